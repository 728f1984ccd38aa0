//! A networked wpm device on QEMU's mps2-an505: the same device loop as the nRF9160's
//! (`wpm-firmware-app`), over the board's LAN9118 Ethernet instead of the LTE modem.
//!
//! Boot: the provisioning record is read from the provisioning page (QEMU puts it there
//! with `-device loader,file=prov.bin,addr=0x10180000`), embassy-net comes up with the
//! static address QEMU's user-mode network expects (10.0.2.15/24, gateway 10.0.2.2), the
//! wall clock is taken from the host over semihosting, and the device connects to the
//! broker named in the record (10.0.2.2 is the host's loopback under `-nic user`).
//!
//! Run it with `-nic user,model=lan9118` and without `-icount`: the clocks then follow
//! the host's, so MQTT keep-alives and the registry's timeouts mean what they say.
//!
//! Interrupts: the LAN9118 (IRQ 48) wakes the network task when a frame arrives; the
//! CMSDK timer 0 (IRQ 3) ticks at 1 kHz and wakes expired embassy timers. SysTick stays
//! the free-running clock of `wpm_qemu_an505::ticks`.
#![no_std]
#![no_main]

extern crate alloc;

use core::cell::RefCell;
use core::fmt;
use core::mem::MaybeUninit;
use core::net::Ipv4Addr;
use core::task::Waker;
use critical_section::Mutex;
use embassy_executor::Spawner;
use embassy_net::{Ipv4Cidr, StackResources, StaticConfigV4};
use embassy_time::Instant;
use embassy_time_queue_utils::Queue;
use static_cell::StaticCell;
use wpm_firmware_app::{Board, Record, Tuning};
use wpm_lan9118::Lan9118;
use wpm_qemu_an505::{self as board, hprintln, RamNorFlash};

/// LAN9118, Secure alias (this image runs Secure, as QEMU boots it).
const ETH_BASE: usize = 0x5200_0000;
const ETH_IRQ: u16 = 48;
/// CMSDK APB timer 0 of the SSE-200, Secure alias, clocked at the 20 MHz system clock.
const TIMER0_BASE: usize = 0x5000_0000;
const TIMER0_IRQ: u16 = 3;
const SYSCLK_HZ: u32 = 20_000_000;

/// The heap the device core and its wasmi slots allocate from: the nRF9160's 128 KiB,
/// so what runs here fits there (the rest of the 192 KiB holds the network stack,
/// the tasks and the stack).
const HEAP_SIZE: usize = 128 * 1024;

#[derive(Clone, Copy)]
struct Irq(u16);

// SAFETY: the numbers are the AN505's interrupt lines (QEMU hw/arm/mps2-tz.c, armsse.c).
unsafe impl cortex_m::interrupt::InterruptNumber for Irq {
    fn number(self) -> u16 {
        self.0
    }
}

// ---- embassy time driver: SysTick as the clock, timer 0 as the 1 kHz alarm tick ----

struct Time {
    queue: Mutex<RefCell<Queue>>,
}

// The clock is in microseconds (embassy-time's default tick rate).
const _: () = assert!(embassy_time_driver::TICK_HZ == 1_000_000);

impl embassy_time_driver::Driver for Time {
    fn now(&self) -> u64 {
        // SysTick counts the 20 MHz core clock.
        board::ticks() / (SYSCLK_HZ as u64 / 1_000_000)
    }

    fn schedule_wake(&self, at: u64, waker: &Waker) {
        // The next 1 ms tick looks at the queue; a wake-up at most 1 ms late is fine
        // for MQTT timers and scheduler turns.
        critical_section::with(|cs| {
            self.queue.borrow(cs).borrow_mut().schedule_wake(at, waker);
        });
    }
}

embassy_time_driver::time_driver_impl!(static TIME: Time = Time {
    queue: Mutex::new(RefCell::new(Queue::new())),
});

fn timer0(reg: usize) -> *mut u32 {
    (TIMER0_BASE + reg) as *mut u32
}

fn start_alarm_tick() {
    // SAFETY: timer 0 is used by nothing else; CTRL=0x0, RELOAD=0x8, INTCLEAR=0xC.
    unsafe {
        timer0(0x0).write_volatile(0);
        timer0(0x8).write_volatile(SYSCLK_HZ / 1000 - 1);
        timer0(0x4).write_volatile(SYSCLK_HZ / 1000 - 1);
        timer0(0xC).write_volatile(1);
        // Enable, interrupt enable.
        timer0(0x0).write_volatile(1 | 1 << 3);
        cortex_m::peripheral::NVIC::unmask(Irq(TIMER0_IRQ));
    }
}

fn on_alarm_tick() {
    // SAFETY: acknowledges timer 0's interrupt.
    unsafe { timer0(0xC).write_volatile(1) };
    let now = embassy_time_driver::now();
    critical_section::with(|cs| {
        // Wakes every expired timer; the next is looked at on the next tick.
        TIME.queue.borrow(cs).borrow_mut().next_expiration(now);
    });
}

/// cortex-m-rt without a device crate sends every device interrupt here.
#[cortex_m_rt::exception]
unsafe fn DefaultHandler(irqn: i16) {
    match irqn as u16 {
        TIMER0_IRQ => on_alarm_tick(),
        // SAFETY: the driver was created at ETH_BASE.
        ETH_IRQ => unsafe { wpm_lan9118::on_interrupt(ETH_BASE) },
        other => panic!("unexpected interrupt {other}"),
    }
}

// ---- the device ----

struct Qemu {
    unix_ms_at_boot: u64,
}

impl Board for Qemu {
    fn unix_ms(&self) -> u64 {
        self.unix_ms_at_boot + Instant::now().as_millis()
    }

    fn log(&self, args: fmt::Arguments<'_>) {
        hprintln!("{}", args);
    }
}

#[embassy_executor::task]
async fn net_task(mut runner: embassy_net::Runner<'static, Lan9118>) -> ! {
    runner.run().await
}

/// FNV-1a of the device id: the TCP sequence seed only has to differ between devices
/// and boots (mixed with the clock below).
fn seed(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

#[embassy_executor::main]
async fn main(spawner: Spawner) {
    {
        static mut HEAP_MEM: [MaybeUninit<u8>; HEAP_SIZE] = [MaybeUninit::uninit(); HEAP_SIZE];
        // SAFETY: once, before any allocation; nothing else uses HEAP_MEM.
        board::init_heap(unsafe { &mut *core::ptr::addr_of_mut!(HEAP_MEM) });
    }
    let mut p = cortex_m::Peripherals::take().unwrap();
    board::start_counter(&mut p.SYST);
    start_alarm_tick();

    let record = match Record::decode(board::provisioning_region()) {
        Ok(r) => r,
        Err(e) => {
            hprintln!(
                "wpm: not provisioned ({:?}); load a record with -device loader,file=prov.bin,addr={:#x}",
                e,
                board::PROVISIONING_ADDR
            );
            board::exit(false)
        }
    };
    hprintln!(
        "wpm: device {} in {:?}, broker {}:{}",
        record.device_id,
        record.groups,
        record.broker_host,
        record.broker_port
    );

    // SAFETY: the only user of the LAN9118; its IRQ goes to `on_interrupt` above.
    let eth = match unsafe { Lan9118::new(ETH_BASE, None) } {
        Ok(eth) => eth,
        Err(e) => {
            hprintln!("wpm: LAN9118: {:?}", e);
            board::exit(false)
        }
    };
    // SAFETY: the handler is in place (DefaultHandler).
    unsafe { cortex_m::peripheral::NVIC::unmask(Irq(ETH_IRQ)) };
    let mac = eth.mac_address();
    hprintln!(
        "wpm: LAN9118 up, MAC {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        mac[0],
        mac[1],
        mac[2],
        mac[3],
        mac[4],
        mac[5]
    );

    // QEMU's user-mode network: the guest is 10.0.2.15, the host's loopback 10.0.2.2.
    let config = embassy_net::Config::ipv4_static(StaticConfigV4 {
        address: Ipv4Cidr::new(Ipv4Addr::new(10, 0, 2, 15), 24),
        gateway: Some(Ipv4Addr::new(10, 0, 2, 2)),
        dns_servers: Default::default(),
    });
    static RESOURCES: StaticCell<StackResources<4>> = StaticCell::new();
    let (stack, runner) = embassy_net::new(
        eth,
        config,
        RESOURCES.init(StackResources::new()),
        seed(&record.device_id) ^ board::ticks(),
    );
    spawner.spawn(net_task(runner).unwrap());

    // Deployments expire: the device needs wall time, here the host's (semihosting
    // SYS_TIME, seconds since the Unix epoch).
    // SAFETY: a semihosting call without arguments; QEMU runs with semihosting enabled.
    let unix_s = unsafe { cortex_m_semihosting::syscall!(TIME) } as u64;
    let board = Qemu {
        unix_ms_at_boot: (unix_s * 1000).saturating_sub(Instant::now().as_millis()),
    };

    // The module store is RAM that QEMU zeroes at start: format it as erased flash.
    // SAFETY: the only RamNorFlash of the store region in this program.
    let mut flash = unsafe { RamNorFlash::store_region() };
    flash.erase_all();
    // The field profile, with a status every minute so the test sees it soon.
    let tuning = Tuning {
        status_interval_ms: 60 * 1000,
        ..Tuning::NRF9160
    };
    let config = wpm_firmware_app::config(&record, tuning);
    // The nRF9160's limits (boards/nrf9160): what runs here fits there.
    let limits = wpm_device_pm::Limits {
        bank_size: 64 * 1024,
        ram_budget: 96 * 1024,
        snapshot_pool: 16 * 1024,
    };
    let device = match wpm_device_pm::Device::with_limits(config, limits, flash, board.unix_ms()) {
        Ok(d) => d,
        Err(e) => {
            hprintln!("wpm: module store: {}", e);
            board::exit(false)
        }
    };
    wpm_firmware_app::run(stack, &board, &record, &tuning, device).await
}
