//! `wpm bench rollout`: a one-shot group deploy and a staged rollout to N simulated
//! devices, measured, next to the raw fan-out of the same bytes by the same broker.
//!
//! Times are split the way an operator reads them:
//!
//! * **distribution**: from the first device accepting the manifest to the last device
//!   having the module installed (verified, committed to flash), as the devices saw it;
//! * **confirmation**: from there until the registry knows every device runs it (health
//!   window passed, report ingested);
//! * **total**: from the API call to the registry knowing every device confirmed.
//!
//! Every report a device publishes is counted on the device side and compared with what
//! the registry wrote: the difference is reported, and a run where it is not zero fails.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::ProgressBar;
use serde_json::{json, Value};

use super::child::{
    free_port, process_cost, raise_fd_limit, Cost, CpuSplit, OwnMosquitto, RegistryBroker,
    RegistryChild,
};
use super::rollout_report::{render, summary_line};
use super::traffic::{follow_sys, start_relay, Traffic};
use super::{fanout, module_of_size, BrokerArgs};
use crate::client::{Client, DeployRequest, PublishOptions};
use crate::output::{emit, emit_json};
use crate::GlobalArgs;
use wpm_manifests::Topic;

#[derive(Debug, Args)]
pub struct RolloutBenchArgs {
    /// Simulated devices (one MQTT connection each)
    #[arg(long, default_value_t = 1000)]
    pub devices: usize,

    /// Size of the module, bytes
    #[arg(long, value_name = "BYTES", default_value_t = 32 * 1024)]
    pub module_size: usize,

    #[command(flatten)]
    pub broker: BrokerArgs,

    /// Kill the broker (SIGKILL) when this rollout stage starts and start it again 2 s
    /// later; only with `--broker mosquitto`, whose retained messages die with it
    #[arg(long, value_name = "STAGE")]
    pub restart_broker_at_stage: Option<u64>,

    /// Rollout stages, cumulative percentages
    #[arg(long, value_delimiter = ',', default_values_t = [1u8, 10, 100])]
    pub stages: Vec<u8>,

    /// Health window of the new versions, in scheduler turns (one turn per second)
    #[arg(long, default_value_t = 1)]
    pub health_turns: u32,

    /// Devices connected per batch (batches 200 ms apart, to spread the connect storm)
    #[arg(long, default_value_t = 500)]
    pub connect_batch: usize,

    /// Give up on a phase that made no progress for this many seconds
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,

    /// Run the whole bench this many times in a row, each on a fresh registry and
    /// broker; the first failure (a hang, a lost report) stops it
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,

    /// Skip the raw fan-out measurements
    #[arg(long)]
    pub no_fanout: bool,
}

pub async fn run(global: &GlobalArgs, args: RolloutBenchArgs) -> Result<()> {
    if args.devices == 0 {
        bail!("--devices must be at least 1");
    }
    let say = |s: &str| {
        if !global.json && !global.quiet {
            eprintln!("{s}");
        }
    };
    let mut results = Vec::new();
    for i in 1..=args.repeat.max(1) {
        if args.repeat > 1 {
            say(&format!("run {i} of {}", args.repeat));
        }
        let r = once(&args, &say)
            .await
            .with_context(|| format!("run {i} of {}", args.repeat.max(1)))?;
        if args.repeat > 1 && !global.json {
            emit(&summary_line(i, &r));
        }
        results.push(r);
    }
    if global.json {
        emit_json(&if results.len() == 1 {
            results.remove(0)
        } else {
            Value::Array(results)
        });
    } else if args.repeat <= 1 {
        emit(&render(&results[0]));
    }
    Ok(())
}

/// How long the registry took to answer fleet summaries: what an operator waits for.
#[derive(Default)]
struct Latencies(std::sync::Mutex<Vec<Duration>>);

impl Latencies {
    /// Median and longest, milliseconds.
    fn summary(&self) -> Value {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        v.sort();
        let ms = |d: Option<&Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
        json!({"median_ms": ms(v.get(v.len() / 2)), "max_ms": ms(v.last()), "calls": v.len()})
    }
}

/// Devices running `name@version` in the registry's view, and devices holding it at all.
async fn version_counts(client: &Client, spec: &str, timing: &Latencies) -> Result<(u64, u64)> {
    let t = Instant::now();
    let s = client
        .get_query("/v1/fleet/status", &[("summary_only", "true".into())])
        .await?;
    timing
        .0
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(t.elapsed());
    let v = &s["summary"]["versions"][spec];
    Ok((
        v["running"].as_u64().unwrap_or(0),
        v["devices"].as_u64().unwrap_or(0),
    ))
}

/// Polls `probe` every 250 ms (a poll is a fleet summary, work for the registry) until
/// it returns true; fails when the value it reports did not change for `stall`.
async fn wait_progress<F, Fut>(what: &str, stall: Duration, mut probe: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(bool, u64)>>,
{
    let mut last = (u64::MAX, Instant::now());
    loop {
        let (done, value) = probe().await?;
        if done {
            return Ok(());
        }
        if value != last.0 {
            last = (value, Instant::now());
        } else if last.1.elapsed() > stall {
            bail!("{what}: stuck at {value} for {stall:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Distribution of `module@version` as the devices saw it: first manifest accepted to
/// last install, seconds.
fn distribution(probe: &wpm_sim::Probe, spec: &str) -> Option<f64> {
    let accepted = probe.milestone("accepted")?;
    let installed = probe.milestone(&format!("installed {spec}"))?;
    Some(installed.last_ms.saturating_sub(accepted.first_ms) as f64 / 1000.0)
}

/// The embedded broker's counters (topic + payload, all clients), from `/v1/health`.
async fn broker_counters(client: &Client) -> Result<Option<Value>> {
    let h = client.get_query("/v1/health", &[]).await?;
    Ok((!h["broker"].is_null()).then(|| h["broker"].clone()))
}

async fn once(args: &RolloutBenchArgs, say: &dyn Fn(&str)) -> Result<Value> {
    let b = &args.broker;
    let embedded = b.broker == "embedded";
    let own = b.broker == "mosquitto";
    let relay = !embedded && !own;
    // The devices' sockets, the broker's (in the registry child for the embedded one),
    // the relay's two per device, the fan-out clients after the devices are gone.
    let fd_limit = raise_fd_limit(args.devices as u64 * if relay { 3 } else { 1 } + 1024)?;
    let dir = tempfile::tempdir()?;
    let mqtt_port = free_port()?;
    let mut own_broker = if own {
        Some(OwnMosquitto::start(mqtt_port).await?)
    } else {
        None
    };
    if args.restart_broker_at_stage.is_some() && own_broker.is_none() {
        bail!("--restart-broker-at-stage needs --broker mosquitto");
    }
    let broker_url = if embedded || own {
        format!("mqtt://127.0.0.1:{mqtt_port}")
    } else {
        b.broker.clone()
    };
    let broker_name = if embedded {
        "embedded".to_string()
    } else if own {
        "mosquitto (own, generated config)".to_string()
    } else {
        broker_url.clone()
    };
    say(&format!(
        "registry child process, broker {broker_name} at {broker_url}; open-file limit {fd_limit}"
    ));
    let database = match &b.database {
        Some(url) => Some(super::child::fresh_database(url).await?),
        None => None,
    };
    let registry = RegistryChild::start(
        dir.path(),
        if embedded {
            RegistryBroker::Embedded { port: mqtt_port }
        } else {
            RegistryBroker::External(&broker_url)
        },
        database.as_ref().map(|d| d.url.as_str()),
    )
    .await?;
    let client = &registry.client;
    let pid = registry.pid()?;

    let traffic = Arc::new(Traffic::default());
    let (device_url, counted_at) = if own {
        follow_sys(&broker_url, traffic.clone()).await?;
        (
            broker_url.clone(),
            "Mosquitto's $SYS totals (wire bytes, all clients, registry included)",
        )
    } else if embedded {
        (
            broker_url.clone(),
            "the embedded broker's counters (topic + payload, all clients, registry included)",
        )
    } else {
        let wpm_transport::BrokerUrl { host, port, .. } = broker_url.parse()?;
        let addr = tokio::net::lookup_host((host.as_str(), port))
            .await?
            .next()
            .with_context(|| format!("cannot resolve {broker_url}"))?;
        let relay = start_relay(addr, traffic.clone()).await?;
        (
            format!("mqtt://{relay}"),
            "a relay between broker and devices (wire bytes, devices only)",
        )
    };
    // $SYS totals lag by up to `sys_interval` (1 s).
    let settle = Duration::from_millis(if own { 1500 } else { 200 });
    let traffic_ref = &traffic;
    let traffic_now = || async move {
        if embedded {
            let c = broker_counters(client).await?;
            Ok::<_, anyhow::Error>(c.map(|c| {
                [
                    c["delivered_bytes"].as_u64().unwrap_or(0),
                    c["received_bytes"].as_u64().unwrap_or(0),
                    c["delivered"].as_u64().unwrap_or(0),
                    c["received"].as_u64().unwrap_or(0),
                ]
            }))
        } else {
            Ok(Some(traffic_ref.snapshot()))
        }
    };

    let name = "bench";
    let v1 = module_of_size(args.module_size, 1)?;
    let v2 = module_of_size(args.module_size, 2)?;
    let v2_sha = wpm_manifests::sha256(&v2);
    let hidden = ProgressBar::hidden();
    // The module has no linear memory; a small limit keeps its slot cost inside the
    // default RAM budget.
    let opts = PublishOptions {
        memory_limit: Some(4096),
        ..PublishOptions::default()
    };
    client.publish(name, "1.0.0", &opts, v1, &hidden).await?;
    let published = client.publish(name, "2.0.0", &opts, v2, &hidden).await?;
    let chunks = published.module.chunks as usize;
    let chunk_size = published.module.chunk_size.unwrap_or(2048) as usize;

    let group = format!("bench{}", std::process::id());
    let probe = Arc::new(wpm_sim::Probe::default());
    let stall = Duration::from_secs(args.timeout);
    let timing = Latencies::default();
    let timing = &timing;
    let secret = wpm_registry::keys::random_bytes()?;
    let configs: Vec<wpm_sim::FleetConfig> = (0..args.devices)
        .step_by(args.connect_batch.max(1))
        .enumerate()
        .map(|(i, start)| {
            let mut c = wpm_sim::FleetConfig::new(device_url.clone(), vec![registry.key], secret);
            c.devices = args.connect_batch.min(args.devices - start);
            c.groups = vec![group.clone()];
            c.id_prefix = format!("bench-{i:03}");
            c.flash_size = 256 * 1024;
            c.probe = Some(probe.clone());
            c
        })
        .collect();
    // The whole fleet in one registration, as `wpm device import` of a production batch.
    let identities: Vec<_> = configs.iter().flat_map(|c| c.identities()).collect();
    crate::commands::identity::register_simulated(
        client,
        &identities,
        std::slice::from_ref(&group),
    )
    .await?;
    let started = Instant::now();
    let mut fleets = Vec::new();
    for c in configs {
        fleets.push(wpm_sim::Fleet::start(c).await?);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let group_ref = &group;
    wait_progress("devices coming online", stall, || async move {
        let s = client
            .get_query(
                "/v1/fleet/status",
                &[
                    ("group", group_ref.clone()),
                    ("summary_only", "true".into()),
                ],
            )
            .await?;
        let online = s["summary"]["online"].as_u64().unwrap_or(0);
        Ok((online as usize >= args.devices, online))
    })
    .await?;
    say(&format!(
        "{} devices online in {:.1?}",
        args.devices,
        started.elapsed()
    ));

    // Phase 1: a one-shot group deploy of v1.
    probe.reset_milestones();
    let cost = Cost::start(pid, own_broker.as_ref().and_then(OwnMosquitto::pid))?;
    let sent_before = probe.tally();
    let t = Instant::now();
    let t_unix = unix_ms();
    client
        .deploy(&DeployRequest {
            module: name.into(),
            version: "1.0.0".into(),
            group: Some(group.clone()),
            device: None,
            health_turns: Some(args.health_turns),
            health_seconds: None,
        })
        .await?;
    // The devices say when they run it; only then ask the registry (a fleet summary is
    // work for it, and an operator does not poll one four times a second).
    let probe_ref = &probe;
    wait_progress("devices running bench@1.0.0", stall, || async move {
        let n = probe_ref
            .milestone("running bench@1.0.0")
            .map_or(0, |m| m.devices);
        Ok((n as usize >= args.devices, n))
    })
    .await?;
    wait_progress(
        "the registry confirming bench@1.0.0",
        stall,
        || async move {
            let (running, _) = version_counts(client, "bench@1.0.0", timing).await?;
            Ok((running as usize >= args.devices, running))
        },
    )
    .await?;
    let deploy_total = t.elapsed().as_secs_f64();
    let deploy_distribution = distribution(&probe, "bench@1.0.0").unwrap_or(0.0);
    let deploy_confirmation = probe.milestone("installed bench@1.0.0").map_or(0.0, |m| {
        deploy_total - m.last_ms.saturating_sub(t_unix) as f64 / 1000.0
    });
    let deploy_cpu = cost.since()?;
    let deploy_reports = probe.tally().since(&sent_before);
    say(&format!(
        "one-shot deploy of v1: {deploy_total:.1} s (distribution {deploy_distribution:.1} s)"
    ));

    // Phase 2: a staged rollout of v2.
    tokio::time::sleep(settle).await;
    let before = traffic_now().await?;
    probe.reset_milestones();
    let cost = Cost::start(pid, own_broker.as_ref().and_then(OwnMosquitto::pid))?;
    let sent_before = probe.tally();
    let t = Instant::now();
    let r = client
        .post_json(
            "/v1/rollouts",
            &json!({"module": name, "version": "2.0.0", "group": group, "stages": args.stages,
                    "max_failure_pct": 10, "stage_timeout_s": args.timeout,
                    "health_turns": args.health_turns}),
        )
        .await?;
    let id = r["id"].as_i64().context("no rollout id")?;
    let mut stage_times = Vec::new();
    let mut stage_seen = 0;
    let mut last_change = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let r = client
            .get_query(
                &format!("/v1/rollouts/{id}"),
                &[("devices", "false".into())],
            )
            .await?;
        let stage = r["stage"].as_u64().unwrap_or(0);
        if stage > stage_seen {
            stage_seen = stage;
            last_change = Instant::now();
            stage_times.push(t.elapsed());
            say(&format!("  stage {stage} started at {:.1?}", t.elapsed()));
            if let (Some(b), Some(at)) = (own_broker.as_mut(), args.restart_broker_at_stage) {
                if at == stage {
                    b.kill().await;
                    say("  broker killed; restarting it in 2 s");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    b.restart().await?;
                }
            }
        }
        match r["state"].as_str() {
            Some("completed") => break,
            Some("rolled_back") => bail!("the rollout was rolled back: {}", r["reason"]),
            _ if last_change.elapsed() > stall => {
                bail!("rollout made no progress for {stall:?}: {r}")
            }
            _ => {}
        }
    }
    let rollout_total = t.elapsed().as_secs_f64();
    // Nothing left half-way: v1 leaves each device's flash once v2 is confirmed.
    wait_progress("devices dropping bench@1.0.0", stall, || async move {
        let (_, old) = version_counts(client, "bench@1.0.0", timing).await?;
        Ok((old == 0, old))
    })
    .await?;
    let rollout_distribution = distribution(&probe, "bench@2.0.0").unwrap_or(0.0);
    let rollout_cpu = cost.since()?;
    let rollout_reports = probe.tally().since(&sent_before);
    tokio::time::sleep(settle).await;
    let after = traffic_now().await?;
    let peak_mem = process_cost(pid)?.peak_rss;

    // Every report the devices sent must be in the database.
    for f in fleets {
        f.stop().await?;
    }
    let sent = probe.sent();
    let last_health = std::cell::RefCell::new(Value::Null);
    let cell = &last_health;
    let settled = wait_progress("ingest settling", Duration::from_secs(30), || async move {
        let h = client.get_query("/v1/health", &[]).await?["ingest"].clone();
        let done = accounted(&h);
        *cell.borrow_mut() = h;
        Ok((done >= sent, done))
    })
    .await;
    let ingest = last_health.into_inner();
    let accounted_for = accounted(&ingest);
    let broker_drops = broker_counters(client).await?.map(|c| c["dropped"].clone());
    let lost = sent.saturating_sub(accounted_for);
    let link_drops = probe.link_drops();

    let mut fanouts = json!(null);
    if !args.no_fanout {
        say("raw broker fan-out of the same bytes…");
        let mut topics = vec![Topic::ModuleManifest(&v2_sha).render()];
        topics.extend((0..chunks as u32).map(|i| Topic::Chunk(&v2_sha, i).render()));
        let raw = fanout::Broker {
            url: &broker_url,
            login: registry.login.as_ref(),
        };
        let fetch = fanout::fetch(
            &raw,
            args.devices,
            topics,
            wpm_sim::Tuning::NRF9160,
            args.connect_batch,
            64 * 1024,
        )
        .await?;
        let push = fanout::push(
            &raw,
            args.devices,
            chunks,
            chunk_size + 48,
            args.connect_batch,
        )
        .await?;
        fanouts = json!({
            "fetch_seconds": fetch.as_secs_f64(),
            "push_seconds": push.as_secs_f64(),
        });
    }
    drop(registry);
    if let Some(mut b) = own_broker {
        b.kill().await;
    }
    if let Some(d) = database {
        d.drop().await;
    }

    let per_k = |cpu: CpuSplit, of: u64| {
        let k = of.max(1) as f64 / 1000.0;
        json!({"registry": cpu.registry / k, "database": cpu.database / k, "broker": cpu.broker / k})
    };
    let per_device = |t: &wpm_sim::Tally| {
        let n = args.devices.max(1) as f64;
        let events: serde_json::Map<String, Value> = (t.event_kinds.iter())
            .map(|(k, v)| (k.to_string(), json!(*v as f64 / n)))
            .collect();
        json!({"status": t.status as f64 / n, "presence": t.presence as f64 / n,
               "telemetry": t.telemetry as f64 / n, "events": events})
    };
    let diff = |i: usize| match (before, after) {
        (Some(b), Some(a)) => json!(a[i].saturating_sub(b[i])),
        _ => Value::Null,
    };
    let result = json!({
        "devices": args.devices,
        "module_size": args.module_size,
        "broker": broker_name,
        "database": b.database.as_deref().map_or("sqlite", |d| d.split(':').next().unwrap_or("?")),
        "stages": args.stages,
        "health_turns": args.health_turns,
        "deploy": {
            "total_seconds": deploy_total,
            "distribution_seconds": deploy_distribution,
            "confirmation_seconds": deploy_confirmation,
            "reports": deploy_reports.total(),
            "reports_per_device": per_device(&deploy_reports),
            "cpu_seconds_per_1000_devices": per_k(deploy_cpu, args.devices as u64),
            "cpu_seconds_per_1000_reports": per_k(deploy_cpu, deploy_reports.total()),
        },
        "rollout": {
            "total_seconds": rollout_total,
            "distribution_seconds": rollout_distribution,
            "stage_start_seconds": stage_times.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
            "reports": rollout_reports.total(),
            "reports_per_device": per_device(&rollout_reports),
            "cpu_seconds_per_1000_devices": per_k(rollout_cpu, args.devices as u64),
            "cpu_seconds_per_1000_reports": per_k(rollout_cpu, rollout_reports.total()),
        },
        "raw_fanout": fanouts,
        "ratios": {
            "deploy_distribution_over_fetch": fanouts["fetch_seconds"].as_f64().map(|f| deploy_distribution / f),
            "deploy_distribution_over_push": fanouts["push_seconds"].as_f64().map(|f| deploy_distribution / f),
        },
        "reports": {
            "sent_by_devices": sent,
            "written_or_refused_by_registry": accounted_for,
            "lost": lost,
            // Beyond what devices sent: last wills of connections that dropped.
            "extra": accounted_for.saturating_sub(sent),
            "device_link_drops": link_drops,
            "ingest": ingest,
            "broker_dropped": broker_drops,
        },
        "rollout_traffic": {
            "counted_at": counted_at,
            "to_devices": {"messages": diff(2), "bytes": diff(0)},
            "from_devices": {"messages": diff(3), "bytes": diff(1)},
        },
        "registry_peak_rss_bytes": peak_mem,
        "fleet_summary_latency": timing.summary(),
    });
    if let Err(e) = settled {
        bail!("{e:#}: {lost} of {sent} device reports never reached the database\n{result:#}");
    }
    Ok(result)
}

/// Reports the registry has dealt with: written, or refused with a counted reason.
fn accounted(ingest: &Value) -> u64 {
    let refused: u64 = ingest["refused"]
        .as_object()
        .map(|m| m.values().filter_map(Value::as_u64).sum())
        .unwrap_or(0);
    ingest["written"].as_u64().unwrap_or(0) + refused
}
