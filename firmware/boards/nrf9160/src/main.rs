//! wpm on the nRF9160 (Secure image): the LTE-M/NB-IoT modem through embassy-net-nrf91,
//! embassy-net TCP, an MQTT 5 client, the device-pm core, modules in internal flash.
//!
//! Identity, groups, trusted registry keys and the broker come from the provisioning
//! record at 0xA4000 (see memory.x and the README); nothing device-specific is compiled
//! in. Without a valid record the device halts, since it could trust nothing.
#![no_std]
#![no_main]

extern crate alloc;

use core::fmt;
use core::mem::MaybeUninit;
use core::net::IpAddr;
use cortex_m as _;
use embassy_executor::Spawner;
use embassy_net::{Ipv4Cidr, Stack, StackResources};
use embassy_net_nrf91::context;
use embassy_nrf::interrupt;
use embassy_nrf::nvmc::Nvmc;
use embassy_time::{Instant, Timer};
use static_cell::StaticCell;
use wpm_firmware_app::{Board, FlashRegion, Record, Tuning};

const PROVISIONING_ADDR: usize = 0xA4000;
const PROVISIONING_SIZE: usize = 4096;
const STORE_ADDR: u32 = 0xA5000;
const STORE_SIZE: u32 = 364 * 1024;
const IPC_ADDR: usize = 0x2000_0000;
const IPC_SIZE: usize = 64 * 1024;
/// The heap: modules' instances (wasmi) and the device core. The rest of the 192 KiB is
/// stack, .data/.bss and the network buffers.
const HEAP_SIZE: usize = 128 * 1024;

#[global_allocator]
static HEAP: embedded_alloc::LlffHeap = embedded_alloc::LlffHeap::empty();

#[interrupt]
fn IPC() {
    embassy_net_nrf91::on_ipc_irq();
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // No console on a field device: reset and boot from flash again (the store is
    // power-cut safe, so a reset is always a safe way out).
    cortex_m::peripheral::SCB::sys_reset()
}

/// Wall clock from the network, kept on the monotonic clock.
struct Nrf9160 {
    unix_ms_at_boot: u64,
}

impl Board for Nrf9160 {
    fn unix_ms(&self) -> u64 {
        self.unix_ms_at_boot + Instant::now().as_millis()
    }

    fn log(&self, _args: fmt::Arguments<'_>) {
        // Reported through the device's status/events instead; no UART is wired.
    }
}

#[embassy_executor::task]
async fn modem_task(runner: embassy_net_nrf91::Runner<'static>) -> ! {
    runner.run().await
}

#[embassy_executor::task]
async fn net_task(
    mut runner: embassy_net::Runner<'static, embassy_net_nrf91::NetDriver<'static>>,
) -> ! {
    runner.run().await
}

/// Keeps the PDN context attached and the stack's address in step with it.
#[embassy_executor::task]
async fn context_task(control: &'static context::Control<'static>, stack: Stack<'static>) -> ! {
    loop {
        let result = control
            .run(|status| {
                let Some(IpAddr::V4(ip)) = status.ip else {
                    return;
                };
                let gateway = match status.gateway {
                    Some(IpAddr::V4(g)) => Some(g),
                    _ => None,
                };
                let mut dns_servers = heapless::Vec::new();
                for d in &status.dns {
                    if let IpAddr::V4(d) = d {
                        let _ = dns_servers.push(*d);
                    }
                }
                stack.set_config_v4(embassy_net::ConfigV4::Static(embassy_net::StaticConfigV4 {
                    address: Ipv4Cidr::new(ip, 32),
                    gateway,
                    dns_servers,
                }));
            })
            .await;
        if result.is_err() {
            Timer::after_secs(10).await;
        }
    }
}

/// `+CCLK: "yy/MM/dd,hh:mm:ss±zz"` (local time, zz in quarter hours) to unix seconds.
fn parse_cclk(resp: &[u8]) -> Option<u64> {
    let s = core::str::from_utf8(resp).ok()?;
    let start = s.find('"')? + 1;
    let t = s.get(start..start + 20)?;
    let n = |a: usize| t.get(a..a + 2)?.parse::<u32>().ok();
    let utc = wpm_firmware_app::unix_seconds(2000 + n(0)?, n(3)?, n(6)?, n(9)?, n(12)?, n(15)?);
    let quarters = n(18)? as u64 * 15 * 60;
    Some(match t.as_bytes()[17] {
        b'+' => utc.checked_sub(quarters)?,
        _ => utc + quarters,
    })
}

#[embassy_executor::main]
async fn main(spawner: Spawner) {
    let p = embassy_nrf::init(Default::default());
    {
        static mut HEAP_MEM: [MaybeUninit<u8>; HEAP_SIZE] = [MaybeUninit::uninit(); HEAP_SIZE];
        // SAFETY: once, before any allocation.
        unsafe { HEAP.init(core::ptr::addr_of_mut!(HEAP_MEM) as usize, HEAP_SIZE) }
    }
    // SAFETY: the provisioning page is flash, read-only to this image.
    let region =
        unsafe { core::slice::from_raw_parts(PROVISIONING_ADDR as *const u8, PROVISIONING_SIZE) };
    let record = match Record::decode(region) {
        Ok(r) => r,
        Err(_) => loop {
            // Unprovisioned: nothing to trust, nothing to connect to.
            cortex_m::asm::wfi();
        },
    };

    // SAFETY: memory.x keeps the application out of the IPC region; only the modem
    // driver uses it.
    let ipc =
        unsafe { core::slice::from_raw_parts_mut(IPC_ADDR as *mut MaybeUninit<u8>, IPC_SIZE) };
    static STATE: StaticCell<embassy_net_nrf91::State> = StaticCell::new();
    let (driver, control, runner) =
        embassy_net_nrf91::new(STATE.init(embassy_net_nrf91::State::new()), ipc).await;
    spawner.spawn(modem_task(runner).unwrap());

    // No RNG peripheral is reachable from the application core: the TCP/DNS seed mixes
    // the device id with the RTC, which only needs to differ between devices and boots.
    let seed = wpm_manifests_seed(&record.device_id) ^ Instant::now().as_ticks();
    static RESOURCES: StaticCell<StackResources<4>> = StaticCell::new();
    let (stack, net_runner) = embassy_net::new(
        driver,
        embassy_net::Config::default(),
        RESOURCES.init(StackResources::new()),
        seed,
    );
    spawner.spawn(net_task(net_runner).unwrap());

    static CONTROL: StaticCell<context::Control<'static>> = StaticCell::new();
    let control = CONTROL.init(context::Control::new(control, 0).await);
    let apn = context::Config {
        apn: b"",
        auth_prot: context::AuthProt::None,
        auth: None,
        pin: None,
    };
    while control.configure(&apn).await.is_err() {
        Timer::after_secs(5).await;
    }
    spawner.spawn(context_task(control, stack).unwrap());

    // Deployments expire, so the device needs wall time before it acts on any: the
    // network's time (NITZ) once attached.
    stack.wait_config_up().await;
    let unix_s = loop {
        let mut resp = [0u8; 64];
        let n = control.at_command(b"AT+CCLK?", &mut resp).await;
        if let Some(t) = parse_cclk(&resp[..n]).filter(|t| *t > 1_700_000_000) {
            break t;
        }
        Timer::after_secs(5).await;
    };
    let board = Nrf9160 {
        unix_ms_at_boot: (unix_s * 1000).saturating_sub(Instant::now().as_millis()),
    };

    let flash = FlashRegion::new(Nvmc::new(p.NVMC), STORE_ADDR, STORE_SIZE);
    let tuning = Tuning::NRF9160;
    let config = wpm_firmware_app::config(&record, tuning);
    let limits = wpm_device_pm::Limits {
        bank_size: 64 * 1024,
        ram_budget: 96 * 1024,
        // Evicted modules' snapshots kept in RAM before they go to flash.
        snapshot_pool: 16 * 1024,
    };
    let device = match wpm_device_pm::Device::with_limits(config, limits, flash, board.unix_ms()) {
        Ok(d) => d,
        // A store that cannot even be formatted is a hardware fault: reset and retry.
        Err(_) => cortex_m::peripheral::SCB::sys_reset(),
    };
    wpm_firmware_app::run(stack, &board, &record, &tuning, device).await
}

/// FNV-1a of the device id.
fn wpm_manifests_seed(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}
