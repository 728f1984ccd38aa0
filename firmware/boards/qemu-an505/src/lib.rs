//! Board support for QEMU's mps2-an505 (Cortex-M33, the nRF9160's core).
//!
//! # Memory map (Secure aliases)
//!
//! ```text
//! 0x1000_0000  1 MiB    image (SSRAM-0; QEMU loads the ELF here and reads the vectors)
//! 0x1010_0000  512 KiB  module store: RAM-backed NOR flash, see [`RamNorFlash`]
//! 0x1018_0000  4 KiB    provisioning record (loaded with -device loader,addr=0x10180000)
//! 0x3800_0000  192 KiB  RAM (SSRAM-1), the same as the nRF9160 application gets
//! 0x5000_0000           CMSDK timer 0 (netdevice: 1 kHz tick of the embassy time driver)
//! 0x5200_0000           LAN9118 Ethernet controller (netdevice, see wpm-lan9118)
//! ```
//!
//! The AN505 has no flash controller, so the module store is a region of SSRAM-0 with
//! NOR-flash rules enforced in software (erase sets 0xFF, a write may only clear bits,
//! 4-byte writes, 4 KiB erase pages: those of the nRF9160's NVMC). The store code on top
//! of it is the one that runs on the nRF9160's NVMC.
#![no_std]

extern crate alloc;

use core::sync::atomic::{AtomicU32, Ordering};
use cortex_m::peripheral::syst::SystClkSource;
use cortex_m_rt::exception;
use embedded_storage::nor_flash::{
    ErrorType, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash,
};

pub use cortex_m_semihosting::{hprint, hprintln};

pub const STORE_ADDR: usize = 0x1010_0000;
pub const STORE_SIZE: usize = 512 * 1024;
pub const PROVISIONING_ADDR: usize = 0x1018_0000;
pub const PROVISIONING_SIZE: usize = 4096;

/// Instructions per SysTick tick under `-icount shift=0` (1 ns per instruction, SysTick
/// at the 20 MHz core clock; TARGET-FACTS).
pub const INSTRUCTIONS_PER_TICK: u64 = 50;
/// Tick rate of the virtual clock.
pub const TICKS_PER_MS: u64 = 20_000;

#[global_allocator]
static HEAP: embedded_alloc::LlffHeap = embedded_alloc::LlffHeap::empty();

/// Heap for everything the device core allocates, wasmi slots included. What is left
/// of the 192 KiB of RAM after .data/.bss and the stack.
pub const HEAP_SIZE: usize = 160 * 1024;

/// Sets up the heap and the instruction counter. Call once, first thing.
pub fn init() {
    use core::mem::MaybeUninit;
    static mut HEAP_MEM: [MaybeUninit<u8>; HEAP_SIZE] = [MaybeUninit::uninit(); HEAP_SIZE];
    // SAFETY: `init` runs once; HEAP_MEM is used by nothing else.
    init_heap(unsafe { &mut *core::ptr::addr_of_mut!(HEAP_MEM) });
    let mut p = cortex_m::Peripherals::take().expect("init called twice");
    start_counter(&mut p.SYST);
}

/// Hands `mem` to the global allocator. Call once, before any allocation (a binary that
/// needs RAM for other statics gives a smaller heap than [`init`]'s).
pub fn init_heap(mem: &'static mut [core::mem::MaybeUninit<u8>]) {
    // SAFETY: called once before any allocation; `mem` is ours for good.
    unsafe { HEAP.init(mem.as_mut_ptr() as usize, mem.len()) }
}

/// Starts SysTick as the free-running counter behind [`ticks`].
pub fn start_counter(syst: &mut cortex_m::peripheral::SYST) {
    syst.set_clock_source(SystClkSource::Core);
    syst.set_reload(0x00FF_FFFF);
    syst.clear_current();
    syst.enable_interrupt();
    syst.enable_counter();
}

/// Heap bytes in use now.
pub fn heap_used() -> usize {
    HEAP.used()
}

static WRAPS: AtomicU32 = AtomicU32::new(0);

#[exception]
fn SysTick() {
    WRAPS.fetch_add(1, Ordering::Relaxed);
}

/// SysTick ticks since [`init`]: a 24-bit down-counter extended by its wrap count.
pub fn ticks() -> u64 {
    loop {
        let before = WRAPS.load(Ordering::Relaxed);
        let current = cortex_m::peripheral::SYST::get_current();
        // Read inside an interrupt handler or a critical section, the counter may have
        // wrapped without the SysTick handler having counted it yet: it is pending then,
        // and the counter has just been reloaded (high). Counting that wrap here keeps
        // the clock monotonic (the embassy time driver of `netdevice` relies on it).
        let uncounted = cortex_m::peripheral::SCB::is_pendst_pending() && current > 0x0080_0000;
        // A wrap between the two reads would pair a new counter value with an old wrap
        // count; read again then.
        if WRAPS.load(Ordering::Relaxed) == before {
            let wraps = before as u64 + uncounted as u64;
            return (wraps << 24) + (0x00FF_FFFF - current) as u64;
        }
    }
}

/// Guest instructions executed since [`init`] (resolution: one tick, 50 instructions).
pub fn instructions() -> u64 {
    ticks() * INSTRUCTIONS_PER_TICK
}

/// Milliseconds of virtual time since [`init`].
pub fn uptime_ms() -> u64 {
    ticks() / TICKS_PER_MS
}

/// Ends the QEMU run with an exit code the host sees.
pub fn exit(success: bool) -> ! {
    use cortex_m_semihosting::debug;
    debug::exit(if success {
        debug::EXIT_SUCCESS
    } else {
        debug::EXIT_FAILURE
    });
    // Without semihosting (real hardware) there is nothing to return to.
    loop {
        cortex_m::asm::wfi();
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    hprintln!("PANIC: {}", info);
    exit(false)
}

/// The provisioning page.
pub fn provisioning_region() -> &'static [u8] {
    // SAFETY: the region is SSRAM that only QEMU's loader writes, before reset.
    unsafe { core::slice::from_raw_parts(PROVISIONING_ADDR as *const u8, PROVISIONING_SIZE) }
}

/// A NOR flash made of RAM, with the nRF9160 NVMC's geometry and rules.
pub struct RamNorFlash {
    base: *mut u8,
    size: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RamNorFlashError {
    OutOfBounds,
    NotAligned,
    /// A write would have to set a bit that is 0: real NOR flash cannot, it needs an
    /// erase first. Caught here so a store bug shows on QEMU as it would on the device.
    WriteNotErased,
}

impl NorFlashError for RamNorFlashError {
    fn kind(&self) -> NorFlashErrorKind {
        match self {
            RamNorFlashError::OutOfBounds => NorFlashErrorKind::OutOfBounds,
            RamNorFlashError::NotAligned => NorFlashErrorKind::NotAligned,
            RamNorFlashError::WriteNotErased => NorFlashErrorKind::Other,
        }
    }
}

impl RamNorFlash {
    /// The board's module store region.
    ///
    /// # Safety
    /// At most one `RamNorFlash` may exist for the region at a time.
    pub unsafe fn store_region() -> Self {
        Self {
            base: STORE_ADDR as *mut u8,
            size: STORE_SIZE,
        }
    }

    /// Erases the whole region, as a factory-fresh flash.
    pub fn erase_all(&mut self) {
        // SAFETY: the region belongs to self.
        unsafe { core::ptr::write_bytes(self.base, 0xFF, self.size) }
    }

    fn check(&self, offset: u32, len: usize, align: usize) -> Result<(), RamNorFlashError> {
        let offset = offset as usize;
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return Err(RamNorFlashError::OutOfBounds);
        }
        if offset % align != 0 || len % align != 0 {
            return Err(RamNorFlashError::NotAligned);
        }
        Ok(())
    }
}

impl ErrorType for RamNorFlash {
    type Error = RamNorFlashError;
}

impl ReadNorFlash for RamNorFlash {
    const READ_SIZE: usize = 1;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Self::Error> {
        self.check(offset, bytes.len(), 1)?;
        // SAFETY: bounds checked above; the region belongs to self.
        unsafe {
            core::ptr::copy_nonoverlapping(
                self.base.add(offset as usize),
                bytes.as_mut_ptr(),
                bytes.len(),
            )
        };
        Ok(())
    }

    fn capacity(&self) -> usize {
        self.size
    }
}

impl NorFlash for RamNorFlash {
    const WRITE_SIZE: usize = 4;
    const ERASE_SIZE: usize = 4096;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
        if to < from {
            return Err(RamNorFlashError::OutOfBounds);
        }
        self.check(from, (to - from) as usize, Self::ERASE_SIZE)?;
        // SAFETY: bounds checked above.
        unsafe { core::ptr::write_bytes(self.base.add(from as usize), 0xFF, (to - from) as usize) };
        Ok(())
    }

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Self::Error> {
        self.check(offset, bytes.len(), Self::WRITE_SIZE)?;
        // SAFETY: bounds checked above.
        let target =
            unsafe { core::slice::from_raw_parts_mut(self.base.add(offset as usize), bytes.len()) };
        if target.iter().zip(bytes).any(|(old, new)| old & new != *new) {
            return Err(RamNorFlashError::WriteNotErased);
        }
        target.copy_from_slice(bytes);
        Ok(())
    }
}

/// A recorded set of MQTT messages, as the on-target test's flash image holds them:
/// u16 topic length, topic, u32 payload length, payload; repeated.
pub struct Messages<'a>(pub &'a [u8]);

impl<'a> Iterator for Messages<'a> {
    type Item = (&'a str, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let b = self.0;
        let tlen = u16::from_le_bytes(b.get(0..2)?.try_into().ok()?) as usize;
        let topic = core::str::from_utf8(b.get(2..2 + tlen)?).ok()?;
        let at = 2 + tlen;
        let plen = u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?) as usize;
        let payload = b.get(at + 4..at + 4 + plen)?;
        self.0 = &b[at + 4 + plen..];
        Some((topic, payload))
    }
}
