//! The production shape: a three-node rmqtt broker cluster (`wpm broker serve`, child
//! processes), two registry replicas on one PostgreSQL, each on its own node, and devices
//! spread over all three nodes. One broker node is killed (SIGKILL) in the middle of a
//! rollout and started again: every device converges, the rollout completes, and no
//! event a surviving node accepted is missing from the database.

use std::sync::Arc;
use std::time::Duration;
use wpm_integration::{
    cli_binary, example, identity_secret, port_open, postgres_database, shared_data_dir, unique,
    wait_for, Child, Replica,
};

const CONVERGE: Duration = Duration::from_secs(180);
const NODES: u64 = 3;
const DEVICES_PER_NODE: usize = 4;

/// One broker node: its ports stay the same across a restart.
struct Node {
    id: u64,
    devices: u16,
    registry: u16,
    peers: Vec<String>,
    /// Its log (the cluster logs every failed forward while a peer is down).
    log: std::path::PathBuf,
    process: Option<Child>,
}

impl Node {
    fn start(&mut self) -> anyhow::Result<()> {
        let mut cmd = std::process::Command::new(cli_binary()?);
        cmd.args(["broker", "serve"])
            .args(["--listen", &format!("127.0.0.1:{}", self.devices)])
            .args(["--registry-listen", &format!("127.0.0.1:{}", self.registry)])
            .args(["--node-id", &self.id.to_string()])
            .args(["--cluster-listen", &self.peers[self.id as usize - 1]])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.log)?,
            );
        for (i, p) in self.peers.iter().enumerate() {
            cmd.args(["--node", &format!("{}@{p}", i + 1)]);
        }
        self.process = Some(Child(cmd.spawn()?));
        Ok(())
    }

    async fn wait_up(&self) -> anyhow::Result<()> {
        wait_for(
            "a broker node to listen",
            Duration::from_secs(90),
            || async { Ok((port_open(self.devices) && port_open(self.registry)).then_some(())) },
        )
        .await
        .map_err(|e| {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            anyhow::anyhow!(
                "{e}; node {} log, newest first:\n{}",
                self.id,
                tail.join("\n")
            )
        })
    }

    fn device_url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.devices)
    }

    fn registry_url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.registry)
    }
}

/// Three free ports below the kernel's ephemeral range. A node's ports must stay free
/// while it is down, and a device reconnecting to a port in that range on loopback can
/// be given that very port as its own source port (a TCP self-connection), taking it.
fn ports() -> [u16; 3] {
    let mut found = Vec::new();
    while found.len() < 3 {
        let mut b = [0u8; 2];
        getrandom::fill(&mut b).unwrap();
        let port = 20_000 + u16::from_le_bytes(b) % 12_000;
        if !found.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            found.push(port);
        }
    }
    [found[0], found[1], found[2]]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rollout_completes_and_loses_nothing_when_a_broker_node_dies() -> anyhow::Result<()> {
    let cluster_ports = ports();
    let peers: Vec<String> = cluster_ports
        .iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let logs = tempfile::tempdir()?;
    let mut nodes: Vec<Node> = (1..=NODES)
        .map(|id| {
            let [devices, registry, _] = ports();
            Node {
                id,
                devices,
                registry,
                peers: peers.clone(),
                log: logs.path().join(format!("node{id}.log")),
                process: None,
            }
        })
        .collect();
    for n in &mut nodes {
        n.start()?;
    }
    for n in &nodes {
        n.wait_up().await?;
    }

    let db = postgres_database().await?;
    let data = shared_data_dir()?;
    let token = unique("token");
    let share = unique("wpm-registry");
    let replicas = [
        Replica::start(
            data.path(),
            &db,
            &nodes[0].registry_url(),
            &share,
            &token,
            &format!("{share}-a"),
        )?,
        Replica::start(
            data.path(),
            &db,
            &nodes[1].registry_url(),
            &share,
            &token,
            &format!("{share}-b"),
        )?,
    ];
    for r in &replicas {
        r.wait_up().await?;
    }
    let api = replicas[0].api.clone();
    let key = api.public_key().await?;

    // One fleet per node, each counting what its devices publish.
    let group = unique("cluster");
    let mut fleets = Vec::new();
    let mut probes = Vec::new();
    let mut devices_of = Vec::new();
    for n in &nodes {
        let probe = Arc::new(wpm_sim::Probe::default());
        let mut config = wpm_sim::FleetConfig::new(n.device_url(), vec![key], identity_secret());
        config.devices = DEVICES_PER_NODE;
        config.groups = vec![group.clone()];
        config.id_prefix = unique(&format!("node{}", n.id));
        config.tuning.turn_interval_ms = 200;
        config.probe = Some(probe.clone());
        let fleet = api.start_fleet(config).await?;
        devices_of.push(fleet.device_ids().to_vec());
        fleets.push(fleet);
        probes.push(probe);
    }
    let all: Vec<String> = devices_of.iter().flatten().cloned().collect();

    api.publish("hello", "1.0.0", example("hello/v1.wat"))
        .await?
        .ok()?;
    api.publish("hello", "2.0.0", example("hello/v2.wat"))
        .await?
        .ok()?;
    api.deploy("hello", "1.0.0", &group).await?.ok()?;
    api.wait_running(&all, "hello", "1.0.0", CONVERGE).await?;

    // The rollout's canary is out: node 3 dies, with its devices' connections and
    // whatever it held, and comes back 2 s later on the same ports.
    let id = api
        .create_rollout("hello", "2.0.0", &group, &[25, 50, 100], 120)
        .await?;
    api.wait_stage(id, 1, CONVERGE).await?;
    nodes[2].process.take();
    tokio::time::sleep(Duration::from_secs(2)).await;
    nodes[2].start()?;
    nodes[2].wait_up().await?;

    let done = replicas[1]
        .api
        .wait_rollout(id, "completed", CONVERGE)
        .await?;
    assert_eq!(
        done["counts"]["succeeded"],
        all.len(),
        "every device confirmed: {done}"
    );
    api.wait_running(&all, "hello", "2.0.0", CONVERGE).await?;

    // Devices on the surviving nodes: every event they published is in the database,
    // once. (A killed node loses what it had accepted and not yet forwarded; its devices'
    // status comes back with their reconnect, checked above.)
    let survivors: Vec<String> = devices_of[..2].iter().flatten().cloned().collect();
    let published: u64 = probes[..2].iter().map(|p| p.events()).sum();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let stored = loop {
        let mut stored = 0;
        for d in &survivors {
            stored += api.events(d).await?.len() as u64;
        }
        if stored >= published || std::time::Instant::now() > deadline {
            break stored;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(
        stored, published,
        "events stored vs published by devices on surviving nodes"
    );
    for r in &replicas {
        let h = r.api.get("/v1/health").await?.ok()?;
        let refused: u64 = h["ingest"]["refused"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert_eq!(refused, 0, "{h}");
        assert!(
            h["ingest"]["written"].as_u64().unwrap() > 0,
            "both replicas ingest: {h}"
        );
    }
    for f in fleets {
        f.stop().await?;
    }
    Ok(())
}
