//! `wpm bench`: figures for the things a fleet operator pays for, measured on this
//! machine side by side. Nothing here is a pass/fail test: the commands print figures.
//!
//! * `rollout`: a deploy and a staged rollout to N simulated devices (the real device
//!   core, the firmware's tunables), split into distribution and confirmation, next to
//!   the raw broker fan-out of the same bytes; every device report counted on both sides.
//! * `ingest`: how many device reports per second the registry writes, and its CPU per
//!   report, from publishers that do not wait for devices.

mod child;
mod fanout;
mod ingest;
mod rollout;
mod rollout_report;
mod traffic;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};

use crate::GlobalArgs;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Deploy and roll a module out to simulated devices; print distribution and
    /// confirmation times, reports sent and written, broker traffic, registry cost
    #[command(after_help = "Examples:
  wpm bench rollout --devices 1000
  wpm bench rollout --devices 10000 --stages 100
  wpm bench rollout --devices 1000 --broker mosquitto --database postgres://postgres@127.0.0.1/test
  wpm bench rollout --devices 1000 --repeat 20     # a hang or a lost report fails the run")]
    Rollout(rollout::RolloutBenchArgs),

    /// Device reports per second into the registry's database, and the registry's CPU
    /// per report, from publishers that do not wait for devices
    #[command(after_help = "Examples:
  wpm bench ingest
  wpm bench ingest --records 200000 --database postgres://postgres@127.0.0.1/test")]
    Ingest(ingest::IngestBenchArgs),
}

/// Which broker a bench runs against.
#[derive(Debug, Clone, Args)]
pub struct BrokerArgs {
    /// `embedded` (the registry's own), `mosquitto` (one started by the bench on a free
    /// port, with the configuration `wpm broker config --mosquitto` writes) or
    /// mqtt://host:port of an external broker
    #[arg(long, default_value = "embedded")]
    pub broker: String,

    /// Registry database (default: a SQLite file in a temporary directory)
    #[arg(long, value_name = "URL")]
    pub database: Option<String>,
}

pub async fn run(global: &GlobalArgs, cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Rollout(args) => rollout::run(global, args).await,
        BenchCommand::Ingest(args) => ingest::run(global, args).await,
    }
}

/// A valid module of exactly `size` bytes: `wpm_init`/`wpm_tick` plus a custom section of
/// filler (distinct per `tag`, so two versions share no chunk).
pub fn module_of_size(size: usize, tag: u8) -> Result<Vec<u8>> {
    let mut wasm = wat::parse_str(
        r#"(module (func (export "wpm_init") (result i32) (i32.const 0)) (func (export "wpm_tick")))"#,
    )?;
    let name = b"wpm-bench-filler";
    // Section: id 0, size (LEB128, padded to 5 bytes so its length is known), name, bytes.
    let overhead = 1 + 5 + 1 + name.len();
    if size < wasm.len() + overhead {
        bail!(
            "--module-size must be at least {} bytes",
            wasm.len() + overhead
        );
    }
    let filler = size - wasm.len() - overhead;
    let body = 1 + name.len() + filler;
    wasm.push(0);
    for i in 0..5 {
        let byte = ((body >> (7 * i)) & 0x7f) as u8;
        wasm.push(if i < 4 { byte | 0x80 } else { byte });
    }
    wasm.push(name.len() as u8);
    wasm.extend_from_slice(name);
    // xorshift: incompressible, reproducible.
    let mut x: u32 = 0x9e37_79b9 ^ u32::from(tag);
    wasm.extend((0..filler).map(|_| {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x as u8
    }));
    debug_assert_eq!(wasm.len(), size);
    Ok(wasm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_have_the_asked_size_and_validate() {
        for size in [200, 4096, 32 * 1024] {
            let m = module_of_size(size, 1).unwrap();
            assert_eq!(m.len(), size);
            wpm_registry::http::validate_wasm(&m).unwrap();
            assert_ne!(m, module_of_size(size, 2).unwrap());
        }
        assert!(module_of_size(10, 1).is_err());
    }
}
