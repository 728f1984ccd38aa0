//! A device on a pretend network: an in-memory stand-in for the MQTT broker (retained
//! messages by topic, delivered on subscribe) and for the registry (signs with the golden
//! key and publishes modules as retained chunks). The real broker is exercised by the
//! integration tests; this only has to be a faithful enough broker for one device.
#![allow(dead_code)] // Each test file uses a different part of the harness.

use std::collections::{HashMap, HashSet, VecDeque};
use wpm_device_pm::sim_flash::SimFlash;
use wpm_device_pm::{Config, Device, Input, Limits, Output, Tuning};
use wpm_manifests::{
    encode, golden, Action, Chunk, Command, Deployment, EventKind, KeyPair, ModuleManifest,
    ModuleRef, Report, ReportBody, Target, Topic, TrustedKeys,
};

pub const DEVICE: &str = "dev-1";
/// The device's own key seed (its provisioning record's `device_key`).
pub const DEVICE_KEY: [u8; 32] = [0xD1; 32];
/// Device clock at the start of every test (unix ms).
pub const T0: u64 = 1_790_000_000_000;
pub const CHUNK_SIZE: u32 = 64;
pub const TURN_MS: u64 = 1_000;
/// Turns of the default health window (deployments here name none).
pub const HEALTH_TURNS: u32 = wpm_manifests::HealthWindow::DEFAULT.turns;
/// Room for three slots of the test modules (64 KiB memory limit each).
pub const LIMITS: Limits = Limits {
    bank_size: 8192,
    ram_budget: 3 * 72 * 1024,
    snapshot_pool: 16 * 1024,
};
/// The state ring and five banks.
pub const FLASH_SIZE: usize = 4 * 4096 + 5 * 8192;

pub fn config() -> Config {
    Config {
        device_id: DEVICE.into(),
        groups: vec!["eu".into()],
        trusted_keys: vec![golden::key().public()],
        device_key: DEVICE_KEY,
        sequence_floor: 0,
        tuning: Tuning {
            slots: 3,
            chunk_window: 2,
            turn_interval_ms: TURN_MS,
            status_interval_ms: 60_000,
            ..Tuning::NRF9160
        },
    }
}

/// A module that logs `tag` at init, publishes `tag` as telemetry every turn, then runs
/// `tick_extra`; `$turn` counts its turns and `$tick` is its `wpm_tick`. `init_result` is
/// what `wpm_init` returns.
pub fn wasm(tag: &str, init_result: i32, tick_extra: &str) -> Vec<u8> {
    let len = tag.len();
    wat::parse_str(format!(
        r#"(module
          (import "wpm" "log" (func $log (param i32 i32 i32)))
          (import "wpm" "now_ms" (func $now (result i64)))
          (import "wpm" "telemetry" (func $tel (param i32 i32) (result i32)))
          (memory (export "memory") 1)
          (global $turn (mut i32) (i32.const 0))
          (data (i32.const 0) "{tag}")
          (func (export "wpm_init") (result i32)
            (call $log (i32.const 2) (i32.const 0) (i32.const {len}))
            (drop (call $now))
            (i32.const {init_result}))
          (func $tick (export "wpm_tick")
            (global.set $turn (i32.add (global.get $turn) (i32.const 1)))
            (drop (call $tel (i32.const 0) (i32.const {len})))
            {tick_extra}))"#
    ))
    .unwrap()
}

/// `body` runs on every turn from turn 5 on (after the health check has passed).
pub fn from_turn_5(body: &str) -> String {
    format!("(if (i32.ge_u (global.get $turn) (i32.const 5)) (then {body}))")
}

pub struct World {
    dev: Option<Device<SimFlash>>,
    pub now: u64,
    pub retained: HashMap<String, Vec<u8>>,
    subscribed: HashSet<String>,
    /// How often each topic was subscribed to.
    pub subscriptions: HashMap<String, usize>,
    /// Most chunk topics subscribed at the same time.
    pub max_chunks_in_flight: usize,
    /// Every publish and log the device produced, in order.
    pub sent: Vec<Output>,
    queue: VecDeque<(String, Vec<u8>)>,
    sequence: u64,
    config: Config,
    limits: Limits,
    /// The last will of the current connection (topic, sealed payload).
    pub will: Option<(String, Vec<u8>)>,
}

impl World {
    /// A fresh device with blank flash, link up.
    pub fn new() -> Self {
        Self::with(config(), LIMITS)
    }

    pub fn with(config: Config, limits: Limits) -> Self {
        let flash = SimFlash::new(FLASH_SIZE);
        let dev = Device::with_limits(config.clone(), limits, flash, T0).unwrap();
        let mut w = World {
            dev: Some(dev),
            now: T0,
            retained: HashMap::new(),
            subscribed: HashSet::new(),
            subscriptions: HashMap::new(),
            max_chunks_in_flight: 0,
            sent: Vec::new(),
            queue: VecDeque::new(),
            sequence: 0,
            config,
            limits,
            will: None,
        };
        w.connect();
        w
    }

    /// Connects as a driver does: the session's last will first, then the link.
    pub fn connect(&mut self) {
        self.will = Some(self.dev_mut().last_will().unwrap());
        self.input(Input::LinkUp);
    }

    pub fn dev(&self) -> &Device<SimFlash> {
        self.dev.as_ref().unwrap()
    }

    pub fn dev_mut(&mut self) -> &mut Device<SimFlash> {
        self.dev.as_mut().unwrap()
    }

    pub fn input(&mut self, input: Input<'_>) {
        let now = self.now;
        self.dev.as_mut().unwrap().handle(now, input);
        self.pump();
    }

    /// Carries out the device's outputs and delivers messages until all is quiet.
    fn pump(&mut self) {
        loop {
            while let Some(out) = self.dev.as_mut().unwrap().poll_output() {
                match &out {
                    Output::Subscribe { topic } => {
                        self.subscribed.insert(topic.clone());
                        *self.subscriptions.entry(topic.clone()).or_default() += 1;
                        let chunks = self.subscribed.iter().filter(|t| t.contains("/chunk/"));
                        self.max_chunks_in_flight = self.max_chunks_in_flight.max(chunks.count());
                        if let Some(p) = self.retained.get(topic) {
                            self.queue.push_back((topic.clone(), p.clone()));
                        }
                    }
                    Output::Unsubscribe { topic } => {
                        self.subscribed.remove(topic);
                    }
                    Output::Publish {
                        topic,
                        payload,
                        retain: true,
                    } => {
                        self.retained.insert(topic.clone(), payload.clone());
                    }
                    _ => {}
                }
                self.sent.push(out);
            }
            let Some((topic, payload)) = self.queue.pop_front() else {
                return;
            };
            // A message queued for a topic unsubscribed since is not delivered.
            if self.subscribed.contains(&topic) {
                let now = self.now;
                let input = Input::Message {
                    topic: &topic,
                    payload: &payload,
                };
                self.dev.as_mut().unwrap().handle(now, input);
            }
        }
    }

    /// Publishes retained, as the registry does, and delivers to a subscribed device.
    pub fn publish(&mut self, topic: String, payload: Vec<u8>) {
        self.retained.insert(topic.clone(), payload.clone());
        if self.subscribed.contains(&topic) {
            self.queue.push_back((topic, payload));
            self.pump();
        }
    }

    /// Stores a module on the "broker": its signed manifest and the chunks
    /// `0..publish_chunks` (all of them when `None`).
    pub fn publish_module_partly(
        &mut self,
        name: &str,
        version: &str,
        wasm: &[u8],
        publish_chunks: Option<usize>,
    ) -> ModuleRef {
        let sha = wpm_manifests::sha256(wasm);
        let chunks: Vec<&[u8]> = wasm.chunks(CHUNK_SIZE as usize).collect();
        let manifest = ModuleManifest {
            name: name.into(),
            version: version.into(),
            sha256: sha.into(),
            size: wasm.len() as u32,
            chunk_size: CHUNK_SIZE,
            chunk_hashes: chunks
                .iter()
                .map(|c| wpm_manifests::sha256(c).into())
                .collect(),
        };
        self.publish(
            Topic::ModuleManifest(&sha).render(),
            golden::key().seal(&manifest),
        );
        let n = publish_chunks.unwrap_or(chunks.len());
        for (i, data) in chunks.iter().enumerate().take(n) {
            self.publish_chunk(&sha, i as u32, data);
        }
        ModuleRef {
            name: name.into(),
            version: version.into(),
            sha256: sha.into(),
            size: wasm.len() as u32,
            chunk_size: CHUNK_SIZE,
            memory_limit: 65536,
            fuel_per_turn: 10_000,
            priority: 5,
            pinned: false,
        }
    }

    pub fn publish_module(&mut self, name: &str, version: &str, wasm: &[u8]) -> ModuleRef {
        self.publish_module_partly(name, version, wasm, None)
    }

    pub fn publish_chunk(&mut self, sha: &[u8; 32], index: u32, data: &[u8]) {
        let chunk = Chunk {
            module: (*sha).into(),
            index,
            data: data.to_vec().into(),
        };
        self.publish(Topic::Chunk(sha, index).render(), encode(&chunk));
    }

    /// A deployment for the fleet with the next sequence, valid for a day.
    pub fn deployment(&mut self, modules: Vec<ModuleRef>) -> Deployment {
        self.sequence += 1;
        Deployment {
            target: Target::Fleet,
            sequence: self.sequence,
            issued_at: self.now / 1000,
            expires_at: self.now / 1000 + 86_400,
            modules,
            health: None,
        }
    }

    pub fn deploy_signed(&mut self, key: &KeyPair, d: &Deployment) {
        self.publish(Topic::Deployment(&d.target).render(), key.seal(d));
    }

    pub fn deploy(&mut self, modules: Vec<ModuleRef>) {
        let d = self.deployment(modules);
        self.deploy_signed(&golden::key(), &d);
    }

    /// Lets time pass, delivering every timer on the way.
    pub fn advance(&mut self, ms: u64) {
        let end = self.now + ms;
        while let Some(at) = self.dev().next_timer().filter(|at| *at <= end) {
            assert!(at >= self.now, "timer in the past: {at} < {}", self.now);
            self.now = at;
            self.input(Input::Timer);
        }
        self.now = end;
    }

    /// Power cycle: only the flash survives; the link comes back up.
    pub fn reboot(&mut self) {
        self.reboot_offline();
        self.connect();
    }

    /// Power cycle, link still down: the device as rebuilt from flash alone.
    pub fn reboot_offline(&mut self) {
        let flash = self.dev.take().unwrap().into_flash();
        let flash = SimFlash::from_bytes(flash.as_bytes().to_vec());
        self.subscribed.clear();
        let dev = Device::with_limits(self.config.clone(), self.limits, flash, self.now);
        self.dev = Some(dev.unwrap());
    }

    /// Sends a lifecycle command signed with the golden key, valid for five minutes.
    pub fn command(&mut self, action: Action) -> u64 {
        self.sequence += 1;
        let c = Command {
            device: DEVICE.into(),
            sequence: self.sequence,
            issued_at: self.now / 1000,
            expires_at: self.now / 1000 + 300,
            action,
        };
        self.send_command(&golden::key(), &c);
        c.sequence
    }

    /// Delivers a command (not retained, like the registry's).
    pub fn send_command(&mut self, key: &KeyPair, c: &Command) {
        let topic = Topic::Command(DEVICE).render();
        if self.subscribed.contains(&topic) {
            self.queue.push_back((topic, key.seal(c)));
            self.pump();
        }
    }

    /// Events the device published, decoded, in order.
    pub fn events(&self) -> Vec<EventKind> {
        let topic = Topic::Events(DEVICE).render();
        self.sent
            .iter()
            .filter_map(|o| match o {
                Output::Publish {
                    topic: t,
                    payload,
                    retain: false,
                } if *t == topic => match report(payload).body {
                    ReportBody::Event(e) => Some(e.kind),
                    other => panic!("{other:?} on the events topic"),
                },
                _ => None,
            })
            .collect()
    }

    /// Forgets what was sent so far, so a test can look at what comes next.
    pub fn clear_sent(&mut self) {
        self.sent.clear();
    }

    /// Telemetry messages `module` published.
    pub fn telemetry(&self, module: &str) -> Vec<Vec<u8>> {
        let topic = Topic::Telemetry(DEVICE, module).render();
        self.sent
            .iter()
            .filter_map(|o| match o {
                Output::Publish {
                    topic: t,
                    payload,
                    retain: false,
                } if *t == topic => match report(payload).body {
                    ReportBody::Telemetry(bytes) => Some(bytes.to_vec()),
                    other => panic!("{other:?} on a telemetry topic"),
                },
                _ => None,
            })
            .collect()
    }

    /// (name, version, state) of every module in the device's status.
    pub fn modules(&self) -> Vec<(String, String, &'static str)> {
        self.dev()
            .status()
            .modules
            .iter()
            .map(|m| (m.name.clone(), m.version.clone(), m.state.as_str()))
            .collect()
    }
}

pub fn module_state(
    name: &str,
    version: &str,
    state: &'static str,
) -> (String, String, &'static str) {
    (name.into(), version.into(), state)
}

/// A counter: each turn adds 1 to a hidden (unexported) i64 global and to an i64 at the
/// end of its 4 KiB memory (custom page size 1), traps if the two ever disagree, and
/// publishes the count as 8 little-endian bytes. Its snapshot is about 4 KiB. `tag`
/// only makes the bytes (and so the sha256) differ between counters.
pub fn counter_wasm(tag: &str) -> Vec<u8> {
    counter_wasm_with(tag, "", INIT_OK, "")
}

/// The counter's usual `wpm_init`.
pub const INIT_OK: &str = r#"(func (export "wpm_init") (result i32) (i32.const 0))"#;

/// [`counter_wasm`] with its global `$n` declared with `global_export` (e.g.
/// `(export "count")`, empty to keep it hidden), `funcs` in place of [`INIT_OK`] (the
/// init and takeover exports) and `tick_extra` run at the end of each tick.
pub fn counter_wasm_with(tag: &str, global_export: &str, funcs: &str, tick_extra: &str) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
          (import "wpm" "telemetry" (func $tel (param i32 i32) (result i32)))
          (memory (export "memory") 4096 4096 (pagesize 1))
          (data (i32.const 16) "{tag}")
          (global $n {global_export} (mut i64) (i64.const 0))
          {funcs}
          (func (export "wpm_tick")
            (global.set $n (i64.add (global.get $n) (i64.const 1)))
            (i64.store (i32.const 4088) (i64.add (i64.load (i32.const 4088)) (i64.const 1)))
            (if (i64.ne (global.get $n) (i64.load (i32.const 4088))) (then unreachable))
            (i64.store (i32.const 0) (global.get $n))
            (drop (call $tel (i32.const 0) (i32.const 8)))
            {tick_extra}))"#
    ))
    .unwrap()
}

/// The counts a counter module published, in order.
pub fn counts(w: &World, module: &str) -> Vec<u64> {
    (w.telemetry(module).iter())
        .map(|t| u64::from_le_bytes(t[..8].try_into().unwrap()))
        .collect()
}

/// A module reference fit for [`counter_wasm`].
pub fn small(mut m: ModuleRef) -> ModuleRef {
    m.memory_limit = 4096;
    m
}

pub fn evict(name: &str) -> Action {
    Action::Evict(name.into())
}

/// Whether the device published an event `want` accepts.
pub fn has_event(w: &World, want: impl Fn(&EventKind) -> bool) -> bool {
    w.events().iter().any(want)
}

/// Opens a report the device published, with the device's public key, as the registry
/// does.
pub fn report(payload: &[u8]) -> Report {
    let key = KeyPair::from_seed(&DEVICE_KEY).public();
    TrustedKeys::new(&[key]).open(payload).unwrap()
}

/// The status the device last published (retained).
pub fn published_status(w: &World) -> wpm_manifests::DeviceStatus {
    match report(&w.retained[&Topic::Status(DEVICE).render()]).body {
        ReportBody::Status(s) => s,
        other => panic!("{other:?} on the status topic"),
    }
}
