//! The ingest's writer: batches reports, decodes them, writes each batch in one
//! transaction and only then acknowledges its messages to the broker.
//!
//! Two stages run side by side, so decoding the next batch overlaps writing this one:
//!
//! ```text
//! messages ──▶ batcher: collect (up to BATCH_MAX or BATCH_WINDOW), decode ──▶ committer: write, retry, ack
//! ```

use super::decode::{decode_message, Decoded, Raw};
use super::{IngestStats, Refusal, BATCH_MAX, BATCH_WINDOW};
use crate::db::{self, Db};
use rumqttc::v5::mqttbytes::v5::Publish;
use rumqttc::v5::AsyncClient;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};

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
    let batcher = tokio::spawn(async move {
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
            let prepared = Prepared::new(publishes, &batcher_stats);
            if prepared_tx.send(prepared).await.is_err() {
                break;
            }
        }
    });
    while let Some(p) = prepared_rx.recv().await {
        p.write(&db, &stats).await;
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
    messages: u64,
}

impl Batch {
    fn add(&mut self, d: Decoded) {
        self.messages += 1;
        match d {
            Decoded::Status(s) => {
                let newer = self
                    .statuses
                    .get(&s.device)
                    .is_none_or(|old| old.status_at <= s.status_at);
                if newer {
                    self.statuses.insert(s.device.clone(), s);
                }
            }
            Decoded::Presence(p) => {
                self.presences.insert(p.device.clone(), p);
            }
            Decoded::Event(e) => {
                self.seen.insert(e.device.clone());
                self.events.push(e)
            }
            Decoded::Seen(device) => {
                self.seen.insert(device);
            }
            Decoded::Ignored => {}
        }
    }

    async fn commit(&self, db: &Db, now: i64) -> anyhow::Result<()> {
        let statuses: Vec<_> = self.statuses.values().collect();
        let presences: Vec<_> = self.presences.values().collect();
        let seen: Vec<_> = self.seen.iter().collect();
        db.write_batch(&statuses, &presences, &self.events, &seen, now)
            .await
    }
}

/// A batch decoded and ready to write, with the messages it acknowledges.
struct Prepared {
    publishes: Vec<Publish>,
    batch: Batch,
    /// The decodable messages, to write one by one if the batch is refused.
    raws: Vec<Raw>,
    now: i64,
}

impl Prepared {
    /// Decodes; refusals are counted here.
    fn new(publishes: Vec<Publish>, stats: &IngestStats) -> Prepared {
        let now = db::now_ms();
        let mut batch = Batch::default();
        let mut raws = Vec::with_capacity(publishes.len());
        for p in &publishes {
            let raw = Raw {
                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                payload: p.payload.to_vec(),
                retained: p.retain,
            };
            match decode_message(&raw, now) {
                Ok(d) => {
                    raws.push(raw);
                    batch.add(d);
                }
                Err(r) => stats.refuse(r.reason, &raw.topic, &r.detail),
            }
        }
        Prepared {
            publishes,
            batch,
            raws,
            now,
        }
    }

    /// Writes the batch, retrying until the database takes it. While the database is
    /// unreachable this waits (the broker holds everything unacknowledged); when it is
    /// reachable but refused the batch [`ATTEMPTS`] times, the messages are written one
    /// by one and any the database still refuses [`ATTEMPTS`] times is counted as
    /// [`Refusal::DatabaseRefused`].
    async fn write(&self, db: &Db, stats: &IngestStats) {
        let mut wait = Duration::from_millis(100);
        let mut attempts = 0;
        loop {
            let t = std::time::Instant::now();
            match self.batch.commit(db, self.now).await {
                Ok(()) => {
                    stats
                        .written
                        .fetch_add(self.batch.messages, Ordering::Relaxed);
                    tracing::debug!(
                        messages = self.batch.messages,
                        statuses = self.batch.statuses.len(),
                        took_ms = t.elapsed().as_millis() as u64,
                        "ingest batch written"
                    );
                    return;
                }
                Err(e) => {
                    stats.write_retries.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(
                        error = format!("{e:#}"),
                        messages = self.batch.messages,
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
        for raw in &self.raws {
            let mut one = Batch::default();
            if let Ok(d) = decode_message(raw, self.now) {
                one.add(d);
            }
            let mut last = None;
            for attempt in 0..ATTEMPTS {
                match one.commit(db, self.now).await {
                    Ok(()) => {
                        last = None;
                        break;
                    }
                    Err(e) => last = Some(e),
                }
                tokio::time::sleep(Duration::from_millis(100) * (attempt + 1)).await;
            }
            match last {
                None => {
                    stats.written.fetch_add(1, Ordering::Relaxed);
                }
                Some(e) => stats.refuse(Refusal::DatabaseRefused, &raw.topic, &format!("{e:#}")),
            }
        }
    }
}
