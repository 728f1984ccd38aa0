//! A device on a pretend network: an in-memory stand-in for the MQTT broker (retained
//! messages by topic, delivered on subscribe) and for the registry (signs with the golden
//! key and publishes modules as retained chunks). The real broker is exercised by the
//! integration tests; this only has to be a faithful enough broker for one device.
#![allow(dead_code)] // Each test file uses a different part of the harness.

use std::collections::{HashMap, HashSet, VecDeque};
use wpm_device_pm::sim_flash::SimFlash;
use wpm_device_pm::{Config, Device, Input, Limits, Output};
use wpm_manifests::{
    encode, golden, Chunk, Deployment, Event, EventKind, KeyPair, ModuleManifest, ModuleRef,
    Target, Topic,
};

pub const DEVICE: &str = "dev-1";
/// Device clock at the start of every test (unix ms).
pub const T0: u64 = 1_790_000_000_000;
pub const CHUNK_SIZE: u32 = 64;
pub const TURN_MS: u64 = 1_000;
pub const LIMITS: Limits = Limits {
    bank_size: 8192,
    ram_budget: 128 * 1024,
};
/// Two state pages and five banks.
pub const FLASH_SIZE: usize = 2 * 4096 + 5 * 8192;

pub fn config() -> Config {
    Config {
        device_id: DEVICE.into(),
        groups: vec!["eu".into()],
        trusted_keys: vec![golden::key().public()],
        slots: 3,
        chunk_window: 2,
        turn_interval_ms: TURN_MS,
        status_interval_ms: 60_000,
    }
}

/// A module that logs `tag` at init, publishes `tag` as telemetry every turn, then runs
/// `tick_extra`; `$turn` counts its turns. `init_result` is what `wpm_init` returns.
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
          (func (export "wpm_tick")
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
}

impl World {
    /// A fresh device with blank flash, link up.
    pub fn new() -> Self {
        let dev = Device::with_limits(config(), LIMITS, SimFlash::new(FLASH_SIZE), T0).unwrap();
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
        };
        w.input(Input::LinkUp);
        w
    }

    pub fn dev(&self) -> &Device<SimFlash> {
        self.dev.as_ref().unwrap()
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
        let flash = self.dev.take().unwrap().into_flash();
        let flash = SimFlash::from_bytes(flash.as_bytes().to_vec());
        self.subscribed.clear();
        self.dev = Some(Device::with_limits(config(), LIMITS, flash, self.now).unwrap());
        self.input(Input::LinkUp);
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
                } if *t == topic => Some(wpm_manifests::decode::<Event>(payload).unwrap().kind),
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
                } if *t == topic => Some(payload.clone()),
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
