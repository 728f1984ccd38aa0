//! Keeps what the registry retains on the broker as it published it.
//!
//! Devices install from retained messages: module chunks and manifests, and each
//! target's newest deployment. Anything else retained there (garbage, an empty message
//! that clears the topic, an old deployment) stops devices installing, and the
//! publisher's memory of what it sent would never notice. So a client of the registry's
//! own watches those topics and, when a message there is not what belongs, puts the
//! registry's bytes back: at most once a second per module or target, however fast
//! someone writes there, each repair counted (`/v1/health` `retained.repaired`) and
//! logged with its topic.
//!
//! What belongs is decided by the database, not by this process's memory, so every
//! replica guards every deployed module and target, whichever replica published it: a
//! module's messages are the same bytes from any replica (chunks, and a manifest sealed
//! by the shared key: ed25519 is deterministic), and a target's is its newest
//! deployment. Before judging, the guard follows a key rotation another replica made
//! ([`crate::trust::follow`]), so it never puts an old key's manifest back.
//!
//! Devices need none of this to stay safe (they verify every signature and hash); it
//! keeps them able to install. A locked-down broker keeps others off these topics in
//! the first place. Module topics of no deployed module (a digest nobody deployed) are
//! left alone: no device asks for them; nor is a deployment topic with no live
//! deployment in the database (devices refuse what is there, and report it).

use crate::db::ModuleRow;
use crate::deploy::Deployer;
use crate::publish::{client_id, drive, MqttSettings};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use wpm_manifests::sha256;
use wpm_manifests::topic::{parse_deployment_topic, parse_module_topic, ModuleTopic, PREFIX};

/// Repairs of retained state, for `/v1/health`.
#[derive(Debug, Default)]
pub struct GuardStats {
    pub repaired: AtomicU64,
}

/// What to put back.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Damage {
    /// A chunk or the manifest of this module.
    Module([u8; 32]),
    /// The deployment topic of one target.
    Deployment(String),
}

/// Whether a message on `topic` with payload hash `seen` may differ from what belongs
/// there: the damage to look into. `ours` is what this process retained there. Pure.
fn judge(topic: &str, seen: [u8; 32], ours: Option<[u8; 32]>) -> Option<Damage> {
    if ours == Some(seen) {
        return None;
    }
    if let Some(digest) = module_digest(topic) {
        // The database decides whether it is a deployed module (the repair pass).
        return Some(Damage::Module(digest));
    }
    parse_deployment_topic(topic)?;
    // Nothing of ours and nothing there: fine. Otherwise the database says what belongs.
    (ours.is_some() || seen != sha256(&[])).then(|| Damage::Deployment(topic.into()))
}

/// Damage waiting for the next repair pass, each with the hash last seen on each of its
/// topics. Pure.
#[derive(Debug, Default)]
struct Pending(HashMap<Damage, HashMap<String, [u8; 32]>>);

impl Pending {
    /// Takes in one message: `seen` on `topic`, where this process retained `ours`.
    fn observe(&mut self, topic: &str, seen: [u8; 32], ours: Option<[u8; 32]>) {
        match judge(topic, seen, ours) {
            Some(d) => {
                self.0.entry(d).or_default().insert(topic.into(), seen);
            }
            // Messages from this process's publisher arrive in the order it sent them:
            // an older deployment seen just before its successor is no damage once the
            // successor arrives; nor is a module message put right since.
            None => {
                let damage = match module_digest(topic) {
                    Some(digest) => Damage::Module(digest),
                    None => Damage::Deployment(topic.into()),
                };
                if let Some(topics) = self.0.get_mut(&damage) {
                    topics.remove(topic);
                    if topics.is_empty() {
                        self.0.remove(&damage);
                    }
                }
            }
        }
    }
}

/// The module a chunk or manifest topic belongs to.
fn module_digest(topic: &str) -> Option<[u8; 32]> {
    parse_module_topic(topic).map(|t| match t {
        ModuleTopic::Manifest(d) | ModuleTopic::Chunk(d, _) => d,
    })
}

/// The deployed modules by digest (one digest may carry several names or versions), as
/// the database said at the last repair pass that had a module to look into.
#[derive(Default)]
struct Deployed(HashMap<[u8; 32], Vec<ModuleRow>>);

impl Deployed {
    async fn read(&mut self, deployer: &Deployer) -> anyhow::Result<()> {
        self.0.clear();
        for m in deployer.db.desired_modules().await? {
            self.0.entry(m.sha256).or_default().push(m);
        }
        Ok(())
    }
}

/// Watches and repairs until `stop` flips.
pub async fn run(
    settings: MqttSettings,
    deployer: Arc<Deployer>,
    stats: Arc<GuardStats>,
    stop: watch::Receiver<bool>,
) {
    let (client, eventloop) = AsyncClient::new(settings.options(client_id("guard")), 64);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let subscriber = client.clone();
    let (connected, _) = watch::channel(false);
    let task = tokio::spawn(drive(
        eventloop,
        stop.clone(),
        connected,
        "guard",
        move |e| match e {
            Event::Incoming(Packet::ConnAck(_)) => {
                for filter in ["module/+/manifest", "module/+/chunk/+", "deploy/#"] {
                    let _ = subscriber.try_subscribe(format!("{PREFIX}/{filter}"), QoS::AtMostOnce);
                }
            }
            Event::Incoming(Packet::Publish(p)) => {
                let topic = String::from_utf8_lossy(&p.topic).into_owned();
                let _ = tx.send((topic, sha256(&p.payload)));
            }
            _ => {}
        },
    ));
    let mut damaged = Pending::default();
    let mut deployed = Deployed::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut stop_rx = stop;
    loop {
        tokio::select! {
            _ = stop_rx.changed() => break,
            m = rx.recv() => {
                let Some((topic, seen)) = m else { break };
                damaged.observe(&topic, seen, deployer.publisher.retained_hash(&topic));
            }
            _ = tick.tick() => {
                if damaged.0.is_empty() {
                    continue;
                }
                if let Err(e) = crate::trust::follow(&deployer).await {
                    tracing::error!(error = format!("{e:#}"), "following the trust chain");
                }
                let modules = damaged.0.keys().any(|d| matches!(d, Damage::Module(_)));
                if modules {
                    if let Err(e) = deployed.read(&deployer).await {
                        tracing::error!(error = format!("{e:#}"), "reading the deployed modules");
                        continue;
                    }
                }
                for (d, seen) in std::mem::take(&mut damaged.0) {
                    match repair(&deployer, &deployed, &d, &seen).await {
                        Ok(true) => {
                            stats.repaired.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::error!(error = format!("{e:#}"), damage = ?d, "cannot repair retained state");
                            damaged.0.insert(d, seen);
                        }
                    }
                }
            }
        }
    }
    let _ = client.disconnect().await;
    let _ = task.await;
}

/// Puts the registry's bytes back; false when what is there is right after all (another
/// replica published the same module or a newer deployment) or there is nothing to put
/// back. `seen`: the hash last seen on each damaged topic.
async fn repair(
    deployer: &Deployer,
    deployed: &Deployed,
    damage: &Damage,
    seen: &HashMap<String, [u8; 32]>,
) -> anyhow::Result<bool> {
    let publisher = &deployer.publisher;
    match damage {
        Damage::Module(digest) => {
            // Not deployed: nobody installs from it.
            let Some(rows) = deployed.0.get(digest) else {
                return Ok(false);
            };
            let wasm = deployer
                .db
                .module_wasm(&rows[0].name, &rows[0].version)
                .await?;
            for m in rows {
                let hashes = publisher.module_hashes(m, &wasm)?;
                if seen.iter().all(|(t, h)| hashes.get(t) == Some(h)) {
                    publisher.adopt_module(m, hashes);
                    return Ok(false);
                }
            }
            // The one this process published, else the last deployed under that digest.
            let m = (publisher.published_module(digest))
                .filter(|p| {
                    rows.iter()
                        .any(|r| r.name == p.name && r.version == p.version)
                })
                .unwrap_or_else(|| rows[rows.len() - 1].clone());
            tracing::warn!(module = %m.name, version = %m.version, topics = ?seen.keys().collect::<Vec<_>>(),
                "something else was retained on a topic of this module; publishing it again");
            publisher.republish_module(&m, &wasm).await?;
            Ok(true)
        }
        Damage::Deployment(topic) => {
            let Some(target) = parse_deployment_topic(topic) else {
                return Ok(false);
            };
            // Under the deploy lock: a deployment made meanwhile is not overwritten.
            let _guard = deployer.lock.lock().await;
            let seen = seen.get(topic.as_str()).copied();
            match deployer.db.latest_deployment(&target).await? {
                Some(d) if Some(sha256(&d.sealed)) == seen => Ok(false),
                Some(d) => {
                    tracing::warn!(topic, "something else was retained on a deployment topic; publishing the newest deployment again");
                    publisher.publish_deployment(&d).await?;
                    Ok(true)
                }
                // Nothing live to put back (a retired per-device deployment, or garbage
                // where nothing was deployed, which devices refuse and report).
                None => Ok(false),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_differs_from_what_was_published_is_damage() {
        let (ours, other, empty) = ([1; 32], [2; 32], sha256(&[]));
        let h = "ab".repeat(32);
        let manifest = format!("wpm/v1/module/{h}/manifest");
        let chunk = format!("wpm/v1/module/{h}/chunk/3");
        let digest = [0xab; 32];
        assert_eq!(judge(&manifest, ours, Some(ours)), None);
        assert_eq!(
            judge(&manifest, other, Some(ours)),
            Some(Damage::Module(digest))
        );
        assert_eq!(
            judge(&manifest, empty, Some(ours)),
            Some(Damage::Module(digest))
        );
        assert_eq!(
            judge(&chunk, other, Some(ours)),
            Some(Damage::Module(digest))
        );
        // A module this process never published: the database decides.
        assert_eq!(judge(&chunk, other, None), Some(Damage::Module(digest)));
        let group = "wpm/v1/deploy/group/eu";
        assert_eq!(judge(group, ours, Some(ours)), None);
        assert_eq!(
            judge(group, other, Some(ours)),
            Some(Damage::Deployment(group.into()))
        );
        // Something where this process deployed nothing: the database decides.
        assert_eq!(
            judge(group, other, None),
            Some(Damage::Deployment(group.into()))
        );
        assert_eq!(judge(group, empty, None), None);
        // Reports and commands are not retained state of the registry's.
        assert_eq!(judge("wpm/v1/device/d1/status", other, None), None);
    }

    #[test]
    fn a_deployment_overtaken_by_its_successor_is_no_damage() {
        let (v1, v2, garbage) = ([1; 32], [2; 32], [3; 32]);
        let group = "wpm/v1/deploy/group/eu";
        let mut p = Pending::default();
        // v1 and v2 published back to back: v1 arrives when v2 is already ours.
        p.observe(group, v1, Some(v2));
        p.observe(group, v2, Some(v2));
        assert!(p.0.is_empty(), "{p:?}");
        // Garbage after ours stays damage.
        p.observe(group, garbage, Some(v2));
        let seen = &p.0[&Damage::Deployment(group.into())];
        assert_eq!(seen.get(group), Some(&garbage));
    }

    #[test]
    fn a_module_topic_put_right_since_is_no_damage() {
        let (ours, garbage) = ([1; 32], [3; 32]);
        let h = "ab".repeat(32);
        let (manifest, chunk) = (
            format!("wpm/v1/module/{h}/manifest"),
            format!("wpm/v1/module/{h}/chunk/0"),
        );
        let mut p = Pending::default();
        p.observe(&manifest, garbage, Some(ours));
        p.observe(&chunk, garbage, Some(ours));
        p.observe(&manifest, ours, Some(ours));
        let topics = &p.0[&Damage::Module([0xab; 32])];
        assert_eq!(topics.keys().collect::<Vec<_>>(), [&chunk]);
        p.observe(&chunk, ours, Some(ours));
        assert!(p.0.is_empty(), "{p:?}");
    }
}
