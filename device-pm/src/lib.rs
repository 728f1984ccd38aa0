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
//!    must pass its health check: `wpm_init` returns 0 and [`HEALTH_TURNS`] ticks run
//!    without trapping. Then it is confirmed and the old version's bank is freed;
//!    otherwise the old version is restarted and the new one refused until a newer
//!    deployment arrives.
#![no_std]

extern crate alloc;

pub mod download;
pub mod runtime;
pub mod sim_flash;
pub mod store;

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use download::{Download, Rejection};
use embedded_storage::nor_flash::NorFlash;
use runtime::{HostCall, Instance, Runtime};
use store::{Installed, Refused, Staging, Store};
use wpm_manifests::{
    Chunk, Deployment, DeviceStatus, Event, EventKind, ModuleManifest, ModuleRef, ModuleState,
    ModuleStatus, Presence, Target, Topic, TrustedKeys,
};

pub use store::StoreError;

/// Scheduler turns a new version must run without trapping before it is confirmed.
pub const HEALTH_TURNS: u32 = 3;

/// What the device is and how it behaves. Names must satisfy [`wpm_manifests::valid_name`].
#[derive(Debug, Clone)]
pub struct Config {
    pub device_id: String,
    pub groups: Vec<String>,
    pub trusted_keys: Vec<[u8; 32]>,
    /// Number of wasmi runtime slots.
    pub slots: usize,
    /// Most chunk requests in flight.
    pub chunk_window: usize,
    /// Scheduler period.
    pub turn_interval_ms: u64,
    /// Periodic status republish.
    pub status_interval_ms: u64,
}

/// Resource sizes of the device; [`Limits::default`] fits an nRF9160.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Size of one module bank in flash: the largest module the device can take. Fixed
    /// for the life of the flash contents (it is stored and checked at boot).
    pub bank_size: u32,
    /// RAM set aside for modules; status reports an estimate of what is left of it.
    pub ram_budget: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            bank_size: 64 * 1024,
            ram_budget: 128 * 1024,
        }
    }
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
    /// Turns survived since it was started.
    turns: u32,
}

/// The device package manager.
pub struct Device<F> {
    config: Config,
    limits: Limits,
    keys: TrustedKeys,
    deploy_topics: Vec<String>,
    store: Store<F>,
    runtime: Runtime,
    slots: Vec<Slot>,
    download: Option<Download>,
    /// Why a module ended, by sha256; such a module is not restarted before the next
    /// boot or the next accepted deployment.
    failed: BTreeMap<[u8; 32], String>,
    /// Replayed sequences already reported this boot (retained copies come back often).
    reported_replays: BTreeSet<u64>,
    last_error: Option<String>,
    outputs: VecDeque<Output>,
    link_up: bool,
    now_ms: u64,
    next_turn_ms: u64,
    next_status_ms: u64,
    status_dirty: bool,
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
        let store = Store::open(flash, limits.bank_size)?;
        let mut targets = alloc::vec![Target::Fleet];
        targets.extend(config.groups.iter().cloned().map(Target::Group));
        targets.push(Target::Device(config.device_id.clone()));
        let mut device = Self {
            keys: TrustedKeys::new(&config.trusted_keys),
            deploy_topics: targets
                .iter()
                .map(|t| Topic::Deployment(t).render())
                .collect(),
            next_turn_ms: now_ms + config.turn_interval_ms,
            next_status_ms: now_ms + config.status_interval_ms,
            config,
            limits,
            store,
            runtime: Runtime::new(),
            slots: Vec::new(),
            download: None,
            failed: BTreeMap::new(),
            reported_replays: BTreeSet::new(),
            last_error: None,
            outputs: VecDeque::new(),
            link_up: false,
            now_ms,
            status_dirty: false,
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
        let turn = (!self.slots.is_empty()).then_some(self.next_turn_ms);
        let status = self.link_up.then_some(self.next_status_ms);
        let download = self.download.as_ref().and_then(Download::next_deadline);
        [turn, status, download].into_iter().flatten().min()
    }

    /// The MQTT last will: presence topic and CBOR `Presence { online: false }`.
    pub fn last_will(&self) -> (String, Vec<u8>) {
        (
            Topic::Presence(&self.config.device_id).render(),
            wpm_manifests::encode(&Presence { online: false }),
        )
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
                let s = if self.slot_of(&i.module.sha256).is_some() {
                    ModuleState::Running
                } else if failure.is_some() {
                    ModuleState::Failed
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
            slots_total: self.config.slots as u16,
            flash_free: self.store.free_bytes(),
            ram_free: self.limits.ram_budget.saturating_sub(self.ram_used()),
            last_error: self.last_error.clone(),
            at_ms: self.now_ms,
        }
    }

    /// Power off: only the flash remains.
    pub fn into_flash(self) -> F {
        self.store.into_flash()
    }

    /// An estimate: per slot its linear memory, twice the wasm size for the compiled
    /// code (wasmi keeps more than the file, see TARGET-FACTS) and 4 KiB of store.
    fn ram_used(&self) -> u32 {
        self.slots
            .iter()
            .map(|s| s.instance.memory_bytes() as u32 + 2 * s.module.size + 4096)
            .sum()
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

    fn publish(&mut self, topic: String, payload: Vec<u8>, retain: bool) {
        if self.link_up {
            self.emit(Output::Publish {
                topic,
                payload,
                retain,
            });
        }
    }

    fn event(&mut self, kind: EventKind) {
        let event = Event {
            device: self.config.device_id.clone(),
            at_ms: self.now_ms,
            kind,
        };
        let topic = Topic::Events(&self.config.device_id).render();
        self.publish(topic, wpm_manifests::encode(&event), false);
        self.status_dirty = true;
    }

    fn publish_status(&mut self) {
        let status = wpm_manifests::encode(&self.status());
        let topic = Topic::Status(&self.config.device_id).render();
        self.publish(topic, status, true);
        self.status_dirty = false;
        self.next_status_ms = self.now_ms + self.config.status_interval_ms;
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
                    self.publish(topic, bytes, false);
                }
            }
        }
    }

    // ---- inputs ----

    fn link_up(&mut self) {
        self.link_up = true;
        for topic in self.deploy_topics.clone() {
            self.subscribe(topic);
        }
        let presence = Topic::Presence(&self.config.device_id).render();
        self.publish(
            presence,
            wpm_manifests::encode(&Presence { online: true }),
            true,
        );
        self.status_dirty = true;
        if let Some(d) = &mut self.download {
            d.link_lost();
            if d.manifest.is_none() {
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
        if !self.slots.is_empty() && now >= self.next_turn_ms {
            self.next_turn_ms = now + self.config.turn_interval_ms;
            self.run_turn();
        }
        if self.link_up && now >= self.next_status_ms {
            self.status_dirty = true;
        }
        if let Some(d) = &mut self.download {
            let late = d.timed_out(now);
            let digest = d.module.sha256;
            for index in late {
                if self.link_up {
                    let topic = Topic::Chunk(&digest, index).render();
                    self.unsubscribe(topic.clone());
                    self.subscribe(topic);
                }
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
        if deployment.sequence < accepted {
            if self.reported_replays.insert(deployment.sequence) {
                self.reject_manifest(format!(
                    "replayed manifest: sequence {} is older than accepted {accepted}",
                    deployment.sequence
                ));
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
            // instance keeps the old ones until it is next started.
            for i in &mut s.installed {
                let same = |m: &&ModuleRef| m.sha256 == i.module.sha256 && m.name == i.module.name;
                if let Some(m) = deployment.modules.iter().find(same) {
                    i.module = m.clone();
                }
            }
            s.desired = deployment.modules;
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
        self.start_modules();
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
        if let Err(e) = self
            .store
            .update(|s| s.installed.retain(|i| !gone.contains(&sha(&i.module))))
        {
            return self.device_error(format!("could not remove modules: {e}"));
        }
        for i in unwanted {
            self.slots.retain(|s| s.module.sha256 != i.module.sha256);
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

    /// Starts, for each installed name, the version that should run, higher priority
    /// first while slots last. A new version takes the place of the old one here, between
    /// two scheduler turns.
    fn start_modules(&mut self) {
        let mut modules: Vec<&ModuleRef> = (self.store.state().installed.iter())
            .map(|i| &i.module)
            .collect();
        modules.sort_by_key(|m| (!m.pinned, core::cmp::Reverse(m.priority)));
        let mut names: Vec<String> = Vec::new();
        for m in modules {
            if !names.contains(&m.name) {
                names.push(m.name.clone());
            }
        }
        for name in names {
            while let Some(target) = self.run_target(&name) {
                if self.slot_of(&target.module.sha256).is_some() {
                    break;
                }
                self.slots.retain(|s| s.module.name != name);
                if self.slots.len() >= self.config.slots {
                    break;
                }
                match self.start(&target) {
                    Ok(()) => break,
                    Err(reason) if !target.confirmed => self.refuse(&target.module, reason),
                    Err(reason) => {
                        self.module_ended(&target.module, reason);
                        break;
                    }
                }
            }
        }
    }

    fn start(&mut self, target: &Installed) -> Result<(), String> {
        let m = &target.module;
        let wasm = self
            .store
            .read(target.bank, 0, m.size as usize)
            .map_err(|e| format!("reading the module from flash: {e}"))?;
        match self.runtime.start(m, &wasm, self.now_ms) {
            Ok(mut instance) => {
                if self.slots.is_empty() {
                    // The turn timer was idle; the first turn is one period from now.
                    self.next_turn_ms = self.now_ms + self.config.turn_interval_ms;
                }
                let calls = instance.take_calls();
                self.host_calls(&m.name, calls);
                self.slots.push(Slot {
                    module: m.clone(),
                    instance,
                    turns: 0,
                });
                self.event(EventKind::Started {
                    module: m.name.clone(),
                    version: m.version.clone(),
                });
                Ok(())
            }
            Err(failed) => {
                self.host_calls(&m.name, failed.calls);
                Err(failed.reason)
            }
        }
    }

    /// A confirmed module trapped or could not start: it stays stopped until reboot.
    fn module_ended(&mut self, module: &ModuleRef, reason: String) {
        self.slots.retain(|s| s.module.sha256 != module.sha256);
        self.failed.insert(sha(module), reason.clone());
        self.last_error = Some(format!("{}@{}: {reason}", module.name, module.version));
        self.event(EventKind::Trapped {
            module: module.name.clone(),
            version: module.version.clone(),
            reason,
        });
    }

    /// Refuses a module version until a newer deployment: drops it from the installed set
    /// (and from staging) and reports why.
    fn refuse(&mut self, module: &ModuleRef, reason: String) {
        self.slots.retain(|s| s.module.sha256 != module.sha256);
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
        }) {
            self.device_error(format!("could not record a refused module: {e}"));
        }
        self.last_error = Some(format!("{}@{}: {reason}", module.name, module.version));
        self.event(EventKind::InstallFailed {
            module: module.name.clone(),
            version: module.version.clone(),
            reason,
        });
    }

    /// Runs one scheduler turn: every slot gets `wpm_tick` with its fuel.
    fn run_turn(&mut self) {
        let now = self.now_ms;
        let mut outcomes = Vec::new();
        for slot in &mut self.slots {
            let result = slot.instance.tick(now);
            if result.is_ok() {
                slot.turns += 1;
            }
            let calls = slot.instance.take_calls();
            outcomes.push((slot.module.clone(), slot.turns, calls, result));
        }
        for (module, turns, calls, result) in outcomes {
            self.host_calls(&module.name, calls);
            let candidate = (self.store.state().installed.iter())
                .any(|i| i.module.sha256 == module.sha256 && !i.confirmed);
            match result {
                Ok(()) if candidate && turns >= HEALTH_TURNS => self.confirm(&module),
                Ok(()) => {}
                Err(reason) if candidate => {
                    self.refuse(&module, format!("health check: {reason}"));
                    self.start_modules();
                }
                Err(reason) => self.module_ended(&module, reason),
            }
        }
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
        }) {
            return self.device_error(format!("could not confirm {}: {e}", module.name));
        }
        for m in old {
            self.event(EventKind::Removed {
                module: m.name,
                version: m.version,
            });
        }
    }

    // ---- downloads ----

    /// Starts downloading the first desired module that is neither installed nor refused.
    fn next_download(&mut self) {
        loop {
            let state = self.store.state();
            let next = state.desired.iter().find(|m| {
                !state.installed.iter().any(|i| i.module.sha256 == m.sha256)
                    && !state.refused.iter().any(|r| r.sha256 == m.sha256)
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
                    .bank_for_staging()
                    .ok_or_else(|| "no free flash bank".to_string())?;
                // Erase before the record names the bank: a cut in between leaves a
                // bank nobody refers to, never a record pointing at stale bytes.
                self.store
                    .erase_bank(bank)
                    .and_then(|()| {
                        self.store.update(|s| {
                            s.staging = Some(Staging {
                                module: module.clone(),
                                bank,
                            })
                        })
                    })
                    .map_err(|e| format!("preparing the staging bank: {e}"))?;
                bank
            }
        };
        self.download = Some(Download::new(module.clone(), bank));
        if self.link_up {
            self.subscribe(Topic::ModuleManifest(&module.sha256).render());
        }
        Ok(())
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
        d.mark_held(index);
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
        if let Some(have) = d.progress_to_report() {
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
        for index in d.next_requests(self.config.chunk_window, self.now_ms) {
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
