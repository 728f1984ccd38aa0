//! The flash store: everything the device must remember across a power cut.
//!
//! # Layout
//!
//! ```text
//! offset 0               state ring: STATE_PAGES pages of state records, appended
//! offset R = 4P          bank 0   (one module's wasm bytes, or one snapshot)
//! offset R + B           bank 1
//! ...                    as many whole banks as fit; the tail is unused
//! ```
//!
//! `P` is the state page size (the flash's erase size, at least 4 KiB) and `B` the bank
//! size ([`crate::Limits::bank_size`], rounded up to whole erase pages). A bank holds
//! whatever the current state record says it holds: an installed module (confirmed, or
//! the candidate of a hot-swap, or the previous version kept until the candidate is
//! confirmed), the staging area of a download, or the snapshot of an evicted module.
//! Nothing else points into a bank.
//!
//! A state record is `magic u32 | generation u64 | length u32 | CBOR body | crc32`, all
//! little-endian, the CRC-32 (ISO-HDLC) covering everything before it, padded with `0xFF`
//! to the write size. The body is a [`State`].
//!
//! # Atomicity
//!
//! The state record is the only thing that says what a bank holds. Every change is made
//! by appending a complete new record with the next generation after the current one,
//! in erased flash; boot takes the intact record with the highest generation. A cut
//! while writing leaves a record that fails its CRC, so boot falls back to the previous
//! record: the device sees either the old state or the new one, never a mix. Module and
//! snapshot bytes are written into a bank no record refers to, and only a record written
//! after they are complete (and, for modules, read back and verified) points at them; a
//! bank is reused only once the record that pointed at it has been replaced. A snapshot
//! record carries the sha256 of the snapshot bytes, checked before they are trusted.
//!
//! # Wear
//!
//! Records are appended, so a state page is erased only when the ring wraps into it
//! (once per `STATE_PAGES` pages of records, not once per change), and the page erased
//! is always the one after the current record's page, which holds only older records.
//! Banks are handed out round-robin from a cursor kept in the state
//! ([`State::next_bank`]), so one module updated again and again walks over every bank
//! instead of erasing the same two; only the pages a module or snapshot needs are erased.
//! At boot a torn record after the newest intact one means the rest of its page is not
//! erased; the next record then starts a fresh page.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use embedded_storage::nor_flash::{NorFlash, NorFlashError, NorFlashErrorKind};
use minicbor::{Decode, Encode};
use sha2::{Digest as _, Sha256};
use wpm_manifests::{Digest, ModuleRef};

const MAGIC: u32 = 0x574d_5053; // "SPMW"
const HEADER: usize = 4 + 8 + 4;
const CRC: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);
const MIN_STATE_PAGE: usize = 4096;
/// Pages in the state ring. Two would do for atomicity; four spread the erases.
pub const STATE_PAGES: u32 = 4;

/// Why the store could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    Flash(NorFlashErrorKind),
    /// The flash cannot hold the state ring and one bank.
    TooSmall,
    /// The state no longer fits in a state page.
    RecordTooLarge(usize),
    /// A snapshot larger than a bank.
    SnapshotTooLarge(usize),
    /// Every bank holds a module, a snapshot or the staging area.
    NoFreeBank,
    /// The flash was formatted with another bank size; reading it with this one would
    /// misplace every module.
    LayoutChanged {
        stored: u32,
        configured: u32,
    },
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Flash(k) => write!(f, "flash error: {k}"),
            StoreError::TooSmall => f.write_str("flash too small for the state ring and a bank"),
            StoreError::RecordTooLarge(n) => {
                write!(f, "state record of {n} bytes does not fit a page")
            }
            StoreError::SnapshotTooLarge(n) => write!(f, "snapshot of {n} bytes exceeds a bank"),
            StoreError::NoFreeBank => f.write_str("no free flash bank"),
            StoreError::LayoutChanged { stored, configured } => write!(
                f,
                "flash formatted with bank size {stored}, configured {configured}"
            ),
        }
    }
}

fn flash_err<E: NorFlashError>(e: E) -> StoreError {
    StoreError::Flash(e.kind())
}

/// A module whose verified bytes are in a bank.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Installed {
    #[n(0)]
    pub module: ModuleRef,
    #[n(1)]
    pub bank: u16,
    /// Passed its health check. An unconfirmed module is the candidate of a hot-swap; the
    /// confirmed version of the same name stays installed until it is confirmed.
    #[n(2)]
    pub confirmed: bool,
}

/// A module being downloaded into a bank no installed module uses.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Staging {
    #[n(0)]
    pub module: ModuleRef,
    #[n(1)]
    pub bank: u16,
}

/// A module version that failed to install or pass its health check; not retried until a
/// newer deployment is accepted.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Refused {
    #[n(0)]
    pub sha256: Digest,
    #[n(1)]
    pub reason: String,
}

/// The snapshot of an evicted module, in a bank.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct FlashSnapshot {
    /// sha256 of the module it belongs to.
    #[n(0)]
    pub module: Digest,
    #[n(1)]
    pub bank: u16,
    #[n(2)]
    pub len: u32,
    /// sha256 of the snapshot bytes: a torn snapshot is never restored.
    #[n(3)]
    pub sha256: Digest,
}

/// An operator's pin or unpin of a module name, overriding the deployment's flag.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct PinOverride {
    #[n(0)]
    pub name: String,
    #[n(1)]
    pub pinned: bool,
}

/// What a state record holds.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct State {
    #[n(0)]
    pub bank_size: u32,
    /// Sequence of the last accepted deployment (0: none).
    #[n(1)]
    pub sequence: u64,
    /// The accepted deployment's module set: after a reboot the retained deployment
    /// arrives again with the same sequence and is ignored, so the wish must be here.
    #[n(2)]
    pub desired: Vec<ModuleRef>,
    #[n(3)]
    pub installed: Vec<Installed>,
    #[n(4)]
    pub staging: Option<Staging>,
    #[n(5)]
    pub refused: Vec<Refused>,
    /// Where the search for the next free bank starts (round-robin wear levelling).
    #[n(6)]
    pub next_bank: u16,
    #[n(7)]
    pub snapshots: Vec<FlashSnapshot>,
    /// Sequence of the last accepted lifecycle command (0: none).
    #[n(8)]
    pub command_sequence: u64,
    /// Module names stopped by command; they stay stopped across reboots until started.
    #[n(9)]
    pub stopped: Vec<String>,
    #[n(10)]
    pub pins: Vec<PinOverride>,
    /// The accepted deployment's health window (`None`: the default).
    #[n(11)]
    pub health: Option<wpm_manifests::HealthWindow>,
    /// The high half of this boot's report counters (see `reporter.rs`): one more at
    /// every boot, so no report counter is ever used twice.
    #[n(12)]
    #[cbor(default)]
    pub report_epoch: u32,
    /// The keys reached by following the registry's trust chain (`None`: the
    /// provisioned ones, epoch 0).
    #[n(13)]
    pub trust: Option<TrustState>,
}

/// The epoch of the trust chain a device has reached, and that epoch's keys.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct TrustState {
    #[n(0)]
    pub epoch: u64,
    #[n(1)]
    pub keys: Vec<minicbor::bytes::ByteArray<32>>,
}

impl State {
    fn empty(bank_size: u32) -> Self {
        Self {
            bank_size,
            sequence: 0,
            desired: Vec::new(),
            installed: Vec::new(),
            staging: None,
            refused: Vec::new(),
            next_bank: 0,
            snapshots: Vec::new(),
            command_sequence: 0,
            stopped: Vec::new(),
            pins: Vec::new(),
            health: None,
            report_epoch: 0,
            trust: None,
        }
    }

    /// Drops the snapshots of modules no longer installed (their banks become free).
    pub fn prune_snapshots(&mut self) {
        let installed = &self.installed;
        self.snapshots
            .retain(|x| installed.iter().any(|i| i.module.sha256 == x.module));
    }

    /// Whether `module` is pinned: by command if an operator said so, else by deployment.
    pub fn pinned(&self, module: &ModuleRef) -> bool {
        (self.pins.iter().find(|p| p.name == module.name)).map_or(module.pinned, |p| p.pinned)
    }
}

/// The flash store. Holds the current [`State`] in RAM; flash is the truth at boot.
pub struct Store<F> {
    flash: F,
    page: u32,
    bank_size: u32,
    banks: u16,
    state: State,
    generation: u64,
    /// Where the next record goes: ring page and offset in it (`page` = full).
    append: (u32, u32),
}

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

impl<F: NorFlash> Store<F> {
    /// Boots from flash alone: the newest intact state record, or an empty state on a
    /// blank flash.
    pub fn open(mut flash: F, bank_size: u32) -> Result<Self, StoreError> {
        let page = round_up(MIN_STATE_PAGE, F::ERASE_SIZE) as u32;
        let bank_size = round_up(bank_size.max(1) as usize, F::ERASE_SIZE) as u32;
        let capacity = flash.capacity() as u64;
        let banks = capacity.saturating_sub(STATE_PAGES as u64 * page as u64) / bank_size as u64;
        if banks == 0 {
            return Err(StoreError::TooSmall);
        }
        // (generation, state, ring page, end offset of the record)
        let mut best: Option<(u64, State, u32, u32)> = None;
        for p in 0..STATE_PAGES {
            let mut at = 0;
            while let Some((generation, state, len)) = read_record(&mut flash, p * page, at, page)?
            {
                at += len;
                if best.as_ref().is_none_or(|(g, ..)| generation > *g) {
                    best = Some((generation, state, p, at));
                }
            }
        }
        let (generation, state, append) = match best {
            Some((g, s, p, end)) => {
                // Append after the newest record only over erased flash; a torn record
                // there sends the next one to a fresh page.
                let rest = read_at(&mut flash, p * page + end, (page - end) as usize)?;
                let end = if rest.iter().all(|b| *b == 0xFF) {
                    end
                } else {
                    page
                };
                (g, s, (p, end))
            }
            None => (0, State::empty(bank_size), (STATE_PAGES - 1, page)),
        };
        if state.bank_size != bank_size {
            return Err(StoreError::LayoutChanged {
                stored: state.bank_size,
                configured: bank_size,
            });
        }
        Ok(Self {
            flash,
            page,
            bank_size,
            banks: banks.min(u16::MAX as u64) as u16,
            state,
            generation,
            append,
        })
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn bank_size(&self) -> u32 {
        self.bank_size
    }

    pub fn banks(&self) -> u16 {
        self.banks
    }

    /// The flash itself, for its counters (tests and benchmarks).
    pub fn flash(&self) -> &F {
        &self.flash
    }

    /// The flash itself, to arm a simulated power cut (tests).
    pub fn flash_mut(&mut self) -> &mut F {
        &mut self.flash
    }

    /// Changes the state atomically: the change is in RAM only once it is in flash.
    pub fn update(&mut self, change: impl FnOnce(&mut State)) -> Result<(), StoreError> {
        let mut next = self.state.clone();
        change(&mut next);
        let body = wpm_manifests::encode(&next);
        let generation = self.generation + 1;
        let mut record = Vec::with_capacity(HEADER + body.len() + 4 + F::WRITE_SIZE);
        record.extend_from_slice(&MAGIC.to_le_bytes());
        record.extend_from_slice(&generation.to_le_bytes());
        record.extend_from_slice(&(body.len() as u32).to_le_bytes());
        record.extend_from_slice(&body);
        record.extend_from_slice(&CRC.checksum(&record).to_le_bytes());
        record.resize(round_up(record.len(), F::WRITE_SIZE), 0xFF);
        if record.len() > self.page as usize {
            return Err(StoreError::RecordTooLarge(record.len()));
        }
        let (mut page, mut offset) = self.append;
        if offset as usize + record.len() > self.page as usize {
            // The next ring page holds only records older than the current one.
            page = (page + 1) % STATE_PAGES;
            offset = 0;
            let at = page * self.page;
            // From here on the current page is the one to leave, whatever happens.
            self.append = (page, self.page);
            self.flash.erase(at, at + self.page).map_err(flash_err)?;
        }
        // A failed write may have left bits behind: the next record goes after it.
        self.append = (page, self.page);
        self.flash
            .write(page * self.page + offset, &record)
            .map_err(flash_err)?;
        self.append = (page, offset + record.len() as u32);
        self.state = next;
        self.generation = generation;
        Ok(())
    }

    /// A free bank, searching round-robin from [`State::next_bank`]; the caller names
    /// it in its next state record and sets `next_bank` past it. `reuse_staging`: the
    /// current staging area is being replaced, so its bank counts as free.
    pub fn free_bank(&self, reuse_staging: bool) -> Option<u16> {
        let start = self.state.next_bank % self.banks;
        (0..self.banks).map(|i| (start + i) % self.banks).find(|b| {
            !self.holds_module_or_snapshot(*b)
                && (reuse_staging || self.state.staging.as_ref().is_none_or(|s| s.bank != *b))
        })
    }

    /// The cursor value after handing out `bank`.
    pub fn after(&self, bank: u16) -> u16 {
        (bank + 1) % self.banks
    }

    fn holds_module_or_snapshot(&self, bank: u16) -> bool {
        self.state.installed.iter().any(|i| i.bank == bank)
            || self.state.snapshots.iter().any(|s| s.bank == bank)
    }

    fn bank_in_use(&self, bank: u16) -> bool {
        self.holds_module_or_snapshot(bank)
            || self.state.staging.as_ref().is_some_and(|s| s.bank == bank)
    }

    /// Bytes of flash in banks no module or staging area uses.
    pub fn free_bytes(&self) -> u32 {
        let free = (0..self.banks).filter(|b| !self.bank_in_use(*b)).count() as u32;
        free * self.bank_size
    }

    fn bank_offset(&self, bank: u16) -> u32 {
        STATE_PAGES * self.page + bank as u32 * self.bank_size
    }

    /// Erases the pages of `bank` that the first `len` bytes occupy (all of them for
    /// `len` ≥ the bank size): a small module or snapshot wears only what it uses.
    pub fn erase_bank(&mut self, bank: u16, len: u32) -> Result<(), StoreError> {
        let at = self.bank_offset(bank);
        let len = round_up(len.clamp(1, self.bank_size) as usize, F::ERASE_SIZE) as u32;
        self.flash.erase(at, at + len).map_err(flash_err)
    }

    /// Writes `data` at `offset` in `bank`, padding the tail to the write size with
    /// `0xFF` (which leaves those bits erased). `offset` must be write-aligned.
    pub fn write(&mut self, bank: u16, offset: u32, data: &[u8]) -> Result<(), StoreError> {
        if !(offset as usize).is_multiple_of(F::WRITE_SIZE) {
            return Err(StoreError::Flash(NorFlashErrorKind::NotAligned));
        }
        if offset as u64 + data.len() as u64 > self.bank_size as u64 {
            return Err(StoreError::Flash(NorFlashErrorKind::OutOfBounds));
        }
        let whole = data.len() - data.len() % F::WRITE_SIZE;
        let at = self.bank_offset(bank) + offset;
        if whole > 0 {
            self.flash.write(at, &data[..whole]).map_err(flash_err)?;
        }
        if whole < data.len() {
            let mut tail = vec![0xFF; F::WRITE_SIZE];
            tail[..data.len() - whole].copy_from_slice(&data[whole..]);
            self.flash
                .write(at + whole as u32, &tail)
                .map_err(flash_err)?;
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset` in `bank`.
    pub fn read(&mut self, bank: u16, offset: u32, len: usize) -> Result<Vec<u8>, StoreError> {
        if offset as u64 + len as u64 > self.bank_size as u64 {
            return Err(StoreError::Flash(NorFlashErrorKind::OutOfBounds));
        }
        let at = self.bank_offset(bank) + offset;
        read_at(&mut self.flash, at, len)
    }

    /// sha256 of the first `size` bytes of `bank`, read back from flash in small pieces
    /// so the check needs no module-sized buffer.
    pub fn digest(&mut self, bank: u16, size: u32) -> Result<[u8; 32], StoreError> {
        const PIECE: u32 = 1024;
        let mut hasher = Sha256::new();
        let mut offset = 0;
        while offset < size {
            let len = PIECE.min(size - offset);
            hasher.update(self.read(bank, offset, len as usize)?);
            offset += len;
        }
        Ok(hasher.finalize().into())
    }

    /// Writes a snapshot of `module` into a free bank, then records it (replacing an
    /// older snapshot of the same module) in one state record: a cut before the record
    /// leaves the old state, with the bank still free.
    pub fn save_snapshot(&mut self, module: &Digest, bytes: &[u8]) -> Result<(), StoreError> {
        if bytes.len() > self.bank_size as usize {
            return Err(StoreError::SnapshotTooLarge(bytes.len()));
        }
        let bank = self.free_bank(false).ok_or(StoreError::NoFreeBank)?;
        self.erase_bank(bank, bytes.len() as u32)?;
        self.write(bank, 0, bytes)?;
        let entry = FlashSnapshot {
            module: *module,
            bank,
            len: bytes.len() as u32,
            sha256: wpm_manifests::sha256(bytes).into(),
        };
        let next = self.after(bank);
        self.update(|s| {
            s.snapshots.retain(|x| x.module != entry.module);
            s.snapshots.push(entry);
            s.next_bank = next;
        })
    }

    /// The bytes of `module`'s snapshot in flash, if the state names one and they match
    /// their recorded sha256 (a snapshot that does not is dropped from the state).
    pub fn load_snapshot(&mut self, module: &[u8; 32]) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(entry) = self
            .state
            .snapshots
            .iter()
            .find(|x| *x.module == *module)
            .cloned()
        else {
            return Ok(None);
        };
        let bytes = self.read(entry.bank, 0, entry.len as usize)?;
        if wpm_manifests::sha256(&bytes) == *entry.sha256 {
            return Ok(Some(bytes));
        }
        self.update(|s| s.snapshots.retain(|x| x.module != entry.module))?;
        Ok(None)
    }

    pub fn into_flash(self) -> F {
        self.flash
    }
}

/// Reads `len` bytes at `at`, widening the read to the flash's read size.
fn read_at<F: NorFlash>(flash: &mut F, at: u32, len: usize) -> Result<Vec<u8>, StoreError> {
    let mut buf = vec![0; round_up(len, F::READ_SIZE)];
    flash.read(at, &mut buf).map_err(flash_err)?;
    buf.truncate(len);
    Ok(buf)
}

/// The record at `offset` in the state page at `at`, with its padded length, if it is
/// complete and intact. A record whose CRC holds but whose body does not decode is
/// treated as torn too: it cannot be used.
fn read_record<F: NorFlash>(
    flash: &mut F,
    at: u32,
    offset: u32,
    page: u32,
) -> Result<Option<(u64, State, u32)>, StoreError> {
    if (offset as usize + HEADER + 4) > page as usize {
        return Ok(None);
    }
    let at = at + offset;
    let header = read_at(flash, at, HEADER)?;
    let field = |r: core::ops::Range<usize>| -> u64 {
        header[r]
            .iter()
            .rev()
            .fold(0u64, |acc, b| (acc << 8) | *b as u64)
    };
    if field(0..4) != MAGIC as u64 {
        return Ok(None);
    }
    let generation = field(4..12);
    let len = field(12..16) as usize;
    if offset as usize + HEADER + len + 4 > page as usize {
        return Ok(None);
    }
    let record = read_at(flash, at, HEADER + len + 4)?;
    let (covered, crc) = record.split_at(HEADER + len);
    if CRC.checksum(covered).to_le_bytes() != crc {
        return Ok(None);
    }
    let padded = round_up(HEADER + len + 4, F::WRITE_SIZE) as u32;
    Ok(wpm_manifests::decode::<State>(&covered[HEADER..])
        .ok()
        .map(|s| (generation, s, padded)))
}
