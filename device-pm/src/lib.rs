//! The device package manager core: sans-IO, `no_std` + `alloc`.
//!
//! A [`Device`] takes [`Input`]s (the link came up or went down, an MQTT message arrived,
//! the timer fired) and queues [`Output`]s (subscribe, unsubscribe, publish, log) for the
//! caller to carry out; flash sits behind `embedded_storage::nor_flash::NorFlash`. The
//! same core runs under embassy on the nRF9160, under tokio in the simulator and in plain
//! host tests.
//!
//! # Lifecycle of a module
//!
//! 1. A signed deployment names the desired modules ([`Device::handle`] checks signature,
//!    target, sequence and expiry before anything changes).
//! 2. A missing module is downloaded chunk by chunk into a free flash bank
//!    ([`download`]), each chunk checked against the signed module manifest.
//! 3. The bank is read back and its sha256 checked, then a new state record commits it
//!    as an *unconfirmed* install ([`store`]).
//! 4. It replaces the running version of the same name between two scheduler turns and
//!    must pass its health check: `wpm_init` returns 0, then it runs the deployment's
//!    [`HealthWindow`] (turns without trapping, seconds up). Then it is confirmed and the old version's bank is freed;
//!    otherwise the old version is restarted and the new one refused until a newer
//!    deployment arrives (a `RolledBack` event says why; the old version continues from
//!    the state it was swapped out with).
//!
//! # Slots and eviction
//!
//! At most [`Config::slots`] modules are resident, and only while their [`slot_cost`]s
//! fit [`Limits::ram_budget`]. Each turn every slot gets one fuel slice (see [`runtime`]);
//! a module that must run when the slots are full takes the place of a victim chosen
//! by policy, whose state is snapshotted ([`snapshot`]) to the RAM pool or to flash
//! ([`store`]) and restored when it is its turn again. Signed lifecycle commands start,
//! stop, pin, unpin and evict modules: Stop ends a module and drops its state, Evict
//! snapshots it and holds it evicted (across reboots, as far as the snapshot is in
//! flash) until a Start command restores it where it was. The contract modules run
//! under is in `docs/host-api.md`.
#![no_std]

extern crate alloc;

pub mod download;
mod reporter;
pub mod runtime;
pub mod sim_flash;
pub mod snapshot;
pub mod store;
mod trust;
pub mod tuning;

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use download::{Download, Rejection};
use embedded_storage::nor_flash::NorFlash;
use reporter::Reporter;
use runtime::{HostCall, Instance, Runtime, Slice};
use snapshot::Snapshot;
use store::{Installed, PinOverride, Refused, Staging, Store};
use wpm_manifests::{
    Action, Chunk, Command, Deployment, DeviceStatus, Event, EventKind, HealthWindow,
    ModuleManifest, ModuleRef, ModuleState, ModuleStatus, ReportBody, Target, Topic, TrustedKeys,
};

pub use store::StoreError;
pub use tuning::{Qos, Tuning, PUBLISH_WINDOW};

/// What the device is and how it behaves. Names must satisfy [`wpm_manifests::valid_name`].
#[derive(Debug, Clone)]
pub struct Config {
    pub device_id: String,
    pub groups: Vec<String>,
    pub trusted_keys: Vec<[u8; 32]>,
    /// The secret seed of the device's own ed25519 key (its identity, from the
    /// provisioning record; the registry holds the public half). Every report the
    /// device publishes is sealed with it.
    pub device_key: [u8; 32],
    /// The sequence of the newest deployment addressing the device when it was
    /// provisioned (0: none): it accepts none older, even on a blank flash.
    pub sequence_floor: u64,
    /// Slots, chunk window and intervals. `tuning.slots` is the most wasmi runtime
    /// slots; fewer are used when the modules' RAM reservations (see
    /// [`Limits::ram_budget`]) do not fit.
    pub tuning: Tuning,
}

/// Resource sizes of the device; [`Limits::default`] fits an nRF9160.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Size of one module bank in flash: the largest module the device can take. Fixed
    /// for the life of the flash contents (it is stored and checked at boot).
    pub bank_size: u32,
    /// RAM for runtime slots. A module takes a slot only if its reservation
    /// ([`slot_cost`]: memory limit, compiled code, store) fits next to the others';
    /// status reports what is left.
    pub ram_budget: u32,
    /// RAM for snapshots of evicted modules; a snapshot that does not fit goes to flash.
    pub snapshot_pool: u32,
}

impl Default for Limits {
    /// 112 KiB of slots and 16 KiB of snapshots: 128 of the nRF9160 app's 192 KiB.
    fn default() -> Self {
        Self {
            bank_size: 64 * 1024,
            ram_budget: 112 * 1024,
            snapshot_pool: 16 * 1024,
        }
    }
}

/// RAM a slot running `module` reserves: its memory limit, twice the wasm size for the
/// compiled code (wasmi keeps more than the file, see TARGET-FACTS) and 4 KiB of store.
pub fn slot_cost(module: &ModuleRef) -> u32 {
    module
        .memory_limit
        .saturating_add(module.size.saturating_mul(2))
        .saturating_add(4096)
}

/// Something that happened to the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input<'a> {
    LinkUp,
    LinkDown,
    Message { topic: &'a str, payload: &'a [u8] },
    Timer,
}

/// Something the caller must do for the device. Publishes are only produced while the
/// link is up; what happened offline is summed up by the status published at `LinkUp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Subscribe {
        topic: String,
    },
    Unsubscribe {
        topic: String,
    },
    Publish {
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    },
    Log {
        module: String,
        level: u8,
        message: String,
    },
}

/// A runtime slot in use.
struct Slot {
    module: ModuleRef,
    instance: Instance,
    /// Turns survived since it was first started (kept across eviction).
    turns: u32,
    /// Scheduler turn in which it got this slot.
    loaded_turn: u64,
    /// Scheduler turn in which a call of it last returned: the "use" of LRU.
    returned_turn: u64,
    /// When it got a slot this boot: a candidate's health window counts its seconds
    /// from here.
    since_ms: u64,
}

/// The device package manager.
pub struct Device<F> {
    config: Config,
    limits: Limits,
    keys: TrustedKeys,
    reporter: Reporter,
    deploy_topics: Vec<String>,
    store: Store<F>,
    runtime: Runtime,
    slots: Vec<Slot>,
    /// Snapshots of evicted (or swapped-out) modules kept in RAM, by module sha256.
    ram_snapshots: BTreeMap<[u8; 32], Vec<u8>>,
    /// Scheduler turns so far this boot.
    turn: u64,
    command_topic: String,
    download: Option<Download>,
    /// Why a module ended, by sha256; such a module is not restarted before the next
    /// boot or the next accepted deployment.
    failed: BTreeMap<[u8; 32], String>,
    /// Replayed sequences already reported this boot (retained copies come back often).
    reported_replays: BTreeSet<u64>,
    /// Downloads given up for a stall, by module sha256: when to try each again.
    parked: BTreeMap<[u8; 32], u64>,
    last_error: Option<String>,
    outputs: VecDeque<Output>,
    link_up: bool,
    now_ms: u64,
    next_turn_ms: u64,
    next_status_ms: u64,
    /// Something happened that may have changed the status.
    status_dirty: bool,
    /// sha256 of the last status published, its clock left out: a status that would
    /// say nothing new (after a download-progress event, say) is not sent again, as
    /// every byte over the air costs. `None` forces the next one out (a new
    /// connection, the periodic republish).
    published_status: Option<[u8; 32]>,
}

fn describe(target: &Target) -> String {
    match target {
        Target::Fleet => "the fleet".to_string(),
        Target::Group(g) => format!("group {g}"),
        Target::Device(d) => format!("device {d}"),
    }
}

fn sha(module: &ModuleRef) -> [u8; 32] {
    *module.sha256
}

impl<F: NorFlash> Device<F> {
    /// Boots from flash alone with [`Limits::default`].
    pub fn new(config: Config, flash: F, now_ms: u64) -> Result<Self, StoreError> {
        Self::with_limits(config, Limits::default(), flash, now_ms)
    }

    /// Boots from flash alone: restarts the installed modules and resumes a download.
    pub fn with_limits(
        config: Config,
        limits: Limits,
        flash: F,
        now_ms: u64,
    ) -> Result<Self, StoreError> {
        let mut store = Store::open(flash, limits.bank_size)?;
        // One state write per boot keeps report counters above every earlier boot's.
        store.update(|s| s.report_epoch = s.report_epoch.saturating_add(1))?;
        let mut targets = alloc::vec![Target::Fleet];
        targets.extend(config.groups.iter().cloned().map(Target::Group));
        targets.push(Target::Device(config.device_id.clone()));
        let command_topic = Topic::Command(&config.device_id).render();
        let mut device = Self {
            keys: TrustedKeys::new(&trust::in_force(store.state(), &config).1),
            reporter: Reporter::new(
                config.device_id.clone(),
                &config.device_key,
                store.state().report_epoch,
            ),
            deploy_topics: targets
                .iter()
                .map(|t| Topic::Deployment(t).render())
                .collect(),
            next_turn_ms: now_ms + config.tuning.turn_interval_ms,
            next_status_ms: now_ms + config.tuning.status_interval_ms,
            config,
            limits,
            store,
            runtime: Runtime::new(),
            slots: Vec::new(),
            ram_snapshots: BTreeMap::new(),
            turn: 0,
            command_topic,
            download: None,
            failed: BTreeMap::new(),
            reported_replays: BTreeSet::new(),
            parked: BTreeMap::new(),
            last_error: None,
            outputs: VecDeque::new(),
            link_up: false,
            now_ms,
            status_dirty: false,
            published_status: None,
        };
        device.reconcile();
        Ok(device)
    }

    pub fn handle(&mut self, now_ms: u64, input: Input<'_>) {
        self.now_ms = now_ms;
        match input {
            Input::LinkUp => self.link_up(),
            Input::LinkDown => {
                self.link_up = false;
                if let Some(d) = &mut self.download {
                    d.link_lost();
                }
            }
            Input::Message { topic, payload } => self.on_message(topic, payload),
            Input::Timer => self.on_timer(),
        }
        if self.status_dirty && self.link_up {
            self.publish_status();
        }
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.outputs.pop_front()
    }

    /// Unix ms at which to deliver [`Input::Timer`].
    pub fn next_timer(&self) -> Option<u64> {
        let turn = self.needs_turns().then_some(self.next_turn_ms);
        let status = self.link_up.then_some(self.next_status_ms);
        let download = self.download.as_ref().and_then(Download::next_deadline);
        let parked = self.parked.values().copied().min();
        [turn, status, download, parked].into_iter().flatten().min()
    }

    /// The MQTT last will for the next connection: the presence topic and a sealed
    /// `Presence { online: false }`. Call it once per connection, before connecting:
    /// the session's first presence announces this will, and the registry accepts
    /// only the will announced last.
    ///
    /// # Errors
    /// The flash did not take the next report epoch (after 2³² reports in one boot).
    pub fn last_will(&mut self) -> Result<(String, Vec<u8>), StoreError> {
        self.keep_counting()?;
        Ok((
            Topic::Presence(&self.config.device_id).render(),
            self.reporter.seal_will(),
        ))
    }

    /// The MQTT username and password to connect with: the device id, and a signature
    /// of it by the device's key that the broker checks with the registered public key.
    /// The client id must be the device id too.
    pub fn broker_login(&mut self) -> (String, String) {
        self.reporter.login()
    }

    /// Moves to the next report epoch when this one's counters are used up.
    fn keep_counting(&mut self) -> Result<(), StoreError> {
        if self.reporter.exhausted() {
            self.store
                .update(|s| s.report_epoch = s.report_epoch.saturating_add(1))?;
            self.reporter.start_epoch(self.store.state().report_epoch);
        }
        Ok(())
    }

    pub fn status(&self) -> DeviceStatus {
        let state = self.store.state();
        let module_status = |m: &ModuleRef, state, last_error: Option<&String>| ModuleStatus {
            name: m.name.clone(),
            version: m.version.clone(),
            sha256: m.sha256,
            state,
            last_error: last_error.cloned(),
        };
        let mut modules: Vec<ModuleStatus> = state
            .installed
            .iter()
            .map(|i| {
                let failure = self.failed.get(&sha(&i.module));
                let name_resident = self.slots.iter().any(|s| s.module.name == i.module.name);
                let s = if self.slot_of(&i.module.sha256).is_some() {
                    // Until its health check passes, a new version is not yet the one
                    // the device stands by: a rollout must not count it as a success.
                    if i.confirmed {
                        ModuleState::Running
                    } else {
                        ModuleState::Verifying
                    }
                } else if failure.is_some() {
                    ModuleState::Failed
                } else if self.has_snapshot(&i.module.sha256) && !name_resident {
                    // Evicted by policy (waiting for a slot) or by command (held until
                    // a Start command), its state kept either way.
                    ModuleState::Evicted
                } else if state.stopped.contains(&i.module.name) {
                    ModuleState::Stopped
                } else {
                    ModuleState::Installed
                };
                module_status(&i.module, s, failure)
            })
            .collect();
        if let Some(d) = &self.download {
            modules.push(module_status(&d.module, ModuleState::Downloading, None));
        }
        for m in &state.desired {
            if let Some(r) = state.refused.iter().find(|r| r.sha256 == m.sha256) {
                modules.push(module_status(m, ModuleState::Failed, Some(&r.reason)));
            }
        }
        DeviceStatus {
            device: self.config.device_id.clone(),
            groups: self.config.groups.clone(),
            sequence: state.sequence,
            modules,
            slots_used: self.slots.len() as u16,
            slots_total: self.slots_total() as u16,
            flash_free: self.store.free_bytes(),
            ram_free: self.limits.ram_budget.saturating_sub(self.ram_used()),
            last_error: self.last_error.clone(),
            at_ms: self.now_ms,
            trust_epoch: Some(self.trust_epoch()),
        }
    }

    /// Power off: only the flash remains.
    pub fn into_flash(self) -> F {
        self.store.into_flash()
    }

    /// The flash, for its counters (tests, benchmarks).
    pub fn flash(&self) -> &F {
        self.store.flash()
    }

    /// The flash, to arm a simulated power cut (tests).
    pub fn flash_mut(&mut self) -> &mut F {
        self.store.flash_mut()
    }

    /// Slots the device can have in use at once: [`Config::slots`], fewer when the RAM
    /// budget cannot hold that many reservations. Counted with the modules that should
    /// run, cheapest first, and for the slots they leave over, more modules as large as
    /// the largest of them; so `slots_used <= slots_total` always holds, and a device whose
    /// modules are too large for its budget shows it before any module waits.
    fn slots_total(&self) -> usize {
        let mut costs: Vec<u32> = (self.run_targets().iter())
            .map(|i| slot_cost(&i.module))
            .collect();
        costs.sort_unstable();
        let largest = costs.last().copied().unwrap_or(0);
        let mut ram = 0u32;
        (costs.into_iter().chain(core::iter::repeat(largest)))
            .take(self.config.tuning.slots)
            .take_while(|cost| {
                ram = ram.saturating_add(*cost);
                ram <= self.limits.ram_budget
            })
            .count()
    }

    /// RAM the slots reserve ([`slot_cost`] each).
    fn ram_used(&self) -> u32 {
        self.slots.iter().map(|s| slot_cost(&s.module)).sum()
    }

    fn has_snapshot(&self, digest: &[u8; 32]) -> bool {
        self.ram_snapshots.contains_key(digest)
            || (self.store.state().snapshots.iter()).any(|s| *s.module == *digest)
    }

    // ---- outputs ----

    fn emit(&mut self, output: Output) {
        self.outputs.push_back(output);
    }

    fn subscribe(&mut self, topic: String) {
        self.emit(Output::Subscribe { topic });
    }

    fn unsubscribe(&mut self, topic: String) {
        self.emit(Output::Unsubscribe { topic });
    }

    /// Seals and publishes a report; nothing (and no counter) while the link is down.
    fn report(&mut self, topic: String, body: ReportBody, retain: bool) {
        if !self.link_up {
            return;
        }
        if let Err(e) = self.keep_counting() {
            return self.device_error(format!("report not sent: {e:?}"));
        }
        let payload = self.reporter.seal(body);
        self.emit(Output::Publish {
            topic,
            payload,
            retain,
        });
    }

    fn event(&mut self, kind: EventKind) {
        let event = Event {
            device: self.config.device_id.clone(),
            at_ms: self.now_ms,
            kind,
        };
        let topic = Topic::Events(&self.config.device_id).render();
        self.report(topic, ReportBody::Event(event), false);
        self.status_dirty = true;
    }

    fn publish_status(&mut self) {
        self.status_dirty = false;
        let mut status = self.status();
        let at_ms = core::mem::take(&mut status.at_ms);
        let digest = wpm_manifests::sha256(&wpm_manifests::encode(&status));
        if self.published_status == Some(digest) {
            return;
        }
        status.at_ms = at_ms;
        let topic = Topic::Status(&self.config.device_id).render();
        self.report(topic, ReportBody::Status(status), true);
        self.published_status = Some(digest);
        self.next_status_ms = self.now_ms + self.config.tuning.status_interval_ms;
    }

    /// A failure of the device itself (flash), not of a module or a manifest.
    fn device_error(&mut self, message: String) {
        self.emit(Output::Log {
            module: "wpm".to_string(),
            level: 0,
            message: message.clone(),
        });
        self.last_error = Some(message);
        self.status_dirty = true;
    }

    fn host_calls(&mut self, module: &str, calls: Vec<HostCall>) {
        for call in calls {
            match call {
                HostCall::Log { level, message } => self.emit(Output::Log {
                    module: module.to_string(),
                    level,
                    message,
                }),
                HostCall::Telemetry(bytes) => {
                    let topic = Topic::Telemetry(&self.config.device_id, module).render();
                    self.report(topic, ReportBody::Telemetry(bytes.into()), false);
                }
            }
        }
    }

    // ---- inputs ----

    fn link_up(&mut self) {
        self.link_up = true;
        // First, so a broker delivers the retained chain before any deployment signed
        // by a key the device is about to learn.
        self.subscribe(Topic::Trust.render());
        for topic in self.deploy_topics.clone() {
            self.subscribe(topic);
        }
        self.subscribe(self.command_topic.clone());
        let presence = Topic::Presence(&self.config.device_id).render();
        self.report(presence, self.reporter.online(), true);
        self.status_dirty = true;
        self.published_status = None;
        if let Some(d) = &mut self.download {
            d.link_lost();
            if d.manifest.is_none() {
                d.manifest_requested(self.now_ms);
                let topic = Topic::ModuleManifest(&d.module.sha256).render();
                self.subscribe(topic);
            }
        }
        self.request_chunks();
    }

    fn on_message(&mut self, topic: &str, payload: &[u8]) {
        if self.deploy_topics.iter().any(|t| t == topic) {
            return self.on_deployment(payload);
        }
        if topic == self.command_topic {
            return self.on_command(payload);
        }
        if topic == wpm_manifests::topic::TRUST_TOPIC {
            return self.on_trust(payload);
        }
        match wpm_manifests::topic::parse_module_topic(topic) {
            Some(wpm_manifests::topic::ModuleTopic::Manifest(digest)) => {
                self.on_module_manifest(&digest, payload)
            }
            Some(wpm_manifests::topic::ModuleTopic::Chunk(digest, index)) => {
                self.on_chunk(topic, &digest, index, payload)
            }
            None => {}
        }
    }

    fn on_timer(&mut self) {
        let now = self.now_ms;
        if self.needs_turns() && now >= self.next_turn_ms {
            self.next_turn_ms = now + self.config.tuning.turn_interval_ms;
            self.run_turn();
        }
        if self.link_up && now >= self.next_status_ms {
            self.status_dirty = true;
            self.published_status = None;
        }
        if let Some(d) = &mut self.download {
            let digest = d.module.sha256;
            let mut late: Vec<String> = (d.timed_out(now).into_iter())
                .map(|index| Topic::Chunk(&digest, index).render())
                .collect();
            if d.manifest_late(now) {
                late.push(Topic::ModuleManifest(&digest).render());
            }
            let stalled = d.stalled(now);
            if self.link_up {
                for topic in late {
                    self.unsubscribe(topic.clone());
                    self.subscribe(topic);
                }
            }
            if let Some(reason) = stalled {
                self.download_stalled(reason);
            }
        }
        if self.parked.values().any(|until| *until <= now) {
            self.parked.retain(|_, until| *until > now);
            if self.download.is_none() {
                self.next_download();
            }
        }
        self.request_chunks();
    }

    // ---- deployments ----

    fn reject_manifest(&mut self, reason: String) {
        self.last_error = Some(reason.clone());
        self.event(EventKind::ManifestRejected { reason });
    }

    fn on_deployment(&mut self, payload: &[u8]) {
        let deployment = match self.keys.open::<Deployment>(payload) {
            Ok(d) => d,
            Err(e) => return self.reject_manifest(e.to_string()),
        };
        if !deployment
            .target
            .addresses(&self.config.device_id, &self.config.groups)
        {
            return self.reject_manifest(format!(
                "manifest addresses {}, not this device",
                describe(&deployment.target)
            ));
        }
        let accepted = self.store.state().sequence;
        if deployment.sequence == accepted {
            return; // The retained copy of what is already accepted.
        }
        // Nothing older than what was accepted, nor, on a device new from the factory,
        // than what was current when it was provisioned: a replayed old deployment
        // must not roll a fresh device back.
        let floor = accepted.max(self.config.sequence_floor);
        if deployment.sequence < floor {
            // Reported, but not the device's error: the running set is as accepted.
            if self.reported_replays.insert(deployment.sequence) {
                self.event(EventKind::ManifestReplayed {
                    sequence: deployment.sequence,
                    accepted: floor,
                });
            }
            return;
        }
        if deployment.expires_at.saturating_mul(1000) <= self.now_ms {
            return self.reject_manifest(format!(
                "expired at {} (unix s), device clock {} ms",
                deployment.expires_at, self.now_ms
            ));
        }
        if let Some(reason) = invalid_module_list(&deployment.modules) {
            return self.reject_manifest(reason);
        }
        let sequence = deployment.sequence;
        let committed = self.store.update(|s| {
            s.sequence = sequence;
            // Limits and priority may change for bytes already installed; a running
            // instance keeps the old ones until it is next loaded.
            for i in &mut s.installed {
                let same = |m: &&ModuleRef| m.sha256 == i.module.sha256 && m.name == i.module.name;
                if let Some(m) = deployment.modules.iter().find(same) {
                    i.module = m.clone();
                }
            }
            s.desired = deployment.modules;
            s.health = deployment.health;
            s.refused.clear();
        });
        if let Err(e) = committed {
            return self.reject_manifest(format!("could not store the manifest: {e}"));
        }
        // A newer deployment is the operator's word to try again what failed.
        self.failed.clear();
        self.event(EventKind::ManifestAccepted { sequence });
        self.reconcile();
    }

    // ---- bringing the device to the desired set ----

    /// Removes what is no longer wanted, starts what should run, and downloads what is
    /// missing. Called after anything that changes the desired or installed set.
    fn reconcile(&mut self) {
        self.remove_unwanted();
        self.drop_unwanted_download();
        self.schedule();
        if self.download.is_none() {
            self.next_download();
        }
    }

    /// Whether an installed module is still needed: it is desired, or it is the
    /// confirmed version of a desired name whose new version is not yet confirmed.
    fn wanted(&self, i: &Installed) -> bool {
        let state = self.store.state();
        let same_name = |m: &ModuleRef| m.name == i.module.name;
        state.desired.iter().any(|m| m.sha256 == i.module.sha256)
            || (i.confirmed
                && state.desired.iter().any(same_name)
                && !state.installed.iter().any(|j| {
                    j.confirmed && same_name(&j.module) && j.module.sha256 != i.module.sha256
                }))
    }

    fn remove_unwanted(&mut self) {
        let unwanted: Vec<Installed> = (self.store.state().installed.iter())
            .filter(|i| !self.wanted(i))
            .cloned()
            .collect();
        if unwanted.is_empty() {
            return;
        }
        let gone: Vec<[u8; 32]> = unwanted.iter().map(|i| sha(&i.module)).collect();
        if let Err(e) = self.store.update(|s| {
            s.installed.retain(|i| !gone.contains(&sha(&i.module)));
            s.prune_snapshots();
        }) {
            return self.device_error(format!("could not remove modules: {e}"));
        }
        for i in unwanted {
            self.slots.retain(|s| s.module.sha256 != i.module.sha256);
            self.ram_snapshots.remove(&sha(&i.module));
            self.event(EventKind::Removed {
                module: i.module.name,
                version: i.module.version,
            });
        }
    }

    fn drop_unwanted_download(&mut self) {
        let Some(d) = &self.download else { return };
        let state = self.store.state();
        let still_wanted = state.desired.contains(&d.module)
            && !state
                .installed
                .iter()
                .any(|i| i.module.sha256 == d.module.sha256);
        if !still_wanted {
            self.cancel_download();
        }
    }

    /// Forgets the download and its subscriptions. The staging bank stays reserved until
    /// the next download takes it over, which saves a state write here.
    fn cancel_download(&mut self) -> Option<Download> {
        let d = self.download.take()?;
        if self.link_up {
            if d.manifest.is_none() {
                self.unsubscribe(Topic::ModuleManifest(&d.module.sha256).render());
            }
            for index in d.outstanding() {
                self.unsubscribe(Topic::Chunk(&d.module.sha256, index).render());
            }
        }
        Some(d)
    }

    fn slot_of(&self, digest: &[u8; 32]) -> Option<usize> {
        self.slots.iter().position(|s| *s.module.sha256 == *digest)
    }

    /// The installed version of `name` that should run: a candidate before the
    /// confirmed version, neither if it ended this boot.
    fn run_target(&self, name: &str) -> Option<Installed> {
        self.store
            .state()
            .installed
            .iter()
            .filter(|i| i.module.name == name && !self.failed.contains_key(&sha(&i.module)))
            .min_by_key(|i| i.confirmed)
            .cloned()
    }

    /// Whether the scheduler has anything to run or to bring back.
    fn needs_turns(&self) -> bool {
        // Not for snapshots alone: a module evicted by command waits for a Start command,
        // not for a turn, and an idle device should sleep.
        !self.slots.is_empty() || self.waiting().next().is_some()
    }

    /// Installed modules that should be in a slot but are not.
    fn waiting(&self) -> impl Iterator<Item = Installed> + '_ {
        self.run_targets()
            .into_iter()
            .filter(|i| self.slot_of(&i.module.sha256).is_none())
    }

    /// For each installed name not stopped by command, the version that should run,
    /// best first: pinned, then higher priority.
    fn run_targets(&self) -> Vec<Installed> {
        let state = self.store.state();
        let mut names: Vec<&str> = Vec::new();
        for i in &state.installed {
            if !names.contains(&i.module.name.as_str()) && !state.stopped.contains(&i.module.name) {
                names.push(&i.module.name);
            }
        }
        let mut targets: Vec<Installed> = names.iter().filter_map(|n| self.run_target(n)).collect();
        targets.sort_by_key(|i| {
            (
                !state.pinned(&i.module),
                core::cmp::Reverse(i.module.priority),
            )
        });
        targets
    }

    fn fits(&self, module: &ModuleRef) -> bool {
        self.slots.len() < self.config.tuning.slots
            && self.ram_used().saturating_add(slot_cost(module)) <= self.limits.ram_budget
    }

    /// Brings the slots in line with what should run, between two scheduler turns:
    /// drops what was stopped or removed, swaps in new versions (and back, on a
    /// rollback), and gives waiting modules a slot, evicting others when the slots are
    /// full (at most one eviction round per call, see [`Device::victims_for`]).
    fn schedule(&mut self) {
        while self.schedule_pass() {}
    }

    /// One pass of [`Device::schedule`]; true when a module was refused and the set of
    /// targets changed, so another pass is needed.
    fn schedule_pass(&mut self) -> bool {
        let targets = self.run_targets();
        let mut i = 0;
        while i < self.slots.len() {
            let slot = &self.slots[i];
            let target = targets.iter().find(|t| t.module.name == slot.module.name);
            if target.is_some_and(|t| t.module.sha256 == slot.module.sha256) {
                i += 1;
                continue;
            }
            if target.is_some() && !slot.instance.at_boundary() {
                // A hot-swap waits for the old version's call to return.
                i += 1;
                continue;
            }
            let slot = self.slots.remove(i);
            if target.is_some() {
                // Swapped out for another version: its state is kept for the new
                // version to take over and for a rollback.
                let kept = (slot.instance.snapshot(slot.turns))
                    .and_then(|snapshot| self.keep_snapshot(&slot.module, &snapshot));
                if let Err(e) = kept {
                    self.device_error(format!(
                        "could not keep the state of {}: {e}",
                        slot.module.name
                    ));
                }
            }
        }
        let mut evicted = false;
        for target in targets {
            let m = &target.module;
            if self.slots.iter().any(|s| s.module.name == m.name) {
                continue;
            }
            if !self.fits(m) {
                if evicted {
                    continue;
                }
                let Some(victims) = self.victims_for(&target) else {
                    continue;
                };
                for v in victims {
                    let slot = &self.slots[v];
                    self.evict(slot.module.sha256.into())
                        .unwrap_or_else(|e| self.device_error(e));
                }
                evicted = true;
                if !self.fits(m) {
                    continue;
                }
            }
            match self.place(&target) {
                Ok(()) => {}
                Err(reason) if !target.confirmed => {
                    self.refuse(m, reason);
                    return true;
                }
                Err(reason) => self.module_ended(m, reason),
            }
        }
        false
    }

    /// Slots to evict so that `waiting` fits, by policy: never a pinned module, nor one
    /// on probation, nor one mid-call (see [`snapshot`]), nor one of higher priority
    /// than `waiting`, nor one that got its slot this turn (no thrashing); then lowest
    /// priority first, then least recently used (oldest returned call, oldest load).
    /// `None` if no such set makes room.
    fn victims_for(&self, waiting: &Installed) -> Option<Vec<usize>> {
        let state = self.store.state();
        let confirmed = |m: &ModuleRef| {
            (state.installed.iter()).any(|i| i.module.sha256 == m.sha256 && i.confirmed)
        };
        let mut candidates: Vec<usize> = (0..self.slots.len())
            .filter(|i| {
                let s = &self.slots[*i];
                !state.pinned(&s.module)
                    && confirmed(&s.module)
                    && s.instance.at_boundary()
                    && s.module.priority <= waiting.module.priority
                    && s.loaded_turn < self.turn
            })
            .collect();
        candidates.sort_by_key(|i| {
            let s = &self.slots[*i];
            (s.module.priority, s.returned_turn, s.loaded_turn)
        });
        let need = slot_cost(&waiting.module);
        let (mut slots, mut ram) = (self.slots.len(), self.ram_used());
        let mut victims = Vec::new();
        for i in candidates {
            if slots < self.config.tuning.slots
                && ram.saturating_add(need) <= self.limits.ram_budget
            {
                break;
            }
            slots -= 1;
            ram -= slot_cost(&self.slots[i].module);
            victims.push(i);
        }
        let room =
            slots < self.config.tuning.slots && ram.saturating_add(need) <= self.limits.ram_budget;
        // Highest index first, so removing one leaves the others' indices valid.
        victims.sort_unstable_by(|a, b| b.cmp(a));
        room.then_some(victims)
    }

    /// Snapshots the module in the slot of `digest` and frees the slot.
    fn evict(&mut self, digest: [u8; 32]) -> Result<(), String> {
        let at = self.slot_of(&digest).ok_or("not running")?;
        let slot = &self.slots[at];
        let module = slot.module.clone();
        let to = (slot.instance.snapshot(slot.turns))
            .and_then(|snapshot| self.keep_snapshot(&module, &snapshot))
            .map_err(|e| format!("could not evict {}: {e}", module.name))?;
        let slot = self.slots.remove(at);
        self.event(EventKind::Evicted {
            module: slot.module.name,
            version: slot.module.version,
            to: to.into(),
        });
        Ok(())
    }

    /// Keeps `slot`'s state: in the RAM pool if it fits there, else in a flash bank.
    /// Returns where it went.
    fn keep_snapshot(
        &mut self,
        module: &ModuleRef,
        snapshot: &Snapshot,
    ) -> Result<&'static str, String> {
        let bytes = wpm_manifests::encode(snapshot);
        let digest = sha(module);
        self.drop_snapshot(&digest);
        let pooled: usize = self.ram_snapshots.values().map(Vec::len).sum();
        if pooled + bytes.len() <= self.limits.snapshot_pool as usize {
            self.ram_snapshots.insert(digest, bytes);
            return Ok("ram");
        }
        self.store
            .save_snapshot(&module.sha256, &bytes)
            .map_err(|e| format!("writing the snapshot to flash: {e}"))?;
        Ok("flash")
    }

    /// Forgets the RAM snapshot of `digest`; a flash one is dropped with the next state
    /// change that replaces it (or when it is restored).
    fn drop_snapshot(&mut self, digest: &[u8; 32]) {
        self.ram_snapshots.remove(digest);
    }

    /// The snapshot of `digest`, from RAM or flash, if there is one to trust. A flash
    /// snapshot whose bytes fail their sha256 is reported and dropped, never used.
    fn load_snapshot(&mut self, digest: &[u8; 32]) -> Option<Snapshot> {
        let bytes = match self.ram_snapshots.get(digest) {
            Some(bytes) => bytes.clone(),
            None => match self.store.load_snapshot(digest) {
                Ok(bytes) => bytes?,
                Err(e) => {
                    self.device_error(format!("reading a snapshot: {e}"));
                    return None;
                }
            },
        };
        wpm_manifests::decode::<Snapshot>(&bytes).ok()
    }

    /// Gives `target` a slot: restored from its snapshot if it has one, else loaded
    /// fresh (taking over its predecessor's state when it is a new version that asks
    /// for it) and its `wpm_init` started.
    fn place(&mut self, target: &Installed) -> Result<(), String> {
        let m = &target.module;
        let wasm = self
            .store
            .read(target.bank, 0, m.size as usize)
            .map_err(|e| format!("reading the module from flash: {e}"))?;
        if let Some(snapshot) = self.load_snapshot(&m.sha256) {
            match self.runtime.restore(m, &wasm, &snapshot, self.now_ms) {
                Ok(instance) => {
                    self.forget_snapshot(&m.sha256);
                    self.occupy(m, instance, snapshot.turns);
                    self.event(EventKind::Restored {
                        module: m.name.clone(),
                        version: m.version.clone(),
                    });
                    return Ok(());
                }
                Err(failed) => {
                    // The snapshot does not fit this module: start it afresh.
                    self.forget_snapshot(&m.sha256);
                    self.device_error(format!("restoring {}: {}", m.name, failed.reason));
                }
            }
        }
        let mut instance = self.runtime.load(m, &wasm, self.now_ms).map_err(|f| {
            self.host_calls(&m.name, f.calls);
            f.reason
        })?;
        if !target.confirmed {
            if let Some(old) = self.predecessor(m) {
                if let Some(snapshot) = self.load_snapshot(&old.sha256) {
                    instance
                        .take_over(&snapshot)
                        .map_err(|e| format!("wpm_takeover: {e}"))?;
                }
            }
        }
        let first = instance.run_slice(self.now_ms);
        let calls = instance.take_calls();
        self.host_calls(&m.name, calls);
        first?;
        self.occupy(m, instance, 0);
        self.event(EventKind::Started {
            module: m.name.clone(),
            version: m.version.clone(),
        });
        Ok(())
    }

    /// Drops the snapshot of `digest` everywhere, now that a slot holds the module.
    fn forget_snapshot(&mut self, digest: &[u8; 32]) {
        self.drop_snapshot(digest);
        if (self.store.state().snapshots.iter()).any(|s| *s.module == *digest) {
            if let Err(e) = self
                .store
                .update(|s| s.snapshots.retain(|x| *x.module != *digest))
            {
                self.device_error(format!("could not drop a restored snapshot: {e}"));
            }
        }
    }

    fn occupy(&mut self, m: &ModuleRef, instance: Instance, turns: u32) {
        if self.next_turn_ms < self.now_ms {
            // The turn timer was idle; the first turn is one period from now.
            self.next_turn_ms = self.now_ms + self.config.tuning.turn_interval_ms;
        }
        self.slots.push(Slot {
            module: m.clone(),
            instance,
            turns,
            loaded_turn: self.turn,
            returned_turn: self.turn,
            since_ms: self.now_ms,
        });
    }

    /// The confirmed version of `m`'s name that `m` is replacing.
    fn predecessor(&self, m: &ModuleRef) -> Option<ModuleRef> {
        (self.store.state().installed.iter())
            .find(|i| i.confirmed && i.module.name == m.name && i.module.sha256 != m.sha256)
            .map(|i| i.module.clone())
    }

    /// A confirmed module trapped or could not start: it stays stopped until reboot.
    fn module_ended(&mut self, module: &ModuleRef, reason: String) {
        self.slots.retain(|s| s.module.sha256 != module.sha256);
        self.drop_snapshot(&sha(module));
        self.failed.insert(sha(module), reason.clone());
        self.last_error = Some(format!("{}@{}: {reason}", module.name, module.version));
        self.event(EventKind::Trapped {
            module: module.name.clone(),
            version: module.version.clone(),
            reason,
        });
    }

    /// Refuses a module version until a newer deployment: drops it from the installed set
    /// (and from staging) and reports why; if it was replacing a confirmed version, that
    /// one runs again (from the state it was swapped out with) and a rollback is reported.
    fn refuse(&mut self, module: &ModuleRef, reason: String) {
        self.slots.retain(|s| s.module.sha256 != module.sha256);
        self.drop_snapshot(&sha(module));
        // Also in RAM: should the record below fail (flash gone), nothing retries it.
        self.failed.insert(sha(module), reason.clone());
        let previous = self.predecessor(module);
        let digest = module.sha256;
        let refused = Refused {
            sha256: digest,
            reason: reason.clone(),
        };
        if let Err(e) = self.store.update(|s| {
            s.installed.retain(|i| i.module.sha256 != digest);
            if s.staging
                .as_ref()
                .is_some_and(|st| st.module.sha256 == digest)
            {
                s.staging = None;
            }
            s.refused.push(refused);
            s.prune_snapshots();
        }) {
            self.device_error(format!("could not record a refused module: {e}"));
        }
        self.last_error = Some(format!("{}@{}: {reason}", module.name, module.version));
        self.event(EventKind::InstallFailed {
            module: module.name.clone(),
            version: module.version.clone(),
            reason: reason.clone(),
        });
        if let Some(previous) = previous {
            self.event(EventKind::RolledBack {
                module: module.name.clone(),
                from_version: module.version.clone(),
                to_version: previous.version,
                reason,
            });
        }
    }

    /// Runs one scheduler turn: every slot gets one slice of its fuel (a new call of
    /// `wpm_tick`, or the rest of a paused call), then waiting modules are scheduled.
    fn run_turn(&mut self) {
        self.turn += 1;
        let now = self.now_ms;
        let turn = self.turn;
        let mut outcomes = Vec::new();
        for slot in &mut self.slots {
            let was_initialized = slot.instance.initialized();
            let result = slot.instance.run_slice(now);
            if result.is_ok() && was_initialized {
                slot.turns += 1;
            }
            if result == Ok(Slice::Returned) {
                slot.returned_turn = turn;
            }
            let calls = slot.instance.take_calls();
            let healthy_for = now.saturating_sub(slot.since_ms);
            outcomes.push((slot.module.clone(), slot.turns, healthy_for, calls, result));
        }
        let health = self.store.state().health.unwrap_or(HealthWindow::DEFAULT);
        for (module, turns, healthy_for, calls, result) in outcomes {
            self.host_calls(&module.name, calls);
            let candidate = (self.store.state().installed.iter())
                .any(|i| i.module.sha256 == module.sha256 && !i.confirmed);
            let passed = turns >= health.turns && healthy_for >= u64::from(health.seconds) * 1000;
            match result {
                Ok(_) if candidate && passed => self.confirm(&module),
                Ok(_) => {}
                Err(reason) if candidate => self.refuse(&module, format!("health check: {reason}")),
                Err(reason) => self.module_ended(&module, reason),
            }
        }
        self.schedule();
    }

    /// A new version passed its health check: the old versions of its name go.
    fn confirm(&mut self, module: &ModuleRef) {
        let old: Vec<ModuleRef> = (self.store.state().installed.iter())
            .filter(|i| i.module.name == module.name && i.module.sha256 != module.sha256)
            .map(|i| i.module.clone())
            .collect();
        if let Err(e) = self.store.update(|s| {
            s.installed
                .retain(|i| i.module.name != module.name || i.module.sha256 == module.sha256);
            for i in &mut s.installed {
                i.confirmed |= i.module.sha256 == module.sha256;
            }
            s.prune_snapshots();
        }) {
            return self.device_error(format!("could not confirm {}: {e}", module.name));
        }
        for m in old {
            self.drop_snapshot(&sha(&m));
            self.event(EventKind::Removed {
                module: m.name,
                version: m.version,
            });
        }
        // `verifying` becomes `running`; a first install has no Removed event to say so.
        self.status_dirty = true;
    }

    // ---- lifecycle commands ----

    /// A signed command on this device's command topic: checked like a deployment
    /// (signature by a trusted key, addressed to this device, sequence above the last
    /// accepted command's, not expired), then applied, the sequence persisted with it.
    fn on_command(&mut self, payload: &[u8]) {
        let command = match self.keys.open::<Command>(payload) {
            Ok(c) => c,
            Err(e) => return self.command_rejected(0, e.to_string()),
        };
        let sequence = command.sequence;
        if command.device != self.config.device_id {
            return self.command_rejected(
                sequence,
                format!(
                    "command addresses device {}, not this device",
                    command.device
                ),
            );
        }
        let accepted = self.store.state().command_sequence;
        if sequence <= accepted {
            return self.command_rejected(
                sequence,
                format!("replayed command: sequence {sequence} is not above accepted {accepted}"),
            );
        }
        if command.expires_at.saturating_mul(1000) <= self.now_ms {
            return self.command_rejected(
                sequence,
                format!(
                    "expired at {} (unix s), device clock {} ms",
                    command.expires_at, self.now_ms
                ),
            );
        }
        let name = command.action.module().to_string();
        let state = self.store.state();
        let Some(installed) = state
            .installed
            .iter()
            .find(|i| i.module.name == name)
            .cloned()
        else {
            return self.command_rejected(sequence, format!("module {name} is not installed"));
        };
        if let Action::Evict(_) = command.action {
            let slot = self.slots.iter().find(|s| s.module.name == name);
            let refusal = match slot {
                None => Err("it is not running"),
                Some(s) if state.pinned(&s.module) => Err("it is pinned"),
                Some(s) if !s.instance.at_boundary() => Err("it is in the middle of a call"),
                Some(s) => Ok(sha(&s.module)),
            };
            // Evicted before the command is recorded: if the snapshot cannot be kept,
            // nothing changed and the command is rejected.
            let evicted = refusal
                .map_err(|why| format!("cannot evict {name}: {why}"))
                .and_then(|digest| self.evict(digest));
            if let Err(reason) = evicted {
                return self.command_rejected(sequence, reason);
            }
        }
        let action = command.action.clone();
        let recorded = self.store.update(|s| {
            s.command_sequence = sequence;
            match &action {
                Action::Start(n) => s.stopped.retain(|x| x != n),
                // An evicted module is held like a stopped one, but with its state: it
                // stays evicted, across reboots, until a Start command restores it.
                Action::Stop(n) | Action::Evict(n) if !s.stopped.contains(n) => {
                    s.stopped.push(n.clone())
                }
                Action::Pin(n) | Action::Unpin(n) => {
                    s.pins.retain(|p| p.name != *n);
                    s.pins.push(PinOverride {
                        name: n.clone(),
                        pinned: matches!(action, Action::Pin(_)),
                    });
                }
                Action::Stop(_) | Action::Evict(_) => {}
            }
        });
        if let Err(e) = recorded {
            return self.command_rejected(sequence, format!("could not store the command: {e}"));
        }
        match &command.action {
            Action::Stop(n) => {
                // A stopped module starts afresh: no state of it is kept, whether it was
                // running or evicted.
                let versions: Vec<[u8; 32]> = (self.store.state().installed.iter())
                    .filter(|i| i.module.name == *n)
                    .map(|i| sha(&i.module))
                    .collect();
                self.slots.retain(|s| s.module.name != *n);
                for d in versions {
                    self.forget_snapshot(&d);
                }
            }
            Action::Start(_) => {
                // An operator's start also clears a failure from this boot.
                self.failed.retain(|d, _| *d != sha(&installed.module));
            }
            Action::Evict(_) | Action::Pin(_) | Action::Unpin(_) => {}
        }
        self.event(EventKind::CommandApplied {
            sequence,
            action: command.action,
        });
        self.schedule();
    }

    fn command_rejected(&mut self, sequence: u64, reason: String) {
        self.last_error = Some(reason.clone());
        self.event(EventKind::CommandRejected { sequence, reason });
    }

    // ---- downloads ----

    /// Starts downloading the first desired module that is neither installed nor refused.
    fn next_download(&mut self) {
        loop {
            let state = self.store.state();
            let next = state.desired.iter().find(|m| {
                !state.installed.iter().any(|i| i.module.sha256 == m.sha256)
                    && !state.refused.iter().any(|r| r.sha256 == m.sha256)
                    && !self.failed.contains_key(&*m.sha256)
                    && !self.parked.contains_key(&*m.sha256)
            });
            let Some(module) = next.cloned() else { return };
            match self.begin_download(&module) {
                Ok(()) => return,
                Err(reason) => self.refuse(&module, reason),
            }
        }
    }

    fn begin_download(&mut self, module: &ModuleRef) -> Result<(), String> {
        let bank_size = self.store.bank_size();
        if module.size > bank_size {
            return Err(format!(
                "module is {} bytes, a flash bank holds {bank_size}",
                module.size
            ));
        }
        if module.size > 0
            && (module.chunk_size == 0
                || !(module.chunk_size as usize).is_multiple_of(F::WRITE_SIZE))
        {
            return Err(format!(
                "chunk size {} is not a positive multiple of the flash write size {}",
                module.chunk_size,
                F::WRITE_SIZE
            ));
        }
        let resumed = (self.store.state().staging.as_ref())
            .filter(|s| s.module == *module)
            .map(|s| s.bank);
        let bank = match resumed {
            Some(bank) => bank,
            None => {
                let bank = self
                    .store
                    .free_bank(true)
                    .ok_or_else(|| "no free flash bank".to_string())?;
                let next = self.store.after(bank);
                // Erase before the record names the bank: a cut in between leaves a
                // bank nobody refers to, never a record pointing at stale bytes.
                self.store
                    .erase_bank(bank, module.size)
                    .and_then(|()| {
                        self.store.update(|s| {
                            s.staging = Some(Staging {
                                module: module.clone(),
                                bank,
                            });
                            s.next_bank = next;
                        })
                    })
                    .map_err(|e| format!("preparing the staging bank: {e}"))?;
                bank
            }
        };
        let mut download = Download::new(module.clone(), bank);
        if self.link_up {
            download.manifest_requested(self.now_ms);
            self.subscribe(Topic::ModuleManifest(&module.sha256).render());
        }
        self.download = Some(download);
        Ok(())
    }

    /// Gives the current download up for now: what it waits for is not on the broker.
    /// Not a refusal of the module: it is tried again [`download::RETRY_LATER_MS`]
    /// later (or at the next boot or deployment), others first.
    fn download_stalled(&mut self, reason: String) {
        let Some(d) = self.cancel_download() else {
            return;
        };
        let retry = download::RETRY_LATER_MS;
        self.parked.insert(sha(&d.module), self.now_ms + retry);
        self.event(EventKind::InstallFailed {
            module: d.module.name.clone(),
            version: d.module.version.clone(),
            reason: format!(
                "download stalled, trying again in {} s: {reason}",
                retry / 1000
            ),
        });
        self.next_download();
    }

    /// Gives the current download up.
    fn download_failed(&mut self, reason: String) {
        if let Some(d) = self.cancel_download() {
            self.refuse(&d.module, reason);
        }
        self.next_download();
    }

    fn on_module_manifest(&mut self, digest: &[u8; 32], payload: &[u8]) {
        let Some(d) = &self.download else { return };
        if *d.module.sha256 != *digest || d.manifest.is_some() {
            return;
        }
        let name = format!("{}@{}", d.module.name, d.module.version);
        let checked = self
            .keys
            .open::<ModuleManifest>(payload)
            .map_err(|e| e.to_string())
            .and_then(|m| self.download.as_mut().map_or(Ok(()), |d| d.set_manifest(m)));
        if let Err(e) = checked {
            let reason = format!("module manifest of {name} refused: {e}");
            self.reject_manifest(reason.clone());
            return self.download_failed(reason);
        }
        if self.link_up {
            self.unsubscribe(Topic::ModuleManifest(digest).render());
        }
        if let Some(d) = &mut self.download {
            d.progressed(self.now_ms);
        }
        if let Err(e) = self.find_staged_chunks() {
            return self.download_failed(format!("reading the staging bank: {e}"));
        }
        self.after_chunk();
    }

    /// Resume: chunks already in the staging bank that match their hash are not fetched
    /// again. An unwritten chunk reads as `0xFF` bytes and so does not match (unless it
    /// really is all `0xFF`, in which case it is indeed already there).
    fn find_staged_chunks(&mut self) -> Result<(), StoreError> {
        let Some(d) = &mut self.download else {
            return Ok(());
        };
        for index in 0..d.chunk_count() {
            let (offset, len) = d.chunk_span(index);
            let bytes = self.store.read(d.bank, offset, len)?;
            if d.chunk_hash(index) == Some(&wpm_manifests::sha256(&bytes)) {
                d.mark_held(index);
            }
        }
        Ok(())
    }

    fn on_chunk(&mut self, topic: &str, digest: &[u8; 32], index: u32, payload: &[u8]) {
        let Some(d) = &self.download else { return };
        if *d.module.sha256 != *digest || !d.is_outstanding(index) {
            return; // A late or duplicate delivery.
        }
        let module = d.module.name.clone();
        if self.link_up {
            self.unsubscribe(topic.to_string());
        }
        let checked = match wpm_manifests::decode::<Chunk>(payload) {
            Ok(chunk) => self.check_chunk(digest, index, &chunk).map(|()| chunk),
            Err(e) => {
                let reason = format!("malformed CBOR: {e}");
                self.event(EventKind::MalformedMessage {
                    topic: topic.to_string(),
                    reason: reason.clone(),
                });
                Err(reason)
            }
        };
        let chunk = match checked {
            Ok(chunk) => chunk,
            Err(reason) => {
                self.event(EventKind::ChunkRejected {
                    module,
                    index,
                    reason: reason.clone(),
                });
                let Some(d) = &mut self.download else { return };
                if d.reject(index, self.now_ms) == Rejection::GiveUp {
                    self.download_failed(format!(
                        "chunk {index} failed {} times, last: {reason}",
                        download::MAX_ATTEMPTS
                    ));
                }
                return;
            }
        };
        let Some(d) = &mut self.download else { return };
        let (offset, _) = d.chunk_span(index);
        if let Err(e) = self.store.write(d.bank, offset, &chunk.data) {
            return self.download_failed(format!("writing chunk {index}: {e}"));
        }
        d.chunk_arrived(index, self.now_ms);
        self.after_chunk();
    }

    fn check_chunk(&self, digest: &[u8; 32], index: u32, chunk: &Chunk) -> Result<(), String> {
        if *chunk.module != *digest {
            return Err("chunk belongs to another module".to_string());
        }
        if chunk.index != index {
            return Err(format!(
                "chunk says index {} on the topic of {index}",
                chunk.index
            ));
        }
        self.download.as_ref().map_or(Ok(()), |d| d.check(chunk))
    }

    /// Reports progress, and commits the module or asks for more chunks.
    fn after_chunk(&mut self) {
        let Some(d) = &mut self.download else { return };
        if let Some(have) = d.progress_to_report(self.now_ms) {
            let kind = EventKind::DownloadProgress {
                module: d.module.name.clone(),
                version: d.module.version.clone(),
                chunks_have: have,
                chunks_total: d.chunk_count(),
            };
            self.event(kind);
        }
        if self.download.as_ref().is_some_and(Download::is_complete) {
            self.commit();
        } else {
            self.request_chunks();
        }
    }

    fn request_chunks(&mut self) {
        if !self.link_up {
            return;
        }
        let Some(d) = &mut self.download else { return };
        let digest = d.module.sha256;
        for index in d.next_requests(self.config.tuning.chunk_window, self.now_ms) {
            self.subscribe(Topic::Chunk(&digest, index).render());
        }
    }

    /// All chunks are in flash: read the module back, check its digest, and commit it as
    /// an unconfirmed install in one state record.
    fn commit(&mut self) {
        let Some(d) = self.download.take() else {
            return;
        };
        let module = d.module;
        match self.store.digest(d.bank, module.size) {
            Ok(digest) if digest == *module.sha256 => {}
            Ok(_) => {
                return self.refuse(
                    &module,
                    "module sha256 does not match after read-back".into(),
                )
            }
            Err(e) => return self.refuse(&module, format!("reading the module back: {e}")),
        }
        let installed = Installed {
            module: module.clone(),
            bank: d.bank,
            confirmed: false,
        };
        if let Err(e) = self.store.update(|s| {
            s.staging = None;
            s.installed.push(installed);
        }) {
            return self.refuse(&module, format!("committing the install: {e}"));
        }
        self.event(EventKind::Installed {
            module: module.name,
            version: module.version,
        });
        self.reconcile();
    }
}

/// Why a deployment's module list cannot be acted on, if it cannot.
fn invalid_module_list(modules: &[ModuleRef]) -> Option<String> {
    for (i, m) in modules.iter().enumerate() {
        if !wpm_manifests::valid_name(&m.name) {
            return Some(format!("invalid module name {:?}", m.name));
        }
        if modules[..i].iter().any(|o| o.name == m.name) {
            return Some(format!("module {} is listed twice", m.name));
        }
    }
    None
}
