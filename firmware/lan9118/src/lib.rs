//! An [`embassy_net_driver::Driver`] for the SMSC LAN9118 (the MAC + PHY on Arm's MPS2
//! FPGA boards, which QEMU's `mps2-an505` models with `-nic user,model=lan9118`).
//!
//! The chip is programmed through 32-bit registers: frames go in and out through data
//! FIFOs, each with a status FIFO beside it; the MAC's own registers sit behind
//! `MAC_CSR_CMD`/`MAC_CSR_DATA`, the PHY's behind the MAC's MII registers. This driver
//! copies each frame through the FIFOs with the CPU (no DMA on these boards).
//!
//! Wake-ups come from the chip's interrupt: [`Lan9118::new`] enables the "RX status FIFO
//! level" interrupt (a frame arrived) in push-pull, active-high mode, and the board's
//! handler for that IRQ line calls [`on_interrupt`], which acknowledges it and wakes the
//! network task. Transmitting never waits: the TX data FIFO takes a whole frame as long
//! as it has room, and [`Driver::transmit`] only says "not now" when it has none (the
//! stack then polls again on its next wake-up). The link state is read from the PHY on
//! every poll.
#![no_std]

use core::cell::Cell;
use core::task::Context;
use embassy_net_driver::{Capabilities, HardwareAddress, LinkState};
use embassy_sync::waitqueue::AtomicWaker;

/// Largest Ethernet frame handled (without the FCS, which the chip adds and strips).
pub const MTU: usize = 1514;

// System control and status registers (offsets from the base address).
const RX_DATA_FIFO: usize = 0x00;
const TX_DATA_FIFO: usize = 0x20;
const RX_STATUS_FIFO: usize = 0x40;
const TX_STATUS_FIFO: usize = 0x48;
const ID_REV: usize = 0x50;
const IRQ_CFG: usize = 0x54;
const INT_STS: usize = 0x58;
const INT_EN: usize = 0x5c;
const BYTE_TEST: usize = 0x64;
const FIFO_INT: usize = 0x68;
const TX_CFG: usize = 0x70;
const HW_CFG: usize = 0x74;
const RX_DP_CTRL: usize = 0x78;
const RX_FIFO_INF: usize = 0x7c;
const TX_FIFO_INF: usize = 0x80;
const PMT_CTRL: usize = 0x84;
const MAC_CSR_CMD: usize = 0xa4;
const MAC_CSR_DATA: usize = 0xa8;

const IRQ_CFG_EN: u32 = 1 << 8;
const IRQ_CFG_POL_HIGH: u32 = 1 << 4;
const IRQ_CFG_PUSH_PULL: u32 = 1 << 0;
/// RX status FIFO level: more statuses waiting than `FIFO_INT[7:0]` (0: any).
const INT_RSFL: u32 = 1 << 3;
const HW_CFG_SRST: u32 = 1 << 0;
const PMT_CTRL_READY: u32 = 1 << 0;
const TX_CFG_TX_ON: u32 = 1 << 1;
const RX_DP_CTRL_FFWD: u32 = 1 << 31;
const CSR_BUSY: u32 = 1 << 31;
const CSR_READ: u32 = 1 << 30;

// MAC registers, reached through MAC_CSR_CMD.
const MAC_CR: u32 = 1;
const MAC_ADDRH: u32 = 2;
const MAC_ADDRL: u32 = 3;
const MII_ACC: u32 = 6;
const MII_DATA: u32 = 7;
const MAC_CR_TXEN: u32 = 1 << 3;
const MAC_CR_RXEN: u32 = 1 << 2;
const MII_BUSY: u32 = 1 << 0;
const MII_WRITE: u32 = 1 << 1;
/// The internal PHY's MII address.
const PHY_ADDR: u32 = 1;
const PHY_BCR: u32 = 0;
const PHY_BSR: u32 = 1;
const PHY_BCR_AUTONEG: u32 = 1 << 12;
const PHY_BSR_LINK: u32 = 1 << 2;

// TX command words.
const TX_CMD_A_FIRST: u32 = 1 << 13;
const TX_CMD_A_LAST: u32 = 1 << 12;

/// Why the chip could not be brought up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// BYTE_TEST did not read 0x87654321: no LAN9118 at this address, or the bus is
    /// not 32-bit little-endian.
    NotFound(u32),
    /// A reset or a MAC/PHY access did not complete.
    Timeout,
}

static WAKER: AtomicWaker = AtomicWaker::new();

/// Call from the chip's interrupt handler: acknowledges "frame arrived" and wakes the
/// network task, which then drains the RX FIFO.
///
/// # Safety
/// `base` must be the address the [`Lan9118`] was created with.
pub unsafe fn on_interrupt(base: usize) {
    // SAFETY: per the contract, a LAN9118 register; writing 1 clears only that bit.
    unsafe { core::ptr::write_volatile((base + INT_STS) as *mut u32, INT_RSFL) };
    WAKER.wake();
}

/// The controller, owned by the network stack's runner.
pub struct Lan9118 {
    base: usize,
    mac: [u8; 6],
    /// Tag of the last frame sent (the chip echoes it in the TX status).
    tag: Cell<u16>,
}

impl Lan9118 {
    /// Resets the chip at `base`, keeps the MAC address it loaded from its EEPROM (`mac`
    /// overrides it when given), starts the PHY's autonegotiation, enables MAC TX/RX and
    /// the RX interrupt. The board must route the chip's IRQ line to [`on_interrupt`].
    ///
    /// # Safety
    /// `base` must be the address of a LAN9118 that nothing else accesses.
    pub unsafe fn new(base: usize, mac: Option<[u8; 6]>) -> Result<Self, Error> {
        let mut chip = Self {
            base,
            mac: [0; 6],
            tag: Cell::new(0),
        };
        let test = chip.read(BYTE_TEST);
        if test != 0x8765_4321 {
            return Err(Error::NotFound(test));
        }
        chip.write(HW_CFG, HW_CFG_SRST);
        chip.wait(|c| c.read(HW_CFG) & HW_CFG_SRST == 0)?;
        chip.wait(|c| c.read(PMT_CTRL) & PMT_CTRL_READY != 0)?;
        let _ = chip.read(ID_REV);

        if let Some(mac) = mac {
            chip.mac_write(
                MAC_ADDRL,
                u32::from_le_bytes([mac[0], mac[1], mac[2], mac[3]]),
            )?;
            chip.mac_write(MAC_ADDRH, u32::from(mac[4]) | u32::from(mac[5]) << 8)?;
        }
        let lo = chip.mac_read(MAC_ADDRL)?.to_le_bytes();
        let hi = chip.mac_read(MAC_ADDRH)?.to_le_bytes();
        chip.mac = [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1]];

        let bcr = chip.phy_read(PHY_BCR)?;
        chip.phy_write(PHY_BCR, bcr | PHY_BCR_AUTONEG)?;
        // Perfect filtering on our address plus broadcast (for ARP); not promiscuous.
        chip.mac_write(MAC_CR, MAC_CR_TXEN | MAC_CR_RXEN)?;
        chip.write(TX_CFG, TX_CFG_TX_ON);
        // Interrupt as soon as one RX status is waiting.
        chip.write(FIFO_INT, chip.read(FIFO_INT) & !0xff);
        chip.write(INT_STS, u32::MAX);
        chip.write(INT_EN, INT_RSFL);
        chip.write(IRQ_CFG, IRQ_CFG_EN | IRQ_CFG_POL_HIGH | IRQ_CFG_PUSH_PULL);
        Ok(chip)
    }

    pub fn mac_address(&self) -> [u8; 6] {
        self.mac
    }

    fn read(&self, reg: usize) -> u32 {
        // SAFETY: `base` is the chip's (contract of `new`), `reg` one of its registers.
        unsafe { core::ptr::read_volatile((self.base + reg) as *const u32) }
    }

    fn write(&self, reg: usize, value: u32) {
        // SAFETY: as in `read`.
        unsafe { core::ptr::write_volatile((self.base + reg) as *mut u32, value) }
    }

    /// Polls `done` a bounded number of times: registers settle within microseconds
    /// on the real chip and at once on QEMU's model.
    fn wait(&self, done: impl Fn(&Self) -> bool) -> Result<(), Error> {
        for _ in 0..100_000 {
            if done(self) {
                return Ok(());
            }
        }
        Err(Error::Timeout)
    }

    fn mac_read(&self, reg: u32) -> Result<u32, Error> {
        self.wait(|c| c.read(MAC_CSR_CMD) & CSR_BUSY == 0)?;
        self.write(MAC_CSR_CMD, CSR_BUSY | CSR_READ | reg);
        self.wait(|c| c.read(MAC_CSR_CMD) & CSR_BUSY == 0)?;
        Ok(self.read(MAC_CSR_DATA))
    }

    fn mac_write(&self, reg: u32, value: u32) -> Result<(), Error> {
        self.wait(|c| c.read(MAC_CSR_CMD) & CSR_BUSY == 0)?;
        self.write(MAC_CSR_DATA, value);
        self.write(MAC_CSR_CMD, CSR_BUSY | reg);
        self.wait(|c| c.read(MAC_CSR_CMD) & CSR_BUSY == 0)
    }

    fn phy_read(&self, reg: u32) -> Result<u32, Error> {
        self.wait(|c| c.mac_read(MII_ACC).is_ok_and(|v| v & MII_BUSY == 0))?;
        self.mac_write(MII_ACC, PHY_ADDR << 11 | reg << 6 | MII_BUSY)?;
        self.wait(|c| c.mac_read(MII_ACC).is_ok_and(|v| v & MII_BUSY == 0))?;
        Ok(self.mac_read(MII_DATA)? & 0xffff)
    }

    fn phy_write(&self, reg: u32, value: u32) -> Result<(), Error> {
        self.wait(|c| c.mac_read(MII_ACC).is_ok_and(|v| v & MII_BUSY == 0))?;
        self.mac_write(MII_DATA, value & 0xffff)?;
        self.mac_write(MII_ACC, PHY_ADDR << 11 | reg << 6 | MII_WRITE | MII_BUSY)?;
        self.wait(|c| c.mac_read(MII_ACC).is_ok_and(|v| v & MII_BUSY == 0))
    }

    /// RX statuses waiting (RX_FIFO_INF[23:16]).
    fn rx_waiting(&self) -> u32 {
        (self.read(RX_FIFO_INF) >> 16) & 0xff
    }

    /// Free bytes in the TX data FIFO (TX_FIFO_INF[15:0]).
    fn tx_free(&self) -> usize {
        (self.read(TX_FIFO_INF) & 0xffff) as usize
    }

    fn drain_tx_status(&self) {
        // Statuses of sent frames are not needed (the stack retransmits what is lost),
        // but a full status FIFO would stop the transmitter.
        while (self.read(TX_FIFO_INF) >> 16) & 0xff != 0 {
            let _ = self.read(TX_STATUS_FIFO);
        }
    }
}

/// A received frame still in the RX FIFO: its status has been popped, its data not.
pub struct RxToken<'a> {
    chip: &'a Lan9118,
    status: u32,
    consumed: bool,
}

impl RxToken<'_> {
    /// Frame length incl. the 4-byte FCS; the data FIFO holds it in whole words.
    fn len(&self) -> usize {
        ((self.status >> 16) & 0x3fff) as usize
    }

    /// Drops the frame's data from the FIFO, so the next status pairs with its data.
    fn discard(&self) {
        let words = self.len().div_ceil(4);
        // The datasheet asks for fast-forward only for frames of 4 words or more.
        if words >= 4 {
            self.chip.write(RX_DP_CTRL, RX_DP_CTRL_FFWD);
            let _ = self
                .chip
                .wait(|c| c.read(RX_DP_CTRL) & RX_DP_CTRL_FFWD == 0);
        } else {
            for _ in 0..words {
                let _ = self.chip.read(RX_DATA_FIFO);
            }
        }
    }
}

impl Drop for RxToken<'_> {
    fn drop(&mut self) {
        // A token the stack dropped unread still owns its frame's data.
        if !self.consumed {
            self.discard();
        }
    }
}

impl embassy_net_driver::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(mut self, f: F) -> R {
        self.consumed = true;
        let len = self.len();
        // Error summary (bit 15), or a length no valid Ethernet frame has: skip it.
        if self.status & (1 << 15) != 0 || !(18..=MTU + 4).contains(&len) {
            self.discard();
            return f(&mut []);
        }
        let mut buf = [0u8; MTU + 4 + 3];
        for word in buf[..len.div_ceil(4) * 4].chunks_exact_mut(4) {
            word.copy_from_slice(&self.chip.read(RX_DATA_FIFO).to_le_bytes());
        }
        f(&mut buf[..len - 4])
    }
}

/// Room for one frame in the TX FIFO.
pub struct TxToken<'a> {
    chip: &'a Lan9118,
}

impl embassy_net_driver::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut buf = [0u8; MTU + 3];
        let len = len.min(MTU);
        let result = f(&mut buf[..len]);
        let chip = self.chip;
        let tag = chip.tag.get().wrapping_add(1);
        chip.tag.set(tag);
        // One buffer holds the whole frame: first and last segment, 4-byte aligned,
        // no data offset; the chip pads short frames and appends the FCS.
        chip.write(TX_DATA_FIFO, TX_CMD_A_FIRST | TX_CMD_A_LAST | len as u32);
        chip.write(TX_DATA_FIFO, u32::from(tag) << 16 | len as u32);
        for word in buf[..len.div_ceil(4) * 4].chunks_exact(4) {
            chip.write(TX_DATA_FIFO, u32::from_le_bytes(word.try_into().unwrap()));
        }
        chip.drain_tx_status();
        result
    }
}

impl embassy_net_driver::Driver for Lan9118 {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, cx: &mut Context) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        // Register before looking: a frame arriving in between still wakes us.
        WAKER.register(cx.waker());
        if self.rx_waiting() == 0 {
            return None;
        }
        if self.tx_free() < MTU + 8 {
            // A frame waits but there is no room for a reply yet: look again soon (the
            // RX interrupt for this frame has been acknowledged already).
            cx.waker().wake_by_ref();
            return None;
        }
        let status = self.read(RX_STATUS_FIFO);
        // The RX and TX FIFOs are independent, so both tokens share the chip.
        Some((
            RxToken {
                chip: self,
                status,
                consumed: false,
            },
            TxToken { chip: self },
        ))
    }

    fn transmit(&mut self, cx: &mut Context) -> Option<Self::TxToken<'_>> {
        if self.tx_free() < MTU + 8 {
            // Frames leave the FIFO at wire speed; try again on the next wake-up.
            cx.waker().wake_by_ref();
            return None;
        }
        Some(TxToken { chip: self })
    }

    fn link_state(&mut self, cx: &mut Context) -> LinkState {
        match self.phy_read(PHY_BSR) {
            Ok(bsr) if bsr & PHY_BSR_LINK != 0 => LinkState::Up,
            _ => {
                // No PHY interrupt is enabled: look again soon.
                cx.waker().wake_by_ref();
                LinkState::Down
            }
        }
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities::default();
        caps.max_transmission_unit = MTU;
        caps.max_burst_size = Some(1);
        caps
    }

    fn hardware_address(&self) -> HardwareAddress {
        HardwareAddress::Ethernet(self.mac)
    }
}
