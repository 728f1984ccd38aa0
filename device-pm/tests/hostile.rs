//! Bad modules never take the device down: each kind of misbehaviour ends only the
//! module that does it, with a reason an operator can act on, while a healthy module
//! next to it keeps its exact rhythm.

mod common;

use common::*;
use wpm_device_pm::runtime::{MAX_RECURSION_DEPTH, MAX_SLICES_PER_CALL};

use wpm_manifests::{EventKind, ModuleState};

/// A hostile module: what its `wpm_tick` does once it is past its health check (so it
/// ends as a running module, `Trapped`, rather than as a refused install), and the
/// reason the device must give.
struct Hostile {
    name: &'static str,
    tick: &'static str,
    reason: fn() -> String,
}

const HOSTILE: &[Hostile] = &[
    Hostile {
        name: "trap",
        tick: "unreachable",
        reason: || "wasm `unreachable` instruction executed".into(),
    },
    Hostile {
        // wpm_tick calls itself without end.
        name: "recursion",
        tick: "(call $tick)",
        reason: || format!("call stack exhausted (recursion deeper than {MAX_RECURSION_DEPTH})"),
    },
    Hostile {
        // 4 more 64 KiB pages on top of one, with a 64 KiB memory limit.
        name: "memory-bomb",
        tick: "(drop (memory.grow (i32.const 4)))",
        reason: || "memory limit exceeded".into(),
    },
    Hostile {
        name: "loop",
        tick: "(loop (br 0))",
        reason: || {
            format!(
                "out of fuel: a call did not return within {MAX_SLICES_PER_CALL} turns of 10000"
            )
        },
    },
    Hostile {
        // A log message starting at the last byte of the address space.
        name: "bad-pointer",
        tick: "(call $log (i32.const 2) (i32.const -1) (i32.const 16))",
        reason: || "wpm.log: message out of bounds".into(),
    },
];

#[test]
fn each_hostile_module_ends_alone_with_its_reason() {
    // `from_turn_5` misbehaves only once the health check has passed.
    const { assert!(HEALTH_TURNS < 5) };
    // Long enough for the loop to be caught, and for the healthy module to run after.
    let turns = 5 + MAX_SLICES_PER_CALL + 3;
    for hostile in HOSTILE {
        let name = hostile.name;
        let mut w = World::new();
        let good = small(w.publish_module("good", "1.0.0", &counter_wasm("good")));
        let bad_wasm = wasm("no", 0, &from_turn_5(hostile.tick));
        let bad = w.publish_module(name, "1.0.0", &bad_wasm);
        w.deploy(vec![good, bad]);
        w.advance(TURN_MS * turns as u64);

        let reason = (hostile.reason)();
        let trapped: Vec<String> = (w.events().into_iter())
            .filter_map(|e| match e {
                EventKind::Trapped { module, reason, .. } if module == name => Some(reason),
                _ => None,
            })
            .collect();
        assert_eq!(
            trapped,
            std::slice::from_ref(&reason),
            "{name}: Trapped events"
        );
        let status = w.dev().status();
        let bad_status = status.modules.iter().find(|m| m.name == name).unwrap();
        assert_eq!(bad_status.state, ModuleState::Failed, "{name}");
        assert_eq!(bad_status.last_error.as_ref(), Some(&reason), "{name}");
        assert_eq!(
            status.last_error,
            Some(format!("{name}@1.0.0: {reason}")),
            "{name}: device last_error"
        );
        assert_eq!(status.slots_used, 1, "{name}: only the healthy one runs");
        // One count per turn, none lost or repeated, before, during and after.
        assert_eq!(
            counts(&w, "good"),
            (1..=turns as u64).collect::<Vec<_>>(),
            "{name}: the healthy module's telemetry"
        );
    }
}
