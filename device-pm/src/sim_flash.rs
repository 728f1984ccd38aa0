//! A NOR flash in RAM with the nRF9160 NVMC's geometry, for host tests and the simulator.
//!
//! It is stricter than most real parts on purpose: a write that would have to turn a `0`
//! bit back into `1` fails instead of silently AND-ing, so code that forgets to erase
//! before writing fails in tests, not in the field.

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
}

impl NorFlashError for SimFlashError {
    fn kind(&self) -> NorFlashErrorKind {
        match self {
            SimFlashError::NotAligned => NorFlashErrorKind::NotAligned,
            SimFlashError::OutOfBounds => NorFlashErrorKind::OutOfBounds,
            SimFlashError::NotErased { .. } => NorFlashErrorKind::Other,
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
        }
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
        self.bytes[start..end].fill(0xFF);
        for page in start / Self::ERASE_SIZE..end / Self::ERASE_SIZE {
            self.page_erases[page] += 1;
            self.erases += 1;
        }
        Ok(())
    }

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Self::Error> {
        let (start, end) = self.range(offset, bytes.len(), Self::WRITE_SIZE)?;
        // Check everything before changing anything, so a refused write leaves no trace.
        if let Some(i) = (start..end).find(|&i| bytes[i - start] & !self.bytes[i] != 0) {
            return Err(SimFlashError::NotErased { offset: i as u32 });
        }
        for (dst, src) in self.bytes[start..end].iter_mut().zip(bytes) {
            *dst &= src;
        }
        self.writes += 1;
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
}
