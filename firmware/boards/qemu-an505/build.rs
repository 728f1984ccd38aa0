//! Puts memory.x on the linker path and builds the on-target test's flash image: the
//! retained messages a registry would publish (signed deployments, signed module
//! manifests, module chunks) for the example modules, signed by a fixture key that the
//! fixture provisioning record trusts.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::PathBuf;
use wpm_manifests::signing::KeyPair;
use wpm_manifests::{Action, Chunk, Command, Deployment, ModuleManifest, ModuleRef, Target, Topic};

/// Test-only signing keys; the networked device trusts the key provisioned for it.
const REGISTRY_SEED: [u8; 32] = [0x5a; 32];
const ROGUE_SEED: [u8; 32] = [0x66; 32];
/// The on-target device's own key (its provisioning record's `device_key`).
const ONTARGET_DEVICE_KEY: [u8; 32] = [0xd1; 32];
const CHUNK: usize = 1024;
/// 2026-01-01T00:00:00Z: the device clock of the on-target run starts here.
pub const EPOCH_S: u64 = 1_767_225_600;

struct Image {
    bytes: Vec<u8>,
    consts: String,
}

impl Image {
    /// One record: u16 topic length, topic, u32 payload length, payload.
    fn message(&mut self, topic: &str, payload: &[u8]) {
        self.bytes
            .extend_from_slice(&(topic.len() as u16).to_le_bytes());
        self.bytes.extend_from_slice(topic.as_bytes());
        self.bytes
            .extend_from_slice(&(payload.len() as u32).to_le_bytes());
        self.bytes.extend_from_slice(payload);
    }

    /// Publishes a module: its signed manifest and its chunks, all retained.
    fn module(&mut self, key: &KeyPair, m: &ModuleRef, wasm: &[u8]) {
        let hashes = wasm
            .chunks(CHUNK)
            .map(|c| wpm_manifests::sha256(c).into())
            .collect();
        let manifest = ModuleManifest {
            name: m.name.clone(),
            version: m.version.clone(),
            sha256: m.sha256,
            size: m.size,
            chunk_size: m.chunk_size,
            chunk_hashes: hashes,
        };
        self.message(
            &Topic::ModuleManifest(&m.sha256).render(),
            &key.seal(&manifest),
        );
        for (i, c) in wasm.chunks(CHUNK).enumerate() {
            let chunk = Chunk {
                module: m.sha256,
                index: i as u32,
                data: c.to_vec().into(),
            };
            self.message(
                &Topic::Chunk(&m.sha256, i as u32).render(),
                &wpm_manifests::encode(&chunk),
            );
        }
    }

    /// A payload the test publishes at some point, under a name of its own.
    fn named(&mut self, name: &str, payload: &[u8]) {
        self.message(&format!("test/{name}"), payload);
    }

    fn bytes_const(&mut self, name: &str, bytes: &[u8]) {
        writeln!(self.consts, "pub const {name}: &[u8] = &{bytes:?};").unwrap();
    }
}

/// `memory_limit` is what the module declares: every module here uses a small custom page
/// size, as modules for a 192 KiB device should.
fn module_ref(
    name: &str,
    version: &str,
    wasm: &[u8],
    priority: u8,
    memory_limit: u32,
) -> ModuleRef {
    ModuleRef {
        name: name.into(),
        version: version.into(),
        sha256: wpm_manifests::sha256(wasm).into(),
        size: wasm.len() as u32,
        chunk_size: CHUNK as u32,
        memory_limit,
        fuel_per_turn: 100_000,
        priority,
        pinned: false,
    }
}

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let here = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    fs::copy(here.join("memory.x"), out.join("memory.x")).unwrap();
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rerun-if-changed=memory.x");

    let examples = here.join("../../../examples");
    println!("cargo:rerun-if-changed={}", examples.display());
    println!("cargo:rerun-if-changed=wat");
    let wat = |p: PathBuf| wat::parse_file(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let hello1 = wat(examples.join("hello/v1.wat"));
    let hello2 = wat(examples.join("hello/v2.wat"));
    let counter = wat(here.join("wat/counter.wat"));
    let fib = wat(here.join("wat/fib.wat"));
    let empty = wat(here.join("wat/empty.wat"));
    let traps = wat(examples.join("faulty/traps.wat"));

    let key = KeyPair::from_seed(&REGISTRY_SEED);
    let rogue = KeyPair::from_seed(&ROGUE_SEED);
    let mut image = Image {
        bytes: Vec::new(),
        consts: String::new(),
    };
    let h1 = module_ref("hello", "1.0.0", &hello1, 5, 1024);
    let h2 = module_ref("hello", "2.0.0", &hello2, 5, 1024);
    let c1 = module_ref("counter", "1.0.0", &counter, 3, 4096);
    let t1 = module_ref("traps", "1.0.0", &traps, 1, 1024);
    image.module(&key, &h1, &hello1);
    image.module(&key, &h2, &hello2);
    image.module(&key, &c1, &counter);
    image.module(&key, &t1, &traps);

    let group = Target::Group("qemu".into());
    let deployment = |sequence: u64, modules: Vec<ModuleRef>| Deployment {
        target: group.clone(),
        sequence,
        issued_at: EPOCH_S,
        expires_at: EPOCH_S + 30 * 24 * 3600,
        modules,
        health: None,
    };
    image.named(
        "deploy-1",
        &key.seal(&deployment(1, vec![h1.clone(), c1.clone()])),
    );
    // Signed by a key the device does not trust: must be rejected.
    image.named(
        "deploy-rogue",
        &rogue.seal(&deployment(9, vec![t1.clone()])),
    );
    image.named(
        "deploy-2",
        &key.seal(&deployment(2, vec![h2.clone(), c1.clone()])),
    );
    // A replay of the first deployment with the trusted signature: no rollback.
    image.named(
        "deploy-1-replay",
        &key.seal(&deployment(1, vec![h1.clone(), c1.clone()])),
    );
    // Adds a module that traps on its first tick: it must end alone, with a reason.
    image.named(
        "deploy-3",
        &key.seal(&deployment(3, vec![h2.clone(), c1.clone(), t1.clone()])),
    );
    // A copy of hello v2's chunk 0 with one byte flipped: the device must refuse it.
    let mut bad = hello2[..CHUNK.min(hello2.len())].to_vec();
    bad[10] ^= 0x01;
    let bad_chunk = Chunk {
        module: h2.sha256,
        index: 0,
        data: bad.into(),
    };
    image.named("bad-chunk", &wpm_manifests::encode(&bad_chunk));
    // Signed lifecycle commands: evict counter (held, with its state, until started
    // again), start it (restored from its snapshot); twice, the first snapshot going to
    // the RAM pool, the second (on a boot without a pool) to flash. Sequences must rise.
    for (sequence, action) in [
        (1, Action::Evict("counter".into())),
        (2, Action::Start("counter".into())),
        (3, Action::Evict("counter".into())),
        (4, Action::Start("counter".into())),
    ] {
        let command = Command {
            device: "qemu-ontarget".into(),
            sequence,
            issued_at: EPOCH_S,
            expires_at: EPOCH_S + 30 * 24 * 3600,
            action,
        };
        image.named(&format!("cmd-{sequence}"), &key.seal(&command));
    }

    let provisioning = wpm_provisioning::Record {
        device_id: "qemu-ontarget".into(),
        groups: vec!["qemu".into()],
        trusted_keys: vec![key.public().into()],
        broker_host: "10.0.2.2".into(),
        broker_port: 1883,
        device_key: ONTARGET_DEVICE_KEY.into(),
        sequence_floor: 0,
    };
    image.bytes_const("PROVISIONING", &provisioning.encode());
    image.bytes_const("FIB_WASM", &fib);
    image.bytes_const("EMPTY_WASM", &empty);
    image.bytes_const("HELLO1_WASM", &hello1);
    image.bytes_const("COUNTER_WASM", &counter);
    writeln!(image.consts, "pub const EPOCH_S: u64 = {EPOCH_S};").unwrap();
    fs::write(out.join("image.bin"), &image.bytes).unwrap();
    fs::write(out.join("fixtures.rs"), &image.consts).unwrap();
}
