//! `wpm-provision --record DEVICE.json --broker HOST:PORT --out FILE`
//!
//! Turns the provisioning record `wpm device add ID --group G --out DEVICE.json` wrote
//! (the device's id, groups, own secret key and the registry keys it trusts) into the
//! flash record of `wpm-provisioning`, with the broker the device connects to. Flash it
//! at the board's provisioning address (README), or give it to QEMU with
//! `-device loader,file=FILE,addr=ADDR`. FILE holds the device's secret key: it is
//! written readable by its owner only.

use serde::Deserialize;
use std::process::ExitCode;
use wpm_provisioning::Record;

fn usage() -> ExitCode {
    eprintln!("usage: wpm-provision --record DEVICE.json --broker HOST:PORT --out FILE");
    ExitCode::from(2)
}

/// The JSON `wpm device add` writes (cli/src/commands/identity.rs).
#[derive(Deserialize)]
struct Provisioning {
    device_id: String,
    groups: Vec<String>,
    device_key: String,
    public_key: String,
    trusted_keys: Vec<String>,
    sequence_floor: u64,
}

fn parse_key(what: &str, hex: &str) -> Result<[u8; 32], String> {
    let bad = || format!("{what} is not 64 hex digits");
    if hex.len() != 64 {
        return Err(bad());
    }
    let mut key = [0u8; 32];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
            .map_err(|_| bad())?;
    }
    Ok(key)
}

fn record(json: &str, broker: &str) -> Result<Record, String> {
    let p: Provisioning =
        serde_json::from_str(json).map_err(|e| format!("not a provisioning record: {e}"))?;
    if p.trusted_keys.is_empty() {
        return Err("the record trusts no registry key: such a device accepts nothing".into());
    }
    let trusted_keys = (p.trusted_keys.iter())
        .map(|k| parse_key("a trusted key", k).map(Into::into))
        .collect::<Result<Vec<_>, _>>()?;
    let device_key = parse_key("device_key", &p.device_key)?;
    // The registry knows the device by the public key: a record whose halves do not
    // match would give a device the registry never hears.
    if wpm_manifests::KeyPair::from_seed(&device_key).public()
        != parse_key("public_key", &p.public_key)?
    {
        return Err("device_key is not the secret half of public_key".into());
    }
    let (host, port) = broker.rsplit_once(':').ok_or("--broker wants HOST:PORT")?;
    let broker_port = port.parse().map_err(|_| "--broker has a bad port")?;
    Ok(Record {
        device_id: p.device_id,
        groups: p.groups,
        trusted_keys,
        broker_host: host.to_string(),
        broker_port,
        device_key: device_key.into(),
        sequence_floor: p.sequence_floor,
    })
}

fn write_secret(path: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(bytes)
}

fn main() -> ExitCode {
    let (mut json, mut broker, mut out) = (None, None, None);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let Some(value) = args.next() else {
            return usage();
        };
        match flag.as_str() {
            "--record" => json = Some(value),
            "--broker" => broker = Some(value),
            "--out" => out = Some(value),
            _ => return usage(),
        }
    }
    let (Some(json), Some(broker), Some(out)) = (json, broker, out) else {
        return usage();
    };
    let text = match std::fs::read_to_string(&json) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{json}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let record = match record(&text, &broker) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{json}: {e}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = write_secret(&out, &record.encode()) {
        eprintln!("{out}: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
