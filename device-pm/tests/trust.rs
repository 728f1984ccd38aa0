//! What the device says and whom it believes about time: every report sealed with its
//! own key and numbered across reboots, and the provisioning floor for deployments.

mod common;

use common::*;
use wpm_device_pm::Output;
use wpm_manifests::{golden, EventKind, KeyPair, Topic};

#[test]
fn every_report_is_sealed_by_the_device_and_counters_grow_across_reboots() {
    let mut w = World::new();
    let hello = w.publish_module("hello", "1.0.0", &wasm("v1", 0, ""));
    w.deploy(vec![hello]);
    w.advance(TURN_MS * 3);
    w.reboot();
    w.advance(TURN_MS * 3);
    w.reboot();
    w.command(wpm_manifests::Action::Pin("hello".into()));
    w.advance(TURN_MS * 3);
    let mut last = None;
    let mut kinds = std::collections::HashSet::new();
    for out in &w.sent {
        if let Output::Publish { payload, .. } = out {
            // Each opens with the device's key (a panic otherwise) and names the device.
            let r = report(payload);
            assert_eq!(r.device, DEVICE);
            assert!(
                last.is_none_or(|l| r.counter > l),
                "{} after {last:?}",
                r.counter
            );
            last = Some(r.counter);
            kinds.insert(std::mem::discriminant(&r.body));
        }
    }
    // Status, events, presence and telemetry were all among them.
    assert_eq!(kinds.len(), 4);
}

#[test]
fn a_report_sealed_with_another_key_does_not_open_as_this_device() {
    let w = World::new();
    let presence = &w.retained[&Topic::Presence(DEVICE).render()];
    let other = KeyPair::from_seed(&[0xEE; 32]).public();
    assert!(wpm_manifests::TrustedKeys::new(&[other])
        .open::<wpm_manifests::Report>(presence)
        .is_err());
}

#[test]
fn a_new_device_accepts_no_deployment_older_than_its_provisioning_floor() {
    let mut provisioned = config();
    provisioned.sequence_floor = 5;
    let mut w = World::with(provisioned, LIMITS);
    let hello = w.publish_module("hello", "1.0.0", &wasm("v1", 0, ""));
    // A genuine, unexpired deployment from before the device was provisioned, replayed.
    let old = w.deployment(vec![hello.clone()]);
    w.deploy_signed(&golden::key(), &old);
    assert_eq!(
        w.events(),
        vec![EventKind::ManifestReplayed {
            sequence: old.sequence,
            accepted: 5
        }]
    );
    assert_eq!(w.dev().status().sequence, 0);
    // The one current at provisioning installs.
    let mut current = w.deployment(vec![hello]);
    current.sequence = 5;
    w.deploy_signed(&golden::key(), &current);
    w.advance(TURN_MS * HEALTH_TURNS as u64);
    assert_eq!(w.modules(), vec![module_state("hello", "1.0.0", "running")]);
}
