//! Staged rollouts: a module version goes to a group in stages (say 1 %, 10 %, 100 %),
//! each stage advancing once its devices confirm, the whole rollout halting and rolling
//! back when too many fail. Design: docs/rollouts.md.
//!
//! Every piece of state lives in the database (`rollouts`, `rollout_devices`), and one
//! controller at a time drives it: the replica holding the `rollout-controller` lease.
//! A replica that dies stops renewing its lease; another takes it over when it expires
//! and carries on from the rows.
//!
//! The controller is driven by arriving reports: ingest wakes it after every batch it
//! writes, and a pass judges all updating devices of a rollout in three set-based
//! statements ([`Db::judge_updating`]), counts them, and asks the pure [`plan`] what to
//! do next. A stage therefore advances as soon as its last device confirmed, and the
//! cost of a pass does not depend on the size of the fleet.

use crate::db::{now_ms, DesiredChange, ModuleRow};
use crate::deploy::Deployer;
use anyhow::Context as _;
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use wpm_manifests::{HealthWindow, Target};

/// How long the controller lease lasts without renewal: how long a killed replica's
/// rollouts wait before another replica takes them over.
pub const LEASE_TTL_MS: i64 = 5_000;
/// A pass runs at least this often without any report (stage timeouts, the lease).
pub const IDLE_PASS: Duration = Duration::from_secs(1);
/// Passes woken by reports are at least this far apart: a burst of batches is judged
/// together.
pub const MIN_PASS_GAP: Duration = Duration::from_millis(200);
/// A pass judges the devices heard from since the previous pass began, minus this: an
/// ingest batch is stamped when it is decoded and committed a little later, maybe by
/// another replica with its own clock.
const REPORT_MARGIN_MS: i64 = 2_000;
/// Every this often a pass judges every updating device, whatever the reports' stamps
/// say: a batch whose commit was held up longer than the margin is not missed.
const FULL_PASS_MS: i64 = 10_000;
const LEASE: &str = "rollout-controller";

/// Event kinds that fail a device's update when they name the rollout's module version.
/// (A `manifest_rejected` fails it too, whatever it names; see [`Db::judge_updating`].)
pub(crate) const FAILURE_KINDS: [&str; 3] = ["install_failed", "rolled_back", "trapped"];

use crate::db::Db;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    Running,
    Paused,
    /// Halted (automatically or on request); the controller is reverting the devices.
    RollingBack,
    RolledBack,
    Completed,
}

impl RolloutState {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Paused => "paused",
            RolloutState::RollingBack => "rolling_back",
            RolloutState::RolledBack => "rolled_back",
            RolloutState::Completed => "completed",
        }
    }

    pub(crate) fn parse(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "running" => RolloutState::Running,
            "paused" => RolloutState::Paused,
            "rolling_back" => RolloutState::RollingBack,
            "rolled_back" => RolloutState::RolledBack,
            "completed" => RolloutState::Completed,
            other => anyhow::bail!("unknown rollout state {other:?} in the database"),
        })
    }
}

/// What an operator asks for.
#[derive(Clone, Debug)]
pub struct NewRollout {
    pub module: ModuleRow,
    pub group: String,
    /// Cumulative percentages of the group, strictly increasing, ending with 100.
    pub stages: Vec<u8>,
    /// Halt and roll back when more than this share of the devices updated so far failed.
    pub max_failure_pct: u8,
    /// A device that has not confirmed within this time counts as failed.
    pub stage_timeout: Duration,
    /// What the new version must pass on each device before it counts as confirmed.
    pub health: HealthWindow,
}

/// Checks a stage list: 1 to 10 cumulative percentages, increasing, ending with 100.
pub fn check_stages(stages: &[u8]) -> Result<(), String> {
    if stages.is_empty() || stages.len() > 10 {
        return Err("give 1 to 10 stages".into());
    }
    if stages.windows(2).any(|w| w[0] >= w[1]) || stages[0] == 0 {
        return Err(format!(
            "stages must be increasing percentages above 0, not {stages:?}"
        ));
    }
    if stages.last() != Some(&100) {
        return Err(format!("the last stage must be 100 (%), not {stages:?}"));
    }
    Ok(())
}

#[derive(Clone, Debug, Serialize)]
pub struct Rollout {
    pub id: i64,
    pub module: String,
    pub version: String,
    pub previous_version: Option<String>,
    pub group: String,
    pub stages: Vec<u8>,
    /// How many stages have been started (0 until the first devices get the manifest).
    pub stage: usize,
    pub state: RolloutState,
    pub max_failure_pct: i64,
    pub stage_timeout_ms: i64,
    /// The group manifest issued by the 100 % stage, if reached.
    pub group_sequence: Option<i64>,
    /// Why it halted or was rolled back.
    pub reason: Option<String>,
    pub health: HealthWindow,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Has the manifest; not confirmed yet.
    Updating,
    /// Reports the version running (after its health check).
    Succeeded,
    Failed,
    /// Sent back to the previous version.
    RolledBack,
}

impl DeviceState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Updating => "updating",
            DeviceState::Succeeded => "succeeded",
            DeviceState::Failed => "failed",
            DeviceState::RolledBack => "rolled_back",
        }
    }

    pub(crate) fn parse(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "updating" => DeviceState::Updating,
            "succeeded" => DeviceState::Succeeded,
            "failed" => DeviceState::Failed,
            "rolled_back" => DeviceState::RolledBack,
            other => anyhow::bail!("unknown rollout device state {other:?} in the database"),
        })
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct RolloutDevice {
    pub device: String,
    /// 1-based stage that took the device in.
    pub stage: i64,
    pub state: DeviceState,
    /// Sequence of the manifest that carried the version to it.
    pub sequence: i64,
    pub assigned_at_ms: i64,
    pub updated_at_ms: i64,
    pub detail: Option<String>,
}

/// Devices per state.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Counts {
    pub assigned: usize,
    pub updating: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub rolled_back: usize,
}

/// Devices one judging pass moved out of `updating`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Judged {
    pub failed: usize,
    pub succeeded: usize,
}

impl Counts {
    /// The counts after a judging pass.
    pub fn apply(mut self, j: Judged) -> Counts {
        let moved = (j.failed + j.succeeded).min(self.updating);
        self.updating -= moved;
        self.failed += j.failed;
        self.succeeded += j.succeeded;
        self
    }

    /// Whether the failures so far pass the threshold (a share of the devices assigned).
    pub fn over_threshold(&self, max_failure_pct: i64) -> bool {
        self.failed > 0 && self.failed * 100 > max_failure_pct.max(0) as usize * self.assigned
    }
}

/// How many devices of `members` a stage of `pct` % covers (at least one).
pub fn stage_size(members: usize, pct: u8) -> usize {
    (members * usize::from(pct))
        .div_ceil(100)
        .max(1)
        .min(members)
}

/// What the controller does next with a running rollout, given its devices' counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Devices of the current stage are still updating.
    Wait,
    /// Too many failed: revert the devices updated so far.
    Halt(String),
    /// Every device of the stages so far is judged: give the next stage the version.
    StartStage { stage: usize, pct: u8 },
    /// Every stage is done.
    Complete,
}

/// The rollout rules, pure: halt past the failure threshold; otherwise wait while any
/// device updates; otherwise start the next stage or complete.
pub fn plan(r: &Rollout, counts: &Counts) -> Step {
    if counts.over_threshold(r.max_failure_pct) {
        return Step::Halt(format!(
            "halted: {} of {} devices failed (threshold {} %)",
            counts.failed, counts.assigned, r.max_failure_pct
        ));
    }
    if counts.updating > 0 {
        return Step::Wait;
    }
    match r.stages.get(r.stage) {
        Some(&pct) => Step::StartStage {
            stage: r.stage + 1,
            pct,
        },
        None => Step::Complete,
    }
}

/// Drives the rollouts. Only the lease holder acts.
pub struct Controller {
    pub deployer: Arc<Deployer>,
    /// This replica's lease holder name.
    pub holder: String,
    /// Notified by ingest after every batch of reports, and by the API after a change.
    pub wake: Arc<Notify>,
    /// When this replica's previous pass began, while it held the lease (0: judge every
    /// device, as after a start or a takeover).
    pub last_pass_ms: std::sync::atomic::AtomicI64,
    /// When it last judged every updating device.
    pub last_full_pass_ms: std::sync::atomic::AtomicI64,
    /// Each running rollout's counts at its current stage, kept up to date with what
    /// each pass judged, so a pass costs what arrived and not a count of every device.
    pub counts: std::sync::Mutex<std::collections::HashMap<i64, (usize, Counts)>>,
}

impl Controller {
    fn db(&self) -> &Db {
        &self.deployer.db
    }

    fn cached_counts(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<i64, (usize, Counts)>> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn hold_lease(&self) -> anyhow::Result<bool> {
        self.db()
            .take_lease(LEASE, &self.holder, LEASE_TTL_MS)
            .await
    }

    /// One pass over the active rollouts, if this replica holds the lease.
    pub async fn tick(&self) -> anyhow::Result<()> {
        use std::sync::atomic::Ordering;
        if !self.hold_lease().await? {
            self.last_pass_ms.store(0, Ordering::Relaxed);
            return Ok(());
        }
        if self.last_pass_ms.load(Ordering::Relaxed) == 0 {
            // Another replica may have acted meanwhile: count afresh.
            self.cached_counts().clear();
        }
        let now = now_ms();
        let previous = self.last_pass_ms.swap(now, Ordering::Relaxed);
        let since = if previous == 0
            || now - self.last_full_pass_ms.load(Ordering::Relaxed) >= FULL_PASS_MS
        {
            self.last_full_pass_ms.store(now, Ordering::Relaxed);
            0
        } else {
            previous - REPORT_MARGIN_MS
        };
        for r in self.db().rollouts(true).await? {
            let result = match r.state {
                RolloutState::Running => self.advance(&r, since).await,
                RolloutState::RollingBack => self.roll_back(&r).await,
                _ => Ok(()),
            };
            result.with_context(|| format!("rollout {}", r.id))?;
        }
        Ok(())
    }

    /// Judges the updating devices heard from since `since`, then does what [`plan`]
    /// says.
    async fn advance(&self, r: &Rollout, since: i64) -> anyhow::Result<()> {
        let judged = self.db().judge_updating(r, now_ms(), since).await?;
        let cached = self.cached_counts().get(&r.id).copied();
        let counts = match cached {
            Some((stage, counts)) if stage == r.stage => counts.apply(judged),
            _ => self.db().rollout_counts(r.id).await?,
        };
        self.cached_counts().insert(r.id, (r.stage, counts));
        match plan(r, &counts) {
            Step::Wait => Ok(()),
            Step::Halt(reason) => {
                tracing::warn!(rollout = r.id, %reason, "rolling back");
                self.cached_counts().remove(&r.id);
                self.db()
                    .set_rollout_state(
                        r.id,
                        &[RolloutState::Running],
                        RolloutState::RollingBack,
                        Some(&reason),
                    )
                    .await?;
                // Roll back in this same pass, not a tick later.
                self.wake.notify_one();
                Ok(())
            }
            Step::StartStage { stage, pct } => self.start_stage(r, stage, pct).await,
            Step::Complete => {
                let last = self.db().current_sequence().await?;
                self.db().retire_device_deployments(r.id, last).await?;
                self.db()
                    .set_rollout_state(
                        r.id,
                        &[RolloutState::Running],
                        RolloutState::Completed,
                        None,
                    )
                    .await?;
                self.cached_counts().remove(&r.id);
                tracing::info!(rollout = r.id, "rollout completed");
                Ok(())
            }
        }
    }

    /// Gives stage `stage` (`pct` % of the group, cumulative) the new version:
    /// per-device manifests, or the group manifest for the 100 % stage.
    async fn start_stage(&self, r: &Rollout, stage: usize, pct: u8) -> anyhow::Result<()> {
        let module = self
            .db()
            .module(&r.module, &r.version)
            .await?
            .context("the rollout's module was deleted")?;
        let group = Target::Group(r.group.clone());
        if pct == 100 {
            // Everyone left, and devices that join the group later, through one manifest.
            let (d, _) = self
                .deployer
                .deploy(&group, &DesiredChange::Set(module), Some(r.health))
                .await?;
            let seq = i64::try_from(d.sequence)?;
            self.db()
                .assign_rest_of_group(r.id, &r.group, stage, seq)
                .await?;
            self.db().set_rollout_stage(r.id, stage, Some(seq)).await?;
        } else {
            let members = self.db().group_members(&r.group).await?;
            let assigned: std::collections::HashSet<String> = self
                .db()
                .rollout_devices(r.id)
                .await?
                .into_iter()
                .map(|d| d.device)
                .collect();
            let fresh: Vec<String> = members
                .iter()
                .take(stage_size(members.len(), pct))
                .filter(|m| !assigned.contains(*m))
                .cloned()
                .collect();
            let mut set = self.db().desired_set(&group).await?;
            set.retain(|m| m.name != module.name);
            set.push(module);
            let rows = self
                .deployer
                .deploy_devices(&fresh, &set, Some(r.health))
                .await?;
            let assigned: Vec<(String, u64)> = fresh
                .into_iter()
                .zip(rows.iter().map(|d| d.sequence))
                .collect();
            self.db().assign_devices(r.id, &assigned, stage).await?;
            self.db().set_rollout_stage(r.id, stage, None).await?;
        }
        tracing::info!(rollout = r.id, stage, pct, "rollout stage started");
        Ok(())
    }

    /// Sends the devices already given the new version back to the previous one, with
    /// new manifests (new sequences: devices never accept an older one).
    async fn roll_back(&self, r: &Rollout) -> anyhow::Result<()> {
        let group = Target::Group(r.group.clone());
        let mut set = self.db().desired_set(&group).await?;
        if r.group_sequence.is_some() {
            // The group manifest carried the new version: revert the group's set.
            set.retain(|m| m.name != r.module);
            if let Some(prev) = &r.previous_version {
                set.push(
                    self.db()
                        .module(&r.module, prev)
                        .await?
                        .context("the previous version was deleted")?,
                );
            }
            self.deployer
                .deploy(&group, &DesiredChange::Replace(set), None)
                .await?;
        } else {
            // The group's set still holds the previous version: that is each device's.
            let devices: Vec<String> = self
                .db()
                .rollout_devices(r.id)
                .await?
                .into_iter()
                .filter(|d| d.state != DeviceState::RolledBack)
                .map(|d| d.device)
                .collect();
            self.deployer.deploy_devices(&devices, &set, None).await?;
        }
        self.db().mark_rolled_back(r.id).await?;
        let last = self.db().current_sequence().await?;
        self.db().retire_device_deployments(r.id, last).await?;
        self.db()
            .set_rollout_state(
                r.id,
                &[RolloutState::RollingBack],
                RolloutState::RolledBack,
                None,
            )
            .await?;
        tracing::info!(rollout = r.id, "rollout rolled back");
        Ok(())
    }
}

/// Runs the controller until `stop`: a pass after every wake-up (reports arrived, an
/// operator acted), at most every [`MIN_PASS_GAP`], and at least every [`IDLE_PASS`].
pub async fn controller_loop(ctl: Arc<Controller>, mut stop: watch::Receiver<bool>) {
    loop {
        if let Err(e) = ctl.tick().await {
            tracing::error!(error = format!("{e:#}"), "rollout controller");
        }
        tokio::select! {
            _ = stop.changed() => break,
            _ = ctl.wake.notified() => {}
            _ = tokio::time::sleep(IDLE_PASS) => {}
        }
        tokio::select! {
            _ = stop.changed() => break,
            _ = tokio::time::sleep(MIN_PASS_GAP) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_are_checked_and_sized() {
        assert!(check_stages(&[1, 10, 100]).is_ok());
        assert!(check_stages(&[100]).is_ok());
        assert!(check_stages(&[10, 10, 100]).is_err());
        assert!(check_stages(&[1, 50]).is_err());
        assert!(check_stages(&[0, 100]).is_err());
        assert!(check_stages(&[]).is_err());
        assert_eq!(stage_size(1000, 1), 10);
        assert_eq!(stage_size(3, 1), 1);
        assert_eq!(stage_size(3, 10), 1);
        assert_eq!(stage_size(3, 50), 2);
        assert_eq!(stage_size(0, 10), 0);
    }

    #[test]
    fn threshold() {
        let c = |assigned, failed| Counts {
            assigned,
            failed,
            ..Counts::default()
        };
        assert!(!c(10, 1).over_threshold(10));
        assert!(c(10, 2).over_threshold(10));
        assert!(c(1, 1).over_threshold(50));
        assert!(!c(1, 0).over_threshold(0));
    }

    fn rollout(stage: usize) -> Rollout {
        Rollout {
            id: 1,
            module: "hello".into(),
            version: "2.0.0".into(),
            previous_version: Some("1.0.0".into()),
            group: "g".into(),
            stages: vec![1, 10, 100],
            stage,
            state: RolloutState::Running,
            max_failure_pct: 10,
            stage_timeout_ms: 60_000,
            group_sequence: None,
            reason: None,
            health: HealthWindow::DEFAULT,
            created_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    fn counts(assigned: usize, updating: usize, failed: usize) -> Counts {
        Counts {
            assigned,
            updating,
            succeeded: assigned - updating - failed,
            failed,
            rolled_back: 0,
        }
    }

    #[test]
    fn judged_devices_leave_updating() {
        let c = counts(10, 6, 1).apply(Judged {
            failed: 2,
            succeeded: 3,
        });
        assert_eq!(c, counts(10, 1, 3));
    }

    #[test]
    fn a_new_rollout_starts_its_first_stage() {
        assert_eq!(
            plan(&rollout(0), &Counts::default()),
            Step::StartStage { stage: 1, pct: 1 }
        );
    }

    #[test]
    fn a_stage_waits_for_its_last_device_then_the_next_starts() {
        assert_eq!(plan(&rollout(1), &counts(10, 1, 0)), Step::Wait);
        assert_eq!(
            plan(&rollout(1), &counts(10, 0, 0)),
            Step::StartStage { stage: 2, pct: 10 }
        );
        assert_eq!(plan(&rollout(3), &counts(1000, 0, 0)), Step::Complete);
    }

    #[test]
    fn failures_past_the_threshold_halt_even_while_devices_update() {
        assert_eq!(plan(&rollout(2), &counts(100, 50, 10)), Step::Wait);
        assert!(matches!(
            plan(&rollout(2), &counts(100, 50, 11)),
            Step::Halt(reason) if reason.contains("11 of 100")
        ));
    }
}
