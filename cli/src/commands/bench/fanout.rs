//! The raw broker fan-out a rollout is compared with: the same bytes to the same number
//! of clients, without the registry or the device core.
//!
//! * **fetch**: each client reads a module the way a device does (MQTT 5, the device's
//!   QoS and chunk window): the retained manifest, then the retained chunks, subscribing to
//!   a window of them and to the next one as each arrives. The fair comparison for pure
//!   distribution.
//! * **push**: one publisher sends the chunks once to a topic every client subscribed to
//!   beforehand: the broker's best case, shown for reference.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::watch;
use wpm_sim::Tuning;

/// Give up when nothing progressed for this long.
const STALL: Duration = Duration::from_secs(60);

fn qos(q: wpm_sim::Qos) -> QoS {
    match q {
        wpm_sim::Qos::AtMostOnce => QoS::AtMostOnce,
        wpm_sim::Qos::AtLeastOnce => QoS::AtLeastOnce,
    }
}

/// Where the bench's raw clients connect, and the login they use there.
pub struct Broker<'a> {
    pub url: &'a str,
    pub login: Option<&'a (String, String)>,
}

fn options(broker: &Broker<'_>, id: String, max_packet: usize) -> Result<MqttOptions> {
    let wpm_transport::BrokerUrl { host, port, .. } = broker.url.parse()?;
    let mut o = MqttOptions::new(id, host, port);
    if let Some((user, password)) = broker.login {
        o.set_credentials(user.clone(), password.clone());
    }
    o.set_max_packet_size(Some(max_packet as u32))
        .set_keep_alive(Duration::from_secs(Tuning::NRF9160.keep_alive_s.into()))
        // rumqttc sizes its in-flight table by this (65,536 entries by default).
        .set_outgoing_inflight_upper_limit(wpm_sim::PUBLISH_WINDOW);
    Ok(o)
}

/// Waits until `done` reaches `want`, failing when it stalls for [`STALL`] or a client
/// reports an error.
async fn wait_all(
    what: &str,
    done: &AtomicU64,
    want: u64,
    failed: &mut watch::Receiver<Option<String>>,
) -> Result<()> {
    let mut last = (0, Instant::now());
    loop {
        let now = done.load(Ordering::Relaxed);
        if now >= want {
            return Ok(());
        }
        if let Some(e) = failed.borrow_and_update().clone() {
            bail!("{what}: {e}");
        }
        if now > last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > STALL {
            bail!("{what}: stuck at {now} of {want} for {STALL:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `n` clients connected in batches of `batch` (200 ms apart), each driven by `on_event`
/// until the returned tasks are aborted. Waits until all are connected.
async fn connect_clients<F>(
    broker: &Broker<'_>,
    n: usize,
    batch: usize,
    max_packet: usize,
    failed: &watch::Sender<Option<String>>,
    mut make: impl FnMut(usize, AsyncClient) -> F,
) -> Result<tokio::task::JoinSet<()>>
where
    F: FnMut(&AsyncClient, Event) + Send + 'static,
{
    let connected = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let o = options(
            broker,
            format!("wpm-bench-{}-{i}", std::process::id()),
            max_packet,
        )?;
        let (client, mut ev) = AsyncClient::new(o, 64);
        let mut on_event = make(i, client.clone());
        let connected = connected.clone();
        let failed = failed.clone();
        tasks.spawn(async move {
            loop {
                match ev.poll().await {
                    Ok(e) => {
                        if let Event::Incoming(Packet::ConnAck(_)) = e {
                            connected.fetch_add(1, Ordering::Relaxed);
                        }
                        on_event(&client, e);
                    }
                    Err(e) => {
                        let _ = failed.send(Some(format!("client {i}: {e}")));
                        return;
                    }
                }
            }
        });
        if i % batch.max(1) == batch.max(1) - 1 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let mut rx = failed.subscribe();
    wait_all("connecting", &connected, n as u64, &mut rx).await?;
    Ok(tasks)
}

/// Every one of `n` clients fetches `topics` (the module manifest, then the chunks, all
/// retained) with the device's window and QoS. Returns the time from the start signal to
/// the last client holding every topic.
pub async fn fetch(
    broker: &Broker<'_>,
    n: usize,
    topics: Vec<String>,
    tuning: Tuning,
    batch: usize,
    max_packet: usize,
) -> Result<Duration> {
    let (start_tx, start_rx) = watch::channel(false);
    let (failed_tx, mut failed_rx) = watch::channel(None);
    let finished = Arc::new(AtomicU64::new(0));
    let topics = Arc::new(topics);
    let window = tuning.chunk_window.max(1);
    let mut tasks = connect_clients(broker, n, batch, max_packet, &failed_tx, |_, client| {
        let topics = topics.clone();
        let finished = finished.clone();
        let mut start = start_rx.clone();
        // The manifest first, alone, like a device; then the chunks through the window.
        let mut next = 0usize;
        let mut received = 0usize;
        let sub_qos = qos(tuning.subscribe_qos);
        let starter = client.clone();
        let t = topics.clone();
        tokio::spawn(async move {
            if start.wait_for(|s| *s).await.is_ok() {
                let _ = starter.subscribe(t[0].clone(), sub_qos).await;
            }
        });
        move |client: &AsyncClient, e: Event| {
            if let Event::Incoming(Packet::Publish(p)) = e {
                received += 1;
                let _ = client.try_unsubscribe(String::from_utf8_lossy(&p.topic).into_owned());
                if received == topics.len() {
                    finished.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                if next == 0 {
                    next = 1;
                }
                let in_flight = next - received;
                for _ in in_flight..window {
                    if next < topics.len() {
                        let _ = client.try_subscribe(topics[next].clone(), sub_qos);
                        next += 1;
                    }
                }
            }
        }
    })
    .await?;
    let started = Instant::now();
    let _ = start_tx.send(true);
    let result = wait_all("raw fetch fan-out", &finished, n as u64, &mut failed_rx).await;
    let took = started.elapsed();
    tasks.abort_all();
    result.map(|()| took)
}

/// One publisher sends `messages` payloads of `payload` bytes to a topic `n` clients
/// subscribed to. Returns the time from the first publish to the last delivery.
pub async fn push(
    broker: &Broker<'_>,
    n: usize,
    messages: usize,
    payload: usize,
    batch: usize,
) -> Result<Duration> {
    let topic = format!("wpm-bench/push/{}", std::process::id());
    let received = Arc::new(AtomicU64::new(0));
    let subscribed = Arc::new(AtomicU64::new(0));
    let (failed_tx, mut failed_rx) = watch::channel(None);
    let max_packet = payload + 1024;
    let mut tasks = connect_clients(broker, n, batch, max_packet, &failed_tx, |_, _| {
        let received = received.clone();
        let subscribed = subscribed.clone();
        let topic = topic.clone();
        move |client: &AsyncClient, e: Event| match e {
            Event::Incoming(Packet::ConnAck(_)) => {
                let _ = client.try_subscribe(topic.clone(), QoS::AtLeastOnce);
            }
            Event::Incoming(Packet::SubAck(_)) => {
                subscribed.fetch_add(1, Ordering::Relaxed);
            }
            Event::Incoming(Packet::Publish(_)) => {
                received.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    })
    .await?;
    wait_all("push subscriptions", &subscribed, n as u64, &mut failed_rx).await?;
    let o = options(
        broker,
        format!("wpm-bench-pub-{}", std::process::id()),
        max_packet,
    )?;
    let (publisher, mut ev) = AsyncClient::new(o, 64);
    let pub_failed = failed_tx.clone();
    tasks.spawn(async move {
        loop {
            if let Err(e) = ev.poll().await {
                let _ = pub_failed.send(Some(format!("publisher: {e}")));
                return;
            }
        }
    });
    let started = Instant::now();
    let body = vec![0x5au8; payload];
    for _ in 0..messages {
        publisher
            .publish(topic.clone(), QoS::AtLeastOnce, false, body.clone())
            .await
            .context("queueing a push publish")?;
    }
    let want = (n * messages) as u64;
    let result = wait_all("raw push fan-out", &received, want, &mut failed_rx).await;
    let took = started.elapsed();
    tasks.abort_all();
    result.map(|()| took)
}
