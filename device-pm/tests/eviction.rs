//! Slots, eviction and restore, and lifecycle commands.

mod common;

use common::*;
use wpm_device_pm::{Config, Limits};
use wpm_manifests::{golden, Action, Command, EventKind};

fn one_slot() -> Config {
    let mut c = config();
    c.tuning.slots = 1;
    c
}

fn evictions(w: &World, module: &str, to: &str) -> usize {
    (w.events().iter())
        .filter(
            |e| matches!(e, EventKind::Evicted { module: m, to: t, .. } if m == module && t == to),
        )
        .count()
}

/// Two counters share one slot: every turn one is evicted and the other restored. Each
/// must count 1, 2, 3, … with no value lost or repeated, over 1,000 evict/restore cycles.
fn counters_share_a_slot(limits: Limits, to: &str) {
    let mut w = World::with(one_slot(), limits);
    let a = small(w.publish_module("a", "1.0.0", &counter_wasm("a")));
    let b = small(w.publish_module("b", "1.0.0", &counter_wasm("b")));
    w.deploy(vec![a, b]);
    w.advance(TURN_MS * 1006);
    let (ca, cb) = (counts(&w, "a"), counts(&w, "b"));
    assert_eq!(ca, (1..=ca.len() as u64).collect::<Vec<_>>());
    assert_eq!(cb, (1..=cb.len() as u64).collect::<Vec<_>>());
    let cycles = evictions(&w, "a", to) + evictions(&w, "b", to);
    assert!(cycles >= 1000, "{cycles} evictions to {to}");
    assert!(
        ca.len() >= 490 && cb.len() >= 490,
        "{} / {}",
        ca.len(),
        cb.len()
    );
}

#[test]
fn counter_survives_a_thousand_evictions_through_ram() {
    counters_share_a_slot(LIMITS, "ram");
}

#[test]
fn counter_survives_a_thousand_evictions_through_flash() {
    counters_share_a_slot(
        Limits {
            snapshot_pool: 0,
            ..LIMITS
        },
        "flash",
    );
}

/// Each call of `wpm_tick` runs 3,000 steps of `acc = acc * 31 + i` on a hidden global,
/// more than one turn's fuel, then publishes `acc`.
fn long_wasm() -> Vec<u8> {
    wat::parse_str(
        r#"(module
          (import "wpm" "telemetry" (func $tel (param i32 i32) (result i32)))
          (memory (export "memory") 16 16 (pagesize 1))
          (global $acc (mut i32) (i32.const 7))
          (func (export "wpm_init") (result i32) (i32.const 0))
          (func (export "wpm_tick") (local $i i32)
            (loop $step
              (global.set $acc (i32.add (i32.mul (global.get $acc) (i32.const 31)) (local.get $i)))
              (local.set $i (i32.add (local.get $i) (i32.const 1)))
              (br_if $step (i32.lt_u (local.get $i) (i32.const 3000))))
            (i32.store (i32.const 0) (global.get $acc))
            (drop (call $tel (i32.const 0) (i32.const 4)))))"#,
    )
    .unwrap()
}

/// What `long_wasm` publishes after each of its calls.
fn long_results(calls: usize) -> Vec<i32> {
    let mut acc: i32 = 7;
    (0..calls)
        .map(|_| {
            for i in 0..3000 {
                acc = acc.wrapping_mul(31).wrapping_add(i);
            }
            acc
        })
        .collect()
}

/// Under the contract of `snapshot.rs` a module paused mid-call is evicted only once
/// its call has returned: here every call of `long` spans several turns (paused by
/// fuel and resumed), `long` shares one slot with a counter and is evicted and restored
/// over and over, and every result it publishes is still exactly right.
#[test]
fn module_paused_by_fuel_is_evicted_at_its_call_boundary_and_finishes_right() {
    let mut w = World::with(one_slot(), LIMITS);
    let long = small(w.publish_module("long", "1.0.0", &long_wasm()));
    let counter = small(w.publish_module("counter", "1.0.0", &counter_wasm("counter")));
    w.deploy(vec![long, counter]);
    w.advance(TURN_MS * 200);
    let results: Vec<i32> = (w.telemetry("long").iter())
        .map(|t| i32::from_le_bytes(t[..4].try_into().unwrap()))
        .collect();
    assert!(results.len() >= 10, "{}", results.len());
    assert_eq!(results, long_results(results.len()));
    assert!(evictions(&w, "long", "ram") >= 10);
    // Calls did span turns: `long` held the slot for more turns than it returned.
    let turns_of_long = 200 - counts(&w, "counter").len();
    assert!(
        turns_of_long > results.len() * 2,
        "{turns_of_long} turns, {} calls",
        results.len()
    );
}

fn applied(w: &World) -> Vec<u64> {
    (w.events().iter())
        .filter_map(|e| match e {
            EventKind::CommandApplied { sequence, .. } => Some(*sequence),
            _ => None,
        })
        .collect()
}

fn rejected(w: &World) -> Vec<String> {
    (w.events().iter())
        .filter_map(|e| match e {
            EventKind::CommandRejected { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn lifecycle_commands_stop_start_pin_and_evict() {
    let mut w = World::new();
    let m = small(w.publish_module("counter", "1.0.0", &counter_wasm("counter")));
    w.deploy(vec![m]);
    w.advance(TURN_MS * 3);
    w.clear_sent();

    let stop = w.command(Action::Stop("counter".into()));
    assert_eq!(applied(&w), [stop]);
    assert_eq!(
        w.modules(),
        vec![module_state("counter", "1.0.0", "stopped")]
    );
    // Stopped survives a reboot.
    w.reboot();
    w.advance(TURN_MS * 2);
    assert!(counts(&w, "counter").is_empty());
    assert_eq!(
        w.modules(),
        vec![module_state("counter", "1.0.0", "stopped")]
    );

    w.command(Action::Start("counter".into()));
    w.advance(TURN_MS * 2);
    assert_eq!(counts(&w, "counter"), [1, 2]);

    w.command(Action::Pin("counter".into()));
    w.clear_sent();
    w.command(evict("counter"));
    assert_eq!(
        rejected(&w),
        ["cannot evict counter: it is pinned".to_string()]
    );
    w.command(Action::Unpin("counter".into()));
    w.advance(TURN_MS);
    assert_eq!(counts(&w, "counter"), [3]);
    // The retained status is fresh after each command.
    let status = published_status(&w);
    assert_eq!(status.modules[0].state, wpm_manifests::ModuleState::Running);
}

#[test]
fn commands_that_are_replayed_misaddressed_forged_or_expired_are_rejected() {
    let mut w = World::new();
    let m = small(w.publish_module("counter", "1.0.0", &counter_wasm("counter")));
    w.deploy(vec![m]);
    w.advance(TURN_MS * 3);
    let mut c = Command {
        device: DEVICE.into(),
        sequence: 50,
        issued_at: w.now / 1000,
        expires_at: w.now / 1000 + 60,
        action: Action::Stop("counter".into()),
    };
    w.send_command(&golden::key(), &c);
    w.clear_sent();
    w.send_command(&golden::key(), &c); // replay
    c.sequence = 51;
    c.device = "dev-2".into();
    w.send_command(&golden::key(), &c);
    c.device = DEVICE.into();
    w.send_command(&wpm_manifests::KeyPair::from_seed(&[9; 32]), &c);
    c.expires_at = w.now / 1000 - 1;
    w.send_command(&golden::key(), &c);
    c.expires_at = w.now / 1000 + 60;
    c.action = Action::Start("nope".into());
    w.send_command(&golden::key(), &c);
    let reasons = rejected(&w);
    assert_eq!(reasons.len(), 5, "{reasons:?}");
    assert!(reasons[0].starts_with("replayed command"));
    assert!(reasons[1].contains("addresses device dev-2"));
    assert_eq!(reasons[2], "signed by an untrusted key");
    assert!(reasons[3].starts_with("expired"));
    assert_eq!(reasons[4], "module nope is not installed");
    assert!(applied(&w).is_empty());
    assert_eq!(
        w.modules(),
        vec![module_state("counter", "1.0.0", "stopped")]
    );
}

/// Evict by command parks a module with its state: it is not brought back on the next
/// turn (slots are free here), nor by a reboot when its snapshot is in flash, but by a
/// Start command, and then continues where it was. Stop drops the parked state.
#[test]
fn evicted_by_command_stays_evicted_until_started() {
    let flash_snapshots = Limits {
        snapshot_pool: 0,
        ..LIMITS
    };
    let mut w = World::with(config(), flash_snapshots);
    let m = small(w.publish_module("counter", "1.0.0", &counter_wasm("counter")));
    w.deploy(vec![m]);
    w.advance(TURN_MS * 3);
    w.clear_sent();

    let sequence = w.command(evict("counter"));
    assert_eq!(applied(&w), [sequence]);
    assert_eq!(evictions(&w, "counter", "flash"), 1);
    w.advance(TURN_MS * 3);
    w.reboot();
    w.advance(TURN_MS * 3);
    assert!(counts(&w, "counter").is_empty());
    assert_eq!(w.dev().status().slots_used, 0);
    assert_eq!(
        w.modules(),
        vec![module_state("counter", "1.0.0", "evicted")]
    );
    // Nothing to run: the device sleeps instead of waking every turn.
    let next = w.dev().next_timer();
    assert!(next.is_some_and(|at| at > w.now + TURN_MS), "{next:?}");

    w.command(Action::Start("counter".into()));
    w.advance(TURN_MS * 2);
    assert!(w.events().contains(&EventKind::Restored {
        module: "counter".into(),
        version: "1.0.0".into()
    }));
    assert_eq!(counts(&w, "counter"), [4, 5]);

    w.command(evict("counter"));
    w.command(Action::Stop("counter".into()));
    assert_eq!(
        w.modules(),
        vec![module_state("counter", "1.0.0", "stopped")]
    );
    w.command(Action::Start("counter".into()));
    w.advance(TURN_MS);
    assert_eq!(counts(&w, "counter"), [4, 5, 1]);
}

/// Slots the RAM budget allows are what status reports, not `Config::slots` alone.
#[test]
fn slots_total_is_what_the_ram_budget_allows_for_the_modules() {
    let mut w = World::new();
    assert_eq!(w.dev().status().slots_total, 3, "nothing installed");
    let counter = small(w.publish_module("counter", "1.0.0", &counter_wasm("counter")));
    w.deploy(vec![counter.clone()]);
    assert_eq!(w.dev().status().slots_total, 3, "small modules");
    // Two reservations of about 104 KiB fit the 216 KiB budget, a third does not.
    let big = |mut m: wpm_manifests::ModuleRef| {
        m.memory_limit = 100 * 1024;
        m
    };
    let a = big(w.publish_module("a", "1.0.0", &counter_wasm("a")));
    let b = big(w.publish_module("b", "1.0.0", &counter_wasm("b")));
    w.deploy(vec![a, b, counter]);
    w.advance(TURN_MS * 3);
    let status = w.dev().status();
    assert_eq!((status.slots_used, status.slots_total), (2, 2));
    // Counted as large as b, a third slot does not fit next to b and the counter.
    w.command(Action::Stop("a".into()));
    assert_eq!(w.dev().status().slots_total, 2);
    w.command(Action::Stop("b".into()));
    assert_eq!(
        w.dev().status().slots_total,
        3,
        "only small modules left to run"
    );
}
