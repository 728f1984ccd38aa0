//! The registry's secrets on disk (signing key, API token) and its signing path.

use anyhow::Context as _;
use std::io::Write as _;
use std::path::Path;
use wpm_manifests::{Deployment, KeyPair, ModuleManifest};

/// File names inside the data directory.
pub const SIGNING_KEY_FILE: &str = "signing.key";
pub const PUBLIC_KEY_FILE: &str = "registry.pub";
/// The key a rotation in progress will sign with (`crate::trust`).
pub const NEXT_SIGNING_KEY_FILE: &str = "signing-next.key";
pub const TOKEN_FILE: &str = "api-token";
pub const CLIENT_ID_FILE: &str = "mqtt-client-id";
pub const BROKER_PASSWORD_FILE: &str = "broker-password";

/// 32 bytes from the operating system's CSPRNG.
pub fn random_bytes() -> anyhow::Result<[u8; 32]> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| anyhow::anyhow!("no randomness from the OS: {e}"))?;
    Ok(b)
}

/// Writes a secret readable by the owner only. `create_new`, so two registries starting
/// on one data dir cannot both generate (and one overwrite the other's) key.
fn write_secret(path: &Path, contents: &str) -> anyhow::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

/// Loads DATA_DIR/signing.key (hex ed25519 seed; 32 raw bytes are accepted too), or
/// generates it on first start. Also (re)writes DATA_DIR/registry.pub (hex public key).
pub fn load_or_create_signing_key(data_dir: &Path) -> anyhow::Result<KeyPair> {
    let path = data_dir.join(SIGNING_KEY_FILE);
    let key = match read_key(&path)? {
        Some(key) => key,
        None => {
            let seed = random_bytes()?;
            write_secret(&path, &format!("{}\n", hex::encode(seed)))?;
            tracing::info!(path = %path.display(), "generated a new registry signing key");
            KeyPair::from_seed(&seed)
        }
    };
    write_public_key(data_dir, &key)?;
    Ok(key)
}

/// The key in DATA_DIR/signing.key as the file is now (another replica sharing the
/// directory may have rotated it), if there is one.
pub fn signing_key(data_dir: &Path) -> anyhow::Result<Option<KeyPair>> {
    read_key(&data_dir.join(SIGNING_KEY_FILE))
}

/// The key in `path` (a hex ed25519 seed, or 32 raw bytes), if the file exists.
fn read_key(path: &Path) -> anyhow::Result<Option<KeyPair>> {
    if !path.exists() {
        return Ok(None);
    }
    let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let seed: [u8; 32] = if raw.len() == 32 {
        raw.try_into().expect("length checked")
    } else {
        let text = std::str::from_utf8(&raw)
            .ok()
            .map(str::trim)
            .unwrap_or_default();
        let mut seed = [0u8; 32];
        hex::decode_to_slice(text, &mut seed).with_context(|| {
            format!(
                "{} is not a hex ed25519 seed (64 hex digits)",
                path.display()
            )
        })?;
        seed
    };
    Ok(Some(KeyPair::from_seed(&seed)))
}

fn write_public_key(data_dir: &Path, key: &KeyPair) -> anyhow::Result<()> {
    let pub_path = data_dir.join(PUBLIC_KEY_FILE);
    std::fs::write(&pub_path, format!("{}\n", hex::encode(key.public())))
        .with_context(|| format!("writing {}", pub_path.display()))
}

/// Generates the key a rotation will sign with and keeps it in
/// DATA_DIR/signing-next.key (a leftover from a rotation that never recorded its update
/// is replaced).
pub fn create_next_signing_key(data_dir: &Path) -> anyhow::Result<KeyPair> {
    let path = data_dir.join(NEXT_SIGNING_KEY_FILE);
    discard_next_signing_key(data_dir)?;
    let seed = random_bytes()?;
    write_secret(&path, &format!("{}\n", hex::encode(seed)))?;
    Ok(KeyPair::from_seed(&seed))
}

/// The key a rotation left in DATA_DIR/signing-next.key, if any.
pub fn next_signing_key(data_dir: &Path) -> anyhow::Result<Option<KeyPair>> {
    read_key(&data_dir.join(NEXT_SIGNING_KEY_FILE))
}

pub fn discard_next_signing_key(data_dir: &Path) -> anyhow::Result<()> {
    let path = data_dir.join(NEXT_SIGNING_KEY_FILE);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Makes the next key the signing key: one rename, so a crash leaves the old key or
/// the new one in DATA_DIR/signing.key, never neither; the old key is gone after it.
pub fn promote_next_signing_key(data_dir: &Path) -> anyhow::Result<KeyPair> {
    let next = data_dir.join(NEXT_SIGNING_KEY_FILE);
    let key = read_key(&next)?.context("no next signing key to promote")?;
    let current = data_dir.join(SIGNING_KEY_FILE);
    std::fs::rename(&next, &current)
        .with_context(|| format!("renaming {} to {}", next.display(), current.display()))?;
    // The rename is durable once the directory is.
    std::fs::File::open(data_dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", data_dir.display()))?;
    write_public_key(data_dir, &key)?;
    Ok(key)
}

/// The API token: the given one, else DATA_DIR/api-token, generated on first start.
pub fn load_or_create_token(data_dir: &Path, given: Option<&str>) -> anyhow::Result<String> {
    if let Some(t) = given {
        anyhow::ensure!(!t.trim().is_empty(), "the API token must not be empty");
        return Ok(t.trim().to_string());
    }
    load_or_create_secret(&data_dir.join(TOKEN_FILE), "API token")
}

/// The id the bootstrap token is listed and revoked under: `bootstrap-` and the start of
/// its secret's sha256, so a new secret in the data directory is a new, unrevoked token,
/// and replicas started with different secrets do not share one row.
pub fn bootstrap_token_id(token: &str) -> String {
    let hash = wpm_manifests::sha256(token.as_bytes());
    format!("bootstrap-{}", hex::encode(&hash[..6]))
}

/// The password the registry's own MQTT clients log in to the embedded broker with
/// (username `wpm-registry`): DATA_DIR/broker-password, generated on first start.
pub fn load_or_create_broker_password(data_dir: &Path) -> anyhow::Result<String> {
    load_or_create_secret(&data_dir.join(BROKER_PASSWORD_FILE), "broker password")
}

/// A random secret kept in `path` (owner-only), made on first use.
fn load_or_create_secret(path: &Path, what: &str) -> anyhow::Result<String> {
    if path.exists() {
        let t =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let t = t.trim();
        anyhow::ensure!(!t.is_empty(), "{} is empty", path.display());
        return Ok(t.to_string());
    }
    let secret = hex::encode(random_bytes()?);
    write_secret(path, &format!("{secret}\n"))?;
    tracing::info!(path = %path.display(), "generated a new {what}");
    Ok(secret)
}

/// This registry's MQTT client id stem, made on first start into `DATA_DIR/mqtt-client-id`
/// and kept: the broker finds the registry's persistent ingest session (and the reports
/// it queued while the registry was away) by it.
pub fn load_or_create_client_id(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join(CLIENT_ID_FILE);
    if path.exists() {
        let id = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let id = id.trim();
        anyhow::ensure!(
            wpm_manifests::valid_name(id),
            "{} does not hold a valid client id",
            path.display()
        );
        return Ok(id.to_string());
    }
    let id = format!("wpm-registry-{}", hex::encode(&random_bytes()?[..6]));
    std::fs::write(&path, format!("{id}\n"))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
}

/// The one function that signs deployments. Everything the registry publishes on a
/// deployment topic comes from here, and the golden-vector test checks it byte for byte.
pub fn seal_deployment(key: &KeyPair, deployment: &Deployment) -> Vec<u8> {
    key.seal(deployment)
}

/// The one function that signs module manifests (chunk indexes).
pub fn seal_module_manifest(key: &KeyPair, manifest: &ModuleManifest) -> Vec<u8> {
    key.seal(manifest)
}

/// Compares two secrets in time independent of where they first differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_and_token_persist_with_owner_only_mode() {
        let dir = tempfile::tempdir().unwrap();
        let k1 = load_or_create_signing_key(dir.path()).unwrap();
        let k2 = load_or_create_signing_key(dir.path()).unwrap();
        assert_eq!(k1.public(), k2.public());
        let t1 = load_or_create_token(dir.path(), None).unwrap();
        let t2 = load_or_create_token(dir.path(), None).unwrap();
        assert_eq!(t1, t2);
        assert_eq!(t1.len(), 64);
        assert_eq!(
            load_or_create_token(dir.path(), Some("given")).unwrap(),
            "given"
        );
        let pubhex = std::fs::read_to_string(dir.path().join(PUBLIC_KEY_FILE)).unwrap();
        assert_eq!(pubhex.trim(), hex::encode(k1.public()));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            for f in [SIGNING_KEY_FILE, TOKEN_FILE] {
                let mode = std::fs::metadata(dir.path().join(f))
                    .unwrap()
                    .permissions()
                    .mode();
                assert_eq!(mode & 0o777, 0o600, "{f}");
            }
        }
    }

    #[test]
    fn constant_time_eq_works() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
