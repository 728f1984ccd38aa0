//! `wpm bench ingest`: status records per second from the broker into the registry's
//! database, with publishers that push as fast as the broker takes them instead of
//! waiting for devices.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Args;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::{json, Value};

use super::child::{free_port, OwnMosquitto, RegistryBroker, RegistryChild};
use super::BrokerArgs;
use crate::output::{emit, emit_json};
use crate::GlobalArgs;
use wpm_manifests::{DeviceStatus, KeyPair, ModuleState, ModuleStatus, Report, ReportBody, Topic};

#[derive(Debug, Args)]
pub struct IngestBenchArgs {
    /// Status records to publish
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

/// A status record as a device with one running module sends it: sealed with the
/// device's key, numbered `counter`.
fn status(device: &str, key: &KeyPair, counter: u64, at_ms: u64) -> Vec<u8> {
    let status = DeviceStatus {
        device: device.to_string(),
        groups: vec!["bench".into()],
        sequence: 7,
        modules: vec![ModuleStatus {
            name: "sensor".into(),
            version: "1.4.2".into(),
            sha256: [7u8; 32].into(),
            state: ModuleState::Running,
            last_error: None,
        }],
        slots_used: 1,
        slots_total: 4,
        flash_free: 400_000,
        ram_free: 90_000,
        last_error: None,
        at_ms,
    };
    key.seal(&Report {
        device: device.to_string(),
        counter,
        body: ReportBody::Status(status),
    })
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
    let records: Vec<Vec<(String, Vec<u8>)>> = keys
        .iter()
        .map(|devices| {
            (0..per)
                .map(|i| {
                    let (id, key) = &devices[(i % devices.len() as u64) as usize];
                    let at = 1_790_000_000_000 + i;
                    // Each device's records go out in counter order.
                    (Topic::Status(id).render(), status(id, key, i + 1, at))
                })
                .collect()
        })
        .collect();
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
            for (topic, payload) in records {
                c.publish(topic, QoS::AtLeastOnce, true, payload).await?;
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
        "{} status records ({} devices, {} publishers) via {} into {}\n\
         \x20 published and acknowledged by the broker in {:.2} s\n\
         \x20 written by the registry in {:.2} s: {:.0} records/s",
        r["records"],
        r["devices"],
        r["publishers"],
        r["broker"].as_str().unwrap_or("?"),
        r["database"].as_str().unwrap_or("?"),
        r["publish_seconds"].as_f64().unwrap_or(0.0),
        r["ingest_seconds"].as_f64().unwrap_or(0.0),
        r["records_per_second"].as_f64().unwrap_or(0.0),
    )
}
