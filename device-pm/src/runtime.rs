//! The wasmi side: one [`Instance`] per runtime slot, each in its own `Store` with its own
//! memory limit and fuel, and the host API of `docs/interfaces.md` (module `"wpm"`).
//!
//! A module cannot reach anything of the device but what the host API returns: host
//! calls only append to the instance's outbox, which the device drains after each call
//! into the module and turns into outputs. So a misbehaving module can at worst end
//! itself.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use wasmi::TrapCode;
use wasmi::{
    Caller, Config, Engine, Error, Extern, Linker, Memory, Module, Store, StoreLimits,
    StoreLimitsBuilder, TypedFunc,
};
use wpm_manifests::ModuleRef;

/// Largest telemetry message a module may publish.
pub const TELEMETRY_MAX: usize = 1024;
/// Telemetry messages a module may publish per scheduler turn (and during `wpm_init`).
pub const TELEMETRY_PER_TURN: u32 = 4;
/// Longer log messages are cut, so a module cannot make the device buffer much.
pub const LOG_MAX: usize = 256;

/// Something a module asked the host to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostCall {
    Log { level: u8, message: String },
    Telemetry(Vec<u8>),
}

/// The per-instance data a host function sees.
struct Host {
    limits: StoreLimits,
    now_ms: u64,
    telemetry_this_turn: u32,
    calls: Vec<HostCall>,
}

/// The engine and host API shared by every slot.
pub struct Runtime {
    engine: Engine,
    linker: Linker<Host>,
}

/// A running module.
pub struct Instance {
    store: Store<Host>,
    tick: TypedFunc<(), ()>,
    memory: Option<Memory>,
    fuel_per_turn: u64,
}

/// Why a module could not be started, with what it logged before failing.
pub struct StartFailed {
    pub reason: String,
    pub calls: Vec<HostCall>,
}

fn guest_bytes<'a>(caller: &'a Caller<'_, Host>, ptr: i32, len: i32) -> Option<&'a [u8]> {
    let memory = caller.get_export("memory").and_then(Extern::into_memory)?;
    let start = ptr as u32 as usize;
    let end = start.checked_add(len as u32 as usize)?;
    memory.data(caller).get(start..end)
}

fn host_log(mut caller: Caller<'_, Host>, level: i32, ptr: i32, len: i32) -> Result<(), Error> {
    let bytes = guest_bytes(&caller, ptr, len)
        .ok_or_else(|| Error::new("wpm.log: message out of bounds"))?;
    let bytes = &bytes[..bytes.len().min(LOG_MAX)];
    let message = String::from_utf8_lossy(bytes).into_owned();
    let level = level.clamp(0, 3) as u8;
    caller
        .data_mut()
        .calls
        .push(HostCall::Log { level, message });
    Ok(())
}

fn host_telemetry(mut caller: Caller<'_, Host>, ptr: i32, len: i32) -> i32 {
    if len as u32 as usize > TELEMETRY_MAX {
        return -1;
    }
    let Some(bytes) = guest_bytes(&caller, ptr, len).map(<[u8]>::to_vec) else {
        return -1;
    };
    let host = caller.data_mut();
    if host.telemetry_this_turn >= TELEMETRY_PER_TURN {
        return -2;
    }
    host.telemetry_this_turn += 1;
    host.calls.push(HostCall::Telemetry(bytes));
    0
}

impl Default for Runtime {
    fn default() -> Self {
        Self::new()
    }
}

impl Runtime {
    pub fn new() -> Self {
        let mut config = Config::default();
        config.consume_fuel(true).wasm_custom_page_sizes(true);
        let engine = Engine::new(&config);
        let mut linker = Linker::new(&engine);
        // The names are distinct, so defining them cannot fail.
        let _ = linker.func_wrap("wpm", "log", host_log);
        let _ = linker.func_wrap("wpm", "now_ms", |caller: Caller<'_, Host>| {
            caller.data().now_ms as i64
        });
        let _ = linker.func_wrap("wpm", "telemetry", host_telemetry);
        Self { engine, linker }
    }

    /// Compiles and instantiates `wasm` and runs its `wpm_init`, which must return 0.
    pub fn start(
        &self,
        module: &ModuleRef,
        wasm: &[u8],
        now_ms: u64,
    ) -> Result<Instance, StartFailed> {
        let limits = StoreLimitsBuilder::new()
            .memory_size(module.memory_limit as usize)
            .memories(1)
            .tables(1)
            .instances(1)
            .trap_on_grow_failure(true)
            .build();
        let host = Host {
            limits,
            now_ms,
            telemetry_this_turn: 0,
            calls: Vec::new(),
        };
        let mut store = Store::new(&self.engine, host);
        store.limiter(|host| &mut host.limits);
        match self.instantiate(&mut store, module, wasm) {
            Ok((tick, memory)) => Ok(Instance {
                store,
                tick,
                memory,
                fuel_per_turn: module.fuel_per_turn,
            }),
            Err(reason) => Err(StartFailed {
                reason,
                calls: core::mem::take(&mut store.data_mut().calls),
            }),
        }
    }

    fn instantiate(
        &self,
        store: &mut Store<Host>,
        module: &ModuleRef,
        wasm: &[u8],
    ) -> Result<(TypedFunc<(), ()>, Option<Memory>), String> {
        let compiled =
            Module::new(&self.engine, wasm).map_err(|e| format!("invalid module: {e}"))?;
        set_fuel(store, module.fuel_per_turn);
        let instance = self
            .linker
            .instantiate_and_start(&mut *store, &compiled)
            .map_err(|e| format!("instantiation failed: {}", reason(&e, module.fuel_per_turn)))?;
        let init = instance
            .get_typed_func::<(), i32>(&*store, "wpm_init")
            .map_err(|_| "missing export `wpm_init: () -> i32`".to_string())?;
        let tick = instance
            .get_typed_func::<(), ()>(&*store, "wpm_tick")
            .map_err(|_| "missing export `wpm_tick: () -> ()`".to_string())?;
        let memory = instance.get_memory(&*store, "memory");
        match init.call(&mut *store, ()) {
            Ok(0) => Ok((tick, memory)),
            Ok(code) => Err(format!("wpm_init returned {code}")),
            Err(e) => Err(format!("wpm_init: {}", reason(&e, module.fuel_per_turn))),
        }
    }
}

fn set_fuel(store: &mut Store<Host>, fuel: u64) {
    // Fuel metering is enabled on the engine, so setting fuel cannot fail.
    let _ = store.set_fuel(fuel);
}

/// A trap, in words an operator can act on.
fn reason(error: &Error, fuel_per_turn: u64) -> String {
    match error.as_trap_code() {
        Some(TrapCode::OutOfFuel) => format!("out of fuel ({fuel_per_turn} per turn)"),
        Some(TrapCode::GrowthOperationLimited) => "memory limit exceeded".to_string(),
        _ => error.to_string(),
    }
}

impl Instance {
    /// One scheduler turn: `wpm_tick` with a full turn's fuel. An error ends the module.
    pub fn tick(&mut self, now_ms: u64) -> Result<(), String> {
        let host = self.store.data_mut();
        host.now_ms = now_ms;
        host.telemetry_this_turn = 0;
        set_fuel(&mut self.store, self.fuel_per_turn);
        self.tick
            .call(&mut self.store, ())
            .map_err(|e| reason(&e, self.fuel_per_turn))
    }

    /// What the module asked of the host since the last call.
    pub fn take_calls(&mut self) -> Vec<HostCall> {
        core::mem::take(&mut self.store.data_mut().calls)
    }

    /// Bytes of linear memory the module holds now.
    pub fn memory_bytes(&self) -> usize {
        self.memory.map_or(0, |m| m.data_size(&self.store))
    }
}
