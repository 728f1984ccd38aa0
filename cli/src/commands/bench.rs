//! `wpm bench rollout`: a staged rollout to N simulated devices, measured, next to the raw
//! fan-out of the same bytes by the same broker.
//!
//! The registry runs as a child process (`wpm registry serve`) so its CPU time and peak
//! memory can be read from /proc without counting the simulated devices. The devices run
//! in this process and reach the broker through a counting TCP relay, which sees every
//! byte and every PUBLISH between the broker and the fleet.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use indicatif::ProgressBar;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use crate::client::{Client, DeployRequest, PublishOptions};
use crate::output::{emit, emit_json, human_size};
use crate::GlobalArgs;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Roll a module out to simulated devices; print time, broker traffic, registry cost
    #[command(after_help = "Examples:
  wpm bench rollout --devices 1000 --module-size 32768
  wpm bench rollout --devices 1000 --module-size 32768 --broker mqtt://127.0.0.1:1883")]
    Rollout(RolloutBenchArgs),
}

#[derive(Debug, Args)]
pub struct RolloutBenchArgs {
    /// Simulated devices (one process, one MQTT connection each)
    #[arg(long, default_value_t = 1000)]
    pub devices: usize,

    /// Size of the module rolled out, bytes
    #[arg(long, value_name = "BYTES", default_value_t = 32 * 1024)]
    pub module_size: usize,

    /// `embedded` (the registry's rumqttd), `mosquitto` (one started by the bench on a
    /// free port, without persistence) or mqtt://host:port of an external broker
    #[arg(long, default_value = "embedded")]
    pub broker: String,

    /// Kill the broker (SIGKILL) when this stage starts and start it again 2 s later;
    /// only with `--broker mosquitto`, whose retained messages die with it
    #[arg(long, value_name = "STAGE")]
    pub restart_broker_at_stage: Option<u64>,

    /// Rollout stages, cumulative percentages
    #[arg(long, value_delimiter = ',', default_values_t = [1u8, 10, 100])]
    pub stages: Vec<u8>,

    /// Devices connected per batch (batches 200 ms apart, to spread the connect storm)
    #[arg(long, default_value_t = 250)]
    pub connect_batch: usize,

    /// Give up after this many seconds per phase
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
}

pub async fn run(global: &GlobalArgs, cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Rollout(args) => rollout(global, args).await,
    }
}

/// A valid module of exactly `size` bytes: `wpm_init`/`wpm_tick` plus a custom section of
/// filler (distinct per `tag`, so two versions share no chunk).
pub fn module_of_size(size: usize, tag: u8) -> Result<Vec<u8>> {
    let mut wasm = wat::parse_str(
        r#"(module (func (export "wpm_init") (result i32) (i32.const 0)) (func (export "wpm_tick")))"#,
    )?;
    let name = b"wpm-bench-filler";
    // Section: id 0, size (LEB128, padded to 5 bytes so its length is known), name, bytes.
    let overhead = 1 + 5 + 1 + name.len();
    if size < wasm.len() + overhead {
        bail!(
            "--module-size must be at least {} bytes",
            wasm.len() + overhead
        );
    }
    let filler = size - wasm.len() - overhead;
    let body = 1 + name.len() + filler;
    wasm.push(0);
    for i in 0..5 {
        let byte = ((body >> (7 * i)) & 0x7f) as u8;
        wasm.push(if i < 4 { byte | 0x80 } else { byte });
    }
    wasm.push(name.len() as u8);
    wasm.extend_from_slice(name);
    // xorshift: incompressible, reproducible.
    let mut x: u32 = 0x9e37_79b9 ^ u32::from(tag);
    wasm.extend((0..filler).map(|_| {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x as u8
    }));
    debug_assert_eq!(wasm.len(), size);
    Ok(wasm)
}

/// Traffic seen by the relay between the broker and the devices.
#[derive(Default)]
struct Traffic {
    bytes_to_devices: AtomicU64,
    bytes_from_devices: AtomicU64,
    publishes_to_devices: AtomicU64,
    publishes_from_devices: AtomicU64,
}

impl Traffic {
    fn snapshot(&self) -> [u64; 4] {
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
async fn follow_sys(broker: &str, traffic: Arc<Traffic>) -> Result<()> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let (host, port) = wpm_registry::config::parse_broker_url(broker)?;
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
async fn start_relay(broker: SocketAddr, traffic: Arc<Traffic>) -> Result<SocketAddr> {
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

/// Raises the open-file limit to its hard maximum: every device is a socket, twice with
/// the relay.
fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a stack struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    lim.rlim_cur
}

/// CPU seconds (user + system) and peak resident memory (bytes) of a process.
fn process_cost(pid: u32) -> Result<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').context("odd /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu = (f[11].parse::<f64>()? + f[12].parse::<f64>()?) / ticks;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hwm_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    Ok((cpu, hwm_kb * 1024))
}

/// Makes a child die with the bench, even when the bench is killed and cannot run
/// `kill_on_drop`.
fn die_with_parent(cmd: &mut tokio::process::Command) {
    // SAFETY: prctl is async-signal-safe, as pre_exec requires.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// The registry as a child process on free ports; killed on drop.
struct RegistryChild {
    child: tokio::process::Child,
    client: Client,
    key: [u8; 32],
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn start_registry(dir: &Path, broker: Option<&str>, mqtt_port: u16) -> Result<RegistryChild> {
    let http = format!("127.0.0.1:{}", free_port()?);
    let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
    cmd.args(["registry", "serve", "--data-dir"])
        .arg(dir)
        .args(["--http", &http]);
    match broker {
        Some(url) => cmd.args(["--broker", url]),
        None => cmd.args(["--mqtt-listen", &format!("127.0.0.1:{mqtt_port}")]),
    };
    die_with_parent(&mut cmd);
    cmd.env("RUST_LOG", "warn,rumqttd=off")
        .env_remove("WPM_TOKEN")
        .stdout(Stdio::null())
        .kill_on_drop(true);
    let child = cmd.spawn().context("starting the registry")?;
    let base = format!("http://{http}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let key = loop {
        if let Ok(token) = std::fs::read_to_string(dir.join("api-token")) {
            let client = Client::with(&base, Some(token.trim().to_string()))?;
            if let Ok(key) = client.public_key().await {
                break (client, key);
            }
        }
        if Instant::now() > deadline {
            bail!("the registry did not come up on {http}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    Ok(RegistryChild {
        child,
        client: key.0,
        key: key.1,
    })
}

async fn resolve(url: &str) -> Result<SocketAddr> {
    let (host, port) = wpm_registry::config::parse_broker_url(url)?;
    let found = tokio::net::lookup_host((host.as_str(), port)).await?.next();
    found.with_context(|| format!("cannot resolve {url}"))
}

/// Devices running `name@version`, from the registry's fleet summary.
async fn running(client: &Client, spec: &str) -> Result<u64> {
    let s = client
        .get_query("/v1/fleet/status", &[("summary_only", "true".into())])
        .await?;
    Ok(s["summary"]["versions"][spec]["running"]
        .as_u64()
        .unwrap_or(0))
}

async fn wait_running(client: &Client, spec: &str, n: usize, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let r = running(client, spec).await?;
        if r as usize >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {r} of {n} devices run {spec} after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One publisher sends `messages` payloads of `payload` bytes; `n` subscribers receive
/// them all. Returns the time from the first publish to the last delivery.
async fn raw_fanout(
    broker: &str,
    n: usize,
    messages: usize,
    payload: usize,
    batch: usize,
) -> Result<Duration> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let (host, port) = wpm_registry::config::parse_broker_url(broker)?;
    let topic = format!("wpm-bench/fanout/{}", std::process::id());
    let received = Arc::new(AtomicU64::new(0));
    let (subscribed_tx, mut subscribed_rx) = tokio::sync::mpsc::channel::<()>(n.max(1));
    let mut clients = Vec::with_capacity(n);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let mut o = MqttOptions::new(
            format!("wpm-bench-sub-{}-{i}", std::process::id()),
            host.clone(),
            port,
        );
        o.set_max_packet_size(payload + 1024, payload + 1024);
        o.set_keep_alive(Duration::from_secs(60));
        let (c, mut ev) = AsyncClient::new(o, 16);
        let received = received.clone();
        let subscribed = subscribed_tx.clone();
        let topic = topic.clone();
        let sub = c.clone();
        tasks.spawn(async move {
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = sub.try_subscribe(topic.clone(), QoS::AtLeastOnce);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = subscribed.try_send(());
                    }
                    Ok(Event::Incoming(Packet::Publish(_))) => {
                        received.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
        });
        clients.push(c);
        if i % batch == batch - 1 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    for _ in 0..n {
        tokio::time::timeout(Duration::from_secs(120), subscribed_rx.recv())
            .await
            .context("fan-out subscribers did not all subscribe")?;
    }
    let mut o = MqttOptions::new(format!("wpm-bench-pub-{}", std::process::id()), host, port);
    o.set_max_packet_size(payload + 1024, payload + 1024);
    let (publisher, mut ev) = AsyncClient::new(o, 64);
    tasks.spawn(async move { while ev.poll().await.is_ok() {} });
    let started = Instant::now();
    let body = vec![0x5au8; payload];
    for _ in 0..messages {
        publisher
            .publish(topic.clone(), QoS::AtLeastOnce, false, body.clone())
            .await?;
    }
    let want = (n * messages) as u64;
    while received.load(Ordering::Relaxed) < want {
        if started.elapsed() > Duration::from_secs(600) {
            bail!(
                "raw fan-out: {} of {want} deliveries after 600 s",
                received.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    for c in clients {
        let _ = c.try_disconnect();
    }
    tasks.abort_all();
    Ok(took)
}

/// A Mosquitto of the bench's own, without persistence, that can be killed and
/// restarted on the same port.
struct OwnBroker {
    config: tempfile::NamedTempFile,
    child: Option<tokio::process::Child>,
    port: u16,
}

impl OwnBroker {
    async fn start(port: u16) -> Result<OwnBroker> {
        use std::io::Write as _;
        let mut config = tempfile::NamedTempFile::new()?;
        writeln!(
            config,
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             max_packet_size 1048576\nsys_interval 1"
        )?;
        let mut b = OwnBroker {
            config,
            child: None,
            port,
        };
        b.restart().await?;
        Ok(b)
    }

    async fn restart(&mut self) -> Result<()> {
        let mut cmd = tokio::process::Command::new("mosquitto");
        cmd.arg("-c")
            .arg(self.config.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().context("starting mosquitto")?;
        self.child = Some(child);
        for _ in 0..100 {
            if TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("mosquitto did not come up on port {}", self.port)
    }

    async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }
}

async fn rollout(global: &GlobalArgs, args: RolloutBenchArgs) -> Result<()> {
    let fd_limit = raise_fd_limit();
    let dir = tempfile::tempdir()?;
    let embedded = args.broker == "embedded";
    let mqtt_port = free_port()?;
    let mut own_broker = if args.broker == "mosquitto" {
        Some(OwnBroker::start(mqtt_port).await?)
    } else {
        None
    };
    if args.restart_broker_at_stage.is_some() && own_broker.is_none() {
        bail!("--restart-broker-at-stage needs --broker mosquitto");
    }
    let broker_url = if embedded || own_broker.is_some() {
        format!("mqtt://127.0.0.1:{mqtt_port}")
    } else {
        args.broker.clone()
    };
    let say = |s: &str| {
        if !global.json && !global.quiet {
            eprintln!("{s}");
        }
    };
    say(&format!(
        "registry child process, broker {broker_url}; open-file limit {fd_limit}"
    ));
    let mut registry = start_registry(
        dir.path(),
        (!embedded).then_some(broker_url.as_str()),
        mqtt_port,
    )
    .await?;
    let pid = registry.child.id().context("registry exited")?;
    let client = &registry.client;

    // Our own Mosquitto counts for us ($SYS): the devices connect straight to it, one
    // socket each instead of three with the relay, which lets 10,000 devices fit the
    // open-file limit. Other brokers: the relay, which sees the devices' traffic only.
    let traffic = Arc::new(Traffic::default());
    let (device_url, counted_at) = if own_broker.is_some() {
        follow_sys(&broker_url, traffic.clone()).await?;
        (
            broker_url.clone(),
            "the broker's $SYS totals (all clients, registry included)",
        )
    } else {
        let relay = start_relay(resolve(&broker_url).await?, traffic.clone()).await?;
        (
            format!("mqtt://{relay}"),
            "a relay between broker and devices (devices only)",
        )
    };
    // $SYS totals lag by up to `sys_interval` (1 s).
    let settle = Duration::from_millis(if own_broker.is_some() { 1500 } else { 0 });

    let name = "bench";
    let v1 = module_of_size(args.module_size, 1)?;
    let v2 = module_of_size(args.module_size, 2)?;
    let hidden = ProgressBar::hidden();
    // The module has no linear memory; a small limit keeps its slot cost (limit + twice
    // the code size, by the device's estimate) inside the default 128 KiB RAM budget.
    let opts = PublishOptions {
        memory_limit: Some(4096),
        ..PublishOptions::default()
    };
    client.publish(name, "1.0.0", &opts, v1, &hidden).await?;
    let published = client.publish(name, "2.0.0", &opts, v2, &hidden).await?;
    let chunks = published.module.chunks as usize;
    let chunk_size = published.module.chunk_size.unwrap_or(2048) as usize;

    let group = format!("bench{}", std::process::id());
    let started = Instant::now();
    let mut fleets = Vec::new();
    for (b, start) in (0..args.devices)
        .step_by(args.connect_batch.max(1))
        .enumerate()
    {
        let mut c = wpm_sim::FleetConfig::new(device_url.clone(), vec![registry.key]);
        c.devices = args.connect_batch.min(args.devices - start);
        c.groups = vec![group.clone()];
        c.id_prefix = format!("bench-{b:03}");
        // Light devices: one scheduler turn per second.
        c.turn_interval_ms = 1000;
        c.flash_size = 256 * 1024;
        fleets.push(wpm_sim::Fleet::start(c).await?);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let timeout = Duration::from_secs(args.timeout);
    let deadline = Instant::now() + timeout;
    loop {
        let s = client
            .get_query(
                "/v1/fleet/status",
                &[("group", group.clone()), ("summary_only", "true".into())],
            )
            .await?;
        if s["summary"]["online"].as_u64().unwrap_or(0) as usize >= args.devices {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "only {} of {} devices came online",
                s["summary"]["online"],
                args.devices
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    say(&format!(
        "{} devices online in {:.1?}",
        args.devices,
        started.elapsed()
    ));

    // Install v1 the plain way, so the rollout is an upgrade with a version to return to.
    let t = Instant::now();
    client
        .deploy(&DeployRequest {
            module: name.into(),
            version: "1.0.0".into(),
            group: Some(group.clone()),
            device: None,
        })
        .await?;
    wait_running(client, "bench@1.0.0", args.devices, timeout).await?;
    let install_time = t.elapsed();
    say(&format!(
        "initial install of v1 on every device: {install_time:.1?}"
    ));

    tokio::time::sleep(settle).await;
    let before = traffic.snapshot();
    let (cpu_before, _) = process_cost(pid)?;
    let written_before = client.get_query("/v1/health", &[]).await?["ingest"]["written"]
        .as_u64()
        .unwrap_or(0);
    let t = Instant::now();
    let r = client
        .post_json(
            "/v1/rollouts",
            &json!({"module": name, "version": "2.0.0", "group": group, "stages": args.stages,
                    "max_failure_pct": 10, "stage_timeout_s": args.timeout}),
        )
        .await?;
    let id = r["id"].as_i64().context("no rollout id")?;
    let mut peak_ingest = 0f64;
    let mut last = (Instant::now(), written_before);
    let mut stage_times = Vec::new();
    let mut stage_seen = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let r = client.get_query(&format!("/v1/rollouts/{id}"), &[]).await?;
        let written = client.get_query("/v1/health", &[]).await?["ingest"]["written"]
            .as_u64()
            .unwrap_or(0);
        let now = Instant::now();
        peak_ingest =
            peak_ingest.max((written - last.1) as f64 / now.duration_since(last.0).as_secs_f64());
        last = (now, written);
        let stage = r["stage"].as_u64().unwrap_or(0);
        if stage > stage_seen {
            stage_seen = stage;
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
            _ if t.elapsed() > timeout => bail!("rollout not done after {timeout:?}: {r}"),
            _ => {}
        }
    }
    wait_running(client, "bench@2.0.0", args.devices, timeout).await?;
    let rollout_time = t.elapsed();
    // Nothing left half-way: v1 leaves each device's flash once v2 is confirmed.
    let deadline = Instant::now() + timeout;
    loop {
        let s = client
            .get_query("/v1/fleet/status", &[("summary_only", "true".into())])
            .await?;
        let old = s["summary"]["versions"]["bench@1.0.0"]["devices"]
            .as_u64()
            .unwrap_or(0);
        if old == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("{old} devices still hold bench@1.0.0 after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    tokio::time::sleep(settle).await;
    let after = traffic.snapshot();
    let (cpu_after, peak_mem) = process_cost(pid)?;
    let written_after = client.get_query("/v1/health", &[]).await?["ingest"]["written"]
        .as_u64()
        .unwrap_or(0);
    let ingest_avg = (written_after - written_before) as f64 / rollout_time.as_secs_f64();
    let down = after[0] - before[0];
    let up = after[1] - before[1];
    let per_device_ratio = down as f64 / args.devices as f64 / args.module_size as f64;

    for f in fleets {
        f.stop().await?;
    }
    // The same bytes as the module's chunks, straight through the broker.
    say("raw broker fan-out of the same bytes…");
    let chunk_payload = chunk_size + 48;
    let fanout = raw_fanout(
        &broker_url,
        args.devices,
        chunks,
        chunk_payload,
        args.connect_batch.max(1),
    )
    .await?;
    let _ = registry.child.kill().await;

    let result = json!({
        "devices": args.devices,
        "module_size": args.module_size,
        "broker": if embedded {
            "embedded rumqttd".to_string()
        } else if own_broker.is_some() {
            format!("mosquitto (own, {broker_url})")
        } else {
            broker_url.clone()
        },
        "broker_restarted_at_stage": args.restart_broker_at_stage,
        "stages": args.stages,
        "rollout_seconds": rollout_time.as_secs_f64(),
        "one_shot_deploy_seconds": install_time.as_secs_f64(),
        "stage_start_seconds": stage_times.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
        "traffic_counted_at": counted_at,
        "broker_to_devices": {"messages": after[2] - before[2], "bytes": down},
        "devices_to_broker": {"messages": after[3] - before[3], "bytes": up},
        "bytes_per_device_per_update_over_module_size": per_device_ratio,
        "registry_cpu_seconds": cpu_after - cpu_before,
        "registry_peak_rss_bytes": peak_mem,
        "status_ingest_per_second": {"average": ingest_avg, "peak": peak_ingest},
        "raw_fanout_seconds": fanout.as_secs_f64(),
        "rollout_over_raw_fanout": rollout_time.as_secs_f64() / fanout.as_secs_f64(),
    });
    if global.json {
        emit_json(&result);
        return Ok(());
    }
    emit(&render(&result));
    Ok(())
}

fn render(r: &Value) -> String {
    let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
    format!(
        "rollout of a {} module to {} devices via {} (stages {})\n\
         \x20 deploy → all devices confirm   {:.1} s (one-shot group deploy of v1: {:.1} s)\n\
         \x20 traffic counted at            {}\n\
         \x20 broker → devices              {} messages, {}\n\
         \x20 devices → broker              {} messages, {}\n\
         \x20 bytes per device per update   {:.2} × module size\n\
         \x20 registry CPU time             {:.2} s (child process, during the rollout)\n\
         \x20 registry peak memory          {}\n\
         \x20 status records ingested       {:.0}/s average, {:.0}/s peak\n\
         \x20 raw broker fan-out, same bytes {:.2} s  → rollout / raw = {:.1}",
        human_size(r["module_size"].as_u64().unwrap_or(0)),
        r["devices"],
        r["broker"].as_str().unwrap_or("?"),
        r["stages"],
        f("rollout_seconds"),
        f("one_shot_deploy_seconds"),
        r["traffic_counted_at"].as_str().unwrap_or("?"),
        r["broker_to_devices"]["messages"],
        human_size(r["broker_to_devices"]["bytes"].as_u64().unwrap_or(0)),
        r["devices_to_broker"]["messages"],
        human_size(r["devices_to_broker"]["bytes"].as_u64().unwrap_or(0)),
        f("bytes_per_device_per_update_over_module_size"),
        f("registry_cpu_seconds"),
        human_size(r["registry_peak_rss_bytes"].as_u64().unwrap_or(0)),
        r["status_ingest_per_second"]["average"]
            .as_f64()
            .unwrap_or(0.0),
        r["status_ingest_per_second"]["peak"]
            .as_f64()
            .unwrap_or(0.0),
        f("raw_fanout_seconds"),
        f("rollout_over_raw_fanout"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_have_the_asked_size_and_validate() {
        for size in [200, 4096, 32 * 1024] {
            let m = module_of_size(size, 1).unwrap();
            assert_eq!(m.len(), size);
            wpm_registry::http::validate_wasm(&m).unwrap();
            assert_ne!(m, module_of_size(size, 2).unwrap());
        }
        assert!(module_of_size(10, 1).is_err());
    }

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
