//! The wasmi side: one [`Instance`] per runtime slot, each in its own `Store` with its own
//! memory limit and fuel, and the host API of `docs/host-api.md` (module `"wpm"`).
//!
//! A module cannot reach anything of the device but what the host API returns: host
//! calls only append to the instance's outbox, which the device drains after each slice
//! and turns into outputs. So a misbehaving module can at worst end itself.
//!
//! # Execution
//!
//! Every call into a module (`wpm_init`, `wpm_takeover`, `wpm_tick`) is made with
//! `call_resumable` and the module's `fuel_per_turn`. A call that runs out of fuel is
//! paused, not failed: the scheduler resumes it on the module's next turn, so a long
//! computation takes several turns and never holds up the other slots or the network.
//! A call still running after [`MAX_SLICES_PER_CALL`] turns is an infinite loop and
//! ends the module.

use crate::snapshot::{self, SavedGlobal, Snapshot, Value};
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt::Display;
use wasmi::{
    Caller, Config, Engine, Error, Extern, Linker, Memory, Module, Mutability, Store, StoreLimits,
    StoreLimitsBuilder, TrapCode, TypedFunc, TypedResumableCall, TypedResumableCallOutOfFuel, Val,
    ValType, F32, F64,
};
use wpm_manifests::ModuleRef;

/// Turns one call may take (each with `fuel_per_turn`) before it counts as a loop.
pub const MAX_SLICES_PER_CALL: u32 = 16;
/// Nested wasm calls a module may make; deeper recursion traps instead of exhausting
/// the device's memory.
pub const MAX_RECURSION_DEPTH: usize = 256;

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

/// A call of the module paused by fuel, resumed on the next turn.
enum Paused {
    Init(TypedResumableCallOutOfFuel<i32>),
    Tick(TypedResumableCallOutOfFuel<()>),
}

/// A module in a slot.
pub struct Instance {
    store: Store<Host>,
    instance: wasmi::Instance,
    /// `wpm_init`, or `wpm_takeover` when the module took over a predecessor's state;
    /// `None` once it returned 0.
    init: Option<TypedFunc<(), i32>>,
    init_name: &'static str,
    tick: TypedFunc<(), ()>,
    memory: Option<Memory>,
    fuel_per_turn: u64,
    paused: Option<Paused>,
    /// Turns the current call has taken so far.
    slices: u32,
}

/// What one turn of a module did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slice {
    /// The call returned (for `wpm_init`: with 0); the module is at a call boundary.
    Returned,
    /// The call ran out of this turn's fuel and continues next turn.
    Paused,
}

/// Why a module could not be started, with what it logged before failing.
pub struct StartFailed {
    pub reason: String,
    pub calls: Vec<HostCall>,
}

fn guest_bytes<'a>(caller: &'a Caller<'_, Host>, ptr: i32, len: i32) -> Option<&'a [u8]> {
    let memory = (caller.get_export("memory"))
        .or_else(|| caller.get_export("wpm:memory"))
        .and_then(Extern::into_memory)?;
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

fn failed(reason: impl Display) -> StartFailed {
    StartFailed {
        reason: reason.to_string(),
        calls: Vec::new(),
    }
}

impl Runtime {
    pub fn new() -> Self {
        let mut config = Config::default();
        config
            .consume_fuel(true)
            .wasm_custom_page_sizes(true)
            .set_max_recursion_depth(MAX_RECURSION_DEPTH);
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

    /// Compiles and instantiates `wasm` (with its state exposed, see [`snapshot`]); its
    /// `wpm_init` runs on the first [`Instance::run_slice`].
    pub fn load(
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
        let wasm = snapshot::expose_state(wasm).map_err(failed)?;
        let compiled =
            Module::new(&self.engine, &wasm).map_err(|e| failed(format!("invalid module: {e}")))?;
        set_fuel(&mut store, module.fuel_per_turn);
        let instance = match self.linker.instantiate_and_start(&mut store, &compiled) {
            Ok(instance) => instance,
            Err(e) => {
                return Err(StartFailed {
                    reason: format!("instantiation failed: {}", reason(&e, module.fuel_per_turn)),
                    calls: core::mem::take(&mut store.data_mut().calls),
                })
            }
        };
        let init = instance
            .get_typed_func::<(), i32>(&store, "wpm_init")
            .map_err(|_| failed("missing export `wpm_init: () -> i32`"))?;
        let tick = instance
            .get_typed_func::<(), ()>(&store, "wpm_tick")
            .map_err(|_| failed("missing export `wpm_tick: () -> ()`"))?;
        let memory = (instance.get_memory(&store, "memory"))
            .or_else(|| instance.get_memory(&store, "wpm:memory"));
        Ok(Instance {
            store,
            instance,
            init: Some(init),
            init_name: "wpm_init",
            tick,
            memory,
            fuel_per_turn: module.fuel_per_turn,
            paused: None,
            slices: 0,
        })
    }

    /// A module continuing exactly from `snapshot`: instantiated afresh, then its memory
    /// and globals overwritten; `wpm_init` is not run again.
    pub fn restore(
        &self,
        module: &ModuleRef,
        wasm: &[u8],
        snapshot: &Snapshot,
        now_ms: u64,
    ) -> Result<Instance, StartFailed> {
        let mut instance = self.load(module, wasm, now_ms)?;
        instance.apply(snapshot, |_| true).map_err(failed)?;
        instance.init = None;
        // What a start function logged belongs to the first instantiation, not this one.
        instance.take_calls();
        Ok(instance)
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
        Some(TrapCode::StackOverflow) => {
            format!("call stack exhausted (recursion deeper than {MAX_RECURSION_DEPTH})")
        }
        _ => error.to_string(),
    }
}

/// What a resumable call came back with, the same for every result type.
enum Outcome<R, P> {
    Finished(R),
    Paused(P),
}

fn outcome<R>(
    call: Result<TypedResumableCall<R>, Error>,
    fuel: u64,
) -> Result<Outcome<R, TypedResumableCallOutOfFuel<R>>, String> {
    match call {
        Ok(TypedResumableCall::Finished(r)) => Ok(Outcome::Finished(r)),
        Ok(TypedResumableCall::OutOfFuel(paused)) => Ok(Outcome::Paused(paused)),
        // A host function failed (e.g. a bad pointer): that ends the module.
        Ok(TypedResumableCall::HostTrap(trap)) => Err(reason(trap.host_error(), fuel)),
        Err(e) => Err(reason(&e, fuel)),
    }
}

impl Instance {
    /// One scheduler turn: `fuel_per_turn` for the paused call, or for a new call of
    /// `wpm_init` (until it returned 0) or `wpm_tick`. An error ends the module.
    pub fn run_slice(&mut self, now_ms: u64) -> Result<Slice, String> {
        let host = self.store.data_mut();
        host.now_ms = now_ms;
        host.telemetry_this_turn = 0;
        let fuel = self.fuel_per_turn;
        if self.slices >= MAX_SLICES_PER_CALL {
            return Err(format!(
                "out of fuel: a call did not return within {MAX_SLICES_PER_CALL} turns of {fuel}"
            ));
        }
        set_fuel(&mut self.store, fuel);
        self.slices += 1;
        let paused = match (self.paused.take(), self.init) {
            (Some(Paused::Init(p)), _) => outcome(p.resume(&mut self.store), fuel)?,
            (None, Some(init)) => outcome(init.call_resumable(&mut self.store, ()), fuel)?,
            (Some(Paused::Tick(p)), _) => {
                let resumed = outcome(p.resume(&mut self.store), fuel)?;
                return Ok(self.tick_outcome(resumed));
            }
            (None, None) => {
                let called = outcome(self.tick.call_resumable(&mut self.store, ()), fuel)?;
                return Ok(self.tick_outcome(called));
            }
        };
        match paused {
            Outcome::Finished(0) => {
                self.init = None;
                self.slices = 0;
                Ok(Slice::Returned)
            }
            Outcome::Finished(code) => Err(format!("{} returned {code}", self.init_name)),
            Outcome::Paused(p) => {
                self.paused = Some(Paused::Init(p));
                Ok(Slice::Paused)
            }
        }
    }

    fn tick_outcome(&mut self, outcome: Outcome<(), TypedResumableCallOutOfFuel<()>>) -> Slice {
        match outcome {
            Outcome::Finished(()) => {
                self.slices = 0;
                Slice::Returned
            }
            Outcome::Paused(p) => {
                self.paused = Some(Paused::Tick(p));
                Slice::Paused
            }
        }
    }

    /// No call is in progress and `wpm_init` has returned: the only state is memory and
    /// globals, so a snapshot is complete.
    pub fn at_boundary(&self) -> bool {
        self.paused.is_none() && self.init.is_none()
    }

    /// Whether `wpm_init` (or `wpm_takeover`) has returned 0.
    pub fn initialized(&self) -> bool {
        self.init.is_none()
    }

    /// What the module asked of the host since the last call.
    pub fn take_calls(&mut self) -> Vec<HostCall> {
        core::mem::take(&mut self.store.data_mut().calls)
    }

    /// Bytes of linear memory the module holds now.
    pub fn memory_bytes(&self) -> usize {
        self.memory.map_or(0, |m| m.data_size(&self.store))
    }

    /// The module's state; only meaningful [`Instance::at_boundary`].
    pub fn snapshot(&self, turns: u32) -> Result<Snapshot, String> {
        let data = self.memory.map_or(&[][..], |m| m.data(&self.store));
        let used = data.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
        let mut globals = Vec::new();
        for export in self.instance.exports(&self.store) {
            let name = export.name();
            let Some(global) = export.into_global() else {
                continue;
            };
            if global.ty(&self.store).mutability() != Mutability::Var {
                continue;
            }
            let value = match global.get(&self.store) {
                Val::I32(v) => Value::I32(v),
                Val::I64(v) => Value::I64(v),
                Val::F32(v) => Value::F32(v.to_bits()),
                Val::F64(v) => Value::F64(v.to_bits()),
                _ => return Err(format!("global {name} holds a reference or vector")),
            };
            globals.push(SavedGlobal {
                name: name.into(),
                value,
            });
        }
        Ok(Snapshot {
            memory_size: data.len() as u32,
            memory: data[..used].to_vec().into(),
            globals,
            turns,
        })
    }

    /// Overwrites memory and the globals `keep` accepts with `snapshot`.
    fn apply(&mut self, snapshot: &Snapshot, keep: impl Fn(&str) -> bool) -> Result<(), String> {
        let size = snapshot.memory_size as usize;
        match self.memory {
            Some(memory) => {
                let grow_err = |e| format!("restoring memory of {size} bytes: {e}");
                if size > memory.data_size(&self.store) && memory.size(&self.store) == 0 {
                    // MemoryType does not tell the page size; one page shows it.
                    memory.grow(&mut self.store, 1).map_err(grow_err)?;
                }
                let have = memory.data_size(&self.store);
                if size > have {
                    let page = have / memory.size(&self.store) as usize;
                    let pages = ((size - have) / page) as u64;
                    memory.grow(&mut self.store, pages).map_err(grow_err)?;
                }
                let data = memory.data_mut(&mut self.store);
                let saved = &snapshot.memory[..];
                if data.len() < saved.len() {
                    return Err("snapshot memory larger than the module's".into());
                }
                data[..saved.len()].copy_from_slice(saved);
                data[saved.len()..].fill(0);
            }
            None if size > 0 => return Err("snapshot has memory, module has none".into()),
            None => {}
        }
        for saved in snapshot.globals.iter().filter(|g| keep(&g.name)) {
            let Some(global) = self.instance.get_global(&self.store, &saved.name) else {
                continue;
            };
            let value = match saved.value {
                Value::I32(v) => Val::I32(v),
                Value::I64(v) => Val::I64(v),
                Value::F32(v) => Val::F32(F32::from_bits(v)),
                Value::F64(v) => Val::F64(F64::from_bits(v)),
            };
            // A successor may declare the name differently: only a mutable global of the
            // same type takes the value (setting an immutable one would fail the swap).
            let ty = global.ty(&self.store);
            if ty.mutability() != Mutability::Var || ty.content() != value_type(&value) {
                continue;
            }
            global
                .set(&mut self.store, value)
                .map_err(|e| format!("restoring global {}: {e}", saved.name))?;
        }
        Ok(())
    }

    /// Hot-swap with state: if this (new) version exports `wpm_takeover: () -> i32`, it
    /// gets its predecessor's memory and the globals it exports under the same name
    /// (not the `wpm:` ones, whose indices mean nothing across versions), and
    /// `wpm_takeover` runs instead of `wpm_init`. Returns whether it did.
    pub fn take_over(&mut self, predecessor: &Snapshot) -> Result<bool, String> {
        let Ok(takeover) = (self.instance).get_typed_func::<(), i32>(&self.store, "wpm_takeover")
        else {
            return Ok(false);
        };
        self.apply(predecessor, |name| !name.starts_with(snapshot::EXPOSED))?;
        self.init = Some(takeover);
        self.init_name = "wpm_takeover";
        Ok(true)
    }
}

fn value_type(v: &Val) -> ValType {
    v.ty()
}
