//! Slots, eviction and restore, hostile modules and lifecycle commands.

mod common;

use common::*;
use wpm_device_pm::{Config, Limits};
use wpm_manifests::{golden, Action, Command, EventKind};

fn one_slot() -> Config {
    Config {
        slots: 1,
        ..config()
    }
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

#[test]
fn deep_recursion_ends_the_module_and_others_keep_running() {
    let mut w = World::new();
    let good = w.publish_module("good", "1.0.0", &wasm("ok", 0, ""));
    let deep = wat::parse_str(
        r#"(module
          (global $turn (mut i32) (i32.const 0))
          (func $down (param i32) (result i32)
            (i32.add (call $down (i32.add (local.get 0) (i32.const 1))) (i32.const 1)))
          (func (export "wpm_init") (result i32) (i32.const 0))
          (func (export "wpm_tick")
            (global.set $turn (i32.add (global.get $turn) (i32.const 1)))
            (if (i32.gt_u (global.get $turn) (i32.const 4))
              (then (drop (call $down (i32.const 0)))))))"#,
    )
    .unwrap();
    let deep = w.publish_module("deep", "1.0.0", &deep);
    w.deploy(vec![good, deep]);
    w.advance(TURN_MS * 8);
    assert!(w.events().iter().any(|e| matches!(e,
        EventKind::Trapped { module, reason, .. } if module == "deep" && reason.contains("recursion"))));
    w.clear_sent();
    w.advance(TURN_MS * 2);
    assert_eq!(w.telemetry("good").len(), 2);
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
    w.clear_sent();
    w.command(evict("counter"));
    assert_eq!(evictions(&w, "counter", "ram"), 1);
    w.advance(TURN_MS * 2);
    assert!(w.events().contains(&EventKind::Restored {
        module: "counter".into(),
        version: "1.0.0".into()
    }));
    assert_eq!(counts(&w, "counter"), [3]);
    // The retained status is fresh after each command.
    let status = &w.retained[&wpm_manifests::Topic::Status(DEVICE).render()];
    let status: wpm_manifests::DeviceStatus = wpm_manifests::decode(status).unwrap();
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
