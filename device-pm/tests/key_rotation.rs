//! Key rotation on the device: it follows the registry's trust chain, keeps the keys it
//! reached across reboots, and believes only them.

mod common;

use common::*;
use minicbor::bytes::ByteVec;
use wpm_manifests::{golden, EventKind, KeyPair, Topic, TrustChain, TrustUpdate};

fn new_key() -> KeyPair {
    KeyPair::from_seed(&[0x42; 32])
}

fn link(signer: &KeyPair, epoch: u64, keys: &[&KeyPair]) -> ByteVec {
    let keys: Vec<[u8; 32]> = keys.iter().map(|k| k.public()).collect();
    TrustUpdate::seal(signer, epoch, &keys).into()
}

fn publish_chain(w: &mut World, links: Vec<ByteVec>) {
    w.publish(
        Topic::Trust.render(),
        wpm_manifests::encode(&TrustChain { links }),
    );
}

fn rejected(w: &World) -> Vec<String> {
    (w.events().into_iter())
        .filter_map(|e| match e {
            EventKind::ManifestRejected { reason } => Some(reason),
            _ => None,
        })
        .collect()
}

#[test]
fn a_device_follows_a_rotation_and_refuses_the_old_key_once_it_is_retired() {
    let (old, new) = (golden::key(), new_key());
    let mut w = World::new();
    let hello = w.publish_module("hello", "1.0.0", &wasm("v1", 0, ""));
    publish_chain(&mut w, vec![link(&old, 1, &[&old, &new])]);
    assert_eq!(w.dev().trust(), (1, vec![old.public(), new.public()]));
    // Both keys are trusted while the fleet moves: the new key's deployment installs.
    let d = w.deployment(vec![hello.clone()]);
    w.deploy_signed(&new, &d);
    w.advance(TURN_MS * HEALTH_TURNS as u64);
    assert_eq!(w.modules(), vec![module_state("hello", "1.0.0", "running")]);

    publish_chain(
        &mut w,
        vec![link(&old, 1, &[&old, &new]), link(&new, 2, &[&new])],
    );
    assert_eq!(w.dev().trust(), (2, vec![new.public()]));
    let updates: Vec<_> = (w.events().into_iter())
        .filter(|e| matches!(e, EventKind::TrustUpdated { .. }))
        .collect();
    assert_eq!(
        updates,
        [
            EventKind::TrustUpdated { epoch: 1 },
            EventKind::TrustUpdated { epoch: 2 }
        ]
    );
    // The retired key no longer speaks for the registry, even after a reboot.
    w.reboot();
    assert_eq!(w.dev().trust(), (2, vec![new.public()]));
    let later = w.deployment(vec![]);
    w.deploy_signed(&old, &later);
    assert_eq!(rejected(&w), ["signed by an untrusted key"]);
    assert_eq!(w.modules(), vec![module_state("hello", "1.0.0", "running")]);
}

#[test]
fn a_device_that_slept_through_two_rotations_follows_the_whole_chain() {
    let (a, b, c) = (golden::key(), new_key(), KeyPair::from_seed(&[0x43; 32]));
    let mut w = World::new();
    w.input(wpm_device_pm::Input::LinkDown);
    let chain = vec![
        link(&a, 1, &[&a, &b]),
        link(&b, 2, &[&b]),
        link(&b, 3, &[&b, &c]),
        link(&c, 4, &[&c]),
    ];
    w.retained.insert(
        Topic::Trust.render(),
        wpm_manifests::encode(&TrustChain { links: chain }),
    );
    // Reconnecting delivers the retained chain.
    w.reboot();
    assert_eq!(w.dev().trust(), (4, vec![c.public()]));
}

#[test]
fn a_trust_update_not_signed_by_a_trusted_key_changes_nothing_and_is_reported() {
    let thief = KeyPair::from_seed(&[0x66; 32]);
    let mut w = World::new();
    publish_chain(&mut w, vec![link(&thief, 1, &[&thief])]);
    assert_eq!(w.dev().trust(), (0, vec![golden::key().public()]));
    assert!(
        matches!(
            w.events().as_slice(),
            [EventKind::TrustRejected { epoch: 0, reason }] if reason.contains("untrusted key")
        ),
        "{:?}",
        w.events()
    );
    // Garbage and an empty retained message are refused or ignored alike.
    w.publish(Topic::Trust.render(), b"\x00garbage".to_vec());
    w.publish(Topic::Trust.render(), Vec::new());
    assert_eq!(w.dev().trust(), (0, vec![golden::key().public()]));
}

#[test]
fn a_deployment_refused_before_the_chain_arrived_installs_once_the_keys_are_learnt() {
    let (old, new) = (golden::key(), new_key());
    let mut w = World::new();
    let hello = w.publish_module("hello", "1.0.0", &wasm("v1", 0, ""));
    let d = w.deployment(vec![hello]);
    w.deploy_signed(&new, &d);
    assert_eq!(rejected(&w), ["signed by an untrusted key"]);
    publish_chain(&mut w, vec![link(&old, 1, &[&old, &new])]);
    w.advance(TURN_MS * HEALTH_TURNS as u64);
    assert_eq!(w.modules(), vec![module_state("hello", "1.0.0", "running")]);
    assert_eq!(w.dev().status().trust_epoch, Some(1));
}
