//! The flash store: everything the device must remember across a power cut.
//!
//! # Layout
//!
//! ```text
//! offset 0               state page A   (one state record)
//! offset P               state page B   (one state record)
//! offset 2P              bank 0         (one module's wasm bytes)
//! offset 2P + B          bank 1
//! ...                    as many whole banks as fit; the tail is unused
//! ```
//!
//! `P` is the state page size (the flash's erase size, at least 4 KiB) and `B` the bank
//! size ([`crate::Limits::bank_size`], rounded up to whole erase pages).
//!
//! A state record is `magic u32 | generation u64 | length u32 | CBOR body | crc32`, all
//! little-endian, the CRC-32 (ISO-HDLC) covering everything before it, padded with `0xFF`
//! to the write size. The body is a [`State`].
//!
//! # Atomicity
//!
//! The state record is the only thing that says what a bank holds. Every change is made
//! by writing a complete new record, with the next generation, into the page that does
//! *not* hold the current one; boot takes the valid record with the highest generation.
//! A cut while erasing or writing that page leaves a record that fails its CRC (or an
//! erased page), so boot falls back to the previous record: the device sees either the
//! old state or the new one, never a mix. Module bytes are written into a bank no record
//! refers to, and only a record written after they were read back and verified points
//! at them; a bank is reused only once the record that still pointed at it has been
//! replaced.

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

/// Why the store could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    Flash(NorFlashErrorKind),
    /// The flash cannot hold two state pages and one bank.
    TooSmall,
    /// The state no longer fits in a state page.
    RecordTooLarge(usize),
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
            StoreError::TooSmall => f.write_str("flash too small for two state pages and a bank"),
            StoreError::RecordTooLarge(n) => {
                write!(f, "state record of {n} bytes does not fit a page")
            }
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
}

/// The flash store. Holds the current [`State`] in RAM; flash is the truth at boot.
pub struct Store<F> {
    flash: F,
    page: u32,
    bank_size: u32,
    banks: u16,
    state: State,
    generation: u64,
    /// Which state page holds the current record (`None`: no record yet).
    current_page: Option<u32>,
}

fn round_up(n: usize, to: usize) -> usize {
    n.div_ceil(to) * to
}

impl<F: NorFlash> Store<F> {
    /// Boots from flash alone: the newest valid state record, or an empty state on a
    /// blank flash.
    pub fn open(mut flash: F, bank_size: u32) -> Result<Self, StoreError> {
        let page = round_up(MIN_STATE_PAGE, F::ERASE_SIZE) as u32;
        let bank_size = round_up(bank_size.max(1) as usize, F::ERASE_SIZE) as u32;
        let capacity = flash.capacity() as u64;
        let banks = capacity.saturating_sub(2 * page as u64) / bank_size as u64;
        if banks == 0 {
            return Err(StoreError::TooSmall);
        }
        let mut best: Option<(u64, u32, State)> = None;
        for p in 0..2 {
            if let Some((generation, state)) = read_record(&mut flash, p * page, page)? {
                if best.as_ref().is_none_or(|(g, _, _)| generation > *g) {
                    best = Some((generation, p, state));
                }
            }
        }
        let (generation, current_page, state) = match best {
            Some((g, p, s)) => (g, Some(p), s),
            None => (
                0,
                None,
                State {
                    bank_size,
                    sequence: 0,
                    desired: Vec::new(),
                    installed: Vec::new(),
                    staging: None,
                    refused: Vec::new(),
                },
            ),
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
            current_page,
        })
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn bank_size(&self) -> u32 {
        self.bank_size
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
        let target = match self.current_page {
            Some(0) => 1,
            _ => 0,
        };
        let at = target * self.page;
        self.flash.erase(at, at + self.page).map_err(flash_err)?;
        self.flash.write(at, &record).map_err(flash_err)?;
        self.state = next;
        self.generation = generation;
        self.current_page = Some(target);
        Ok(())
    }

    /// A bank for a new staging area: one no installed module uses. The current staging
    /// area, if any, is being replaced, so its bank counts as free.
    pub fn bank_for_staging(&self) -> Option<u16> {
        (0..self.banks).find(|b| !self.state.installed.iter().any(|i| i.bank == *b))
    }

    fn bank_in_use(&self, bank: u16) -> bool {
        self.state.installed.iter().any(|i| i.bank == bank)
            || self.state.staging.as_ref().is_some_and(|s| s.bank == bank)
    }

    /// Bytes of flash in banks no module or staging area uses.
    pub fn free_bytes(&self) -> u32 {
        let free = (0..self.banks).filter(|b| !self.bank_in_use(*b)).count() as u32;
        free * self.bank_size
    }

    fn bank_offset(&self, bank: u16) -> u32 {
        2 * self.page + bank as u32 * self.bank_size
    }

    pub fn erase_bank(&mut self, bank: u16) -> Result<(), StoreError> {
        let at = self.bank_offset(bank);
        self.flash.erase(at, at + self.bank_size).map_err(flash_err)
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

/// The record in the state page at `at`, if it is complete and intact. A record whose
/// CRC holds but whose body does not decode is treated as torn too: it cannot be used.
fn read_record<F: NorFlash>(
    flash: &mut F,
    at: u32,
    page: u32,
) -> Result<Option<(u64, State)>, StoreError> {
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
    if HEADER + len + 4 > page as usize {
        return Ok(None);
    }
    let record = read_at(flash, at, HEADER + len + 4)?;
    let (covered, crc) = record.split_at(HEADER + len);
    if CRC.checksum(covered).to_le_bytes() != crc {
        return Ok(None);
    }
    Ok(wpm_manifests::decode::<State>(&covered[HEADER..])
        .ok()
        .map(|s| (generation, s)))
}
