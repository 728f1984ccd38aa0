//! A NOR flash in RAM with the nRF9160 NVMC's geometry, for host tests and the simulator.
//!
//! It is stricter than most real parts on purpose: a write that would have to turn a `0`
//! bit back into `1` fails instead of silently AND-ing, so code that forgets to erase
//! before writing fails in tests, not in the field.
//!
//! # Power loss
//!
//! [`SimFlash::cut_after`] arms a power cut: the `n`-th write or erase from then on is
//! interrupted half-way and every operation after it fails with [`SimFlashError::PowerLost`]
//! until the caller "reboots" (takes the bytes with [`SimFlash::as_bytes`] into a fresh
//! [`SimFlash::from_bytes`]). What an interrupted operation leaves:
//!
//! * a write: its first half (in whole words) programmed, then one word with only its
//!   low nibbles programmed, the rest untouched — a prefix plus some stray bits;
//! * an erase: half of each page erased, the other half left as it was; which half
//!   alternates with the operation number, so both "head erased, old tail" and
//!   "old head, tail erased" are exercised.

use alloc::vec;
use alloc::vec::Vec;
use embedded_storage::nor_flash::{
    ErrorType, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash,
};

/// Why a [`SimFlash`] operation was refused. The flash is unchanged when it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimFlashError {
    NotAligned,
    OutOfBounds,
    /// The write would need an erase first: byte at `offset` has a `0` bit where the
    /// data has a `1`.
    NotErased {
        offset: u32,
    },
    /// Power was cut (see [`SimFlash::cut_after`]); nothing works until a reboot.
    PowerLost,
}

impl NorFlashError for SimFlashError {
    fn kind(&self) -> NorFlashErrorKind {
        match self {
            SimFlashError::NotAligned => NorFlashErrorKind::NotAligned,
            SimFlashError::OutOfBounds => NorFlashErrorKind::OutOfBounds,
            SimFlashError::NotErased { .. } | SimFlashError::PowerLost => NorFlashErrorKind::Other,
        }
    }
}

/// RAM-backed NOR flash: WRITE_SIZE 4, ERASE_SIZE 4096, erased bytes read `0xFF`.
#[derive(Debug, Clone)]
pub struct SimFlash {
    bytes: Vec<u8>,
    reads: u64,
    writes: u64,
    erases: u64,
    page_erases: Vec<u32>,
    /// Write and erase calls so far, the unit of [`SimFlash::cut_after`].
    ops: u64,
    /// The `ops` value of the operation that will be interrupted.
    cut_at: Option<u64>,
    powered: bool,
}

impl SimFlash {
    /// Erased flash of `size_bytes`, rounded up to whole erase pages.
    pub fn new(size_bytes: usize) -> Self {
        Self::from_bytes(vec![0xFF; size_bytes])
    }

    /// Flash holding `bytes` (as saved by [`SimFlash::as_bytes`]). A length that is not a
    /// whole number of pages is padded with erased bytes. Counters start at zero.
    pub fn from_bytes(mut bytes: Vec<u8>) -> Self {
        let pages = bytes.len().div_ceil(Self::ERASE_SIZE);
        bytes.resize(pages * Self::ERASE_SIZE, 0xFF);
        Self {
            bytes,
            reads: 0,
            writes: 0,
            erases: 0,
            page_erases: vec![0; pages],
            ops: 0,
            cut_at: None,
            powered: true,
        }
    }

    /// Arms a power cut: of the write and erase calls from now on, the one numbered `n`
    /// (counting from 0) is torn and everything after it fails.
    pub fn cut_after(&mut self, n: u64) {
        self.cut_at = Some(self.ops + n);
    }

    /// Whether an armed cut has happened.
    pub fn power_lost(&self) -> bool {
        !self.powered
    }

    /// Number of write and erase calls (the operations a cut can hit).
    pub fn ops(&self) -> u64 {
        self.ops
    }

    /// Counts an operation; `Ok(true)` when it is the one to tear.
    fn begin_op(&mut self) -> Result<bool, SimFlashError> {
        if !self.powered {
            return Err(SimFlashError::PowerLost);
        }
        let torn = self.cut_at == Some(self.ops);
        self.ops += 1;
        if torn {
            self.powered = false;
        }
        Ok(torn)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Number of `read` calls.
    pub fn reads(&self) -> u64 {
        self.reads
    }

    /// Number of `write` calls.
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// Number of pages erased in total.
    pub fn erases(&self) -> u64 {
        self.erases
    }

    /// How often each page was erased (wear).
    pub fn page_erases(&self) -> &[u32] {
        &self.page_erases
    }

    fn range(
        &self,
        offset: u32,
        len: usize,
        align: usize,
    ) -> Result<(usize, usize), SimFlashError> {
        let start = offset as usize;
        if !start.is_multiple_of(align) || !len.is_multiple_of(align) {
            return Err(SimFlashError::NotAligned);
        }
        let end = start
            .checked_add(len)
            .filter(|&e| e <= self.bytes.len())
            .ok_or(SimFlashError::OutOfBounds)?;
        Ok((start, end))
    }
}

impl ErrorType for SimFlash {
    type Error = SimFlashError;
}

impl ReadNorFlash for SimFlash {
    const READ_SIZE: usize = 1;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Self::Error> {
        if !self.powered {
            return Err(SimFlashError::PowerLost);
        }
        let (start, end) = self.range(offset, bytes.len(), Self::READ_SIZE)?;
        bytes.copy_from_slice(&self.bytes[start..end]);
        self.reads += 1;
        Ok(())
    }

    fn capacity(&self) -> usize {
        self.bytes.len()
    }
}

impl NorFlash for SimFlash {
    const WRITE_SIZE: usize = 4;
    const ERASE_SIZE: usize = 4096;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
        if to < from {
            return Err(SimFlashError::OutOfBounds);
        }
        let (start, end) = self.range(from, (to - from) as usize, Self::ERASE_SIZE)?;
        let torn = self.begin_op()?;
        for page in start / Self::ERASE_SIZE..end / Self::ERASE_SIZE {
            let at = page * Self::ERASE_SIZE;
            let half = Self::ERASE_SIZE / 2;
            let erased = match (torn, self.ops % 2) {
                (false, _) => at..at + Self::ERASE_SIZE,
                (true, 0) => at..at + half,
                (true, _) => at + half..at + Self::ERASE_SIZE,
            };
            self.bytes[erased].fill(0xFF);
            self.page_erases[page] += 1;
            self.erases += 1;
        }
        if torn {
            return Err(SimFlashError::PowerLost);
        }
        Ok(())
    }

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Self::Error> {
        let (start, end) = self.range(offset, bytes.len(), Self::WRITE_SIZE)?;
        // Check everything before changing anything, so a refused write leaves no trace.
        if let Some(i) = (start..end).find(|&i| bytes[i - start] & !self.bytes[i] != 0) {
            return Err(SimFlashError::NotErased { offset: i as u32 });
        }
        let torn = self.begin_op()?;
        self.writes += 1;
        // A torn write programs the first half of its words and stray bits of the next.
        let words = bytes.len() / Self::WRITE_SIZE;
        let done = if torn {
            words / 2 * Self::WRITE_SIZE
        } else {
            bytes.len()
        };
        for (dst, src) in self.bytes[start..start + done].iter_mut().zip(bytes) {
            *dst &= src;
        }
        if torn {
            let stray = start + done..(start + done + Self::WRITE_SIZE).min(end);
            for (dst, src) in self.bytes[stray].iter_mut().zip(&bytes[done..]) {
                *dst &= src | 0xF0;
            }
            return Err(SimFlashError::PowerLost);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erase_before_write_is_enforced() {
        let mut f = SimFlash::new(8192);
        f.write(0, &[0x0F, 0xFF, 0xFF, 0xFF]).unwrap();
        assert_eq!(
            f.write(0, &[0xF0, 0xFF, 0xFF, 0xFF]),
            Err(SimFlashError::NotErased { offset: 0 })
        );
        // Clearing more bits is allowed, as on real NOR.
        f.write(0, &[0x0E, 0xFF, 0xFF, 0xFF]).unwrap();
        assert_eq!(f.write(1, &[0; 4]), Err(SimFlashError::NotAligned));
        assert_eq!(f.write(8192, &[0; 4]), Err(SimFlashError::OutOfBounds));
        f.erase(0, 4096).unwrap();
        assert_eq!(&f.as_bytes()[..4], &[0xFF; 4]);
        assert_eq!(f.page_erases(), &[1, 0]);
        assert_eq!((f.writes(), f.erases()), (2, 1));
        let copy = SimFlash::from_bytes(f.as_bytes()[..5000].to_vec());
        assert_eq!(copy.capacity(), 8192);
    }

    #[test]
    fn a_cut_tears_one_operation_and_stops_the_rest() {
        let mut f = SimFlash::new(8192);
        f.write(0, &[0; 4]).unwrap();
        f.cut_after(1);
        f.write(4, &[0; 4]).unwrap(); // op 0 from the arming: goes through
        assert_eq!(f.write(8, &[0x00; 16]), Err(SimFlashError::PowerLost));
        // Two of four words programmed, the third has stray bits, the fourth is erased.
        assert_eq!(&f.as_bytes()[8..16], &[0; 8]);
        assert_eq!(&f.as_bytes()[16..20], &[0xF0; 4]);
        assert_eq!(&f.as_bytes()[20..24], &[0xFF; 4]);
        assert!(f.power_lost());
        assert_eq!(f.erase(4096, 8192), Err(SimFlashError::PowerLost));
        let mut buf = [0; 4];
        assert_eq!(f.read(0, &mut buf), Err(SimFlashError::PowerLost));
        assert_eq!(f.ops(), 3);

        // A torn erase leaves half of the page as it was.
        let mut f = SimFlash::from_bytes(f.as_bytes().to_vec());
        f.write(4092, &[0; 4]).unwrap();
        f.cut_after(0);
        assert_eq!(f.erase(0, 4096), Err(SimFlashError::PowerLost));
        let page = &f.as_bytes()[..4096];
        assert!(page[..2048].iter().all(|b| *b == 0xFF));
        assert_eq!(page[4092], 0);
    }
}
