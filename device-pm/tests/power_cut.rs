//! Power loss at every flash write and erase of the four flash-changing workflows, and
//! flash wear over many updates.
//!
//! Each scenario is run once uncut to count its write and erase operations `N`; then for
//! every `k` in `0..N` it is run again with the `k`-th operation torn (see
//! `SimFlash::cut_after`), the device is rebuilt from the flash bytes alone, and:
//! the stored state is the old one or the new one (scenario-specific check); every
//! installed module's bank still hashes to its sha256 and every recorded snapshot to its
//! own (torn bytes are never what a record points at); and the workflow is then carried
//! to its end on the same flash, proving the store still works.

mod common;

use common::*;
use wpm_device_pm::sim_flash::SimFlash;
use wpm_device_pm::store::{State, Store};
use wpm_device_pm::{Input, Limits};
use wpm_manifests::Action;

/// The state as a fresh boot reads it from `bytes`, after checking that nothing a
/// record points at is torn.
fn stored_state(bytes: &[u8], limits: Limits) -> State {
    let mut store = Store::open(SimFlash::from_bytes(bytes.to_vec()), limits.bank_size).unwrap();
    for i in store.state().installed.clone() {
        let digest = store.digest(i.bank, i.module.size).unwrap();
        assert_eq!(
            digest, *i.module.sha256,
            "installed bank {} is torn",
            i.bank
        );
    }
    for s in store.state().snapshots.clone() {
        assert!(
            store.load_snapshot(&s.module).unwrap().is_some(),
            "torn snapshot trusted"
        );
    }
    store.state().clone()
}

struct Scenario {
    name: &'static str,
    limits: Limits,
    setup: fn() -> World,
    step: fn(&mut World),
    /// Checks the state found at boot after a cut; returns a value for `finish`.
    at_boot: fn(&State) -> bool,
    /// Continues on the rebooted device (link down) and checks the end state.
    finish: fn(&mut World, bool),
}

/// Runs `s` with a cut at every operation; returns how many cut points there were.
fn enumerate(s: &Scenario) -> u64 {
    let mut w = (s.setup)();
    let before = w.dev().flash().ops();
    (s.step)(&mut w);
    let n = w.dev().flash().ops() - before;
    let bytes = w.dev().flash().as_bytes().to_vec();
    let new = (s.at_boot)(&stored_state(&bytes, s.limits));
    w.reboot_offline();
    (s.finish)(&mut w, new);
    for k in 0..n {
        let mut w = (s.setup)();
        w.dev_mut().flash_mut().cut_after(k);
        (s.step)(&mut w);
        assert!(
            w.dev().flash().power_lost(),
            "{}: cut {k} never happened",
            s.name
        );
        let bytes = w.dev().flash().as_bytes().to_vec();
        let new = (s.at_boot)(&stored_state(&bytes, s.limits));
        w.reboot_offline();
        (s.finish)(&mut w, new);
    }
    println!("{}: {n} cut points", s.name);
    n
}

fn hello(tag: &str) -> Vec<u8> {
    wasm(tag, 0, "")
}

/// Versions of `hello` in the state, with whether each is confirmed.
fn versions(state: &State) -> Vec<(String, bool)> {
    (state.installed.iter())
        .map(|i| (i.module.version.clone(), i.confirmed))
        .collect()
}

fn confirmed_running(w: &mut World, version: &str) {
    w.input(Input::LinkUp);
    w.advance(TURN_MS * (HEALTH_TURNS as u64 + 1));
    assert_eq!(w.modules(), vec![module_state("hello", version, "running")]);
    let tag = format!("v{}", &version[..1]);
    assert_eq!(w.telemetry("hello").last().unwrap(), tag.as_bytes());
}

#[test]
fn install_survives_a_cut_anywhere() {
    let n = enumerate(&Scenario {
        name: "install",
        limits: LIMITS,
        setup: || {
            let mut w = World::new();
            w.publish_module("hello", "1.0.0", &hello("v1"));
            w
        },
        step: |w| {
            let m = w.publish_module("hello", "1.0.0", &hello("v1"));
            w.deploy(vec![m]);
            w.advance(TURN_MS * HEALTH_TURNS as u64);
        },
        at_boot: |state| {
            let v = versions(state);
            assert!(
                v.is_empty() || v == [("1.0.0".into(), false)] || v == [("1.0.0".into(), true)],
                "{v:?}"
            );
            v == [("1.0.0".into(), true)]
        },
        finish: |w, _| confirmed_running(w, "1.0.0"),
    });
    assert!(n >= 8);
}

#[test]
fn hot_swap_survives_a_cut_anywhere() {
    let n = enumerate(&Scenario {
        name: "hot-swap",
        limits: LIMITS,
        setup: || {
            let mut w = World::new();
            let v1 = w.publish_module("hello", "1.0.0", &hello("v1"));
            w.publish_module("hello", "2.0.0", &hello("v2"));
            w.deploy(vec![v1]);
            w.advance(TURN_MS * HEALTH_TURNS as u64);
            w
        },
        step: |w| {
            let v2 = w.publish_module("hello", "2.0.0", &hello("v2"));
            w.deploy(vec![v2]);
            w.advance(TURN_MS * HEALTH_TURNS as u64);
        },
        at_boot: |state| {
            let v = versions(state);
            // Never a state without a confirmed version: v1 goes only once v2 is confirmed.
            let allowed: [&[(&str, bool)]; 3] = [
                &[("1.0.0", true)],
                &[("1.0.0", true), ("2.0.0", false)],
                &[("2.0.0", true)],
            ];
            let found: Vec<(&str, bool)> = v.iter().map(|(s, c)| (s.as_str(), *c)).collect();
            assert!(allowed.contains(&found.as_slice()), "{v:?}");
            found == [("2.0.0", true)]
        },
        finish: |w, _| confirmed_running(w, "2.0.0"),
    });
    assert!(n >= 8);
}

/// A counter running for five turns on a device whose snapshots must go to flash.
fn counter_world() -> World {
    let mut w = World::with(config(), FLASH_ONLY);
    let m = small(w.publish_module("counter", "1.0.0", &counter_wasm("counter")));
    w.deploy(vec![m]);
    w.advance(TURN_MS * 5);
    assert_eq!(counts(&w, "counter"), [1, 2, 3, 4, 5]);
    w
}

const FLASH_ONLY: Limits = Limits {
    snapshot_pool: 0,
    ..LIMITS
};

/// After a reboot the counter continues from 5 if a snapshot was in flash, else it
/// starts again (its RAM state died with the power, as any running module's does).
/// Evicted by command, it waits for a Start (which changes nothing if it runs).
fn counter_continues(w: &mut World, from_snapshot: bool) {
    w.input(Input::LinkUp);
    w.command(Action::Start("counter".into()));
    w.clear_sent();
    w.advance(TURN_MS * 2);
    let expect: &[u64] = if from_snapshot { &[6, 7] } else { &[1, 2] };
    assert_eq!(counts(w, "counter"), expect);
}

#[test]
fn snapshot_to_flash_survives_a_cut_anywhere() {
    let n = enumerate(&Scenario {
        name: "snapshot",
        limits: FLASH_ONLY,
        setup: counter_world,
        step: |w| {
            w.command(evict("counter"));
        },
        at_boot: |state| !state.snapshots.is_empty(),
        finish: counter_continues,
    });
    assert!(n >= 3);
}

#[test]
fn restore_from_flash_survives_a_cut_anywhere() {
    let n = enumerate(&Scenario {
        name: "restore",
        limits: FLASH_ONLY,
        setup: || {
            let mut w = counter_world();
            w.command(evict("counter"));
            assert!(has_snapshot_in_flash(&w));
            w
        },
        step: |w| {
            w.command(Action::Start("counter".into()));
            w.advance(TURN_MS);
            // A cut before the Start is recorded rejects it; the counter waits on.
            if !w.dev().flash().power_lost() {
                assert_eq!(counts(w, "counter").last(), Some(&6));
            }
        },
        at_boot: |state| !state.snapshots.is_empty(),
        finish: counter_continues,
    });
    assert!(n >= 1);
}

#[test]
fn a_trust_update_survives_a_cut_anywhere() {
    use wpm_manifests::{golden, KeyPair, Topic, TrustChain, TrustUpdate};
    fn keys() -> [KeyPair; 2] {
        [golden::key(), KeyPair::from_seed(&[0x42; 32])]
    }
    let n = enumerate(&Scenario {
        name: "trust update",
        limits: LIMITS,
        setup: World::new,
        step: |w| {
            let [old, new] = keys();
            let update = TrustUpdate::seal(&old, 1, &[old.public(), new.public()]);
            let chain = TrustChain {
                links: vec![update.into()],
            };
            w.publish(Topic::Trust.render(), wpm_manifests::encode(&chain));
        },
        // Old keys or new ones, never a mix.
        at_boot: |state| match &state.trust {
            None => false,
            Some(t) => {
                let [old, new] = keys();
                assert_eq!(t.epoch, 1);
                assert_eq!(*t.keys, [old.public().into(), new.public().into()]);
                true
            }
        },
        // A device that kept the old keys follows the retained chain when it reconnects.
        finish: |w, _| {
            w.connect();
            let [old, new] = keys();
            assert_eq!(w.dev().trust(), (1, vec![old.public(), new.public()]));
        },
    });
    assert!(n >= 1);
}

fn has_snapshot_in_flash(w: &World) -> bool {
    let bytes = w.dev().flash().as_bytes();
    !stored_state(bytes, FLASH_ONLY).snapshots.is_empty()
}

#[test]
fn a_thousand_updates_spread_their_erases() {
    let mut w = World::new();
    let updates = 1000;
    for u in 1..=updates {
        let m = w.publish_module("hello", &format!("{u}.0.0"), &hello(&format!("v{u}")));
        w.deploy(vec![m]);
        w.advance(TURN_MS * HEALTH_TURNS as u64);
    }
    assert_eq!(
        w.modules(),
        vec![module_state("hello", "1000.0.0", "running")]
    );
    let erases = w.dev().flash().page_erases().to_vec();
    println!(
        "page erases after {updates} updates: state ring {:?}, banks {:?}",
        &erases[..4],
        &erases[4..]
    );
    let (ring, banks) = erases.split_at(4);
    // One bank page per update, spread over five banks; each ring page wrapped into
    // about equally often.
    assert!(
        banks.iter().all(|e| *e <= (updates / 5 + 1) as u32),
        "{banks:?}"
    );
    assert!(
        ring.iter().max().unwrap() - ring.iter().min().unwrap() <= 1,
        "{ring:?}"
    );
}
