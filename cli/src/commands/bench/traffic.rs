//! Counting the traffic between the broker and the devices: a relay that sees every byte
//! and every PUBLISH (any broker), or Mosquitto's own `$SYS` totals.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// Traffic between the broker and the devices.
#[derive(Default)]
pub struct Traffic {
    bytes_to_devices: AtomicU64,
    bytes_from_devices: AtomicU64,
    publishes_to_devices: AtomicU64,
    publishes_from_devices: AtomicU64,
}

impl Traffic {
    /// Bytes to devices, bytes from devices, PUBLISH packets to, from.
    pub fn snapshot(&self) -> [u64; 4] {
        [
            self.bytes_to_devices.load(Ordering::Relaxed),
            self.bytes_from_devices.load(Ordering::Relaxed),
            self.publishes_to_devices.load(Ordering::Relaxed),
            self.publishes_from_devices.load(Ordering::Relaxed),
        ]
    }
}

/// Counts MQTT PUBLISH packets in a byte stream, across reads: it follows the fixed
/// headers (type nibble, remaining length) and skips bodies.
#[derive(Default)]
pub struct PacketCounter {
    header: Vec<u8>,
    skip: usize,
}

impl PacketCounter {
    /// Feeds bytes; returns how many PUBLISH packets started in them.
    pub fn feed(&mut self, mut data: &[u8]) -> u64 {
        let mut publishes = 0;
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            self.header.push(data[0]);
            data = &data[1..];
            // header[0] is the type byte, then 1 to 4 length bytes (7 bits each).
            if self.header.len() >= 2 && self.header.last().is_some_and(|b| b & 0x80 == 0) {
                let len = self.header[1..]
                    .iter()
                    .enumerate()
                    .fold(0usize, |acc, (i, b)| {
                        acc | (usize::from(b & 0x7f) << (7 * i))
                    });
                if self.header[0] >> 4 == 3 {
                    publishes += 1;
                }
                self.skip = len;
                self.header.clear();
            }
        }
        publishes
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    bytes: Arc<Traffic>,
    to_devices: bool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut counter = PacketCounter::default();
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let publishes = counter.feed(&buf[..n]);
        let (b, p) = if to_devices {
            (&bytes.bytes_to_devices, &bytes.publishes_to_devices)
        } else {
            (&bytes.bytes_from_devices, &bytes.publishes_from_devices)
        };
        b.fetch_add(n as u64, Ordering::Relaxed);
        p.fetch_add(publishes, Ordering::Relaxed);
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// Follows Mosquitto's own totals ($SYS, updated every `sys_interval`): bytes and
/// PUBLISH packets the broker sent and received, all clients together.
pub async fn follow_sys(broker: &str, traffic: Arc<Traffic>) -> Result<()> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let wpm_transport::BrokerUrl { host, port, .. } = broker.parse()?;
    let (c, mut ev) = AsyncClient::new(
        MqttOptions::new(format!("wpm-bench-sys-{}", std::process::id()), host, port),
        16,
    );
    tokio::spawn(async move {
        // A restarted broker counts from zero again: (base, last raw value) per topic.
        let mut runs: std::collections::HashMap<String, (u64, u64)> = Default::default();
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = c.try_subscribe("$SYS/broker/bytes/+", QoS::AtMostOnce);
                    let _ = c.try_subscribe("$SYS/broker/publish/messages/+", QoS::AtMostOnce);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let Some(v) = std::str::from_utf8(&p.payload)
                        .ok()
                        .and_then(|t| t.trim().parse::<u64>().ok())
                    else {
                        continue;
                    };
                    let counter = match p.topic.as_str() {
                        "$SYS/broker/bytes/sent" => &traffic.bytes_to_devices,
                        "$SYS/broker/bytes/received" => &traffic.bytes_from_devices,
                        "$SYS/broker/publish/messages/sent" => &traffic.publishes_to_devices,
                        "$SYS/broker/publish/messages/received" => &traffic.publishes_from_devices,
                        _ => continue,
                    };
                    let (base, last) = runs.entry(p.topic.clone()).or_default();
                    if v < *last {
                        *base += *last;
                    }
                    *last = v;
                    counter.store(*base + v, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    Ok(())
}

/// The counting relay: listens on a free port, forwards each connection to `broker`.
pub async fn start_relay(broker: SocketAddr, traffic: Arc<Traffic>) -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((device, _)) = listener.accept().await {
            let traffic = traffic.clone();
            tokio::spawn(async move {
                let Ok(upstream) = TcpStream::connect(broker).await else {
                    return;
                };
                let _ = device.set_nodelay(true);
                let _ = upstream.set_nodelay(true);
                let (dr, dw) = device.into_split();
                let (ur, uw) = upstream.into_split();
                tokio::join!(
                    pump(ur, dw, traffic.clone(), true),
                    pump(dr, uw, traffic, false)
                );
            });
        }
    });
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_publishes_across_reads() {
        // PUBLISH (0x30) with 3 body bytes, PINGRESP (0xd0, 0), PUBLISH with a 200-byte
        // body (length 0xc8 0x01), fed one byte at a time.
        let mut stream = vec![0x30, 3, 1, 2, 3, 0xd0, 0, 0x32, 0xc8, 0x01];
        stream.extend(vec![7u8; 200]);
        let mut c = PacketCounter::default();
        let n: u64 = stream.iter().map(|b| c.feed(std::slice::from_ref(b))).sum();
        assert_eq!(n, 2);
        assert_eq!(PacketCounter::default().feed(&stream), 2);
    }
}
