//! The on-target test and measurement run on QEMU's Cortex-M33.
//!
//! It drives the real device-pm core, on the real instruction set, through the protocol
//! it speaks in the field: the flash image built by build.rs holds the retained messages
//! a registry publishes (signed deployments, signed module manifests, chunks), and a
//! small in-memory "broker" answers each `Subscribe` the core emits with the retained
//! message of that topic. Modules are installed into the module store (RAM-backed NOR
//! flash with the nRF9160 NVMC's geometry), verified, run in slots, hot-swapped, and the
//! device is power-cycled from flash alone. Then it measures, in guest instructions,
//! what the device's time goes to, and prints a table.
//!
//! Output is over semihosting; the exit code is 0 only if every check passed.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use cortex_m_rt::entry;
use wpm_device_pm::{Config, Device, Input, Limits, Output, Tuning};
use wpm_manifests::{
    Deployment, DeviceStatus, EventKind, KeyPair, ModuleState, ModuleStatus, Report, ReportBody,
    Target, Topic, TrustedKeys,
};
use wpm_provisioning::Record;
use wpm_qemu_an505::{self as board, hprintln, Messages, RamNorFlash};

mod fixtures {
    include!(concat!(env!("OUT_DIR"), "/fixtures.rs"));
}

/// The flash image: the registry's retained messages, and the test's named payloads.
static IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/image.bin"));

const TURN_MS: u64 = 1000;

struct Checks {
    failed: u32,
    passed: u32,
}

impl Checks {
    fn check(&mut self, ok: bool, what: &str) {
        if ok {
            self.passed += 1;
            hprintln!("  ok   {}", what);
        } else {
            self.failed += 1;
            hprintln!("  FAIL {}", what);
        }
    }
}

/// The device core plus a broker that holds retained messages.
struct Harness {
    device: Device<RamNorFlash>,
    device_id: String,
    now_ms: u64,
    retained: BTreeMap<&'static str, &'static [u8]>,
    /// Served once, before the retained copy, on the first subscription to a topic.
    corrupt_once: BTreeMap<String, &'static [u8]>,
    subscribed: BTreeSet<String>,
    events: Vec<EventKind>,
    telemetry: BTreeMap<String, (u32, Vec<u8>)>,
    logs: Vec<(String, String)>,
    retained_status: Option<Vec<u8>>,
    /// The device's public key: every report it publishes must open with it.
    reports: TrustedKeys,
}

impl Harness {
    fn new(device: Device<RamNorFlash>, record: &Record, now_ms: u64) -> Self {
        let device_id = record.device_id.clone();
        let reports = TrustedKeys::new(&[KeyPair::from_seed(&record.device_key).public()]);
        let retained = Messages(IMAGE)
            .filter(|(t, _)| !t.starts_with("test/"))
            .collect();
        Self {
            device,
            device_id,
            now_ms,
            retained,
            corrupt_once: BTreeMap::new(),
            subscribed: BTreeSet::new(),
            events: Vec::new(),
            telemetry: BTreeMap::new(),
            logs: Vec::new(),
            retained_status: None,
            reports,
        }
    }

    /// Carries out what the core asked for, delivering retained messages on subscribe,
    /// until it has nothing more to say.
    fn pump(&mut self) {
        let events_topic = Topic::Events(&self.device_id).render();
        let status_topic = Topic::Status(&self.device_id).render();
        let telemetry_prefix = format!("{}/", Topic::Telemetry(&self.device_id, "").render());
        let telemetry_prefix = telemetry_prefix.trim_end_matches('/').to_string();
        let mut deliveries: VecDeque<(String, &'static [u8])> = VecDeque::new();
        loop {
            while let Some(out) = self.device.poll_output() {
                match out {
                    Output::Subscribe { topic } => {
                        if let Some(bad) = self.corrupt_once.remove(&topic) {
                            deliveries.push_back((topic.clone(), bad));
                        } else if let Some(p) = self.retained.get(topic.as_str()) {
                            deliveries.push_back((topic.clone(), p));
                        }
                        self.subscribed.insert(topic);
                    }
                    Output::Unsubscribe { topic } => {
                        self.subscribed.remove(&topic);
                    }
                    Output::Publish { topic, payload, .. } => {
                        let report = match self.reports.open::<Report>(&payload) {
                            Ok(r) => r,
                            Err(e) => {
                                hprintln!("  a report that does not open: {}", e);
                                continue;
                            }
                        };
                        match report.body {
                            ReportBody::Event(e) if topic == events_topic => {
                                self.events.push(e.kind)
                            }
                            ReportBody::Status(_) if topic == status_topic => {
                                self.retained_status = Some(payload);
                            }
                            ReportBody::Telemetry(bytes) => {
                                if let Some(module) = topic.strip_prefix(&telemetry_prefix) {
                                    let entry = self
                                        .telemetry
                                        .entry(module.trim_start_matches('/').to_string())
                                        .or_insert((0, Vec::new()));
                                    entry.0 += 1;
                                    entry.1 = bytes.to_vec();
                                }
                            }
                            _ => {}
                        }
                    }
                    Output::Log {
                        module, message, ..
                    } => {
                        hprintln!("  [{}] {}", module, message);
                        self.logs.push((module, message));
                    }
                }
            }
            let Some((topic, payload)) = deliveries.pop_front() else {
                return;
            };
            // Only what is still subscribed arrives, as with a real broker.
            if self.subscribed.contains(&topic) {
                self.device.handle(
                    self.now_ms,
                    Input::Message {
                        topic: &topic,
                        payload,
                    },
                );
            }
        }
    }

    /// A new message on a topic the device subscribed to.
    fn publish(&mut self, topic: &str, payload: &[u8]) {
        if self.subscribed.contains(topic) {
            self.device
                .handle(self.now_ms, Input::Message { topic, payload });
        }
        self.pump();
    }

    /// Lets virtual time pass, delivering every timer due before `ms` from now.
    fn run_for(&mut self, ms: u64) {
        let until = self.now_ms + ms;
        loop {
            self.pump();
            match self.device.next_timer() {
                Some(t) if t <= until => {
                    self.now_ms = self.now_ms.max(t);
                    self.device.handle(self.now_ms, Input::Timer);
                }
                _ => break,
            }
        }
        self.now_ms = until;
        self.pump();
    }

    fn module(&self, name: &str) -> Option<(String, ModuleState)> {
        self.device
            .status()
            .modules
            .into_iter()
            .find(|m| m.name == name)
            .map(|m| (m.version, m.state))
    }

    fn running(&self, name: &str, version: &str) -> bool {
        self.module(name) == Some((version.to_string(), ModuleState::Running))
    }

    fn saw(&self, pred: impl Fn(&EventKind) -> bool) -> bool {
        self.events.iter().any(pred)
    }

    fn counter(&self) -> u32 {
        self.telemetry
            .get("counter")
            .and_then(|(_, p)| p.get(..4))
            .map_or(0, |b| u32::from_le_bytes(b.try_into().unwrap()))
    }
}

fn named(name: &str) -> &'static [u8] {
    let wanted = format!("test/{name}");
    Messages(IMAGE)
        .find(|(t, _)| *t == wanted)
        .map(|(_, p)| p)
        .unwrap_or_else(|| panic!("{wanted} missing from the flash image"))
}

/// Instructions `f` takes, less the cost of reading the counter.
fn measure<T>(f: impl FnOnce() -> T) -> (u64, T) {
    let start = board::instructions();
    let value = f();
    let end = board::instructions();
    (end.saturating_sub(start).saturating_sub(overhead()), value)
}

static mut OVERHEAD: u64 = 0;

fn overhead() -> u64 {
    // SAFETY: written once in main before any measurement, single-threaded.
    unsafe { OVERHEAD }
}

struct Row {
    what: &'static str,
    instructions: u64,
}

fn print_table(rows: &[Row]) {
    hprintln!("");
    hprintln!("| operation (Cortex-M33, QEMU -icount) | instructions | ≈ ms at 64 MHz |");
    hprintln!("|---|---:|---:|");
    for r in rows {
        let us = r.instructions * 1000 / 64_000;
        hprintln!(
            "| {} | {} | {}.{:03} |",
            r.what,
            r.instructions,
            us / 1000,
            us % 1000
        );
    }
    hprintln!("");
}

#[entry]
fn main() -> ! {
    board::init();
    let calibrate = {
        let a = board::instructions();
        let b = board::instructions();
        b - a
    };
    // SAFETY: single-threaded, before any measurement.
    unsafe { OVERHEAD = calibrate };
    let mut checks = Checks {
        failed: 0,
        passed: 0,
    };
    hprintln!(
        "wpm on-target test: mps2-an505 Cortex-M33, heap {} KiB",
        board::HEAP_SIZE / 1024
    );

    let rows = scenario(&mut checks);
    let mut rows = rows;
    rows.extend(benchmarks(&mut checks));
    print_table(&rows);

    hprintln!(
        "{} checks passed, {} failed; heap in use at the end {} B",
        checks.passed,
        checks.failed,
        board::heap_used()
    );
    board::exit(checks.failed == 0)
}

/// Install, verify, run, hot-swap, reject, survive a power cycle.
fn scenario(c: &mut Checks) -> Vec<Row> {
    let mut rows = Vec::new();
    hprintln!("provisioning");
    let record = Record::decode(fixtures::PROVISIONING);
    c.check(record.is_ok(), "the provisioning record decodes");
    let record = record.unwrap_or_else(|e| panic!("provisioning: {e}"));
    c.check(
        record.device_id == "qemu-ontarget" && record.groups == ["qemu"],
        "identity and groups come from the record",
    );
    let mut torn = fixtures::PROVISIONING.to_vec();
    torn[12] ^= 0x40;
    c.check(
        Record::decode(&torn) == Err(wpm_provisioning::Error::BadCrc),
        "a corrupted record fails its CRC",
    );
    c.check(
        Record::decode(&[0xFF; 64]) == Err(wpm_provisioning::Error::NotProvisioned),
        "an erased region is not provisioned",
    );

    let config = Config {
        device_id: record.device_id.clone(),
        groups: record.groups.clone(),
        trusted_keys: record.trusted_keys(),
        device_key: *record.device_key,
        sequence_floor: record.sequence_floor,
        tuning: Tuning {
            slots: 3,
            turn_interval_ms: TURN_MS,
            status_interval_ms: 60_000,
            ..Tuning::NRF9160
        },
    };
    // SAFETY: the only RamNorFlash of the store region in this program.
    let mut flash = unsafe { RamNorFlash::store_region() };
    flash.erase_all();
    let t0 = fixtures::EPOCH_S * 1000 + 3_600_000;
    let (boot, device) =
        measure(|| Device::with_limits(config.clone(), Limits::default(), flash, t0));
    let device = device.unwrap_or_else(|e| panic!("store: {e}"));
    rows.push(Row {
        what: "boot on an erased store (format the state pages)",
        instructions: boot,
    });
    let mut h = Harness::new(device, &record, t0);
    let group = Topic::Deployment(&Target::Group("qemu".into())).render();

    hprintln!("link up");
    h.device.handle(h.now_ms, Input::LinkUp);
    h.pump();
    c.check(
        h.subscribed.contains(&group),
        "subscribed to its group's deployments",
    );
    c.check(h.retained_status.is_some(), "published a retained status");

    hprintln!("install hello 1.0.0 and counter 1.0.0 from the flash image");
    let (install, ()) = measure(|| {
        h.publish(&group, named("deploy-1"));
        // Timers already due (a scheduler that starts modules on its turn) run now.
        h.run_for(0)
    });
    rows.push(Row {
        what:
            "install 2 modules (verify deployment, 4 manifests/chunks each, sha256, commit, start)",
        instructions: install,
    });
    let verifying =
        |h: &Harness, name| h.module(name) == Some(("1.0.0".into(), ModuleState::Verifying));
    c.check(
        verifying(&h, "hello"),
        "hello 1.0.0 started, on its health check",
    );
    c.check(
        verifying(&h, "counter"),
        "counter 1.0.0 started, on its health check",
    );
    c.check(
        h.device.status().sequence == 1,
        "deployment sequence 1 accepted",
    );
    c.check(
        h.logs
            .iter()
            .any(|(m, l)| m == "hello" && l == "hello 1.0.0 started"),
        "hello's wpm_init logged through the host API",
    );
    hprintln!("  heap in use with 2 slots: {} B", board::heap_used());

    hprintln!("run 5 scheduler turns");
    let (turns, ()) = measure(|| h.run_for(5 * TURN_MS));
    rows.push(Row {
        what: "5 scheduler turns of hello + counter (with telemetry)",
        instructions: turns,
    });
    let hello_telemetry = h.telemetry.get("hello").map(|(n, p)| (*n, p.clone()));
    c.check(
        hello_telemetry
            .as_ref()
            .is_some_and(|(n, p)| *n == 5 && p.as_slice() == b"{\"hello\":1,\"ticks\":0000005}"),
        "hello published its 5th tick",
    );
    c.check(
        h.counter() == 5,
        "counter counted 5 turns in its linear memory",
    );
    c.check(
        h.running("hello", "1.0.0"),
        "hello 1.0.0 passed its health check and runs",
    );
    c.check(
        h.running("counter", "1.0.0"),
        "counter 1.0.0 passed its health check and runs",
    );

    hprintln!("a deployment signed by an untrusted key");
    h.publish(&group, named("deploy-rogue"));
    c.check(
        h.saw(|e| matches!(e, EventKind::ManifestRejected { .. })),
        "rejected, with an event",
    );
    c.check(
        h.device.status().sequence == 1,
        "the accepted sequence did not move",
    );
    c.check(h.module("traps").is_none(), "nothing of it was installed");

    hprintln!("hot-swap hello 1.0.0 -> 2.0.0, first copy of chunk 0 corrupted");
    let (digest, size) = {
        let d: Deployment = TrustedKeys::new(&config.trusted_keys)
            .open(named("deploy-2"))
            .expect("deploy-2 is signed by the trusted key");
        let m = d
            .modules
            .iter()
            .find(|m| m.name == "hello")
            .unwrap()
            .clone();
        (*m.sha256, m.size)
    };
    h.corrupt_once
        .insert(Topic::Chunk(&digest, 0).render(), named("bad-chunk"));
    let counter_before = h.counter();
    h.publish(&group, named("deploy-2"));
    c.check(
        h.saw(|e| matches!(e, EventKind::ChunkRejected { index: 0, .. })),
        "the corrupted chunk was rejected",
    );
    c.check(
        h.running("hello", "1.0.0"),
        "hello 1.0.0 keeps running meanwhile",
    );
    // The chunk is asked for again after its timeout; then the health check takes
    // HEALTH_TURNS turns.
    let (swap, ()) = measure(|| h.run_for(60_000));
    rows.push(Row {
        what: "hot-swap incl. refetch, health check, 60 s of turns",
        instructions: swap,
    });
    c.check(h.running("hello", "2.0.0"), "hello 2.0.0 runs");
    c.check(
        !h.device
            .status()
            .modules
            .iter()
            .any(|m| m.version == "1.0.0" && m.name == "hello"),
        "hello 1.0.0 is gone from flash once 2.0.0 is confirmed",
    );
    c.check(
        h.saw(|e| matches!(e, EventKind::Removed { module, version } if module == "hello" && version == "1.0.0")),
        "a Removed event for hello 1.0.0",
    );
    c.check(
        h.telemetry
            .get("hello")
            .is_some_and(|(_, p)| p.starts_with(b"{\"hello\":2")),
        "telemetry now comes from 2.0.0",
    );
    c.check(
        h.counter() > counter_before + 50,
        "counter ran on, undisturbed by the swap",
    );
    let _ = size;

    hprintln!("replay of deployment 1 (validly signed, old sequence)");
    h.publish(&group, named("deploy-1-replay"));
    c.check(
        h.device.status().sequence == 2,
        "no rollback: sequence stays 2",
    );
    c.check(h.running("hello", "2.0.0"), "hello 2.0.0 still runs");

    hprintln!("a module that traps");
    h.publish(&group, named("deploy-3"));
    h.run_for(5 * TURN_MS);
    c.check(
        matches!(h.module("traps"), Some((_, ModuleState::Failed))),
        "traps ended with a reported reason",
    );
    c.check(
        h.running("hello", "2.0.0") && h.running("counter", "1.0.0"),
        "the other slots keep running",
    );

    hprintln!("power cycle: boot from the module store alone");
    let counter_at_cut = h.counter();
    let flash = h.device.into_flash();
    let (reboot, device) =
        measure(|| Device::with_limits(config.clone(), Limits::default(), flash, h.now_ms));
    rows.push(Row {
        what: "boot from flash, restart 2 installed modules",
        instructions: reboot,
    });
    let device = device.unwrap_or_else(|e| panic!("store after power cycle: {e}"));
    let now = h.now_ms;
    let mut h = Harness::new(device, &record, now);
    h.device.handle(h.now_ms, Input::LinkUp);
    h.pump();
    c.check(
        h.running("hello", "2.0.0"),
        "hello 2.0.0 runs after the power cycle",
    );
    c.check(
        h.running("counter", "1.0.0"),
        "counter runs after the power cycle",
    );
    c.check(
        h.device.status().sequence == 3,
        "the accepted sequence survived",
    );
    h.run_for(3 * TURN_MS);
    c.check(
        h.counter() == 3 && counter_at_cut > 3,
        "counter restarted from its wasm (RAM state is not kept across power loss)",
    );

    hprintln!("evict counter by signed command: snapshot to the RAM pool, then restore");
    let command_topic = Topic::Command(&record.device_id).render();
    c.check(
        h.subscribed.contains(&command_topic),
        "subscribed to its command topic",
    );
    evict_and_restore(
        c,
        &mut h,
        &mut rows,
        &command_topic,
        ["cmd-1", "cmd-2"],
        "ram",
    );

    hprintln!("power cycle onto a device without a snapshot pool: evict to flash, restore");
    let flash = h.device.into_flash();
    let no_pool = Limits {
        snapshot_pool: 0,
        ..Limits::default()
    };
    let device = Device::with_limits(config.clone(), no_pool, flash, h.now_ms)
        .unwrap_or_else(|e| panic!("store after the second power cycle: {e}"));
    let now = h.now_ms;
    let mut h = Harness::new(device, &record, now);
    h.device.handle(h.now_ms, Input::LinkUp);
    h.pump();
    evict_and_restore(
        c,
        &mut h,
        &mut rows,
        &command_topic,
        ["cmd-3", "cmd-4"],
        "flash",
    );
    rows
}

/// Lets counter count, evicts it with the signed command `commands[0]` (its snapshot
/// must go to `to`), checks that it stays out, starts it again with `commands[1]` and
/// checks that it counts on from exactly where it was evicted: a fresh start would count
/// from 0 again.
fn evict_and_restore(
    c: &mut Checks,
    h: &mut Harness,
    rows: &mut Vec<Row>,
    command_topic: &str,
    [evict, start]: [&str; 2],
    to: &'static str,
) {
    h.run_for(20 * TURN_MS);
    let at_evict = h.counter();
    let ticks = |h: &Harness| h.telemetry.get("counter").map_or(0, |(n, _)| *n);
    let ticks_at_evict = ticks(h);
    c.check(at_evict >= 20, "counter counted before its eviction");
    let (evicted, ()) = measure(|| h.publish(command_topic, named(evict)));
    c.check(
        h.saw(|e| {
            matches!(e, EventKind::Evicted { module, to: t, .. } if module == "counter" && t == to)
        }),
        if to == "ram" {
            "an Evicted event: counter's snapshot went to RAM"
        } else {
            "an Evicted event: counter's snapshot went to flash"
        },
    );
    h.run_for(3 * TURN_MS);
    c.check(
        matches!(h.module("counter"), Some((_, ModuleState::Evicted)))
            && ticks(h) == ticks_at_evict,
        "counter stays evicted, and does not run, until started",
    );
    c.check(
        h.running("hello", "2.0.0"),
        "hello keeps running while counter is out",
    );
    let (restored, ()) = measure(|| h.publish(command_topic, named(start)));
    rows.push(Row {
        what: if to == "ram" {
            "evict + restore counter through RAM by 2 signed commands, end to end (2 ed25519 verifications)"
        } else {
            "evict + restore counter through flash by 2 signed commands, end to end"
        },
        instructions: evicted + restored,
    });
    c.check(
        h.saw(|e| matches!(e, EventKind::Restored { module, .. } if module == "counter")),
        "a Restored event for counter",
    );
    c.check(h.running("counter", "1.0.0"), "counter runs again");
    h.run_for(5 * TURN_MS);
    let ticked = ticks(h) - ticks_at_evict;
    let value = h.counter();
    if value != at_evict + ticked {
        hprintln!(
            "    counter {} at eviction, {} after {} ticks since",
            at_evict,
            value,
            ticked
        );
    }
    c.check(
        ticked >= 5 && value == at_evict + ticked,
        if to == "ram" {
            "counter continues exactly from its RAM snapshot"
        } else {
            "counter continues exactly from its flash snapshot"
        },
    );
}

#[inline(never)]
fn fib_native(n: u32) -> u32 {
    if n < 2 {
        n
    } else {
        fib_native(n - 1) + fib_native(n - 2)
    }
}

/// The cost of the device's basic operations.
fn benchmarks(c: &mut Checks) -> Vec<Row> {
    use wpm_device_pm::runtime::Runtime;
    let mut rows = Vec::new();
    hprintln!("measurements");

    let data = vec![0xA5u8; 16 * 1024];
    let (sha, digest) = measure(|| wpm_manifests::sha256(&data));
    c.check(digest != [0; 32], "sha256 computed");
    rows.push(Row {
        what: "sha256, per KiB (16 KiB hashed)",
        instructions: sha / 16,
    });
    drop(data);

    let record = Record::decode(fixtures::PROVISIONING).unwrap();
    let device_key = KeyPair::from_seed(&record.device_key);
    let status = DeviceStatus {
        device: record.device_id.clone(),
        groups: record.groups.clone(),
        sequence: 7,
        modules: vec![ModuleStatus {
            name: "hello".into(),
            version: "1.0.0".into(),
            sha256: [7; 32].into(),
            state: ModuleState::Running,
            last_error: None,
        }],
        slots_used: 1,
        slots_total: 3,
        flash_free: 400_000,
        ram_free: 90_000,
        last_error: None,
        at_ms: fixtures::EPOCH_S * 1000,
        trust_epoch: None,
    };
    let plain = wpm_manifests::encode(&status).len();
    let (seal, sealed) = measure(|| {
        device_key.seal(&Report {
            device: record.device_id.clone(),
            counter: 1 << 32,
            body: ReportBody::Status(status),
        })
    });
    hprintln!(
        "  a status report: {} bytes plain, {} sealed (+{})",
        plain,
        sealed.len(),
        sealed.len() - plain
    );
    rows.push(Row {
        what: "sealing one status report (CBOR + ed25519 signature)",
        instructions: seal,
    });

    let key = record.trusted_keys();
    let keys = TrustedKeys::new(&key);
    let sealed = named("deploy-1");
    let (verify, opened) = measure(|| keys.open::<Deployment>(sealed));
    c.check(opened.is_ok(), "the deployment signature verifies");
    rows.push(Row {
        what: "signature verification (ed25519 + CBOR decode of a deployment)",
        instructions: verify,
    });

    let runtime = Runtime::new();
    let module = opened.unwrap().modules[0].clone();
    let (inst, hello) = measure(|| {
        runtime
            .load(&module, fixtures::HELLO1_WASM, 0)
            .and_then(|mut i| {
                // wpm_init runs in the first slice.
                let init = i.run_slice(0);
                Ok((i, init))
            })
    });
    let hello = hello.map(|(_, init)| init);
    c.check(
        hello
            .as_ref()
            .is_ok_and(|r| matches!(r, Ok(wpm_device_pm::runtime::Slice::Returned))),
        "hello's wpm_init returned within one slice",
    );
    c.check(hello.is_ok(), "hello instantiates");
    rows.push(Row {
        what: "instantiate hello (compile, expose state, 1 KiB memory, wpm_init)",
        instructions: inst,
    });
    drop(hello);

    let mut empty_ref = module.clone();
    empty_ref.memory_limit = 0;
    let (inst, empty) = measure(|| {
        runtime
            .load(&empty_ref, fixtures::EMPTY_WASM, 0)
            .map(|mut i| {
                let _ = i.run_slice(0);
                i
            })
    });
    rows.push(Row {
        what: "instantiate an empty module (compile, wpm_init)",
        instructions: inst,
    });
    let Ok(mut empty) = empty else {
        c.check(false, "the empty module instantiates");
        return rows;
    };
    const CALLS: u64 = 100;
    let (calls, ok) = measure(|| (0..CALLS).all(|_| empty.run_slice(0).is_ok()));
    c.check(ok, "100 calls of an empty wpm_tick");
    rows.push(Row {
        what: "call overhead: one wpm_tick of an empty export (fuel set, call, return)",
        instructions: calls / CALLS,
    });
    drop(empty);

    evict_restore_components(c, &mut rows, &runtime);

    let (native, n) = measure(|| fib_native(core::hint::black_box(24)));
    c.check(n == 46368, "native fib(24) = 46368");
    rows.push(Row {
        what: "fib(24) native",
        instructions: native,
    });
    for fuel in [false, true] {
        let mut config = wasmi::Config::default();
        config.consume_fuel(fuel);
        let engine = wasmi::Engine::new(&config);
        let mut store = wasmi::Store::new(&engine, ());
        if fuel {
            let _ = store.set_fuel(u64::MAX / 2);
        }
        let result = wasmi::Module::new(&engine, fixtures::FIB_WASM)
            .and_then(|m| wasmi::Linker::<()>::new(&engine).instantiate_and_start(&mut store, &m))
            .and_then(|i| {
                i.get_typed_func::<i32, i32>(&store, "fib")
                    .map_err(wasmi::Error::from)
            });
        let Ok(fib) = result else {
            c.check(false, "fib.wasm instantiates");
            continue;
        };
        let (wasm, n) = measure(|| fib.call(&mut store, 24));
        c.check(n.ok() == Some(46368), "wasmi fib(24) = 46368");
        rows.push(Row {
            what: if fuel {
                "fib(24) in wasmi, fuel metered (as slots run)"
            } else {
                "fib(24) in wasmi"
            },
            instructions: wasm,
        });
    }
    rows
}

/// What eviction and restore cost by themselves, without the command's signature check
/// or the other slots' ticks: the steps `Device` takes, on counter with a count in its
/// memory, through a CBOR snapshot in RAM and through the board's module store.
fn evict_restore_components(
    c: &mut Checks,
    rows: &mut Vec<Row>,
    runtime: &wpm_device_pm::runtime::Runtime,
) {
    use wpm_device_pm::runtime::HostCall;
    use wpm_device_pm::snapshot::Snapshot;
    use wpm_device_pm::store::Store;
    let key = Record::decode(fixtures::PROVISIONING)
        .unwrap()
        .trusted_keys();
    let deployment: Deployment = TrustedKeys::new(&key)
        .open(named("deploy-1"))
        .expect("deploy-1 verifies");
    let module = (deployment.modules.iter())
        .find(|m| m.name == "counter")
        .expect("deploy-1 has counter")
        .clone();
    // The count counter last published, from a slot's host calls.
    let count = |calls: Vec<HostCall>| {
        calls.into_iter().rev().find_map(|call| match call {
            HostCall::Telemetry(p) => p
                .get(..4)
                .map(|b| u32::from_le_bytes(b.try_into().unwrap())),
            _ => None,
        })
    };
    let Ok(mut instance) = runtime.load(&module, fixtures::COUNTER_WASM, 0) else {
        c.check(false, "counter instantiates");
        return;
    };
    // wpm_init, then 10 ticks.
    for _ in 0..11 {
        let _ = instance.run_slice(0);
    }
    c.check(
        count(instance.take_calls()) == Some(10),
        "counter counted to 10 in a bare slot",
    );

    let (evict, bytes) = measure(|| {
        let bytes = instance.snapshot(10).map(|s| wpm_manifests::encode(&s));
        drop(instance);
        bytes
    });
    rows.push(Row {
        what: "evict to RAM: snapshot counter (4 KiB memory) + CBOR encode + free the slot",
        instructions: evict,
    });
    let Ok(bytes) = bytes else {
        c.check(false, "counter snapshots");
        return;
    };
    let (restore, restored) = measure(|| {
        let snapshot: Snapshot = wpm_manifests::decode(&bytes).map_err(|e| e.to_string())?;
        (runtime.restore(&module, fixtures::COUNTER_WASM, &snapshot, 0)).map_err(|e| e.reason)
    });
    rows.push(Row {
        what: "restore from RAM: CBOR decode + instantiate counter + write back memory and globals",
        instructions: restore,
    });
    let next = restored.map(|mut i| {
        let _ = i.run_slice(0);
        count(i.take_calls())
    });
    c.check(
        next == Ok(Some(11)),
        "counter restored from a RAM snapshot ticks on to 11",
    );

    // SAFETY: the scenario's devices, which owned the store region, are gone.
    let mut flash = unsafe { RamNorFlash::store_region() };
    flash.erase_all();
    let Ok(mut store) = Store::open(flash, Limits::default().bank_size) else {
        c.check(false, "the module store opens");
        return;
    };
    let (save, saved) = measure(|| store.save_snapshot(&module.sha256, &bytes));
    c.check(saved.is_ok(), "the snapshot is written to flash");
    rows.push(Row {
        what: "evict to flash: the above + erase, write, state record (NOR rules)",
        instructions: evict + save,
    });
    let (load, restored) = measure(|| {
        let bytes = store
            .load_snapshot(&module.sha256)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "no snapshot in flash".to_string())?;
        let snapshot: Snapshot = wpm_manifests::decode(&bytes).map_err(|e| e.to_string())?;
        (runtime.restore(&module, fixtures::COUNTER_WASM, &snapshot, 0)).map_err(|e| e.reason)
    });
    rows.push(Row {
        what: "restore from flash: read + sha256 check + the RAM restore",
        instructions: load,
    });
    let next = restored.map(|mut i| {
        let _ = i.run_slice(0);
        count(i.take_calls())
    });
    c.check(
        next == Ok(Some(11)),
        "counter restored from a flash snapshot ticks on to 11",
    );
}
