//! Key rotation on the registry's side: issuing the trust chain devices follow
//! ([`wpm_manifests::trust`]).
//!
//! * [`rotate`]: a new key joins the set, in an update sealed by the current key; the
//!   registry signs with the new key from then on, and publishes again, sealed by it,
//!   every module manifest and deployment it retains.
//! * [`retire`]: once every registered device reports the new epoch, an update sealed by
//!   the new key drops the old ones. With `force` it does not wait: that is how a
//!   compromised key is distrusted (rotate away from it, then retire at once).
//!
//! A rotation is crash safe: the next key is written to its own file before its update
//! is recorded, and only then renamed over the signing key; [`recover`] finishes or
//! undoes one that was cut short.
//!
//! Replicas share the database and the data directory: [`follow_loop`] has each one
//! sign with the chain's newest key within [`FOLLOW_EVERY`] of another's rotation.

use crate::db::Db;
use crate::deploy::Deployer;
use crate::keys;
use anyhow::Context as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Mutex};
use wpm_manifests::trust::MAX_TRUSTED_KEYS;
use wpm_manifests::{Sealed, TrustChain, TrustUpdate};

/// How often a replica looks for a rotation another one made.
pub const FOLLOW_EVERY: Duration = Duration::from_secs(2);

/// One rotation or retirement at a time in this process (replicas are kept apart by the
/// chain's primary key).
static CHANGING: Mutex<()> = Mutex::const_new(());

/// Where the registry and its fleet stand on the trust chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustView {
    /// The newest update's epoch (0: never rotated).
    pub epoch: u64,
    /// The keys devices trust at that epoch.
    pub keys: Vec<[u8; 32]>,
    /// The key the registry signs with.
    pub signing_key: [u8; 32],
    /// Registered, unrevoked devices that have not reported reaching `epoch`.
    pub devices_behind: i64,
}

/// Why a retirement did not happen.
#[derive(Debug)]
pub enum RetireError {
    /// Devices trust the signing key alone already.
    NothingToRetire,
    /// Devices that would lose every key they trust if the old ones went now.
    FleetBehind {
        epoch: u64,
        devices: i64,
    },
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for RetireError {
    fn from(e: anyhow::Error) -> Self {
        RetireError::Failed(e)
    }
}

/// The epoch and key set of the newest update of `chain`; `(0, [signing])` before the
/// first rotation.
fn newest(chain: &[(u64, Vec<u8>)], signing: [u8; 32]) -> anyhow::Result<(u64, Vec<[u8; 32]>)> {
    let Some((_, sealed)) = chain.last() else {
        return Ok((0, vec![signing]));
    };
    // The registry's own record: read, not verified.
    let sealed: Sealed = wpm_manifests::decode(sealed).context("a stored trust update")?;
    let update: TrustUpdate =
        wpm_manifests::decode(&sealed.body).context("a stored trust update")?;
    Ok((update.epoch, update.keys.iter().map(|k| **k).collect()))
}

/// The retained payload of [`wpm_manifests::Topic::Trust`].
pub fn chain_payload(chain: &[(u64, Vec<u8>)]) -> Vec<u8> {
    wpm_manifests::encode(&TrustChain {
        links: chain.iter().map(|(_, s)| s.clone().into()).collect(),
    })
}

/// Retains the chain as the database holds it now.
async fn publish_chain(d: &Deployer) -> anyhow::Result<()> {
    let chain = d.db.trust_chain().await?;
    d.publisher.publish_trust(chain_payload(&chain)).await
}

/// Where things stand.
///
/// # Errors
/// When the database cannot be read.
pub async fn view(db: &Db, signing: [u8; 32]) -> anyhow::Result<TrustView> {
    let (epoch, keys) = newest(&db.trust_chain().await?, signing)?;
    Ok(TrustView {
        devices_behind: db.devices_behind(epoch).await?,
        epoch,
        keys,
        signing_key: signing,
    })
}

/// Issues the update that adds a new key (sealed by the current one), signs with the
/// new key from now on, and publishes the chain and everything retained again.
///
/// # Errors
/// When the set is full (retire first), another replica recorded the same epoch first,
/// or the key file, the database or the broker fails; a failure before the update is
/// recorded leaves the old key signing.
pub async fn rotate(d: &Deployer) -> anyhow::Result<TrustView> {
    let _one = CHANGING.lock().await;
    // From the newest key, had another replica rotated since this one last looked.
    follow_locked(d).await?;
    let data_dir = d.signer.data_dir();
    let current = d.signer.key();
    let (epoch, mut set) = newest(&d.db.trust_chain().await?, current.public())?;
    anyhow::ensure!(
        set.len() < MAX_TRUSTED_KEYS,
        "devices already trust {} keys, the most they keep: retire the old ones first",
        set.len()
    );
    let next = keys::create_next_signing_key(data_dir)?;
    set.push(next.public());
    let update = TrustUpdate::seal(&current, epoch + 1, &set);
    if !d.db.add_trust_link(epoch + 1, &update).await? {
        keys::discard_next_signing_key(data_dir)?;
        anyhow::bail!("another registry recorded trust epoch {} first", epoch + 1);
    }
    let key = keys::promote_next_signing_key(data_dir)?;
    let public = key.public();
    d.signer.replace(key);
    tracing::info!(epoch = epoch + 1, key = %hex::encode(public), "rotated the signing key");
    // The chain first, so devices learn the new key before anything it seals; then the
    // module manifests (forgotten, so published again) and deployments, sealed anew.
    publish_chain(d).await?;
    d.publisher.forget_published().await;
    d.reissue_all().await?;
    view(&d.db, public).await
}

/// Issues the update that leaves the signing key alone in the set (sealed by it), once
/// every registered device reports the newest epoch, or at once with `force`.
///
/// # Errors
/// [`RetireError::NothingToRetire`], [`RetireError::FleetBehind`] (without `force`), or
/// a database or broker failure.
pub async fn retire(d: &Deployer, force: bool) -> Result<TrustView, RetireError> {
    let _one = CHANGING.lock().await;
    // Never seal "this key alone" with a key another replica has rotated away from.
    follow_locked(d).await?;
    let current = d.signer.key();
    let (epoch, set) = newest(&d.db.trust_chain().await?, current.public())?;
    if set == [current.public()] {
        return Err(RetireError::NothingToRetire);
    }
    let behind = d.db.devices_behind(epoch).await?;
    if behind > 0 && !force {
        return Err(RetireError::FleetBehind {
            epoch,
            devices: behind,
        });
    }
    let update = TrustUpdate::seal(&current, epoch + 1, &[current.public()]);
    if !d.db.add_trust_link(epoch + 1, &update).await? {
        return Err(
            anyhow::anyhow!("another registry recorded trust epoch {} first", epoch + 1).into(),
        );
    }
    tracing::info!(
        epoch = epoch + 1,
        forced = force,
        behind,
        "retired the old signing keys"
    );
    publish_chain(d).await?;
    Ok(view(&d.db, current.public()).await?)
}

/// Signs with the newest key of the chain once its file is in the data directory: the
/// rotation another replica made. Everything this process published under the old key
/// is forgotten, so it is sealed anew when next deployed (the rotating replica has
/// published again what is deployed now).
///
/// # Errors
/// When the database or the key file cannot be read, or when the chain no longer
/// trusts the key this process signs with and the file holds no key it does (the data
/// directory is not shared with the replica that rotated).
pub async fn follow(d: &Deployer) -> anyhow::Result<()> {
    let (_, set) = newest(&d.db.trust_chain().await?, d.signer.key().public())?;
    if newest_key(&set) == d.signer.key().public() {
        return Ok(());
    }
    // Not half-way through this process's own rotation.
    let _one = CHANGING.lock().await;
    follow_locked(d).await
}

/// The key that signs at the end of a key set: a rotation appends it, a retirement
/// leaves it alone.
fn newest_key(set: &[[u8; 32]]) -> [u8; 32] {
    *set.last().expect("a trust update names a key")
}

/// [`follow`], holding [`CHANGING`].
async fn follow_locked(d: &Deployer) -> anyhow::Result<()> {
    let current = d.signer.key();
    let (epoch, set) = newest(&d.db.trust_chain().await?, current.public())?;
    if newest_key(&set) == current.public() {
        return Ok(());
    }
    match keys::signing_key(d.signer.data_dir())? {
        Some(key) if key.public() == newest_key(&set) => {
            tracing::info!(epoch, key = %hex::encode(key.public()),
                "signing with the key another registry rotated to");
            d.signer.replace(key);
            d.publisher.forget_published().await;
            Ok(())
        }
        // Its update is recorded, its file not yet renamed into place: the current key
        // is still trusted meanwhile.
        _ if set.contains(&current.public()) => Ok(()),
        _ => anyhow::bail!(
            "devices no longer trust this registry's signing key {} (trust epoch {epoch}), \
             and {} holds none they do: share the data directory with the registry that \
             rotated, or restart with its key",
            hex::encode(current.public()),
            d.signer.data_dir().display()
        ),
    }
}

/// Runs [`follow`] every [`FOLLOW_EVERY`] until `stop`; an error is logged when it
/// first appears, not every pass.
pub async fn follow_loop(d: Arc<Deployer>, mut stop: watch::Receiver<bool>) {
    let mut last_error = None;
    loop {
        let error = follow(&d).await.err().map(|e| format!("{e:#}"));
        if error.is_some() && error != last_error {
            tracing::error!(error = error.as_deref(), "following the trust chain");
        }
        last_error = error;
        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep(FOLLOW_EVERY) => {}
        }
    }
}

/// At start, before the signing key is read: finishes a rotation whose update was
/// recorded but whose key was not yet in place, or drops the next key of one that never
/// recorded its update.
///
/// # Errors
/// When the key files or the database cannot be read or changed.
pub async fn recover(data_dir: &Path, db: &Db) -> anyhow::Result<()> {
    let Some(next) = keys::next_signing_key(data_dir)? else {
        return Ok(());
    };
    let chain = db.trust_chain().await?;
    if !chain.is_empty() && newest(&chain, [0; 32])?.1.contains(&next.public()) {
        keys::promote_next_signing_key(data_dir)?;
        tracing::warn!("finished a key rotation that was cut short");
    } else {
        keys::discard_next_signing_key(data_dir)?;
        tracing::warn!("dropped the key of a rotation that never recorded its update");
    }
    Ok(())
}
