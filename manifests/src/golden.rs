//! The values behind the golden vectors in `manifests/tests/vectors/`.
//!
//! Each side of wpm checks its own encoder or decoder against those bytes; the registry
//! also checks that its signer reproduces them (ed25519 signatures are deterministic).
//! The key here is public test material and must never be trusted by a real device.

use crate::signing::KeyPair;
use crate::types::*;
use alloc::string::ToString;
use alloc::vec;

/// The fixed test signing key (seed `[7; 32]`).
pub fn key() -> KeyPair {
    KeyPair::from_seed(&[7; 32])
}

pub fn module_ref() -> ModuleRef {
    ModuleRef {
        name: "hello".to_string(),
        version: "1.0.0".to_string(),
        sha256: crate::sha256(b"\0asm\x01\0\0\0").into(),
        size: 8,
        chunk_size: 4,
        memory_limit: 65536,
        fuel_per_turn: 100_000,
        priority: 5,
        pinned: false,
    }
}

pub fn deployment() -> Deployment {
    Deployment {
        target: Target::Group("eu-west".to_string()),
        sequence: 42,
        issued_at: 1_790_000_000,
        expires_at: 1_790_604_800,
        modules: vec![module_ref()],
        health: None,
    }
}

pub fn module_manifest() -> ModuleManifest {
    ModuleManifest {
        name: "hello".to_string(),
        version: "1.0.0".to_string(),
        sha256: crate::sha256(b"\0asm\x01\0\0\0").into(),
        size: 8,
        chunk_size: 4,
        chunk_hashes: vec![
            crate::sha256(b"\0asm").into(),
            crate::sha256(b"\x01\0\0\0").into(),
        ],
    }
}

pub fn chunk() -> Chunk {
    Chunk {
        module: crate::sha256(b"\0asm\x01\0\0\0").into(),
        index: 1,
        data: vec![1, 0, 0, 0].into(),
    }
}

pub fn status() -> DeviceStatus {
    DeviceStatus {
        device: "dev-0001".to_string(),
        groups: vec!["eu-west".to_string()],
        sequence: 42,
        modules: vec![ModuleStatus {
            name: "hello".to_string(),
            version: "1.0.0".to_string(),
            sha256: crate::sha256(b"\0asm\x01\0\0\0").into(),
            state: ModuleState::Running,
            last_error: None,
        }],
        slots_used: 1,
        slots_total: 4,
        flash_free: 512 * 1024,
        ram_free: 96 * 1024,
        last_error: None,
        at_ms: 1_790_000_000_123,
        trust_epoch: None,
    }
}

pub fn event() -> Event {
    Event {
        device: "dev-0001".to_string(),
        at_ms: 1_790_000_000_456,
        kind: EventKind::Trapped {
            module: "hello".to_string(),
            version: "1.0.0".to_string(),
            reason: "out of fuel".to_string(),
        },
    }
}

pub fn command() -> Command {
    Command {
        device: "dev-0001".to_string(),
        sequence: 43,
        issued_at: 1_790_000_100,
        expires_at: 1_790_000_400,
        action: Action::Stop("hello".to_string()),
    }
}
