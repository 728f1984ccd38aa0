//! TLS end to end: the registry serves its API as HTTPS and its embedded broker's device
//! listener as MQTT over TLS, with one certificate; the CLI and simulated devices trust
//! it through a CA file, and what speaks in the clear or trusts another CA gets nowhere.

use anyhow::{bail, Result};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use wpm_integration::{cli_binary, example, free_port, identity_secret, unique, Api};
use wpm_transport::TlsFiles;

/// A self-signed certificate for `localhost` and 127.0.0.1, written to `dir`.
fn self_signed(dir: &Path) -> Result<TlsFiles> {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let c = rcgen::generate_simple_self_signed(names)?;
    let files = TlsFiles {
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(&files.cert, c.cert.pem())?;
    std::fs::write(&files.key, c.signing_key.serialize_pem())?;
    Ok(files)
}

/// What an anonymous MQTT client with `transport` gets from `port` within 10 s: a
/// CONNACK accepting it, or the error that ended the attempt.
async fn connect(port: u16, transport: rumqttc::Transport) -> Result<Result<(), String>> {
    use rumqttc::v5::{mqttbytes::v5::Packet, AsyncClient, Event, MqttOptions};
    let mut opts = MqttOptions::new(unique("probe"), "127.0.0.1", port);
    opts.set_transport(transport);
    let (_client, mut events) = AsyncClient::new(opts, 8);
    let poll = async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(format!("{e:?}")),
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(10), poll).await {
        Ok(got) => Ok(got),
        Err(_) => bail!("no CONNACK and no error from port {port} within 10 s"),
    }
}

fn wpm(args: &[&str]) -> Result<std::process::Output> {
    Ok(Command::new(cli_binary()?).args(args).output()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_and_device_broker_speak_tls_and_refuse_the_clear_and_other_cas() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let files = self_signed(dir.path())?;
    let stranger_dir = tempfile::tempdir()?;
    let stranger = self_signed(stranger_dir.path())?;
    let mqtt_port = free_port();
    let mut config = wpm_registry::Config::new(dir.path().join("data"));
    config.http = "127.0.0.1:0".parse()?;
    config.mqtt_listen = format!("127.0.0.1:{mqtt_port}").parse()?;
    config.tls = Some(files.clone());
    let registry = wpm_registry::Registry::start(config).await?;
    let url = registry.http_url();
    assert!(url.starts_with("https://"), "{url}");
    assert_eq!(
        registry.mqtt_url(),
        format!("mqtts://127.0.0.1:{mqtt_port}")
    );
    let token = registry.token().to_string();
    let ca = files.cert.to_str().unwrap();

    // The CLI over HTTPS, trusting the registry's certificate through --ca-file.
    let module = dir.path().join("hello.wasm");
    std::fs::write(&module, example("hello/v1.wat"))?;
    let out = wpm(&[
        "publish",
        module.to_str().unwrap(),
        "--name",
        "hello",
        "--version",
        "1.0.0",
        "--registry",
        &url,
        "--token",
        &token,
        "--ca-file",
        ca,
    ])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without it (or with another CA) the registry's certificate is refused.
    let stranger_ca = stranger.cert.to_str().unwrap();
    for extra in [&[][..], &["--ca-file", stranger_ca][..]] {
        let mut args = vec!["modules", "list", "--registry", &url, "--token", &token];
        args.extend_from_slice(extra);
        let out = wpm(&args)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            stderr.to_lowercase().contains("certificate") || stderr.contains("no trusted"),
            "{stderr}"
        );
    }
    // Plain HTTP on the HTTPS port gets no answer from the API.
    let plain = url.replacen("https://", "http://", 1);
    let r = reqwest::get(format!("{plain}/v1/health")).await;
    assert!(r.map(|r| !r.status().is_success()).unwrap_or(true));

    // Devices over MQTT with TLS: they install what the registry deploys.
    let api = Api::with_ca(url.clone(), token.clone(), &files.cert)?;
    let group = unique("tls");
    let mut fleet = wpm_sim::FleetConfig::new(
        registry.mqtt_url(),
        vec![registry.public_key()],
        identity_secret(),
    );
    fleet.broker_ca = Some(files.cert.clone());
    fleet.devices = 2;
    fleet.groups = vec![group.clone()];
    fleet.id_prefix = unique("tls-dev");
    fleet.tuning.turn_interval_ms = 200;
    let fleet = api.start_fleet(fleet).await?;
    let devices = fleet.device_ids().to_vec();
    api.deploy("hello", "1.0.0", &group).await?.ok()?;
    api.wait_running(&devices, "hello", "1.0.0", Duration::from_secs(60))
        .await?;

    // The device listener refuses MQTT in the clear and clients that trust another CA
    // before MQTT begins; one that trusts the registry's certificate gets as far as the
    // broker's login check, which refuses it (it has no login).
    let clear = connect(mqtt_port, rumqttc::Transport::tcp()).await?;
    assert!(
        clear
            .as_ref()
            .is_err_and(|e| !e.contains("ConnectionRefused")),
        "{clear:?}"
    );
    let other = wpm_transport::client_config(Some(&stranger.cert))?;
    let other = rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(other));
    let refused = connect(mqtt_port, other).await?;
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("Tls")),
        "{refused:?}"
    );
    let ours = "mqtts://127.0.0.1:1".parse::<wpm_transport::BrokerUrl>()?;
    let anonymous = connect(mqtt_port, ours.transport(Some(&files.cert))?).await?;
    assert!(
        anonymous
            .as_ref()
            .is_err_and(|e| e.contains("ConnectionRefused")),
        "{anonymous:?}"
    );

    fleet.stop().await?;
    registry.shutdown().await
}
