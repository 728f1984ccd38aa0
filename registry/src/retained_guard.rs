//! Keeps what the registry retains on the broker as it published it.
//!
//! Devices install from retained messages: module chunks and manifests, and each
//! target's newest deployment. Anything else retained there (garbage, an empty message
//! that clears the topic, an old deployment) stops devices installing, and the
//! publisher's memory of what it sent would never notice. So a client of the registry's
//! own watches those topics and, when a message there is not what this process last
//! retained, puts the registry's bytes back: at most once a second per module or target,
//! however fast someone writes there, each repair counted (`/v1/health`
//! `retained.repaired`) and logged with its topic.
//!
//! Devices need none of this to stay safe (they verify every signature and hash); it
//! keeps them able to install. A locked-down broker keeps others off these topics in
//! the first place. Module topics this process never published (another replica's
//! modules, a digest nobody deployed) are left alone: no device asks for them; nor is a
//! deployment topic with no live deployment in the database (devices refuse what is
//! there, and report it).

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

/// Whether a message on `topic` with payload hash `seen` differs from what this process
/// retained there (`ours`): the damage to repair. Pure.
fn judge(topic: &str, seen: [u8; 32], ours: Option<[u8; 32]>) -> Option<Damage> {
    if ours == Some(seen) {
        return None;
    }
    if let Some(t) = parse_module_topic(topic) {
        let digest = match t {
            ModuleTopic::Manifest(d) | ModuleTopic::Chunk(d, _) => d,
        };
        // Not one of ours: nobody installs from it.
        return ours.map(|_| Damage::Module(digest));
    }
    parse_deployment_topic(topic)?;
    // Nothing of ours and nothing there: fine. Otherwise the database says what belongs.
    (ours.is_some() || seen != sha256(&[])).then(|| Damage::Deployment(topic.into()))
}

/// Damage waiting for the next repair pass, each with the hash last seen there. Pure.
#[derive(Debug, Default)]
struct Pending(HashMap<Damage, [u8; 32]>);

impl Pending {
    /// Takes in one message: `seen` on `topic`, where this process retained `ours`.
    fn observe(&mut self, topic: &str, seen: [u8; 32], ours: Option<[u8; 32]>) {
        match judge(topic, seen, ours) {
            Some(d) => {
                self.0.insert(d, seen);
            }
            // Messages from this process's publisher arrive in the order it sent them:
            // an older deployment seen just before its successor is no damage once the
            // successor arrives.
            None => {
                self.0.remove(&Damage::Deployment(topic.into()));
            }
        }
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
                for (d, seen) in std::mem::take(&mut damaged.0) {
                    match repair(&deployer, &d, seen).await {
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
/// replica published a newer deployment) or there is nothing to put back.
async fn repair(deployer: &Deployer, damage: &Damage, seen: [u8; 32]) -> anyhow::Result<bool> {
    let publisher = &deployer.publisher;
    match damage {
        Damage::Module(digest) => {
            let Some(m) = publisher.published_module(digest) else {
                return Ok(false);
            };
            let wasm = deployer.db.module_wasm(&m.name, &m.version).await?;
            tracing::warn!(module = %m.name, version = %m.version,
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
            match deployer.db.latest_deployment(&target).await? {
                Some(d) if sha256(&d.sealed) == seen => Ok(false),
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
        // A module this process never published: nobody installs from it.
        assert_eq!(judge(&chunk, other, None), None);
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
        assert_eq!(p.0.get(&Damage::Deployment(group.into())), Some(&garbage));
    }
}
