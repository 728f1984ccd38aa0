//! The device package manager end to end against an in-memory broker and registry.

mod common;

use common::*;
use wpm_device_pm::runtime::MAX_SLICES_PER_CALL;
use wpm_device_pm::{Input, Output};
use wpm_manifests::{golden, EventKind, KeyPair, Presence, ReportBody, Topic};

fn rejected(w: &World) -> Vec<String> {
    w.events()
        .into_iter()
        .filter_map(|e| match e {
            EventKind::ManifestRejected { reason } => Some(reason),
            _ => None,
        })
        .collect()
}

/// A world running `hello@1.0.0` (telemetry "v1"), past its health check.
fn running_v1() -> (World, wpm_manifests::ModuleRef) {
    let mut w = World::new();
    let v1 = w.publish_module("hello", "1.0.0", &wasm("v1", 0, ""));
    w.deploy(vec![v1.clone()]);
    w.advance(TURN_MS * HEALTH_TURNS as u64);
    assert_eq!(w.modules(), vec![module_state("hello", "1.0.0", "running")]);
    w.clear_sent();
    (w, v1)
}

#[test]
fn installs_and_runs_a_module() {
    let mut w = World::new();
    // LinkUp: deployment topics, presence and status.
    for t in [
        "wpm/v1/deploy/fleet",
        "wpm/v1/deploy/group/eu",
        "wpm/v1/deploy/device/dev-1",
    ] {
        assert_eq!(w.subscriptions.get(t), Some(&1), "{t}");
    }
    // The session's presence announces the will sealed for it, before it.
    let presence = Topic::Presence(DEVICE).render();
    let (will_topic, will) = w.will.clone().unwrap();
    assert_eq!(will_topic, presence);
    let will = report(&will);
    let online = report(&w.retained[&presence]);
    assert_eq!(
        will.body,
        ReportBody::Presence(Presence {
            online: false,
            will: None
        })
    );
    assert_eq!(
        online.body,
        ReportBody::Presence(Presence {
            online: true,
            will: Some(will.counter)
        })
    );
    assert!(will.counter < online.counter);

    let wasm = wasm("v1", 0, "");
    let m = w.publish_module("hello", "1.0.0", &wasm);
    assert!(m.chunk_count() >= 4, "the test wants several chunks");
    w.deploy(vec![m.clone()]);
    assert!(w.max_chunks_in_flight <= 2, "chunk window exceeded");
    let events = w.events();
    assert_eq!(events[0], EventKind::ManifestAccepted { sequence: 1 });
    // A download faster than the progress interval reports no progress: air time.
    let progress = events
        .iter()
        .filter(|e| matches!(e, EventKind::DownloadProgress { .. }))
        .count();
    assert_eq!(progress, 0, "{events:?}");
    assert!(events.contains(&EventKind::Installed {
        module: "hello".into(),
        version: "1.0.0".into()
    }));
    assert!(events.contains(&EventKind::Started {
        module: "hello".into(),
        version: "1.0.0".into()
    }));
    // The module logged its tag from wpm_init.
    assert!(w.sent.contains(&Output::Log {
        module: "hello".into(),
        level: 2,
        message: "v1".into()
    }));
    // Every chunk topic was left again.
    for i in 0..m.chunk_count() {
        assert_eq!(w.subscriptions[&Topic::Chunk(&m.sha256, i).render()], 1);
    }

    w.advance(TURN_MS * 2);
    assert_eq!(w.telemetry("hello"), vec![b"v1".to_vec(), b"v1".to_vec()]);

    let status = w.dev().status();
    assert_eq!(status.sequence, 1);
    assert_eq!((status.slots_used, status.slots_total), (1, 3));
    assert_eq!(status.flash_free, 4 * LIMITS.bank_size);
    assert!(status.ram_free < LIMITS.ram_budget - 65536);
    assert_eq!(status.last_error, None);
    // Two turns in, the health check (HEALTH_TURNS = 3) is still under way.
    let published = published_status;
    assert_eq!(
        published(&w).modules[0].state,
        wpm_manifests::ModuleState::Verifying
    );
    w.advance(TURN_MS);
    assert_eq!(
        published(&w).modules[0].state,
        wpm_manifests::ModuleState::Running
    );
}

/// Status records the device published since the last `clear_sent`.
fn statuses(w: &World) -> usize {
    let status_topic = Topic::Status(DEVICE).render();
    (w.sent.iter())
        .filter(
            |o| matches!(o, Output::Publish { topic, retain: true, .. } if *topic == status_topic),
        )
        .count()
}

#[test]
fn status_is_republished_periodically_and_not_while_offline() {
    let (mut w, _) = running_v1();
    w.advance(config().tuning.status_interval_ms);
    assert_eq!(statuses(&w), 1);
    w.input(Input::LinkDown);
    w.clear_sent();
    w.advance(2 * config().tuning.status_interval_ms);
    assert_eq!(statuses(&w), 0);
    assert!(w.sent.iter().all(|o| !matches!(o, Output::Publish { .. })));
    w.input(Input::LinkUp);
    assert_eq!(statuses(&w), 1);
}

#[test]
fn a_slow_download_reports_progress_without_repeating_its_status() {
    let mut w = World::new();
    let wasm = wasm("v1", 0, "");
    let m = w.publish_module_partly("hello", "1.0.0", &wasm, Some(1));
    let sha: [u8; 32] = *m.sha256;
    w.deploy(vec![m]);
    w.clear_sent();
    // One chunk every 6 s: progress every 10 s, the status ("downloading") unchanged.
    let chunks: Vec<&[u8]> = wasm.chunks(CHUNK_SIZE as usize).collect();
    for (i, data) in chunks.iter().enumerate().skip(1).take(chunks.len() - 2) {
        w.advance(6_000);
        w.publish_chunk(&sha, i as u32, data);
    }
    let progress = (w.events().iter())
        .filter(|e| matches!(e, EventKind::DownloadProgress { .. }))
        .count();
    assert!(progress >= 1, "the test wants progress events");
    assert_eq!(statuses(&w), 0, "a status that says nothing new was sent");
    // The last chunk changes the status: sent once.
    w.publish_chunk(&sha, chunks.len() as u32 - 1, chunks[chunks.len() - 1]);
    assert_eq!(statuses(&w), 1);
    assert_eq!(
        w.modules(),
        vec![module_state("hello", "1.0.0", "verifying")]
    );
}

#[test]
fn upgrades_v1_to_v2_and_frees_v1() {
    let (mut w, _) = running_v1();
    let v2 = w.publish_module("hello", "2.0.0", &wasm("v2", 0, ""));
    w.deploy(vec![v2]);
    // v1 stays installed (its bank kept) while v2 is on probation.
    assert_eq!(
        w.modules(),
        vec![
            module_state("hello", "1.0.0", "installed"),
            module_state("hello", "2.0.0", "verifying")
        ]
    );
    assert_eq!(w.dev().status().flash_free, 3 * LIMITS.bank_size);
    w.advance(TURN_MS * HEALTH_TURNS as u64);
    assert_eq!(w.modules(), vec![module_state("hello", "2.0.0", "running")]);
    assert!(has_event(&w, |e| *e
        == EventKind::Removed {
            module: "hello".into(),
            version: "1.0.0".into()
        }));
    assert_eq!(w.dev().status().flash_free, 4 * LIMITS.bank_size);
    assert!(w.telemetry("hello").iter().all(|t| t == b"v2"));
}

#[test]
fn corrupt_chunk_is_refused_then_fetched_again() {
    let mut w = World::new();
    let wasm = wasm("v1", 0, "");
    let m = w.publish_module("hello", "1.0.0", &wasm);
    let sha: [u8; 32] = *m.sha256;
    w.publish_chunk(&sha, 1, &[0u8; CHUNK_SIZE as usize]);
    w.deploy(vec![m]);
    assert!(has_event(&w, |e| matches!(e,
        EventKind::ChunkRejected { index: 1, reason, .. } if reason.contains("sha256"))));
    assert_eq!(
        w.modules(),
        vec![module_state("hello", "1.0.0", "downloading")]
    );

    // The registry republishes the right bytes; the device asks again after its backoff.
    w.publish_chunk(&sha, 1, &wasm[64..128]);
    w.advance(5_000);
    assert_eq!(w.modules(), vec![module_state("hello", "1.0.0", "running")]);
    assert_eq!(w.subscriptions[&Topic::Chunk(&sha, 1).render()], 2);
}

#[test]
fn chunk_that_stays_corrupt_fails_the_install() {
    let mut w = World::new();
    let m = w.publish_module("hello", "1.0.0", &wasm("v1", 0, ""));
    let sha: [u8; 32] = *m.sha256;
    w.publish(Topic::Chunk(&sha, 0).render(), b"\xff\x00".to_vec());
    w.deploy(vec![m]);
    w.advance(60_000);
    let events = w.events();
    assert!(events
        .iter()
        .any(|e| matches!(e, EventKind::MalformedMessage { .. })));
    assert!(events.iter().any(|e| matches!(e,
        EventKind::InstallFailed { reason, .. } if reason.contains("chunk 0 failed"))));
    assert_eq!(w.modules(), vec![module_state("hello", "1.0.0", "failed")]);
    // Given up means no more requests.
    let asked = w.subscriptions[&Topic::Chunk(&sha, 0).render()];
    w.advance(60_000);
    assert_eq!(w.subscriptions[&Topic::Chunk(&sha, 0).render()], asked);
}

#[test]
fn manifest_signed_by_another_key_is_refused_and_v1_keeps_running() {
    let (mut w, _) = running_v1();
    let v2 = w.publish_module("hello", "2.0.0", &wasm("v2", 0, ""));
    let d = w.deployment(vec![v2]);
    w.deploy_signed(&KeyPair::from_seed(&[9; 32]), &d);
    assert_eq!(rejected(&w), vec!["signed by an untrusted key".to_string()]);
    w.advance(TURN_MS);
    assert_eq!(w.telemetry("hello"), vec![b"v1".to_vec()]);
    let status = w.dev().status();
    assert_eq!(status.sequence, 1);
    assert_eq!(
        status.last_error.as_deref(),
        Some("signed by an untrusted key")
    );

    // A forged signature under the trusted key id is caught too.
    let mut sealed = golden::key().seal(&d);
    let last = sealed.len() - 1;
    sealed[last] ^= 1;
    w.publish(Topic::Deployment(&d.target).render(), sealed);
    assert!(rejected(&w).contains(&"signature does not verify".to_string()));
    assert_eq!(w.modules(), vec![module_state("hello", "1.0.0", "running")]);
}

#[test]
fn replayed_manifest_is_ignored_and_reported_once_without_an_error() {
    let (mut w, v1) = running_v1();
    let old = w.deployment(vec![]); // sequence 2
    let current = w.deployment(vec![v1.clone()]); // sequence 3
    w.deploy_signed(&golden::key(), &current);
    assert_eq!(
        w.events(),
        vec![EventKind::ManifestAccepted { sequence: 3 }]
    );
    w.clear_sent();
    // The retained copy again: silently ignored.
    w.deploy_signed(&golden::key(), &current);
    assert_eq!(w.events(), vec![]);
    // An older one, twice: ignored, reported once, and not an error of the device.
    w.deploy_signed(&golden::key(), &old);
    w.deploy_signed(&golden::key(), &old);
    assert_eq!(
        w.events(),
        vec![EventKind::ManifestReplayed {
            sequence: 2,
            accepted: 3
        }]
    );
    assert_eq!(w.modules(), vec![module_state("hello", "1.0.0", "running")]);
    assert_eq!(w.dev().status().sequence, 3);
    assert_eq!(w.dev().status().last_error, None);
}

#[test]
fn expired_manifest_is_refused() {
    let (mut w, _) = running_v1();
    let mut d = w.deployment(vec![]);
    d.expires_at = w.now / 1000 - 1;
    w.deploy_signed(&golden::key(), &d);
    let reasons = rejected(&w);
    assert_eq!(reasons.len(), 1);
    assert!(reasons[0].starts_with("expired at"), "{}", reasons[0]);
    assert_eq!(w.modules(), vec![module_state("hello", "1.0.0", "running")]);
    assert_eq!(w.dev().status().sequence, 1);
}

#[test]
fn manifest_for_another_device_is_refused() {
    let (mut w, _) = running_v1();
    let mut d = w.deployment(vec![]);
    d.target = wpm_manifests::Target::Device("dev-2".into());
    // Delivered on our own topic, as a broker or attacker could.
    w.publish(
        Topic::Deployment(&wpm_manifests::Target::Fleet).render(),
        golden::key().seal(&d),
    );
    assert_eq!(
        rejected(&w),
        vec!["manifest addresses device dev-2, not this device".to_string()]
    );
    assert_eq!(w.modules(), vec![module_state("hello", "1.0.0", "running")]);
}

#[test]
fn truncated_cbor_is_refused() {
    let (mut w, _) = running_v1();
    let d = w.deployment(vec![]);
    let sealed = golden::key().seal(&d);
    w.publish(
        Topic::Deployment(&d.target).render(),
        sealed[..sealed.len() / 2].to_vec(),
    );
    let reasons = rejected(&w);
    assert_eq!(reasons.len(), 1);
    assert!(reasons[0].starts_with("malformed CBOR"), "{}", reasons[0]);
    assert_eq!(w.modules(), vec![module_state("hello", "1.0.0", "running")]);
}

#[test]
fn new_version_whose_init_fails_rolls_back_and_is_not_retried() {
    let (mut w, _) = running_v1();
    let v2 = w.publish_module("hello", "2.0.0", &wasm("v2", 7, ""));
    w.deploy(vec![v2]);
    assert!(has_event(&w, |e| *e
        == EventKind::InstallFailed {
            module: "hello".into(),
            version: "2.0.0".into(),
            reason: "wpm_init returned 7".into()
        }));
    assert!(has_event(&w, |e| *e
        == EventKind::RolledBack {
            module: "hello".into(),
            from_version: "2.0.0".into(),
            to_version: "1.0.0".into(),
            reason: "wpm_init returned 7".into()
        }));
    assert_eq!(
        w.modules(),
        vec![
            module_state("hello", "1.0.0", "running"),
            module_state("hello", "2.0.0", "failed")
        ]
    );
    w.advance(TURN_MS);
    assert_eq!(w.telemetry("hello"), vec![b"v1".to_vec()]);
    // Not retried after a reboot either.
    w.reboot();
    w.clear_sent();
    w.advance(TURN_MS);
    assert_eq!(w.telemetry("hello"), vec![b"v1".to_vec()]);
    assert!(!has_event(
        &w,
        |e| matches!(e, EventKind::Started { version, .. } if version == "2.0.0")
    ));
}

#[test]
fn init_that_loops_forever_fails_the_install() {
    let mut w = World::new();
    let spin = wat::parse_str(
        r#"(module (memory (export "memory") 1)
            (func (export "wpm_init") (result i32) (loop (br 0)) (i32.const 0))
            (func (export "wpm_tick")))"#,
    )
    .unwrap();
    let m = w.publish_module("spin", "1.0.0", &spin);
    w.deploy(vec![m]);
    w.advance(TURN_MS * MAX_SLICES_PER_CALL as u64);
    assert!(has_event(&w, |e| matches!(e,
        EventKind::InstallFailed { reason, .. } if reason.contains("out of fuel"))));
    assert_eq!(w.dev().status().slots_used, 0);
}

#[test]
fn module_larger_than_a_bank_is_refused() {
    let mut w = World::new();
    let mut m = w.publish_module("big", "1.0.0", &wasm("x", 0, ""));
    m.size = LIMITS.bank_size + 1;
    w.deploy(vec![m]);
    assert!(has_event(&w, |e| matches!(e,
        EventKind::InstallFailed { reason, .. } if reason.contains("a flash bank holds"))));
}

#[test]
fn removed_from_the_deployment_means_stopped_and_removed() {
    let (mut w, _) = running_v1();
    w.deploy(vec![]);
    assert!(has_event(&w, |e| *e
        == EventKind::Removed {
            module: "hello".into(),
            version: "1.0.0".into()
        }));
    assert_eq!(w.modules(), vec![]);
    assert_eq!(w.dev().status().slots_used, 0);
}

#[test]
fn reboot_restores_modules_and_the_accepted_sequence() {
    let (mut w, v1) = running_v1();
    w.reboot();
    // Running again from flash alone; the retained deployment re-delivered is ignored.
    assert_eq!(w.modules(), vec![module_state("hello", "1.0.0", "running")]);
    assert_eq!(w.dev().status().sequence, 1);
    assert!(!has_event(&w, |e| matches!(
        e,
        EventKind::ManifestAccepted { .. }
    )));
    assert_eq!(
        w.subscriptions[&Topic::ModuleManifest(&v1.sha256).render()],
        1
    );
    w.advance(TURN_MS);
    assert_eq!(w.telemetry("hello"), vec![b"v1".to_vec()]);
}

#[test]
fn download_resumes_after_reboot_without_refetching_held_chunks() {
    let mut w = World::new();
    let wasm = wasm("v1", 0, "");
    let m = w.publish_module_partly("hello", "1.0.0", &wasm, Some(3));
    let sha: [u8; 32] = *m.sha256;
    w.deploy(vec![m.clone()]);
    assert_eq!(
        w.modules(),
        vec![module_state("hello", "1.0.0", "downloading")]
    );

    w.reboot();
    for (i, data) in wasm.chunks(CHUNK_SIZE as usize).enumerate().skip(3) {
        w.publish_chunk(&sha, i as u32, data);
    }
    assert_eq!(
        w.modules(),
        vec![module_state("hello", "1.0.0", "verifying")]
    );
    // Chunks 0..3 were in flash before the reboot: found there, not asked for again.
    for i in 0..3 {
        let asked = w.subscriptions[&Topic::Chunk(&sha, i).render()];
        assert_eq!(asked, 1, "chunk {i} asked for {asked} times");
    }
}

#[test]
fn download_resumes_after_link_down_and_up() {
    let mut w = World::new();
    let wasm = wasm("v1", 0, "");
    let m = w.publish_module_partly("hello", "1.0.0", &wasm, Some(2));
    let sha: [u8; 32] = *m.sha256;
    w.deploy(vec![m.clone()]);
    w.input(Input::LinkDown);
    for (i, data) in wasm.chunks(CHUNK_SIZE as usize).enumerate().skip(2) {
        w.publish_chunk(&sha, i as u32, data);
    }
    w.input(Input::LinkUp);
    assert_eq!(
        w.modules(),
        vec![module_state("hello", "1.0.0", "verifying")]
    );
    assert_eq!(w.subscriptions[&Topic::Chunk(&sha, 0).render()], 1);
}

#[test]
fn golden_deployment_vector_opens_with_the_golden_key() {
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../manifests/tests/vectors/deployment.sealed.cbor"
    ))
    .unwrap();
    let key = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../manifests/tests/vectors/public-key.bin"
    ))
    .unwrap();
    let keys = wpm_manifests::TrustedKeys::new(&[key.try_into().unwrap()]);
    let d: wpm_manifests::Deployment = keys.open(&bytes).unwrap();
    assert_eq!(d, golden::deployment());
}

#[test]
fn telemetry_is_rate_limited_and_size_checked() {
    let mut w = World::new();
    // Each turn: 1 telemetry from the template, then 5 more and 1 too large.
    let extra = "(drop (call $tel (i32.const 0) (i32.const 2)))".repeat(5)
        + "(drop (call $tel (i32.const 0) (i32.const 1025)))";
    let m = w.publish_module("chatty", "1.0.0", &wasm("ab", 0, &extra));
    w.deploy(vec![m]);
    w.clear_sent();
    w.advance(TURN_MS * 2);
    assert_eq!(w.telemetry("chatty").len(), 2 * 4);
    assert!(w.telemetry("chatty").iter().all(|t| t == b"ab"));
}

#[test]
fn module_manifest_that_disagrees_with_the_deployment_is_refused() {
    let mut w = World::new();
    let mut m = w.publish_module("hello", "1.0.0", &wasm("v1", 0, ""));
    m.chunk_size = 2 * CHUNK_SIZE;
    w.deploy(vec![m]);
    let reasons = rejected(&w);
    assert_eq!(reasons.len(), 1);
    assert!(
        reasons[0].contains("does not match the deployment"),
        "{}",
        reasons[0]
    );
    assert_eq!(w.modules(), vec![module_state("hello", "1.0.0", "failed")]);
}

#[test]
fn a_download_whose_manifest_never_comes_gives_up_with_a_reason_and_tries_again_later() {
    use wpm_device_pm::download::{REQUEST_TIMEOUT_MS, RETRY_LATER_MS, STALL_MS};
    let mut w = World::new();
    let hello = w.publish_module("hello", "1.0.0", &wasm("v1", 0, ""));
    // Someone cleared the retained manifest (an empty retained message).
    let manifest_topic = Topic::ModuleManifest(&hello.sha256).render();
    let manifest = w.retained.remove(&manifest_topic).unwrap();
    w.deploy(vec![hello.clone()]);
    w.clear_sent();
    // Asked for again every request timeout, and nothing said before the stall.
    w.advance(STALL_MS - 1_000);
    assert!(w.subscriptions[&manifest_topic] >= (STALL_MS / REQUEST_TIMEOUT_MS) as usize);
    assert_eq!(w.events(), vec![]);
    w.advance(2_000);
    let stalled: Vec<String> = (w.events().into_iter())
        .filter_map(|e| match e {
            EventKind::InstallFailed { reason, .. } => Some(reason),
            _ => None,
        })
        .collect();
    assert_eq!(stalled.len(), 1, "{stalled:?}");
    assert!(
        stalled[0].contains("module manifest did not come"),
        "{}",
        stalled[0]
    );
    assert!(stalled[0].contains("trying again"), "{}", stalled[0]);
    // Nobody asks for it while the download waits to be tried again.
    let asked = w.subscriptions[&manifest_topic];
    w.advance(RETRY_LATER_MS / 2);
    assert_eq!(w.subscriptions[&manifest_topic], asked);
    // The registry puts it back; the next try installs it, no new deployment needed.
    w.retained.insert(manifest_topic, manifest);
    w.advance(RETRY_LATER_MS / 2 + TURN_MS * (HEALTH_TURNS as u64 + 1));
    assert_eq!(w.modules(), vec![module_state("hello", "1.0.0", "running")]);
}

#[test]
fn a_download_whose_chunks_never_come_gives_up_with_a_reason() {
    use wpm_device_pm::download::STALL_MS;
    let mut w = World::new();
    // Only the first two chunks are on the broker.
    let hello = w.publish_module_partly("hello", "1.0.0", &wasm("v1", 0, ""), Some(2));
    w.deploy(vec![hello]);
    w.clear_sent();
    w.advance(STALL_MS + 1_000);
    assert!(has_event(&w, |e| matches!(
        e,
        EventKind::InstallFailed { reason, .. } if reason.contains("no chunk came") && reason.contains("2 of")
    )));
    assert_eq!(w.modules(), vec![]);
}
