//! CBOR message types. Field numbers are the wire format: never reuse or renumber one;
//! add new fields with new numbers (decoders skip unknown fields, and `Option` fields
//! missing from older encoders decode as `None`).

use alloc::string::String;
use alloc::vec::Vec;
use minicbor::bytes::{ByteArray, ByteVec};
use minicbor::{CborLen, Decode, Encode};

/// A sha256 digest on the wire.
pub type Digest = ByteArray<32>;

/// Who a deployment manifest is for.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, CborLen)]
pub enum Target {
    /// Every device of the fleet.
    #[n(0)]
    Fleet,
    /// Every device carrying this group tag.
    #[n(1)]
    Group(#[n(0)] String),
    /// One device.
    #[n(2)]
    Device(#[n(0)] String),
}

impl Target {
    /// Whether a device with this id and these groups is addressed.
    pub fn addresses(&self, device: &str, groups: &[String]) -> bool {
        match self {
            Target::Fleet => true,
            Target::Group(g) => groups.iter().any(|x| x == g),
            Target::Device(d) => d == device,
        }
    }
}

/// One module a deployment wants running.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, CborLen)]
pub struct ModuleRef {
    #[n(0)]
    pub name: String,
    #[n(1)]
    pub version: String,
    /// sha256 of the whole wasm binary.
    #[n(2)]
    pub sha256: Digest,
    /// Size of the wasm binary in bytes.
    #[n(3)]
    pub size: u32,
    /// Chunk size the module was cut into (every chunk but the last has this size).
    #[n(4)]
    pub chunk_size: u32,
    /// Most linear memory the module may use, in bytes.
    #[n(5)]
    pub memory_limit: u32,
    /// Fuel the module may burn in one scheduler turn.
    #[n(6)]
    pub fuel_per_turn: u64,
    /// Higher runs in preference when slots are short.
    #[n(7)]
    pub priority: u8,
    /// A pinned module is never evicted.
    #[n(8)]
    pub pinned: bool,
}

impl ModuleRef {
    /// How many chunks the module travels in.
    pub fn chunk_count(&self) -> u32 {
        if self.chunk_size == 0 {
            return 0;
        }
        self.size.div_ceil(self.chunk_size)
    }
}

/// The signed statement of what a target must run.
///
/// A device accepts it only if the signature verifies against a trusted key, `sequence`
/// is higher than the last one it accepted (no replay, no rollback) and `expires_at` has
/// not passed (no freeze).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, CborLen)]
pub struct Deployment {
    #[n(0)]
    pub target: Target,
    /// Registry-wide, strictly increasing.
    #[n(1)]
    pub sequence: u64,
    /// Unix seconds.
    #[n(2)]
    pub issued_at: u64,
    /// Unix seconds.
    #[n(3)]
    pub expires_at: u64,
    /// The complete desired set: modules not listed here are to be stopped and removed.
    #[n(4)]
    pub modules: Vec<ModuleRef>,
    /// What a new version must do before the device confirms it and frees the old one;
    /// `None`: [`HealthWindow::DEFAULT`].
    #[n(5)]
    pub health: Option<HealthWindow>,
}

/// The health check a new version passes before it is confirmed: it instantiates, its
/// `wpm_init` returns 0, then it runs `turns` scheduler turns without trapping and stays
/// up for `seconds`. Until then the old version stays in flash, ready to return.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, CborLen)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct HealthWindow {
    #[n(0)]
    pub turns: u32,
    #[n(1)]
    pub seconds: u32,
}

impl HealthWindow {
    /// Three turns, no wait: what a deployment that names no window gets.
    pub const DEFAULT: HealthWindow = HealthWindow {
        turns: 3,
        seconds: 0,
    };
}

/// The signed chunk index of one module, retained on the module's manifest topic.
/// It lets a device check each chunk as it arrives, so a corrupt chunk costs one
/// chunk's refetch and not the whole module's.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, CborLen)]
pub struct ModuleManifest {
    #[n(0)]
    pub name: String,
    #[n(1)]
    pub version: String,
    #[n(2)]
    pub sha256: Digest,
    #[n(3)]
    pub size: u32,
    #[n(4)]
    pub chunk_size: u32,
    /// sha256 of each chunk, in order.
    #[n(5)]
    pub chunk_hashes: Vec<Digest>,
}

/// One piece of a module's bytes, retained on its own topic.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, CborLen)]
pub struct Chunk {
    /// sha256 of the whole module this chunk belongs to.
    #[n(0)]
    pub module: Digest,
    #[n(1)]
    pub index: u32,
    #[n(2)]
    pub data: ByteVec,
}

/// Where a module stands on one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, CborLen)]
pub enum ModuleState {
    #[n(0)]
    Downloading,
    #[n(1)]
    Installed,
    #[n(2)]
    Running,
    #[n(3)]
    Stopped,
    #[n(4)]
    Failed,
    #[n(5)]
    Evicted,
    /// A new version runs its health check; the old one stays in flash until it passes.
    #[n(6)]
    Verifying,
}

impl ModuleState {
    pub fn as_str(self) -> &'static str {
        match self {
            ModuleState::Downloading => "downloading",
            ModuleState::Installed => "installed",
            ModuleState::Running => "running",
            ModuleState::Stopped => "stopped",
            ModuleState::Failed => "failed",
            ModuleState::Evicted => "evicted",
            ModuleState::Verifying => "verifying",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, CborLen)]
pub struct ModuleStatus {
    #[n(0)]
    pub name: String,
    #[n(1)]
    pub version: String,
    #[n(2)]
    pub sha256: Digest,
    #[n(3)]
    pub state: ModuleState,
    #[n(4)]
    pub last_error: Option<String>,
}

/// A device's retained status record.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, CborLen)]
pub struct DeviceStatus {
    #[n(0)]
    pub device: String,
    #[n(1)]
    pub groups: Vec<String>,
    /// Sequence of the last deployment manifest accepted (0: none yet).
    #[n(2)]
    pub sequence: u64,
    #[n(3)]
    pub modules: Vec<ModuleStatus>,
    #[n(4)]
    pub slots_used: u16,
    #[n(5)]
    pub slots_total: u16,
    #[n(6)]
    pub flash_free: u32,
    #[n(7)]
    pub ram_free: u32,
    #[n(8)]
    pub last_error: Option<String>,
    /// Device clock, unix milliseconds, when the record was made.
    #[n(9)]
    pub at_ms: u64,
    /// The epoch of the registry's trust chain the device has reached
    /// (`crate::trust`); `None` from a device that does not follow the chain.
    #[n(10)]
    pub trust_epoch: Option<u64>,
}

/// Retained presence; the offline form is the device's MQTT last will.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, CborLen)]
pub struct Presence {
    #[n(0)]
    pub online: bool,
    /// In the first presence of a session: the counter of the last will the device
    /// sealed for this session (see [`crate::report`]).
    #[n(1)]
    pub will: Option<u64>,
}

/// Something that happened on a device.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, CborLen)]
pub struct Event {
    #[n(0)]
    pub device: String,
    /// Device clock, unix milliseconds.
    #[n(1)]
    pub at_ms: u64,
    #[n(2)]
    pub kind: EventKind,
}

/// With the `serde` feature this serializes as one flat object tagged by `kind`, e.g.
/// `{"kind":"trapped","module":"hello","version":"1.0.0","reason":"out of fuel"}`.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, CborLen)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(tag = "kind", rename_all = "snake_case")
)]
pub enum EventKind {
    #[n(0)]
    ManifestAccepted {
        #[n(0)]
        sequence: u64,
    },
    /// A deployment or module manifest was refused; the running set is unchanged.
    #[n(1)]
    ManifestRejected {
        #[n(0)]
        reason: String,
    },
    #[n(2)]
    DownloadProgress {
        #[n(0)]
        module: String,
        #[n(1)]
        version: String,
        #[n(2)]
        chunks_have: u32,
        #[n(3)]
        chunks_total: u32,
    },
    /// A chunk failed its check and will be fetched again.
    #[n(3)]
    ChunkRejected {
        #[n(0)]
        module: String,
        #[n(1)]
        index: u32,
        #[n(2)]
        reason: String,
    },
    #[n(4)]
    Installed {
        #[n(0)]
        module: String,
        #[n(1)]
        version: String,
    },
    #[n(5)]
    InstallFailed {
        #[n(0)]
        module: String,
        #[n(1)]
        version: String,
        #[n(2)]
        reason: String,
    },
    #[n(6)]
    Started {
        #[n(0)]
        module: String,
        #[n(1)]
        version: String,
    },
    /// The module ended abnormally (trap, fuel, memory limit) and was stopped.
    #[n(7)]
    Trapped {
        #[n(0)]
        module: String,
        #[n(1)]
        version: String,
        #[n(2)]
        reason: String,
    },
    #[n(8)]
    Removed {
        #[n(0)]
        module: String,
        #[n(1)]
        version: String,
    },
    /// A message on a wpm topic that could not be decoded.
    #[n(9)]
    MalformedMessage {
        #[n(0)]
        topic: String,
        #[n(1)]
        reason: String,
    },
    /// A lifecycle command was carried out.
    #[n(10)]
    CommandApplied {
        #[n(0)]
        sequence: u64,
        #[n(1)]
        action: Action,
    },
    /// A lifecycle command was refused (bad signature, replay, expired, unknown module…).
    #[n(11)]
    CommandRejected {
        #[n(0)]
        sequence: u64,
        #[n(1)]
        reason: String,
    },
    /// A module's state was snapshotted and its slot given to another module.
    #[n(12)]
    Evicted {
        #[n(0)]
        module: String,
        #[n(1)]
        version: String,
        /// Where the snapshot went: "ram" or "flash".
        #[n(2)]
        to: String,
    },
    /// An evicted module was restored from its snapshot and continues.
    #[n(13)]
    Restored {
        #[n(0)]
        module: String,
        #[n(1)]
        version: String,
    },
    /// A new version failed its health check; the previous one runs again.
    #[n(14)]
    RolledBack {
        #[n(0)]
        module: String,
        #[n(1)]
        from_version: String,
        #[n(2)]
        to_version: String,
        #[n(3)]
        reason: String,
    },
    /// A deployment older than the accepted one arrived (a retained copy seen again, or
    /// a replay) and was ignored. Not an error of the device or of a rollout: its own
    /// kind, so that nothing has to read it out of a free-text reason.
    #[n(15)]
    ManifestReplayed {
        #[n(0)]
        sequence: u64,
        #[n(1)]
        accepted: u64,
    },
    /// The device followed the registry's trust chain to `epoch` and keeps its keys in
    /// flash (`crate::trust`).
    #[n(16)]
    TrustUpdated {
        #[n(0)]
        epoch: u64,
    },
    /// The device stopped following the trust chain at `epoch`: an update it could not
    /// open, or a key set it will not use. Its keys stay those of `epoch`.
    #[n(17)]
    TrustRejected {
        #[n(0)]
        epoch: u64,
        #[n(1)]
        reason: String,
    },
}

/// What an operator can ask of one module on one device.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, CborLen)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(tag = "verb", content = "module", rename_all = "snake_case")
)]
pub enum Action {
    #[n(0)]
    Start(#[n(0)] String),
    #[n(1)]
    Stop(#[n(0)] String),
    #[n(2)]
    Pin(#[n(0)] String),
    #[n(3)]
    Unpin(#[n(0)] String),
    #[n(4)]
    Evict(#[n(0)] String),
}

impl Action {
    /// The module the action is about.
    pub fn module(&self) -> &str {
        match self {
            Action::Start(m)
            | Action::Stop(m)
            | Action::Pin(m)
            | Action::Unpin(m)
            | Action::Evict(m) => m,
        }
    }

    pub fn verb(&self) -> &'static str {
        match self {
            Action::Start(_) => "start",
            Action::Stop(_) => "stop",
            Action::Pin(_) => "pin",
            Action::Unpin(_) => "unpin",
            Action::Evict(_) => "evict",
        }
    }
}

/// A signed lifecycle command for one device, published (not retained) on its command
/// topic. Signed by the registry key like deployments, because broker access alone must
/// not let anyone stop a fleet's modules; `sequence` comes from the same registry-wide
/// counter as deployments, and a device accepts a command only if its sequence is above
/// the last command it accepted and it has not expired (commands live minutes, not days).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, CborLen)]
pub struct Command {
    #[n(0)]
    pub device: String,
    #[n(1)]
    pub sequence: u64,
    /// Unix seconds.
    #[n(2)]
    pub issued_at: u64,
    /// Unix seconds.
    #[n(3)]
    pub expires_at: u64,
    #[n(4)]
    pub action: Action,
}

impl EventKind {
    /// A short stable name, for logs and database columns.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::ManifestAccepted { .. } => "manifest_accepted",
            EventKind::ManifestRejected { .. } => "manifest_rejected",
            EventKind::ManifestReplayed { .. } => "manifest_replayed",
            EventKind::DownloadProgress { .. } => "download_progress",
            EventKind::ChunkRejected { .. } => "chunk_rejected",
            EventKind::Installed { .. } => "installed",
            EventKind::InstallFailed { .. } => "install_failed",
            EventKind::Started { .. } => "started",
            EventKind::Trapped { .. } => "trapped",
            EventKind::Removed { .. } => "removed",
            EventKind::MalformedMessage { .. } => "malformed_message",
            EventKind::CommandApplied { .. } => "command_applied",
            EventKind::CommandRejected { .. } => "command_rejected",
            EventKind::Evicted { .. } => "evicted",
            EventKind::Restored { .. } => "restored",
            EventKind::RolledBack { .. } => "rolled_back",
            EventKind::TrustUpdated { .. } => "trust_updated",
            EventKind::TrustRejected { .. } => "trust_rejected",
        }
    }
}
