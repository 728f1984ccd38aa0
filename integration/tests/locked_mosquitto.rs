//! A Mosquitto locked down as `wpm broker config --mosquitto --password-file --acl-file`
//! writes it, with device logins as `wpm device add --mosquitto-passwd` adds them: the
//! registry logs in with the login the config printed, devices with theirs, a fleet
//! installs a module through it, and no client gets further than its own topics.

use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions, Packet, QoS};
use std::process::Command;
use std::time::Duration;
use wpm_integration::{cli_binary, free_port, unique, Api, Backend, Env, Mqtt, OwnMosquitto};
use wpm_manifests::report::login_password;
use wpm_manifests::KeyPair;

const CONVERGE: Duration = Duration::from_secs(60);

/// Whether the broker at `port` accepts a connection as `client_id` with `login`.
async fn accepted(port: u16, client_id: &str, login: Option<(&str, &str)>) -> bool {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    if let Some((user, password)) = login {
        o.set_credentials(user, password);
    }
    let (_client, mut events) = AsyncClient::new(o, 8);
    loop {
        match tokio::time::timeout(Duration::from_secs(5), events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => return true,
            Ok(Ok(_)) => {}
            Ok(Err(ConnectionError::ConnectionRefused(_))) => return false,
            Ok(Err(e)) => panic!("connecting to the broker: {e}"),
            Err(_) => panic!("no CONNACK"),
        }
    }
}

/// A client logged in as `device`, asking for client id `client_id`: the attacker holding
/// one device's credentials; with the topics of what it receives.
fn device_client(
    port: u16,
    device: &str,
    client_id: &str,
    secret: &[u8; 32],
) -> (AsyncClient, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let key = KeyPair::from_seed(secret);
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_credentials(device, login_password(&key, device));
    let (client, mut events) = AsyncClient::new(o, 64);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(e) = events.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = e {
                let _ = tx.send(p.topic);
            }
        }
    });
    (client, rx)
}

/// Drains `mqtt` for `d`, whatever arrives.
async fn drain(mqtt: &mut Mqtt, d: Duration) {
    let deadline = tokio::time::Instant::now() + d;
    while tokio::time::Instant::now() < deadline {
        let _ = mqtt.next(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_down_mosquitto_serves_the_fleet_and_holds_each_client_to_its_own_topics(
) -> anyhow::Result<()> {
    // The operator's commands: the broker's configuration, ACL and registry login.
    let dir = tempfile::tempdir()?;
    let (port, registry_port) = (free_port(), free_port());
    let (passwd, acl, conf) = (
        dir.path().join("passwd"),
        dir.path().join("acl"),
        dir.path().join("mosquitto.conf"),
    );
    let out = Command::new(cli_binary()?)
        .args(["broker", "config", "--mosquitto", "--no-persistence"])
        .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
        .arg("--registry-listen")
        .arg(format!("127.0.0.1:{registry_port}"))
        .arg("--password-file")
        .arg(&passwd)
        .arg("--acl-file")
        .arg(&acl)
        .arg("--out")
        .arg(&conf)
        .output()?;
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let registry_url = said
        .split("--broker ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("no registry login in {said:?}"))
        .to_string();
    // Mosquitto started as root reads them as its own user, `mosquitto`.
    {
        use std::os::unix::fs::PermissionsExt as _;
        let readable = |mode| std::fs::Permissions::from_mode(mode);
        std::fs::set_permissions(dir.path(), readable(0o755))?;
        std::fs::set_permissions(&passwd, readable(0o644))?;
    }
    let broker = OwnMosquitto::with_config(port, &std::fs::read_to_string(&conf)?)?;

    // The registry logs in on its own listener; devices are registered, and their logins
    // written into the password file as `wpm device add --mosquitto-passwd` does.
    let env = Env::start(Backend::BrokerSqlite(registry_url)).await?;
    let mut config = env.fleet_config(3, &unique("locked"));
    config.broker_url = format!("mqtt://127.0.0.1:{port}");
    env.api.register_fleet(&config).await?;
    let logins: Vec<(String, String)> = (config.identities().into_iter())
        .map(|(id, _)| {
            let key = KeyPair::from_seed(&config.device_key(&id));
            let password = login_password(&key, &id);
            (id, password)
        })
        .collect();
    wpm_registry::external_broker::set_mosquitto_passwords(&passwd, &logins)?;
    broker.reload()?;

    // A fleet installs a module through it.
    let group = config.groups[0].clone();
    let fleet = env.api.start_fleet(config.clone()).await?;
    let devices = fleet.device_ids().to_vec();
    env.api.install_hello(&group, &devices, CONVERGE).await?;

    // Nobody gets in without a login, with another's password, or on the registry's
    // listener as a device.
    let (d0, d1) = (&devices[0], &devices[1]);
    let d0_password = logins[0].1.as_str();
    assert!(!accepted(port, &unique("anon"), None).await);
    assert!(!accepted(port, d1, Some((d1, d0_password))).await);
    assert!(!accepted(registry_port, d0, Some(("wpm-registry", d0_password))).await);

    // The registry's own view of the wire.
    let mut watch = Mqtt::connect_as(
        &format!("mqtt://127.0.0.1:{registry_port}"),
        env.registry.broker_login(),
    )
    .await?;
    watch.subscribe("wpm/v1/#").await?;
    // The retained state arrives before the attack.
    drain(&mut watch, Duration::from_secs(2)).await;

    // With d0's login, asking for d1's client id: it gets d0's, and d1 stays connected.
    let secret = config.device_key(d0);
    let (attacker, mut received) = device_client(port, d0, d1, &secret);
    attacker.subscribe("#", QoS::AtLeastOnce).await?;
    attacker
        .subscribe(format!("wpm/v1/device/{d1}/status"), QoS::AtLeastOnce)
        .await?;
    // Nor through a share group, where it would take reports away from the registry's.
    attacker
        .subscribe(
            "$share/wpm-ingest/wpm/v1/device/+/telemetry",
            QoS::AtLeastOnce,
        )
        .await?;
    let forged = b"forged".to_vec();
    for topic in [
        format!("wpm/v1/device/{d1}/status"),
        format!("wpm/v1/device/{d1}/command"),
        "wpm/v1/deploy/fleet".to_string(),
        format!("wpm/v1/module/{}/manifest", "ab".repeat(32)),
        // Last: its own topic, which the broker lets through (the registry's ingest
        // refuses it: it is not sealed with d0's key).
        format!("wpm/v1/device/{d0}/events"),
    ] {
        attacker
            .publish(topic, QoS::AtLeastOnce, true, forged.clone())
            .await?;
    }
    let mut through = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < deadline {
        let Ok(m) = watch.next(Duration::from_millis(200)).await else {
            continue;
        };
        if m.payload.as_ref() == forged.as_slice() {
            through.push(m.topic.clone());
        }
        assert!(
            m.topic != format!("wpm/v1/device/{d1}/presence"),
            "d1's session was disturbed: {m:?}"
        );
    }
    assert_eq!(through, [format!("wpm/v1/device/{d0}/events")]);
    // Subscribed to everything, it received deployments and modules, but no report of
    // any device (the devices send telemetry every turn), nor any command.
    let mut topics = Vec::new();
    while let Ok(t) = received.try_recv() {
        topics.push(t);
    }
    assert!(
        topics.iter().any(|t| t.starts_with("wpm/v1/module/")),
        "{topics:?}"
    );
    assert!(
        !topics.iter().any(|t| t.starts_with("wpm/v1/device/")),
        "{topics:?}"
    );

    // The fleet is as it was: every device still reports.
    let status = env.api.fleet_status().await?;
    for d in &devices[1..] {
        assert!(
            wpm_integration::device_runs(&status, d, "hello", "1.0.0"),
            "{d}: {status}"
        );
    }
    let health = Api::get(&env.api, "/v1/health").await?.ok()?;
    assert!(
        health["ingest"]["refused"]
            .to_string()
            .contains("not_a_sealed_report"),
        "{health}"
    );

    // Revoked with `--mosquitto-passwd`: the broker no longer lets the device in.
    let d2 = &devices[2];
    let d2_password = logins[2].1.as_str();
    assert!(accepted(port, d2, Some((d2, d2_password))).await);
    let out = Command::new(cli_binary()?)
        .args(["device", "revoke", d2, "--mosquitto-passwd"])
        .arg(&passwd)
        .args([
            "--registry",
            &env.registry.http_url(),
            "--token",
            env.registry.token(),
        ])
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    broker.reload()?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!accepted(port, d2, Some((d2, d2_password))).await);
    fleet.stop().await?;
    Ok(())
}
