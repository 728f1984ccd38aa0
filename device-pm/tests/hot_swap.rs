//! Hot-swap with state: a new version taking over the old one's state (`wpm_takeover`),
//! or starting fresh without it, and the old version continuing from its own state when
//! the new one fails its health check.

mod common;

use common::*;

use wpm_manifests::{EventKind, ModuleRef};

/// Exports the counter's global, so a successor can take it over by name.
const COUNT: &str = r#"(export "count")"#;

/// A new version's takeover: `wpm_init` fails, so the version only passes its health
/// check if `wpm_takeover` runs instead.
const TAKEOVER: &str = r#"(func (export "wpm_init") (result i32) (i32.const 1))
    (func (export "wpm_takeover") (result i32) (i32.const 0))"#;

/// `hello@1.0.0`, a counter with an exported global, past its health check and counted
/// to 1..=HEALTH_TURNS+2; the sent outputs cleared.
fn counting_v1() -> World {
    let mut w = World::new();
    let v1 = small(w.publish_module(
        "hello",
        "1.0.0",
        &counter_wasm_with("v1", COUNT, INIT_OK, ""),
    ));
    w.deploy(vec![v1]);
    w.advance(TURN_MS * (HEALTH_TURNS as u64 + 2));
    assert_eq!(counts(&w, "hello"), [1, 2, 3, 4, 5]);
    w.clear_sent();
    w
}

fn deploy_v2(w: &mut World, wasm: &[u8]) -> ModuleRef {
    let v2 = small(w.publish_module("hello", "2.0.0", wasm));
    w.deploy(vec![v2.clone()]);
    v2
}

fn started(w: &World, version: &str) -> usize {
    (w.events().iter())
        .filter(|e| matches!(e, EventKind::Started { version: v, .. } if v == version))
        .count()
}

#[test]
fn new_version_with_takeover_continues_the_old_ones_count() {
    let mut w = counting_v1();
    // v2 checks every tick that the global and memory agree: had only one of them been
    // handed over, it would trap and be rolled back.
    deploy_v2(&mut w, &counter_wasm_with("v2", COUNT, TAKEOVER, ""));
    assert_eq!(started(&w, "2.0.0"), 1);
    assert_eq!(
        w.modules(),
        vec![
            module_state("hello", "1.0.0", "installed"),
            module_state("hello", "2.0.0", "verifying")
        ]
    );
    w.advance(TURN_MS * (HEALTH_TURNS as u64 + 2));
    assert_eq!(counts(&w, "hello"), [6, 7, 8, 9, 10]);
    assert_eq!(w.modules(), vec![module_state("hello", "2.0.0", "running")]);
}

/// A version that keeps its count hidden rebuilds it from the handed-over memory in
/// `wpm_takeover`; a global it declares immutable under the old mutable one's name is
/// left alone rather than failing the swap (which would roll back to v1, whose counts
/// would be the same: the module states tell the two apart).
#[test]
fn takeover_rebuilds_from_memory_and_leaves_an_immutable_global_alone() {
    let mut w = counting_v1();
    let funcs = r#"(global (export "count") i64 (i64.const 0))
        (func (export "wpm_init") (result i32) (i32.const 1))
        (func (export "wpm_takeover") (result i32)
          (global.set $n (i64.load (i32.const 4088)))
          (i32.const 0))"#;
    deploy_v2(&mut w, &counter_wasm_with("v2", "", funcs, ""));
    w.advance(TURN_MS * (HEALTH_TURNS as u64 + 2));
    assert_eq!(counts(&w, "hello"), [6, 7, 8, 9, 10]);
    assert_eq!(w.modules(), vec![module_state("hello", "2.0.0", "running")]);
}

#[test]
fn new_version_without_takeover_starts_fresh() {
    let mut w = counting_v1();
    deploy_v2(&mut w, &counter_wasm_with("v2", COUNT, INIT_OK, ""));
    w.advance(TURN_MS * (HEALTH_TURNS as u64 + 2));
    assert_eq!(counts(&w, "hello"), [1, 2, 3, 4, 5]);
    assert_eq!(w.modules(), vec![module_state("hello", "2.0.0", "running")]);
}

#[test]
fn failed_new_version_rolls_back_to_the_old_state_and_is_not_retried() {
    let mut w = counting_v1();
    // v2 takes the count over (6, 7), then traps during its health check. Its progress
    // must not leak into v1, which goes on from its own 5.
    let trap_at_7 = "(if (i64.eq (global.get $n) (i64.const 7)) (then unreachable))";
    let v2 = deploy_v2(&mut w, &counter_wasm_with("v2", COUNT, TAKEOVER, trap_at_7));
    w.advance(TURN_MS * 4);
    assert_eq!(counts(&w, "hello"), [6, 7, 6, 7]);
    let reason = "health check: wasm `unreachable` instruction executed".to_string();
    let events = w.events();
    let failed = EventKind::InstallFailed {
        module: "hello".into(),
        version: "2.0.0".into(),
        reason: reason.clone(),
    };
    let rolled_back = EventKind::RolledBack {
        module: "hello".into(),
        from_version: "2.0.0".into(),
        to_version: "1.0.0".into(),
        reason,
    };
    let restored = EventKind::Restored {
        module: "hello".into(),
        version: "1.0.0".into(),
    };
    let at =
        |e: &EventKind| (events.iter().position(|x| x == e)).unwrap_or_else(|| panic!("{e:?}"));
    assert!(at(&failed) < at(&rolled_back) && at(&rolled_back) < at(&restored));
    assert_eq!(
        w.modules(),
        vec![
            module_state("hello", "1.0.0", "running"),
            module_state("hello", "2.0.0", "failed")
        ]
    );

    // Not retried while the same deployment stands: not on later turns, not after a
    // reboot (v1's state was in RAM, so it starts over).
    w.advance(TURN_MS * 2);
    w.reboot();
    w.advance(TURN_MS * 2);
    assert_eq!(started(&w, "2.0.0"), 1);
    assert_eq!(counts(&w, "hello"), [6, 7, 6, 7, 8, 9, 1, 2]);
    assert_eq!(
        w.modules(),
        vec![
            module_state("hello", "1.0.0", "running"),
            module_state("hello", "2.0.0", "failed")
        ]
    );

    // A newer deployment is the operator's word to try again.
    w.deploy(vec![v2]);
    assert_eq!(started(&w, "2.0.0"), 2);
}
