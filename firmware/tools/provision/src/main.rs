//! `wpm-provision --device ID --group G [--group G2] --key HEX [--key HEX2]
//!                --broker HOST:PORT --out FILE`
//!
//! Writes the provisioning record (see `wpm-provisioning`) to FILE. Flash it at the
//! board's provisioning address (README), or give it to QEMU with
//! `-device loader,file=FILE,addr=ADDR`.

use std::process::ExitCode;
use wpm_provisioning::Record;

fn usage() -> ExitCode {
    eprintln!(
        "usage: wpm-provision --device ID [--group G]... --key HEX32 [--key HEX32]... \
         --broker HOST:PORT --out FILE"
    );
    ExitCode::from(2)
}

fn parse_key(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(key)
}

fn main() -> ExitCode {
    let mut device = None;
    let mut groups = Vec::new();
    let mut keys = Vec::new();
    let mut broker = None;
    let mut out = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let Some(value) = args.next() else {
            return usage();
        };
        match flag.as_str() {
            "--device" => device = Some(value),
            "--group" => groups.push(value),
            "--key" => match parse_key(&value) {
                Some(k) => keys.push(k.into()),
                None => {
                    eprintln!("--key wants 64 hex digits (an ed25519 public key)");
                    return ExitCode::from(2);
                }
            },
            "--broker" => broker = Some(value),
            "--out" => out = Some(value),
            _ => return usage(),
        }
    }
    let (Some(device_id), Some(broker), Some(out)) = (device, broker, out) else {
        return usage();
    };
    if keys.is_empty() {
        eprintln!("at least one --key is needed: a device trusting no key accepts nothing");
        return ExitCode::from(2);
    }
    let Some((host, port)) = broker.rsplit_once(':') else {
        return usage();
    };
    let Ok(broker_port) = port.parse() else {
        return usage();
    };
    let record = Record {
        device_id,
        groups,
        trusted_keys: keys,
        broker_host: host.to_string(),
        broker_port,
    };
    if let Err(e) = std::fs::write(&out, record.encode()) {
        eprintln!("{out}: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
