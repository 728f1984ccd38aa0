//! `wpm demo`: the whole system on one machine in one command. Starts the registry
//! in-process (embedded broker, SQLite in the data dir), N simulated devices trusting its key,
//! publishes and deploys the hello module, then shows fleet status and module telemetry
//! until Ctrl-C. Everything here uses the same public paths an operator would.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

use crate::client::{Client, DeployRequest, PublishOptions};
use crate::commands::{deploy, fleet, publish, sim};
use crate::output::{emit, now_ms};
use crate::GlobalArgs;
use wpm_manifests::{Report, ReportBody, TrustedKeys};

/// The example module, built into the binary so `wpm demo` works from any directory.
const HELLO_WAT: &str = include_str!("../../../examples/hello/v1.wat");
const DEMO_GROUP: &str = "demo";

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How many simulated devices to start
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub devices: usize,

    /// Registry data directory (SQLite database, signing key, API token, device flash)
    #[arg(long, value_name = "DIR", default_value = "./wpm-data")]
    pub data_dir: PathBuf,

    /// Registry HTTP listen address
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8470")]
    pub http: std::net::SocketAddr,

    /// Embedded MQTT broker listen address
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:1884")]
    pub mqtt: std::net::SocketAddr,

    /// Seconds between fleet status tables (and between telemetry lines of one module)
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    pub every: u64,
}

/// Each device's key, to open its reports with.
type DeviceKeys = HashMap<String, TrustedKeys>;

fn device_keys(identities: &[(String, [u8; 32])]) -> DeviceKeys {
    (identities.iter())
        .map(|(id, key)| (id.clone(), TrustedKeys::new(&[*key])))
        .collect()
}

/// Telemetry is bytes as the module sent them, sealed by the device: shown (text as
/// text, anything else as hex) only if the device's key opens it.
fn telemetry_line(topic: &str, payload: &[u8], keys: &DeviceKeys) -> Option<String> {
    match wpm_manifests::topic::parse_device_topic(topic)? {
        wpm_manifests::topic::DeviceTopic::Telemetry(device, module) => {
            let report: Report = keys.get(device)?.open(payload).ok()?;
            let ReportBody::Telemetry(bytes) = report.body else {
                return None;
            };
            if report.device != device {
                return None;
            }
            let body = match std::str::from_utf8(&bytes) {
                Ok(s) if !s.chars().any(|c| c.is_control() && c != '\n') => s.trim().to_string(),
                _ => format!("0x{}", hex::encode(&bytes[..])),
            };
            Some(format!("[telemetry] {device} {module}: {body}"))
        }
        _ => None,
    }
}

/// Prints module telemetry straight from the broker. hello sends a record every scheduler
/// turn on every device, so one line per device and module per `every` keeps the fleet
/// table readable.
async fn watch_telemetry(
    broker_url: String,
    login: Option<(String, String)>,
    every: Duration,
    keys: DeviceKeys,
) -> Result<()> {
    let wpm_transport::BrokerUrl { host, port, .. } = broker_url.parse()?;
    let mut opts = MqttOptions::new(format!("wpm-demo-watch-{}", std::process::id()), host, port);
    // Every device's telemetry: the registry's own login reads it.
    if let Some((user, password)) = login {
        opts.set_credentials(user, password);
    }
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(opts, 64);
    let filter = wpm_manifests::TopicFilter::AllTelemetry.render();
    let mut last_shown: HashMap<String, Instant> = HashMap::new();
    loop {
        match events.poll().await {
            // Subscribe on every (re)connect: a clean session forgets subscriptions.
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                client
                    .subscribe(filter.clone(), QoS::AtMostOnce)
                    .await
                    .context("cannot subscribe to telemetry")?;
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let due = last_shown
                    .get(&p.topic)
                    .is_none_or(|at| at.elapsed() >= every);
                if due {
                    if let Some(line) = telemetry_line(&p.topic, &p.payload, &keys) {
                        emit(&line);
                        last_shown.insert(p.topic.clone(), Instant::now());
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("telemetry watcher: {e}; reconnecting");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

fn instructions(http_url: &str, token: &str, data_dir: &Path, first_device: &str) -> String {
    // Without flags, wpm finds the token only in ./wpm-data/api-token.
    let plain = |p: &Path| -> Vec<PathBuf> {
        p.components()
            .filter(|c| !matches!(c, std::path::Component::CurDir))
            .map(|c| PathBuf::from(c.as_os_str()))
            .collect()
    };
    let token_dir = Path::new(crate::config::LOCAL_TOKEN_FILE)
        .parent()
        .unwrap_or(Path::new(""));
    let default_dir = plain(data_dir) == plain(token_dir);
    let token_note = if default_dir {
        "from this directory wpm finds the token by itself; elsewhere, export it"
    } else {
        "export the token"
    };
    [
        String::new(),
        format!("The registry is at {http_url}. In another terminal ({token_note}):"),
        String::new(),
        format!("  export WPM_REGISTRY={http_url}"),
        format!("  export WPM_TOKEN={token}"),
        "  wpm fleet status".into(),
        "  wpm publish my-module.wat --name my-module --version 0.1.0".into(),
        format!("  wpm deploy my-module@0.1.0 --group {DEMO_GROUP}"),
        format!("  wpm device events {first_device}"),
        String::new(),
        "Ctrl-C stops everything.".into(),
    ]
    .join("\n")
}

pub async fn run(global: &GlobalArgs, args: DemoArgs) -> Result<()> {
    if args.devices == 0 {
        bail!("--devices must be at least 1");
    }
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create data dir {}", args.data_dir.display()))?;

    let mut config = wpm_registry::Config::new(args.data_dir.clone());
    config.http = args.http;
    config.mqtt_listen = args.mqtt;
    let registry = wpm_registry::Registry::start(config)
        .await
        .with_context(|| {
            format!(
                "cannot start the registry on {} / {} (another `wpm demo` or `wpm registry serve` \
             running? pick other ports with --http and --mqtt)",
                args.http, args.mqtt
            )
        })?;
    let http_url = registry.http_url().to_string();
    let mqtt_url = registry.mqtt_url().to_string();
    let token = registry.token().to_string();
    let public_key: [u8; 32] = registry.public_key();
    emit(&format!(
        "registry up: HTTP {http_url}, MQTT {mqtt_url}, data in {}",
        args.data_dir.display()
    ));

    let every = Duration::from_secs(args.every.max(1));

    let cfg = sim::fleet_config(
        mqtt_url.clone(),
        vec![public_key],
        sim::identity_secret(&args.data_dir.join("sim"))?,
        vec![DEMO_GROUP.to_string()],
        DEMO_GROUP.to_string(),
        args.devices,
        None,
        Some(args.data_dir.join("sim")),
    );
    let client = Client::with(&http_url, Some(token.clone()))?;
    sim::register(&client, &cfg).await?;
    let keys = device_keys(&cfg.identities());
    let telemetry = tokio::spawn(watch_telemetry(
        mqtt_url.clone(),
        registry.broker_login(),
        every,
        keys,
    ));
    let sim_fleet = wpm_sim::Fleet::start(cfg)
        .await
        .context("cannot start the simulated devices")?;
    emit(&format!(
        "{} simulated devices in group {DEMO_GROUP}: {}",
        args.devices,
        sim_fleet.device_ids().join(", ")
    ));

    let wasm = publish::wat_to_wasm(HELLO_WAT, Path::new("examples/hello/v1.wat"))?;
    let published = publish::publish_bytes(
        &client,
        "hello",
        "1.0.0",
        &PublishOptions::default(),
        wasm,
        true,
    )
    .await?;
    emit(&publish::describe(&published));
    let req = DeployRequest {
        module: "hello".into(),
        version: "1.0.0".into(),
        group: Some(DEMO_GROUP.into()),
        device: None,
        health_turns: None,
        health_seconds: None,
    };
    let (deployment, _) = deploy::deploy(&client, &req).await?;
    emit(&deploy::describe("hello@1.0.0", &deployment));
    let first_device = sim_fleet.device_ids().first().cloned().unwrap_or_default();
    emit(&instructions(
        &http_url,
        &token,
        &args.data_dir,
        &first_device,
    ));

    let mut tick = tokio::time::interval(every);
    // One Ctrl-C future for the whole loop: a fresh one per iteration would miss a signal
    // that arrives while the status request is in flight.
    let ctrl_c = super::shutdown_signal();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                match client.fleet_status(&[]).await {
                    Ok((fs, _)) => {
                        let now = now_ms();
                        let mut text = String::from("\n");
                        if !fs.devices.is_empty() {
                            text.push_str(&fleet::render_table(&fs.devices, now));
                        }
                        text.push_str(&fleet::summary(&fs.devices));
                        emit(&text);
                    }
                    Err(e) => tracing::warn!("fleet status: {e:#}"),
                }
            }
            r = &mut ctrl_c => {
                r?;
                break;
            }
        }
    }
    if !global.quiet {
        emit("stopping...");
    }
    telemetry.abort();
    sim_fleet
        .stop()
        .await
        .context("a simulated device failed while stopping")?;
    registry
        .shutdown()
        .await
        .context("the registry did not shut down cleanly")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_example_assembles() {
        let wasm = publish::wat_to_wasm(HELLO_WAT, Path::new("examples/hello.wat")).unwrap();
        assert_eq!(&wasm[..4], b"\0asm");
    }

    #[test]
    fn instructions_mention_the_token_file_only_when_it_applies() {
        let t = instructions("http://h:1", "tok", Path::new("./wpm-data"), "demo-0000");
        assert!(t.contains("\n  export WPM_TOKEN=tok\n"), "{t}");
        assert!(t.contains("finds the token by itself"), "{t}");
        assert!(t.contains("  wpm device events demo-0000"), "{t}");
        let t = instructions("http://h:1", "tok", Path::new("/tmp/x"), "demo-0000");
        assert!(!t.contains("by itself"), "{t}");
    }

    #[test]
    fn telemetry_lines_show_only_what_the_device_sealed() {
        let key = wpm_manifests::KeyPair::from_seed(&[5; 32]);
        let keys = device_keys(&[("demo-0".into(), key.public())]);
        let sealed = |device: &str, bytes: &[u8]| {
            key.seal(&Report {
                device: device.into(),
                counter: 1,
                body: ReportBody::Telemetry(bytes.to_vec().into()),
            })
        };
        let topic = "wpm/v1/device/demo-0/telemetry/hello";
        assert_eq!(
            telemetry_line(topic, &sealed("demo-0", b"hi 3"), &keys).unwrap(),
            "[telemetry] demo-0 hello: hi 3"
        );
        assert_eq!(
            telemetry_line(topic, &sealed("demo-0", &[0, 1]), &keys).unwrap(),
            "[telemetry] demo-0 hello: 0x0001"
        );
        assert!(telemetry_line(topic, b"hi 3", &keys).is_none());
        let forged = wpm_manifests::KeyPair::from_seed(&[6; 32]).seal(&Report {
            device: "demo-0".into(),
            counter: 1,
            body: ReportBody::Telemetry(b"lies".to_vec().into()),
        });
        assert!(telemetry_line(topic, &forged, &keys).is_none());
        assert!(telemetry_line("wpm/v1/device/demo-0/status", b"x", &keys).is_none());
    }
}
