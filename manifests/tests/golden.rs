//! Golden vectors: the wire format, frozen. Run with `WPM_BLESS=1` to rewrite the files
//! after an intended format change (and say so in the commit).

use std::path::PathBuf;
use wpm_manifests::{decode, encode, golden, Deployment, ModuleManifest, TrustedKeys};

fn check(name: &str, bytes: &[u8]) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/vectors")
        .join(name);
    if std::env::var_os("WPM_BLESS").is_some() {
        std::fs::write(&path, bytes).unwrap();
    }
    let want = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(bytes, &want[..], "{name} differs from the golden vector");
}

#[test]
fn vectors_match() {
    let key = golden::key();
    check("deployment.sealed.cbor", &key.seal(&golden::deployment()));
    check(
        "module-manifest.sealed.cbor",
        &key.seal(&golden::module_manifest()),
    );
    check("command.sealed.cbor", &key.seal(&golden::command()));
    check("chunk.cbor", &encode(&golden::chunk()));
    check("status.cbor", &encode(&golden::status()));
    check("event.cbor", &encode(&golden::event()));
    check("public-key.bin", &key.public());
}

#[test]
fn vectors_open_and_decode() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors");
    let read = |n: &str| std::fs::read(dir.join(n)).unwrap();
    let trusted = TrustedKeys::new(&[golden::key().public()]);
    let d: Deployment = trusted.open(&read("deployment.sealed.cbor")).unwrap();
    assert_eq!(d, golden::deployment());
    let m: ModuleManifest = trusted.open(&read("module-manifest.sealed.cbor")).unwrap();
    assert_eq!(m, golden::module_manifest());
    assert_eq!(
        decode::<wpm_manifests::Chunk>(&read("chunk.cbor")).unwrap(),
        golden::chunk()
    );
    assert_eq!(
        decode::<wpm_manifests::DeviceStatus>(&read("status.cbor")).unwrap(),
        golden::status()
    );
    assert_eq!(
        decode::<wpm_manifests::Event>(&read("event.cbor")).unwrap(),
        golden::event()
    );
}

#[test]
fn wrong_key_and_tampering_are_refused() {
    let sealed = golden::key().seal(&golden::deployment());
    let other = TrustedKeys::new(&[wpm_manifests::KeyPair::from_seed(&[9; 32]).public()]);
    assert!(matches!(
        other.open::<Deployment>(&sealed),
        Err(wpm_manifests::OpenError::UnknownKey)
    ));

    let trusted = TrustedKeys::new(&[golden::key().public()]);
    // Flip every byte in turn: no single-byte change may open.
    for i in 0..sealed.len() {
        let mut t = sealed.clone();
        t[i] ^= 0x01;
        assert!(
            trusted.open::<Deployment>(&t).is_err(),
            "byte {i} flipped still opened"
        );
    }
    // A module-manifest signature must not pass for a deployment.
    let mm = golden::key().seal(&golden::module_manifest());
    assert!(matches!(
        trusted.open::<Deployment>(&mm),
        Err(wpm_manifests::OpenError::BadSignature)
    ));
}
