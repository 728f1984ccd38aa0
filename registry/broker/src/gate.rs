//! Who may connect to the embedded broker, and what each may publish and subscribe to.
//!
//! Defence in depth: the registry never trusts the broker for who spoke (reports are
//! sealed by each device, see `wpm_manifests::report`), but a broker that lets anyone
//! in lets anyone kick a device off by taking its client id, clear or poison retained
//! chunks and manifests, or join the registry's ingest share group. So:
//!
//! * **No anonymous client.** A device logs in with its id as username and client id and
//!   the password `wpm_manifests::login_password` makes with its key; the broker checks
//!   it against the key registered for that id ([`Directory`]), so only the holder of a
//!   device's key can use its client id. A revoked or unknown device is refused.
//! * **The registry's own clients** log in as [`REGISTRY_USER`] with the registry's
//!   broker password; they may do anything.
//! * **Devices publish only their own reports** and subscribe only to what they need, by
//!   exact name (`wpm_manifests::topic::device_may_publish`, `device_may_subscribe`: the
//!   one rule also written into Mosquitto ACLs). No shared subscriptions. A last will
//!   must be the device's presence (rmqtt does not check wills against publish ACLs).

use crate::BrokerStats;
use async_trait::async_trait;
use rmqtt::codec::v5::SubscribeAckReason;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType};
use rmqtt::types::{AuthResult, LastWill, PublishAclResult, SubscribeAclResult};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use wpm_manifests::topic::{device_may_publish, device_may_subscribe};
use wpm_manifests::Topic;

/// The username of the registry's own MQTT clients.
pub const REGISTRY_USER: &str = "wpm-registry";

/// Looks up the key a device logs in with.
#[async_trait]
pub trait Directory: Send + Sync + 'static {
    /// The public key of `device` if it is registered and not revoked.
    async fn login_key(&self, device: &str) -> Option<[u8; 32]>;
}

/// What the broker lets in.
#[derive(Clone)]
pub struct Access {
    /// The registry's broker password (username [`REGISTRY_USER`]).
    pub registry_password: String,
    pub devices: Arc<dyn Directory>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Access { registry_password: \"***\", .. }")
    }
}

/// Refused connections and subscriptions are counted in [`BrokerStats`]; refused
/// publishes are dropped messages (`DropReason::NotAuthorized`), counted and logged
/// with the others.
pub(crate) struct Gate {
    pub access: Access,
    pub stats: Arc<BrokerStats>,
}

/// Whether two secrets are equal, in time that does not depend on where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Gate {
    /// Why a connection is refused, or `Ok(superuser)`.
    async fn login(&self, ci: &rmqtt::types::ConnectInfo) -> Result<bool, &'static str> {
        let (Some(user), Some(password)) = (ci.username(), ci.password()) else {
            return Err("no username and password");
        };
        let user: &str = user;
        if user == REGISTRY_USER {
            return if same_secret(password, self.access.registry_password.as_bytes()) {
                Ok(true)
            } else {
                Err("wrong registry password")
            };
        }
        if &**ci.client_id() != user {
            return Err("client id is not the username");
        }
        let Some(key) = self.access.devices.login_key(user).await else {
            return Err("not a registered, unrevoked device");
        };
        if !wpm_manifests::check_login_password(&key, user, password) {
            return Err("password is not the device's login");
        }
        if let Some(will) = ci.last_will() {
            let topic = match will {
                LastWill::V3(w) => &w.topic,
                LastWill::V5(w) => &w.topic,
            };
            if **topic != *Topic::Presence(user).render() {
                return Err("last will is not on the device's presence topic");
            }
        }
        Ok(false)
    }
}

#[async_trait]
impl Handler for Gate {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        match param {
            Parameter::ClientAuthenticate(ci) => {
                let result = match self.login(ci).await {
                    Ok(superuser) => AuthResult::Allow(superuser, None),
                    Err(why) => {
                        self.stats.refused_logins.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            client_id = %ci.client_id(),
                            username = ?ci.username(),
                            remote = ?ci.ipaddress(),
                            why,
                            "broker refused a connection"
                        );
                        AuthResult::BadUsernameOrPassword
                    }
                };
                (false, Some(HookResult::AuthResult(result)))
            }
            // Only non-superusers (devices) reach the two ACL hooks.
            Parameter::ClientSubscribeCheckAcl(s, sub) => {
                let device = &s.id.client_id;
                let ok = sub.opts.shared_group().is_none()
                    && device_may_subscribe(device, &sub.topic_filter);
                let result = if ok {
                    SubscribeAclResult::new_success(sub.opts.qos(), None)
                } else {
                    self.stats
                        .refused_subscribes
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%device, filter = %sub.topic_filter, "broker refused a subscription");
                    SubscribeAclResult::new_failure(SubscribeAckReason::NotAuthorized)
                };
                (false, Some(HookResult::SubscribeAclResult(result)))
            }
            Parameter::MessagePublishCheckAcl(s, p) => {
                let device = &s.id.client_id;
                let result = if device_may_publish(device, &p.topic) {
                    PublishAclResult::allow()
                } else {
                    PublishAclResult::rejected(false, None)
                };
                (false, Some(HookResult::PublishAclResult(result)))
            }
            _ => (true, acc),
        }
    }
}
