//! `wpm bench ingest`: device reports (statuses and events) per second from the broker
//! into the registry's database, with publishers that push as fast as the broker takes
//! them instead of waiting for devices, and the registry's CPU per report.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::{json, Value};

use super::child::{free_port, Cost, OwnMosquitto, RegistryBroker, RegistryChild};
use super::BrokerArgs;
use crate::output::{emit, emit_json};
use crate::GlobalArgs;
use wpm_manifests::{
    DeviceStatus, Event as DeviceEvent, EventKind, KeyPair, ModuleState, ModuleStatus, Report,
    ReportBody, Topic,
};

#[derive(Debug, Args)]
pub struct IngestBenchArgs {
    /// Reports to publish (statuses and events, alternating per device)
    #[arg(long, default_value_t = 100_000)]
    pub records: u64,

    /// Distinct device ids the records are spread over
    #[arg(long, default_value_t = 10_000)]
    pub devices: u64,

    /// Publishing connections
    #[arg(long, default_value_t = 4)]
    pub publishers: u64,

    #[command(flatten)]
    pub broker: BrokerArgs,
}

/// The `counter`th report of a device in the middle of updating its one module, as it
/// sends them: every other one a status whose module moves on (downloading, installed,
/// running, then the next version), and between them the event that moved it. So the
/// registry stores module rows and events as it does in a rollout, not only statuses
/// that repeat. Sealed with the device's key; the topic and whether it is retained.
fn report(device: &str, key: &KeyPair, counter: u64, at_ms: u64) -> (String, Vec<u8>, bool) {
    let step = (counter - 1) / 2;
    let module = "sensor".to_string();
    let version = format!("1.{}.0", step / 3);
    let (body, topic) = if counter % 2 == 1 {
        let state = [
            ModuleState::Downloading,
            ModuleState::Installed,
            ModuleState::Running,
        ][(step % 3) as usize];
        let status = DeviceStatus {
            device: device.to_string(),
            groups: vec!["bench".into()],
            sequence: 7,
            modules: vec![ModuleStatus {
                name: module,
                version,
                sha256: [7u8; 32].into(),
                state,
                last_error: None,
            }],
            slots_used: 1,
            slots_total: 4,
            flash_free: 400_000,
            ram_free: 90_000,
            last_error: None,
            at_ms,
            trust_epoch: None,
        };
        (ReportBody::Status(status), Topic::Status(device))
    } else {
        let kind = if step % 3 == 1 {
            EventKind::Started { module, version }
        } else {
            EventKind::Installed { module, version }
        };
        let event = DeviceEvent {
            device: device.to_string(),
            at_ms,
            kind,
        };
        (ReportBody::Event(event), Topic::Events(device))
    };
    let retain = matches!(body, ReportBody::Status(_));
    let sealed = key.seal(&Report {
        device: device.to_string(),
        counter,
        body,
    });
    (topic.render(), sealed, retain)
}

pub async fn run(global: &GlobalArgs, args: IngestBenchArgs) -> Result<()> {
    let b = &args.broker;
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    let (url, mut own) = match b.broker.as_str() {
        "embedded" => (format!("mqtt://127.0.0.1:{port}"), None),
        "mosquitto" => (
            format!("mqtt://127.0.0.1:{port}"),
            Some(OwnMosquitto::start(port).await?),
        ),
        other => (other.to_string(), None),
    };
    let database = match &b.database {
        Some(url) => Some(super::child::fresh_database(url).await?),
        None => None,
    };
    let registry = RegistryChild::start(
        dir.path(),
        if b.broker == "embedded" {
            RegistryBroker::Embedded { port }
        } else {
            RegistryBroker::External(&url)
        },
        database.as_ref().map(|d| d.url.as_str()),
    )
    .await?;
    let client = &registry.client;
    let written = || async {
        let h = client.get_query("/v1/health", &[]).await?;
        Ok::<_, anyhow::Error>(h["ingest"]["written"].as_u64().unwrap_or(0))
    };
    let before = written().await?;

    let wpm_transport::BrokerUrl {
        host,
        port: mqtt_port,
        ..
    } = url.parse()?;
    let published = Arc::new(AtomicU64::new(0));
    let publishers = args.publishers.max(1);
    let per = args.records / publishers;
    let total = per * publishers;
    let devices = (args.devices / publishers).max(1);
    // The devices are registered and their records sealed before the clock starts: the
    // bench measures the registry, which verifies every seal.
    let keys: Vec<Vec<(String, KeyPair)>> = (0..publishers)
        .map(|p| {
            (0..devices.min(per))
                .map(|i| {
                    let id = format!("ingest-{p}-{i:05}");
                    let key = KeyPair::from_seed(&wpm_manifests::sha256(id.as_bytes()));
                    (id, key)
                })
                .collect()
        })
        .collect();
    let identities: Vec<(String, [u8; 32])> = (keys.iter().flatten())
        .map(|(id, k)| (id.clone(), k.public()))
        .collect();
    crate::commands::identity::register_simulated(client, &identities, &["bench".into()]).await?;
    let records: Vec<Vec<(String, Vec<u8>, bool)>> = keys
        .iter()
        .map(|devices| {
            (0..per)
                .map(|i| {
                    let n = devices.len() as u64;
                    let (id, key) = &devices[scattered(i % n, n) as usize];
                    let at = 1_790_000_000_000 + i;
                    // Each device's records go out in counter order.
                    report(id, key, i / n + 1, at)
                })
                .collect()
        })
        .collect();
    let pid = registry.pid()?;
    let cost = Cost::start(pid, own.as_ref().and_then(OwnMosquitto::pid))?;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (p, records) in records.into_iter().enumerate() {
        let mut o = MqttOptions::new(
            format!("wpm-bench-ingest-{}-{p}", std::process::id()),
            host.clone(),
            mqtt_port,
        );
        o.set_keep_alive(Duration::from_secs(30))
            .set_outgoing_inflight_upper_limit(1000);
        // One connection speaks for many devices: the registry's own login may (the
        // registry still checks every report's seal).
        if let Some((user, password)) = &registry.login {
            o.set_credentials(user.clone(), password.clone());
        }
        let (c, mut ev) = AsyncClient::new(o, 1000);
        let published = published.clone();
        tasks.spawn(async move {
            let driver = tokio::spawn(async move {
                loop {
                    match ev.poll().await {
                        Ok(Event::Incoming(Packet::PubAck(_))) => {
                            published.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(e) => return Err::<(), _>(anyhow::anyhow!("publisher {p}: {e}")),
                    }
                }
            });
            for (topic, payload, retain) in records {
                c.publish(topic, QoS::AtLeastOnce, retain, payload).await?;
            }
            // Keep the connection until the broker acknowledged everything.
            driver.await?
        });
    }
    let mut last = (0, Instant::now());
    let publish_done = loop {
        // A publisher only ends when its connection failed.
        if let Some(ended) = tasks.try_join_next() {
            match ended {
                Ok(Err(e)) => bail!("{e:#}"),
                Ok(Ok(())) => bail!("a publisher ended early"),
                Err(e) => bail!("a publisher task failed: {e}"),
            }
        }
        if published.load(Ordering::Relaxed) >= total {
            break started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let done = loop {
        let w = written().await?.saturating_sub(before);
        if w >= total {
            break started.elapsed();
        }
        if w > last.0 {
            last = (w, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(60) {
            bail!("ingest stuck at {w} of {total} records for 60 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let cpu = cost.since()?;
    tasks.abort_all();
    drop(registry);
    if let Some(b) = own.as_mut() {
        b.kill().await;
    }
    if let Some(d) = database {
        d.drop().await;
    }
    let result = json!({
        "records": total,
        "devices": args.devices,
        "publishers": publishers,
        "broker": b.broker,
        "database": b.database.as_deref().map_or("sqlite", |d| d.split(':').next().unwrap_or("?")),
        "publish_seconds": publish_done.as_secs_f64(),
        "ingest_seconds": done.as_secs_f64(),
        "records_per_second": total as f64 / done.as_secs_f64(),
        "cpu_us_per_record": {
            "registry": cpu.registry * 1e6 / total as f64,
            "database": cpu.database * 1e6 / total as f64,
            "broker": cpu.broker * 1e6 / total as f64,
        },
    });
    if global.json {
        emit_json(&result);
    } else {
        emit(&render(&result));
    }
    Ok(())
}

fn render(r: &Value) -> String {
    format!(
        "{} device reports ({} devices, {} publishers; statuses and events) via {} into {}\n\
         \x20 published and acknowledged by the broker in {:.2} s\n\
         \x20 written by the registry in {:.2} s: {:.0} records/s\n\
         \x20 CPU per record: registry {:.0} µs (SQLite threads {:.0} µs) + broker {:.0} µs",
        r["records"],
        r["devices"],
        r["publishers"],
        r["broker"].as_str().unwrap_or("?"),
        r["database"].as_str().unwrap_or("?"),
        r["publish_seconds"].as_f64().unwrap_or(0.0),
        r["ingest_seconds"].as_f64().unwrap_or(0.0),
        r["records_per_second"].as_f64().unwrap_or(0.0),
        r["cpu_us_per_record"]["registry"].as_f64().unwrap_or(0.0),
        r["cpu_us_per_record"]["database"].as_f64().unwrap_or(0.0),
        r["cpu_us_per_record"]["broker"].as_f64().unwrap_or(0.0),
    )
}

/// The `k`th device of a round over `n`: each device once, in an order that jumps across
/// the fleet as a real fleet's reports do. In id order, a batch's reports would land on
/// neighbouring database pages and hide what a report costs at that fleet size.
fn scattered(k: u64, n: u64) -> u64 {
    // Primes: one of them is coprime with any n, and a coprime stride visits every index.
    let stride = [7919, 7927]
        .into_iter()
        .find(|p| !n.is_multiple_of(*p))
        .unwrap_or(1);
    k * stride % n
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_round_visits_every_device_once_out_of_order() {
        for n in [1u64, 2, 1000, 7919, 10_000] {
            let order: Vec<u64> = (0..n).map(|k| super::scattered(k, n)).collect();
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "n = {n}");
            if n > 2 {
                assert!(order.windows(2).all(|w| w[1] != w[0] + 1), "n = {n}");
            }
        }
    }
}
