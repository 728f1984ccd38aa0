//! What the broker moved and what it dropped, counted from rmqtt's message hooks.

use async_trait::async_trait;
use rmqtt::hook::{Handler, HookResult, Parameter, ReturnType};
use rmqtt::types::Reason;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why the broker dropped a message instead of delivering it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// A subscriber's session queue was full (it is offline or reads too slowly).
    QueueFull,
    /// A subscriber's in-flight window was full and the message could not wait.
    InflightFull,
    /// The message waited in a queue past its expiry.
    Expired,
    /// The publisher may not publish on that topic (a device on another's topics, or on
    /// the registry's).
    NotAuthorized,
    /// Anything else rmqtt reports (a failed publish, a protocol error).
    Other,
}

impl DropReason {
    pub const ALL: [DropReason; 5] = [
        DropReason::QueueFull,
        DropReason::InflightFull,
        DropReason::Expired,
        DropReason::NotAuthorized,
        DropReason::Other,
    ];

    /// A name an operator reads in `/v1/health`.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::QueueFull => "subscriber_queue_full",
            DropReason::InflightFull => "subscriber_inflight_full",
            DropReason::Expired => "expired_in_queue",
            DropReason::NotAuthorized => "publish_not_authorized",
            DropReason::Other => "other",
        }
    }

    fn of(reason: &Reason) -> DropReason {
        match reason {
            Reason::MessageQueueFull => DropReason::QueueFull,
            Reason::InflightWindowFull => DropReason::InflightFull,
            Reason::MessageExpiration => DropReason::Expired,
            Reason::PublishResult(r) if !r.is_success() => DropReason::NotAuthorized,
            _ => DropReason::Other,
        }
    }
}

/// Counters since the broker started. Bytes are topic plus payload: the MQTT framing
/// around them is not counted.
#[derive(Default, Debug)]
pub struct BrokerStats {
    received: AtomicU64,
    received_bytes: AtomicU64,
    delivered: AtomicU64,
    delivered_bytes: AtomicU64,
    dropped: [AtomicU64; DropReason::ALL.len()],
    /// Connections the broker's gate refused (`gate.rs`).
    pub refused_logins: AtomicU64,
    /// Subscriptions the gate refused.
    pub refused_subscribes: AtomicU64,
}

impl BrokerStats {
    /// PUBLISH packets clients sent to the broker.
    pub fn received(&self) -> (u64, u64) {
        (
            self.received.load(Ordering::Relaxed),
            self.received_bytes.load(Ordering::Relaxed),
        )
    }

    /// Messages the broker handed to subscribers (retained copies included).
    pub fn delivered(&self) -> (u64, u64) {
        (
            self.delivered.load(Ordering::Relaxed),
            self.delivered_bytes.load(Ordering::Relaxed),
        )
    }

    /// Messages dropped, by reason.
    pub fn dropped(&self) -> Vec<(DropReason, u64)> {
        DropReason::ALL
            .iter()
            .map(|r| (*r, self.dropped[*r as usize].load(Ordering::Relaxed)))
            .collect()
    }
}

/// The hook handler that feeds [`BrokerStats`]. It only counts: it never changes or
/// stops a message.
pub(crate) struct Counting(pub(crate) std::sync::Arc<BrokerStats>);

fn size(p: &rmqtt::types::Publish) -> u64 {
    (p.topic.len() + p.payload.len()) as u64
}

#[async_trait]
impl Handler for Counting {
    async fn hook(&self, param: &Parameter, acc: Option<HookResult>) -> ReturnType {
        let s = &self.0;
        match param {
            Parameter::MessagePublish(_, _, p) => {
                s.received.fetch_add(1, Ordering::Relaxed);
                s.received_bytes.fetch_add(size(p), Ordering::Relaxed);
            }
            Parameter::MessageDelivered(_, _, p) => {
                s.delivered.fetch_add(1, Ordering::Relaxed);
                s.delivered_bytes.fetch_add(size(p), Ordering::Relaxed);
            }
            Parameter::MessageDropped(to, from, p, reason) => {
                let r = DropReason::of(reason);
                s.dropped[r as usize].fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    topic = %p.topic,
                    from = %from.id.client_id,
                    to = ?to.as_ref().map(|t| t.client_id.to_string()),
                    reason = r.as_str(),
                    detail = %reason,
                    "broker dropped a message"
                );
            }
            _ => {}
        }
        (true, acc)
    }
}
