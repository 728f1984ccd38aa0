//! Device identities: `wpm device add`, `import`, `list`, `revoke`, `remove`.
//!
//! A device's ed25519 key pair is made here, on the operator's machine; only the public
//! half goes to the registry. The private half goes into the device's provisioning record
//! and nowhere else.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use wpm_manifests::KeyPair;

use crate::client::Client;
use crate::config::Settings;
use crate::output::{emit, emit_json, now_ms, relative_time, Table};
use crate::GlobalArgs;

#[derive(Debug, Args)]
pub struct AddArgs {
    /// Device id
    #[arg(value_name = "DEVICE")]
    pub device: String,

    /// A group the device belongs to (repeatable)
    #[arg(long = "group", value_name = "G")]
    pub groups: Vec<String>,

    /// Write the provisioning record (it holds the device's private key) to this file
    /// instead of standard output
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,

    #[command(flatten)]
    pub broker: BrokerLoginArgs,

    #[command(flatten)]
    pub conn: crate::ConnArgs,
}

#[derive(Debug, Args)]
pub struct BrokerLoginArgs {
    /// Also let the device log in to a locked-down Mosquitto: add its login to this
    /// password file (see `wpm broker config --mosquitto --password-file`); send the
    /// broker SIGHUP to read it again
    #[arg(long, value_name = "FILE")]
    pub mosquitto_passwd: Option<PathBuf>,
}

impl BrokerLoginArgs {
    /// Adds the devices' broker logins to the password file, if one was named. Only
    /// possible here, where the private keys are: the login is signed with them.
    fn write(&self, records: &[Provisioning]) -> Result<()> {
        let Some(file) = &self.mosquitto_passwd else {
            return Ok(());
        };
        let logins = records
            .iter()
            .map(|r| {
                let seed: [u8; 32] = (hex::decode(&r.device_key).ok())
                    .and_then(|s| s.try_into().ok())
                    .context("a provisioning record's device key is not 32 hex bytes")?;
                let key = KeyPair::from_seed(&seed);
                let password = wpm_manifests::report::login_password(&key, &r.device_id);
                Ok((r.device_id.clone(), password))
            })
            .collect::<Result<Vec<_>>>()?;
        wpm_registry::external_broker::set_mosquitto_passwords(file, &logins)
    }
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// CSV file: one device per line, `id,group;group;...` (a header line `id,groups` is
    /// skipped)
    #[arg(value_name = "CSV")]
    pub csv: PathBuf,

    /// Directory for the provisioning records, one `<id>.json` per device
    #[arg(long, value_name = "DIR")]
    pub out_dir: PathBuf,

    #[command(flatten)]
    pub broker: BrokerLoginArgs,

    #[command(flatten)]
    pub conn: crate::ConnArgs,
}

#[derive(Debug, Args)]
pub struct IdArgs {
    /// Device id
    #[arg(value_name = "DEVICE")]
    pub device: String,

    /// Also take the device's login out of this Mosquitto password file (send the
    /// broker SIGHUP to read it again)
    #[arg(long, value_name = "FILE")]
    pub mosquitto_passwd: Option<PathBuf>,

    #[command(flatten)]
    pub conn: crate::ConnArgs,
}

impl IdArgs {
    fn remove_broker_login(&self) -> Result<()> {
        match &self.mosquitto_passwd {
            Some(file) => {
                wpm_registry::external_broker::remove_mosquitto_users(file, &[&self.device])
            }
            None => Ok(()),
        }
    }
}

/// What a device needs to speak for itself and to trust the registry: the provisioning
/// record `wpm device add` writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provisioning {
    pub device_id: String,
    pub groups: Vec<String>,
    /// The device's ed25519 private key (its 32-byte seed), hex. Secret.
    pub device_key: String,
    /// Its public half, as registered.
    pub public_key: String,
    /// The registry keys the device trusts, hex.
    pub trusted_keys: Vec<String>,
    /// The sequence of the newest deployment addressing the device at registration:
    /// the device accepts none older.
    pub sequence_floor: u64,
}

/// A fresh identity for `device`: its key pair drawn from the OS.
fn new_identity(device: &str, groups: &[String], registry_key: &[u8; 32]) -> Result<Provisioning> {
    super::check_name("device id", device)?;
    for g in groups {
        super::check_name("group", g)?;
    }
    let key = KeyPair::from_seed(&wpm_registry::keys::random_bytes()?);
    Ok(Provisioning {
        device_id: device.to_string(),
        groups: groups.to_vec(),
        device_key: hex::encode(key.seed()),
        public_key: hex::encode(key.public()),
        trusted_keys: vec![hex::encode(registry_key)],
        // Set from the registry's answer to the registration.
        sequence_floor: 0,
    })
}

/// Takes each device's sequence floor from the registry's answer to its registration.
fn set_floors(records: &mut [Provisioning], answer: &Value) {
    for r in records {
        r.sequence_floor = answer["sequence_floors"][&r.device_id]
            .as_u64()
            .unwrap_or(0);
    }
}

/// Registers provisioned devices with the registry, all or none.
async fn register(client: &Client, records: &[Provisioning]) -> Result<Value> {
    let devices: Vec<Value> = records
        .iter()
        .map(|p| json!({"id": p.device_id, "public_key": p.public_key, "groups": p.groups}))
        .collect();
    post_devices(client, devices).await
}

/// Registers simulated devices (`wpm sim`, `wpm demo`, `wpm bench`): their ids and
/// public keys, in `groups`, all or none.
pub async fn register_simulated(
    client: &Client,
    identities: &[(String, [u8; 32])],
    groups: &[String],
) -> Result<Value> {
    let devices: Vec<Value> = identities
        .iter()
        .map(|(id, key)| json!({"id": id, "public_key": hex::encode(key), "groups": groups}))
        .collect();
    post_devices(client, devices).await
}

async fn post_devices(client: &Client, devices: Vec<Value>) -> Result<Value> {
    client
        .post_json("/v1/devices", &json!({ "devices": devices }))
        .await
        .context("cannot register the device keys")
}

/// Writes a provisioning record readable by its owner only: it holds a private key.
fn write_record(path: &Path, p: &Provisioning) -> Result<()> {
    write_secret(path, &format!("{}\n", serde_json::to_string_pretty(p)?))
}

/// Writes a file readable by its owner only.
pub fn write_secret(path: &Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut f = options
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

pub async fn add(global: &GlobalArgs, args: AddArgs) -> Result<()> {
    let client = Client::new(&Settings::resolve(&args.conn)?)?;
    let mut record = new_identity(&args.device, &args.groups, &client.public_key().await?)?;
    let answer = register(&client, std::slice::from_ref(&record)).await?;
    set_floors(std::slice::from_mut(&mut record), &answer);
    args.broker.write(std::slice::from_ref(&record))?;
    match &args.out {
        Some(path) => {
            write_record(path, &record)?;
            let summary = json!({"id": record.device_id, "public_key": record.public_key,
                                 "provisioning_record": path});
            if global.json {
                emit_json(&summary);
            } else {
                emit(&format!(
                    "registered {} (key {}); provisioning record in {}",
                    record.device_id,
                    &record.public_key[..16],
                    path.display()
                ));
            }
        }
        None => emit(&serde_json::to_string_pretty(&record)?),
    }
    Ok(())
}

/// `id,group;group` lines, a header line `id,...` skipped, blank lines and `#` comments
/// ignored.
fn parse_csv(text: &str) -> Result<Vec<(String, Vec<String>)>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || (i == 0 && line.starts_with("id,")) {
            continue;
        }
        let (id, groups) = line.split_once(',').unwrap_or((line, ""));
        let groups: Vec<String> = groups
            .split(';')
            .map(str::trim)
            .filter(|g| !g.is_empty())
            .map(str::to_string)
            .collect();
        if id.trim().is_empty() {
            bail!("line {}: no device id", i + 1);
        }
        out.push((id.trim().to_string(), groups));
    }
    Ok(out)
}

pub async fn import(global: &GlobalArgs, args: ImportArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.csv)
        .with_context(|| format!("cannot read {}", args.csv.display()))?;
    let rows = parse_csv(&text).with_context(|| format!("in {}", args.csv.display()))?;
    if rows.is_empty() {
        bail!("{} lists no device", args.csv.display());
    }
    let client = Client::new(&Settings::resolve(&args.conn)?)?;
    let registry_key = client.public_key().await?;
    let mut records = rows
        .iter()
        .map(|(id, groups)| new_identity(id, groups, &registry_key))
        .collect::<Result<Vec<_>>>()?;
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("cannot create {}", args.out_dir.display()))?;
    // Records first: a device whose key is registered but whose record is lost could
    // never speak.
    for r in &records {
        write_record(&args.out_dir.join(format!("{}.json", r.device_id)), r)?;
    }
    let answer = register(&client, &records).await?;
    // Again, with the floors the registration answered (a record without one is still
    // a working record, only without that protection).
    set_floors(&mut records, &answer);
    for r in &records {
        write_record(&args.out_dir.join(format!("{}.json", r.device_id)), r)?;
    }
    args.broker.write(&records)?;
    if global.json {
        emit_json(&answer);
    } else {
        emit(&format!(
            "registered {} device(s) ({} already registered with the same key); \
             provisioning records in {}",
            answer["registered"],
            answer["already_registered"],
            args.out_dir.display()
        ));
    }
    Ok(())
}

pub async fn list(global: &GlobalArgs, args: crate::commands::fleet::ListArgs) -> Result<()> {
    let client = Client::new(&Settings::resolve(&args.conn)?)?;
    let answer = client.get_query("/v1/devices", &[]).await?;
    if global.json {
        emit_json(&answer);
        return Ok(());
    }
    let now = now_ms();
    let mut t = Table::new(&["DEVICE", "STATE", "GROUPS", "KEY", "REGISTERED"]);
    for d in answer["devices"].as_array().into_iter().flatten() {
        let groups: Vec<&str> = d["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        t.row(vec![
            d["id"].as_str().unwrap_or("?").to_string(),
            d["state"].as_str().unwrap_or("?").to_string(),
            if groups.is_empty() {
                "-".into()
            } else {
                groups.join(",")
            },
            d["public_key"]
                .as_str()
                .map_or("?".into(), |k| format!("{}…", &k[..16.min(k.len())])),
            relative_time(d["registered_at_ms"].as_u64(), now),
        ]);
    }
    emit(&t.render());
    Ok(())
}

pub async fn revoke(global: &GlobalArgs, args: IdArgs) -> Result<()> {
    super::check_name("device id", &args.device)?;
    let client = Client::new(&Settings::resolve(&args.conn)?)?;
    let answer = client
        .post_json(&format!("/v1/devices/{}/revoke", args.device), &json!({}))
        .await?;
    args.remove_broker_login()?;
    if global.json {
        emit_json(&answer);
    } else {
        emit(&format!("{} revoked", args.device));
    }
    Ok(())
}

pub async fn remove(global: &GlobalArgs, args: IdArgs) -> Result<()> {
    super::check_name("device id", &args.device)?;
    let client = Client::new(&Settings::resolve(&args.conn)?)?;
    client
        .delete(&format!("/v1/devices/{}", args.device))
        .await?;
    args.remove_broker_login()?;
    if global.json {
        emit_json(&json!({"id": args.device, "removed": true}));
    } else {
        emit(&format!("{} removed", args.device));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_csv_gives_ids_and_groups_and_skips_the_header() {
        let rows = parse_csv("id,groups\ndev-1,eu;canary\n\n# spare\ndev-2,\ndev-3\n").unwrap();
        assert_eq!(
            rows,
            vec![
                (
                    "dev-1".to_string(),
                    vec!["eu".to_string(), "canary".to_string()]
                ),
                ("dev-2".to_string(), vec![]),
                ("dev-3".to_string(), vec![]),
            ]
        );
        assert!(parse_csv(",eu\n").is_err());
    }

    #[test]
    fn a_new_identity_is_a_key_pair_whose_public_half_matches_its_seed() {
        let p = new_identity("dev-1", &["eu".into()], &[9; 32]).unwrap();
        let seed: [u8; 32] = hex::decode(&p.device_key).unwrap().try_into().unwrap();
        assert_eq!(
            hex::encode(KeyPair::from_seed(&seed).public()),
            p.public_key
        );
        assert_eq!(p.trusted_keys, vec![hex::encode([9; 32])]);
        assert!(new_identity("dev/1", &[], &[9; 32]).is_err());
        assert!(new_identity("dev-1", &["e#".into()], &[9; 32]).is_err());
    }
}
