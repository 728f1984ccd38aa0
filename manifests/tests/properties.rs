//! Round-trip and robustness properties of the wire types.

use proptest::prelude::*;
use wpm_manifests::*;

fn name() -> impl Strategy<Value = String> {
    "[a-z0-9_.-]{1,16}"
}

fn digest() -> impl Strategy<Value = Digest> {
    any::<[u8; 32]>().prop_map(Into::into)
}

fn module_ref() -> impl Strategy<Value = ModuleRef> {
    (
        name(),
        name(),
        digest(),
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        any::<u64>(),
        any::<u8>(),
        any::<bool>(),
    )
        .prop_map(
            |(
                name,
                version,
                sha256,
                size,
                chunk_size,
                memory_limit,
                fuel_per_turn,
                priority,
                pinned,
            )| ModuleRef {
                name,
                version,
                sha256,
                size,
                chunk_size,
                memory_limit,
                fuel_per_turn,
                priority,
                pinned,
            },
        )
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        Just(Target::Fleet),
        name().prop_map(Target::Group),
        name().prop_map(Target::Device)
    ]
}

fn deployment() -> impl Strategy<Value = Deployment> {
    (
        target(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        prop::collection::vec(module_ref(), 0..4),
        prop::option::of((any::<u32>(), any::<u32>())),
    )
        .prop_map(
            |(target, sequence, issued_at, expires_at, modules, health)| Deployment {
                target,
                sequence,
                issued_at,
                expires_at,
                modules,
                health: health.map(|(turns, seconds)| HealthWindow { turns, seconds }),
            },
        )
}

fn status() -> impl Strategy<Value = DeviceStatus> {
    let module = (
        name(),
        name(),
        digest(),
        0u8..7,
        proptest::option::of(".{0,20}"),
    )
        .prop_map(|(name, version, sha256, s, last_error)| {
            let state = [
                ModuleState::Downloading,
                ModuleState::Installed,
                ModuleState::Running,
                ModuleState::Stopped,
                ModuleState::Failed,
                ModuleState::Evicted,
                ModuleState::Verifying,
            ][s as usize];
            ModuleStatus {
                name,
                version,
                sha256,
                state,
                last_error,
            }
        });
    (
        name(),
        prop::collection::vec(name(), 0..3),
        any::<u64>(),
        prop::collection::vec(module, 0..4),
        any::<(u16, u16, u32, u32, u64)>(),
        proptest::option::of(".{0,20}"),
    )
        .prop_map(
            |(
                device,
                groups,
                sequence,
                modules,
                (slots_used, slots_total, flash_free, ram_free, at_ms),
                last_error,
            )| DeviceStatus {
                device,
                groups,
                sequence,
                modules,
                slots_used,
                slots_total,
                flash_free,
                ram_free,
                last_error,
                at_ms,
                trust_epoch: None,
            },
        )
}

proptest! {
    #[test]
    fn deployment_round_trips(d in deployment()) {
        prop_assert_eq!(decode::<Deployment>(&encode(&d)).unwrap(), d.clone());
        let key = golden::key();
        let trusted = TrustedKeys::new(&[key.public()]);
        prop_assert_eq!(trusted.open::<Deployment>(&key.seal(&d)).unwrap(), d);
    }

    #[test]
    fn status_round_trips(s in status()) {
        prop_assert_eq!(decode::<DeviceStatus>(&encode(&s)).unwrap(), s);
    }

    #[test]
    fn chunk_round_trips(module in digest(), index in any::<u32>(), data in prop::collection::vec(any::<u8>(), 0..64)) {
        let c = Chunk { module, index, data: data.into() };
        prop_assert_eq!(decode::<Chunk>(&encode(&c)).unwrap(), c);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode::<Deployment>(&bytes);
        let _ = decode::<ModuleManifest>(&bytes);
        let _ = decode::<Chunk>(&bytes);
        let _ = decode::<DeviceStatus>(&bytes);
        let _ = decode::<Event>(&bytes);
        let _ = decode::<Presence>(&bytes);
        let trusted = TrustedKeys::new(&[golden::key().public()]);
        let _ = trusted.open::<Deployment>(&bytes);
    }

    #[test]
    fn truncated_messages_are_errors(d in deployment(), cut in any::<prop::sample::Index>()) {
        let bytes = golden::key().seal(&d);
        let cut = cut.index(bytes.len());
        let trusted = TrustedKeys::new(&[golden::key().public()]);
        prop_assert!(trusted.open::<Deployment>(&bytes[..cut]).is_err());
    }
}

#[test]
fn names_are_topic_safe() {
    assert!(valid_name("dev-0001"));
    assert!(valid_name("hello_world.v2"));
    for bad in ["", "a/b", "+", "#", "a b", ".hidden", &"x".repeat(65)] {
        assert!(!valid_name(bad), "{bad:?} accepted");
    }
}
