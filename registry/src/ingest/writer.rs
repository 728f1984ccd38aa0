//! The ingest's writer: batches reports, decodes them, writes each batch in one
//! transaction and only then acknowledges its messages to the broker.
//!
//! Two stages run side by side, so verifying the next batch overlaps writing this one:
//!
//! ```text
//! messages ──▶ batcher: collect (up to BATCH_MAX or BATCH_WINDOW), verify seals ──▶ committer: admit by counter, write, retry, ack
//! ```
//!
//! Which verified reports are new is decided in the write transaction, from the
//! counters stored with each device's identity: two registry replicas sharing the
//! ingest never both take one report, and a batch written again after a failure is
//! judged again.

use super::admit::{Counters, Verdict};
use super::decode::{decode_batch, Decoded, Raw, Verified};
use super::keys::DeviceKeys;
use super::{IngestStats, Refusal, BATCH_MAX, BATCH_WINDOW};
use crate::db::{self, Db, Standing};
use rumqttc::v5::mqttbytes::v5::Publish;
use rumqttc::v5::AsyncClient;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use wpm_manifests::topic::parse_device_topic;

/// Failed writes of a batch (or of one message) before the database is taken to refuse
/// it rather than to be busy.
const ATTEMPTS: u32 = 5;

/// Batches, writes and acknowledges until `rx` closes; notifies `written` after every
/// batch (the rollout controller judges devices by what was just written).
pub(super) async fn run(
    db: Db,
    client: AsyncClient,
    mut rx: mpsc::UnboundedReceiver<Publish>,
    stats: Arc<IngestStats>,
    written: Arc<Notify>,
) {
    let (prepared_tx, mut prepared_rx) = mpsc::channel::<Prepared>(1);
    let batcher_stats = stats.clone();
    let batcher_db = db.clone();
    let batcher = tokio::spawn(async move {
        let mut keys = DeviceKeys::default();
        loop {
            let Some(first) = rx.recv().await else { break };
            let mut publishes = Vec::with_capacity(BATCH_MAX);
            publishes.push(first);
            let deadline = tokio::time::Instant::now() + BATCH_WINDOW;
            while publishes.len() < BATCH_MAX {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(m)) => publishes.push(m),
                    Ok(None) | Err(_) => break,
                }
            }
            let prepared = Prepared::new(publishes, &batcher_stats, &batcher_db, &mut keys).await;
            if prepared_tx.send(prepared).await.is_err() {
                break;
            }
        }
    });
    let mut known = Standings::default();
    while let Some(p) = prepared_rx.recv().await {
        p.write(&db, &stats, &mut known).await;
        written.notify_one();
        for m in &p.publishes {
            // Only fails when the connection is gone; the broker then delivers the
            // message again on the next connection.
            let _ = client.ack(m).await;
        }
    }
    let _ = batcher.await;
}

/// One batch's writes, newest status and presence per device only.
#[derive(Default)]
struct Batch {
    statuses: HashMap<String, db::StatusWrite>,
    presences: HashMap<String, db::PresenceWrite>,
    events: Vec<db::EventWrite>,
    seen: HashSet<String>,
    /// Reports taken.
    messages: u64,
}

/// What the counters made of a batch's verified reports.
struct Admitted<'a> {
    batch: Batch,
    refused: Vec<(Refusal, &'a Verified)>,
    /// The counters of every device that had a report judged, as read and as they are
    /// now, to store.
    counters: Vec<(&'a str, Counters, Counters)>,
}

/// Decides report by report, in the order the broker delivered them, which are new
/// ([`Counters::admit`]) from each device's `standings`, and collects those into the
/// batch's writes. Pure.
fn admit<'a>(reports: &'a [Verified], standings: &HashMap<String, Standing>) -> Admitted<'a> {
    let mut batch = Batch::default();
    let mut refused = Vec::new();
    let mut counters: HashMap<&str, Counters> = HashMap::new();
    for r in reports {
        let Some(standing) = standings.get(&r.device) else {
            refused.push((Refusal::UnknownDevice, r));
            continue;
        };
        if standing.revoked {
            refused.push((Refusal::Revoked, r));
            continue;
        }
        let c = counters.entry(&r.device).or_insert(standing.counters);
        let offline = matches!(&r.decoded, Decoded::Presence(p, _) if !p.online);
        let verdict = c.admit(r.counter, offline);
        match verdict {
            Verdict::Fresh | Verdict::Will => {}
            Verdict::Duplicate => {
                refused.push((Refusal::Duplicate, r));
                continue;
            }
            Verdict::Replayed => {
                refused.push((Refusal::Replayed, r));
                continue;
            }
        }
        batch.messages += 1;
        match &r.decoded {
            Decoded::Status(s) => {
                let newer =
                    (batch.statuses.get(&s.device)).is_none_or(|old| old.counter < s.counter);
                if newer {
                    batch.statuses.insert(s.device.clone(), s.clone());
                }
            }
            Decoded::Presence(p, announces) => {
                if let Some(will) = announces.filter(|_| p.online) {
                    c.announce(will);
                }
                let will = verdict == Verdict::Will;
                let newer = (batch.presences.get(&p.device))
                    .is_none_or(|old| will || old.counter < p.counter);
                if newer {
                    let p = db::PresenceWrite { will, ..p.clone() };
                    batch.presences.insert(p.device.clone(), p);
                }
            }
            Decoded::Event(e) => {
                batch.seen.insert(e.device.clone());
                batch.events.push(e.clone());
            }
            Decoded::Seen(device) => {
                batch.seen.insert(device.clone());
            }
        }
    }
    let mut counters: Vec<_> = (counters.into_iter())
        .filter(|(id, now)| standings[*id].counters != *now)
        .map(|(id, now)| (id, standings[id].counters, now))
        .collect();
    counters.sort_unstable_by_key(|(id, ..)| *id);
    Admitted {
        batch,
        refused,
        counters,
    }
}

/// The devices' standings as the committer last read or saved them. Trusted until a
/// save finds a row changed underneath (another registry replica took reports of the
/// device, it was revoked or removed); then read again. So a batch of devices already
/// heard from reads nothing before it writes.
#[derive(Default)]
pub(super) struct Standings(HashMap<String, Standing>);

/// Times a batch is judged again after its counters moved underneath it, before the
/// batch counts as failed.
const REJUDGE: usize = 5;

/// Writes `reports` in one transaction: admits them on their devices' standings, writes
/// what was taken and saves the moved counters, all or nothing.
async fn commit<'a>(
    db: &Db,
    reports: &'a [Verified],
    now: i64,
    known: &mut Standings,
) -> anyhow::Result<Admitted<'a>> {
    let mut devices: Vec<&str> = reports.iter().map(|r| r.device.as_str()).collect();
    devices.sort_unstable();
    devices.dedup();
    for _ in 0..REJUDGE {
        let mut tx = db.begin_write().await?;
        let missing: Vec<&str> = (devices.iter().copied())
            .filter(|d| !known.0.contains_key(*d))
            .collect();
        if !missing.is_empty() {
            known.0.extend(db.standings(&mut tx, &missing).await?);
        }
        let standings: HashMap<String, Standing> = (devices.iter())
            .filter_map(|d| known.0.get(*d).map(|s| (d.to_string(), *s)))
            .collect();
        let admitted = admit(reports, &standings);
        let b = &admitted.batch;
        let statuses: Vec<_> = b.statuses.values().collect();
        let presences: Vec<_> = b.presences.values().collect();
        let seen: Vec<_> = b.seen.iter().collect();
        let digest = |d: &str| standings.get(d).and_then(|s| s.rows_digest);
        let stored = db
            .write_reports(
                &mut tx, &statuses, &presences, &b.events, &seen, now, digest,
            )
            .await?;
        if db.save_counters(&mut tx, &admitted.counters).await? {
            tx.commit().await?;
            for (id, _, counters) in &admitted.counters {
                if let Some(s) = known.0.get_mut(*id) {
                    s.counters = *counters;
                }
            }
            for s in statuses.iter().filter(|s| stored.contains(&s.device)) {
                if let Some(k) = known.0.get_mut(&s.device) {
                    k.rows_digest = Some(s.rows_digest);
                }
            }
            return Ok(admitted);
        }
        // Rolled back (dropped); judged again on what the database says now.
        for d in &devices {
            known.0.remove(*d);
        }
        tracing::debug!(
            devices = devices.len(),
            "report counters moved underneath a batch; judging it again"
        );
    }
    anyhow::bail!("report counters kept moving underneath the batch ({REJUDGE} times)")
}

/// A batch verified and ready to write, with the messages it acknowledges.
struct Prepared {
    publishes: Vec<Publish>,
    reports: Vec<Verified>,
    /// Empty retained payloads (a record being cleared): nothing to write.
    empty: u64,
    now: i64,
}

impl Prepared {
    /// Verifies and decodes; refusals are counted here. Waits while the database
    /// cannot say which devices are registered.
    async fn new(
        publishes: Vec<Publish>,
        stats: &IngestStats,
        db: &Db,
        keys: &mut DeviceKeys,
    ) -> Prepared {
        let now = db::now_ms();
        let raws: Vec<Raw> = publishes
            .iter()
            .map(|p| Raw {
                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                payload: p.payload.to_vec(),
                retained: p.retain,
            })
            .collect();
        let devices: Vec<&str> = raws
            .iter()
            .filter_map(|r| parse_device_topic(&r.topic))
            .map(|t| t.device())
            .collect();
        let mut wait = Duration::from_millis(100);
        while let Err(e) = keys.load(db, devices.iter().copied()).await {
            tracing::error!(error = format!("{e:#}"), "cannot read device keys; waiting");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(5));
        }
        let mut reports = Vec::with_capacity(raws.len());
        let mut empty = 0;
        for (raw, decoded) in raws.iter().zip(decode_batch(&raws, now, keys)) {
            match decoded {
                Ok(Some(v)) => reports.push(v),
                Ok(None) => empty += 1,
                Err(r) => {
                    if r.reason == Refusal::BadSignature {
                        if let Some(t) = parse_device_topic(&raw.topic) {
                            keys.forget(t.device());
                        }
                    }
                    stats.refuse(r.reason, &raw.topic, &r.detail);
                }
            }
        }
        Prepared {
            publishes,
            reports,
            empty,
            now,
        }
    }

    /// Writes the batch, retrying until the database takes it. While the database is
    /// unreachable this waits (the broker holds everything unacknowledged); when it is
    /// reachable but refused the batch [`ATTEMPTS`] times, the reports are written one
    /// by one and any the database still refuses [`ATTEMPTS`] times is counted as
    /// [`Refusal::DatabaseRefused`].
    async fn write(&self, db: &Db, stats: &IngestStats, known: &mut Standings) {
        stats.written.fetch_add(self.empty, Ordering::Relaxed);
        let mut wait = Duration::from_millis(100);
        let mut attempts = 0;
        loop {
            let t = std::time::Instant::now();
            match commit(db, &self.reports, self.now, known).await {
                Ok(admitted) => {
                    count(stats, &admitted);
                    tracing::debug!(
                        messages = admitted.batch.messages,
                        statuses = admitted.batch.statuses.len(),
                        took_ms = t.elapsed().as_millis() as u64,
                        "ingest batch written"
                    );
                    return;
                }
                Err(e) => {
                    stats.write_retries.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        error = format!("{e:#}"),
                        messages = self.reports.len(),
                        "ingest batch failed"
                    );
                }
            }
            attempts += 1;
            if attempts >= ATTEMPTS && db.ping().await.is_ok() {
                break;
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(5));
        }
        for one in self.reports.chunks(1) {
            let mut last = None;
            for attempt in 0..ATTEMPTS {
                match commit(db, one, self.now, known).await {
                    Ok(admitted) => {
                        count(stats, &admitted);
                        last = None;
                        break;
                    }
                    Err(e) => last = Some(e),
                }
                tokio::time::sleep(Duration::from_millis(100) * (attempt + 1)).await;
            }
            if let Some(e) = last {
                stats.refuse(Refusal::DatabaseRefused, &one[0].topic, &format!("{e:#}"));
            }
        }
    }
}

fn count(stats: &IngestStats, admitted: &Admitted<'_>) {
    stats
        .written
        .fetch_add(admitted.batch.messages, Ordering::Relaxed);
    for (reason, r) in &admitted.refused {
        stats.refuse(*reason, &r.topic, &format!("counter {}", r.counter));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn presence(device: &str, counter: u64, online: bool, announces: Option<u64>) -> Verified {
        Verified {
            topic: format!("wpm/v1/device/{device}/presence"),
            device: device.into(),
            counter,
            decoded: Decoded::Presence(
                db::PresenceWrite {
                    device: device.into(),
                    online,
                    counter: counter as i64,
                    will: false,
                    seen_at: 1,
                },
                announces,
            ),
        }
    }

    fn telemetry(device: &str, counter: u64) -> Verified {
        Verified {
            topic: format!("wpm/v1/device/{device}/telemetry/m"),
            device: device.into(),
            counter,
            decoded: Decoded::Seen(device.into()),
        }
    }

    fn standing(highest: u64) -> Standing {
        Standing {
            counters: Counters {
                highest,
                ..Counters::default()
            },
            revoked: false,
            rows_digest: None,
        }
    }

    fn reasons(a: &Admitted<'_>) -> Vec<(Refusal, u64)> {
        a.refused.iter().map(|(r, v)| (*r, v.counter)).collect()
    }

    #[test]
    fn only_new_reports_of_registered_unrevoked_devices_are_taken() {
        let standings = HashMap::from([
            ("d1".to_string(), standing(10)),
            (
                "gone".to_string(),
                Standing {
                    revoked: true,
                    ..standing(0)
                },
            ),
        ]);
        let reports = [
            telemetry("d1", 11),
            telemetry("d1", 10), // the retained copy of the last one taken
            telemetry("d1", 11), // a redelivery
            telemetry("gone", 5),
            telemetry("nobody", 5),
            telemetry("d1", 12),
        ];
        let a = admit(&reports, &standings);
        assert_eq!(a.batch.messages, 2);
        assert_eq!(
            reasons(&a),
            [
                (Refusal::Duplicate, 10),
                (Refusal::Duplicate, 11),
                (Refusal::Revoked, 5),
                (Refusal::UnknownDevice, 5)
            ]
        );
        assert_eq!(a.counters.len(), 1);
        assert_eq!(a.counters[0].2.highest, 12);
    }

    #[test]
    fn the_announced_will_takes_the_device_offline_once() {
        let standings = HashMap::from([("d1".to_string(), standing(0))]);
        // Will sealed at 20, then the session: its presence announces the will.
        let reports = [
            presence("d1", 21, true, Some(20)),
            telemetry("d1", 22),
            presence("d1", 20, false, None),
            presence("d1", 20, false, None),
        ];
        let a = admit(&reports, &standings);
        let p = &a.batch.presences["d1"];
        assert!(!p.online && p.will, "{p:?}");
        assert_eq!(reasons(&a), [(Refusal::Replayed, 20)]);
    }

    #[test]
    fn a_presence_from_a_later_session_outranks_an_earlier_will() {
        let standings = HashMap::from([("d1".to_string(), standing(0))]);
        let reports = [
            presence("d1", 21, true, Some(20)),
            presence("d1", 20, false, None),
            // The next session: its will at 30, its presence announces it.
            presence("d1", 31, true, Some(30)),
        ];
        let a = admit(&reports, &standings);
        let p = &a.batch.presences["d1"];
        assert!(p.online && !p.will, "{p:?}");
        assert_eq!(a.counters[0].2.will, 30);
    }
}
