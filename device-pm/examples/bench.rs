//! Device-side figures on the PC: `cargo run --release -p wpm-device-pm --example bench`.
//! Wall-clock numbers are host numbers (see TARGET-FACTS for Cortex-M33 ratios); flash
//! operation counts are exact and the same on the device.

use std::time::Instant;
use wpm_device_pm::runtime::{Runtime, Slice};
use wpm_device_pm::sim_flash::SimFlash;
use wpm_device_pm::store::Store;
use wpm_manifests::ModuleRef;

fn module(wasm: &[u8], memory: u32, fuel: u64) -> ModuleRef {
    ModuleRef {
        name: "bench".into(),
        version: "1.0.0".into(),
        sha256: wpm_manifests::sha256(wasm).into(),
        size: wasm.len() as u32,
        chunk_size: 1024,
        memory_limit: memory,
        fuel_per_turn: fuel,
        priority: 5,
        pinned: false,
    }
}

/// Mean seconds per run of `f` over `n` runs.
fn time(n: u32, mut f: impl FnMut()) -> f64 {
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed().as_secs_f64() / n as f64
}

fn wasm(body: &str) -> Vec<u8> {
    wat::parse_str(body).unwrap()
}

fn main() {
    let rt = Runtime::new();
    println!("instantiate (compile + instantiate + wpm_init) against module size:");
    for funcs in [1, 50, 400, 1600] {
        let f: String = (0..funcs)
            .map(|i| {
                format!(
                    "(func $f{i} (param i32) (result i32) (i32.add (local.get 0) (i32.const {i})))"
                )
            })
            .collect();
        let w = wasm(&format!(
            r#"(module (memory (export "memory") 4096 4096 (pagesize 1)) {f}
               (func (export "wpm_init") (result i32) (i32.const 0)) (func (export "wpm_tick")))"#
        ));
        let m = module(&w, 4096, 100_000);
        let t = time(50, || {
            let mut i = rt.load(&m, &w, 0).ok().unwrap();
            assert_eq!(i.run_slice(0), Ok(Slice::Returned));
        });
        println!("  {:>6} bytes: {:>8.1} µs", w.len(), t * 1e6);
    }

    println!("evict + restore of a module with N KiB of non-zero state:");
    for kib in [4u32, 16, 64] {
        let bytes = kib * 1024;
        let w = wasm(&format!(
            r#"(module (memory (export "memory") {bytes} {bytes} (pagesize 1))
               (global $g (mut i32) (i32.const 0))
               (func (export "wpm_init") (result i32) (local $i i32)
                 (loop $l (i32.store8 (local.get $i) (i32.const 0xA5))
                   (local.set $i (i32.add (local.get $i) (i32.const 1)))
                   (br_if $l (i32.lt_u (local.get $i) (i32.const {bytes}))))
                 (i32.const 0))
               (func (export "wpm_tick")))"#
        ));
        let m = module(&w, bytes, 10_000_000);
        let mut inst = rt.load(&m, &w, 0).ok().unwrap();
        assert_eq!(inst.run_slice(0), Ok(Slice::Returned));
        let ram = time(20, || {
            let snap = wpm_manifests::encode(&inst.snapshot(0).unwrap());
            let snap = wpm_manifests::decode(&snap).unwrap();
            rt.restore(&m, &w, &snap, 0).ok().unwrap();
        });
        let flash = SimFlash::new(4 * 4096 + 2 * 65536 + 4096);
        let mut store = Store::open(flash, 65536 + 4096).unwrap();
        let digest = m.sha256;
        let (w0, e0) = (store.flash().writes(), store.flash().erases());
        let t = Instant::now();
        let snap = wpm_manifests::encode(&inst.snapshot(0).unwrap());
        store.save_snapshot(&digest, &snap).unwrap();
        let back = store.load_snapshot(&digest).unwrap().unwrap();
        rt.restore(&m, &w, &wpm_manifests::decode(&back).unwrap(), 0)
            .ok()
            .unwrap();
        let flash_t = t.elapsed().as_secs_f64();
        println!(
            "  {kib:>2} KiB: RAM {:>7.1} µs; flash {:>7.1} µs with {} writes, {} page erases, {} B snapshot (sim flash, no program/erase time)",
            ram * 1e6,
            flash_t * 1e6,
            store.flash().writes() - w0,
            store.flash().erases() - e0,
            snap.len()
        );
    }

    let calls = 10_000;
    let looped = |body: &str| {
        wasm(&format!(
            r#"(module (import "wpm" "now_ms" (func $now (result i64)))
               (func (export "wpm_init") (result i32) (i32.const 0))
               (func (export "wpm_tick") (local $i i32)
                 (loop $l {body} (local.set $i (i32.add (local.get $i) (i32.const 1)))
                   (br_if $l (i32.lt_u (local.get $i) (i32.const {calls}))))))"#
        ))
    };
    let tick_time = |w: &[u8], fuel: u64| {
        let m = module(w, 0, fuel);
        let mut i = rt.load(&m, w, 0).ok().unwrap();
        assert_eq!(i.run_slice(0), Ok(Slice::Returned));
        time(20, || {
            let mut r = i.run_slice(0);
            while r == Ok(Slice::Paused) {
                r = i.run_slice(0);
            }
            assert_eq!(
                r,
                Ok(Slice::Returned),
                "the call must finish within its slices"
            );
        })
    };
    let with = tick_time(&looped("(drop (call $now))"), u64::MAX / 2);
    let without = tick_time(&looped("(nop)"), u64::MAX / 2);
    println!(
        "host call overhead (wpm.now_ms): {:.1} ns per call",
        (with - without) / calls as f64 * 1e9
    );
    let whole = tick_time(&looped("(nop)"), u64::MAX / 2);
    for fuel in [10_000u64, 50_000] {
        let sliced = tick_time(&looped("(nop)"), fuel);
        println!(
            "scheduler: {calls}-step call in slices of {fuel} fuel: {:.1} µs vs {:.1} µs in one; overhead {:.1} %",
            sliced * 1e6,
            whole * 1e6,
            (sliced / whole - 1.0) * 100.0
        );
    }
}
