//! What an evicted module's state is, and how the device makes all of it readable.
//!
//! # Contract
//!
//! A module is snapshotted only **at a call boundary**: no `wpm_init`, `wpm_tick` or
//! `wpm_takeover` call of it is in progress (none paused by fuel either). There its whole
//! state is its linear memory and its mutable globals; the wasm value stack and call
//! frames are empty. A module paused mid-call by fuel is not a candidate for eviction:
//! wasmi's call stack cannot be serialized, so the scheduler waits for the call to
//! return (at most [`crate::runtime::MAX_SLICES_PER_CALL`] turns) and evicts it then.
//!
//! Mutable globals that a module does not export (LLVM's `__stack_pointer` is the usual
//! one) cannot be read through wasmi's API. So before compiling a module the device
//! rewrites its export section ([`expose_state`]): every mutable global not exported
//! yet is exported as `wpm:g<index>` and an unexported memory as `wpm:memory`. Nothing
//! else changes (no code is touched, function and global indices stay the same), and
//! the module's sha256 is checked on the bytes as published, before the rewrite.
//!
//! Not captured, so not supported in evictable modules: tables changed at run time
//! (`table.set`/`table.grow`) and reference-typed mutable globals (their snapshot fails
//! and the module is simply not evicted). A start function runs again when a snapshot
//! is restored (the module is instantiated afresh, then overwritten); its host calls are
//! dropped.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use minicbor::bytes::ByteVec;
use minicbor::{Decode, Encode};
use wasmparser::{BinaryReader, ExportSectionReader, ExternalKind, GlobalSectionReader};
use wasmparser::{ImportSectionReader, MemorySectionReader, TypeRef};

/// Name prefix of the exports [`expose_state`] adds.
pub const EXPOSED: &str = "wpm:";

/// A global's value, by its bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub enum Value {
    #[n(0)]
    I32(#[n(0)] i32),
    #[n(1)]
    I64(#[n(0)] i64),
    #[n(2)]
    F32(#[n(0)] u32),
    #[n(3)]
    F64(#[n(0)] u64),
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct SavedGlobal {
    #[n(0)]
    pub name: String,
    #[n(1)]
    pub value: Value,
}

/// A module's state at a call boundary. Encoded as CBOR for the RAM pool and flash.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Snapshot {
    /// Size of the linear memory in bytes (0: no memory).
    #[n(0)]
    pub memory_size: u32,
    /// The memory's bytes up to its last non-zero byte; the rest is zero.
    #[n(1)]
    pub memory: ByteVec,
    /// Every exported mutable global, by export name.
    #[n(2)]
    pub globals: Vec<SavedGlobal>,
    /// Health-check turns the module had passed, so a restored candidate keeps count.
    #[n(3)]
    pub turns: u32,
}

fn leb(mut n: u32, out: &mut Vec<u8>) {
    loop {
        let byte = (n & 0x7F) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn read_leb(bytes: &[u8], at: &mut usize) -> Result<u32, String> {
    let mut reader = BinaryReader::new(&bytes[*at..], *at);
    let n = reader.read_var_u32().map_err(|e| format!("{e}"))?;
    *at += reader.current_position();
    Ok(n)
}

const EXPORT_SECTION: u8 = 7;
/// Sections that come after the export section in a module.
const AFTER_EXPORTS: [u8; 5] = [8, 9, 10, 11, 12];

/// End of the contents of the section `id` (which is there).
fn r_end(sections: &[(u8, usize, core::ops::Range<usize>)], id: u8) -> usize {
    (sections.iter())
        .find(|(i, ..)| *i == id)
        .map_or(0, |(_, _, r)| r.end)
}

/// `wasm` with every unexported mutable global and an unexported memory 0 exported (see
/// the module docs). Returns the bytes unchanged when nothing is hidden.
pub fn expose_state(wasm: &[u8]) -> Result<Vec<u8>, String> {
    let bad = |e: wasmparser::BinaryReaderError| format!("invalid module: {e}");
    if wasm.len() < 8 {
        return Err("invalid module: too short".into());
    }
    // Top-level walk: (id, start of the section header, contents range).
    let mut sections = Vec::new();
    let mut at = 8;
    while at < wasm.len() {
        let header = at;
        let id = wasm[at];
        at += 1;
        let size = read_leb(wasm, &mut at)? as usize;
        let end = at
            .checked_add(size)
            .filter(|e| *e <= wasm.len())
            .ok_or("invalid module: section past the end")?;
        sections.push((id, header, at..end));
        at = end;
    }
    let contents = |id: u8| {
        (sections.iter())
            .find(|(i, ..)| *i == id)
            .map(|(_, _, r)| BinaryReader::new(&wasm[r.clone()], r.start))
    };
    let (mut globals_before, mut memories) = (0u32, 0u32);
    if let Some(r) = contents(2) {
        for import in ImportSectionReader::new(r).map_err(bad)? {
            match import.map_err(bad)?.ty {
                TypeRef::Global(_) => globals_before += 1,
                TypeRef::Memory(_) => memories += 1,
                _ => {}
            }
        }
    }
    if let Some(r) = contents(5) {
        memories += MemorySectionReader::new(r).map_err(bad)?.count();
    }
    let mut mutable = Vec::new();
    if let Some(r) = contents(6) {
        for (i, global) in GlobalSectionReader::new(r)
            .map_err(bad)?
            .into_iter()
            .enumerate()
        {
            if global.map_err(bad)?.ty.mutable {
                mutable.push(globals_before + i as u32);
            }
        }
    }
    let mut entries = Vec::new();
    let mut count = 0;
    let mut memory_exported = false;
    if let Some(r) = contents(EXPORT_SECTION) {
        let reader = ExportSectionReader::new(r).map_err(bad)?;
        count = reader.count();
        let first = reader.original_position();
        for export in reader {
            let export = export.map_err(bad)?;
            match export.kind {
                ExternalKind::Global => mutable.retain(|g| *g != export.index),
                ExternalKind::Memory if export.index == 0 => memory_exported = true,
                _ => {}
            }
        }
        entries.extend_from_slice(&wasm[first..r_end(&sections, EXPORT_SECTION)]);
    }
    let mut add = |name: &str, kind: u8, index: u32| {
        leb(name.len() as u32, &mut entries);
        entries.extend_from_slice(name.as_bytes());
        entries.push(kind);
        leb(index, &mut entries);
        count += 1;
    };
    for g in &mutable {
        add(&format!("{EXPOSED}g{g}"), 0x03, *g);
    }
    if memories > 0 && !memory_exported {
        add(&format!("{EXPOSED}memory"), 0x02, 0);
    }
    if mutable.is_empty() && (memories == 0 || memory_exported) {
        return Ok(wasm.to_vec());
    }
    let mut body = Vec::with_capacity(entries.len() + 5);
    leb(count, &mut body);
    body.extend_from_slice(&entries);
    let mut section = alloc::vec![EXPORT_SECTION];
    leb(body.len() as u32, &mut section);
    section.extend_from_slice(&body);
    // Replace the export section, or insert one where the section order wants it.
    let mut out = Vec::with_capacity(wasm.len() + section.len());
    let (cut, resume) = match sections.iter().find(|(i, ..)| *i == EXPORT_SECTION) {
        Some((_, header, range)) => (*header, range.end),
        None => {
            let next = sections.iter().find(|(i, ..)| AFTER_EXPORTS.contains(i));
            let at = next.map_or(wasm.len(), |(_, header, _)| *header);
            (at, at)
        }
    };
    out.extend_from_slice(&wasm[..cut]);
    out.extend_from_slice(&section);
    out.extend_from_slice(&wasm[resume..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hidden_globals_and_memory_are_exported_once() {
        let wasm = wat::parse_str(
            r#"(module
                (import "wpm" "g" (global i32))
                (memory 1)
                (global $sp (mut i32) (i32.const 1024))
                (global $k i32 (i32.const 7))
                (global $shown (mut i64) (i64.const 0))
                (export "shown" (global $shown))
                (func (export "f") (global.set $sp (i32.const 5))))"#,
        )
        .unwrap();
        let out = expose_state(&wasm).unwrap();
        let mut exports = Vec::new();
        for payload in wasmparser::Parser::new(0).parse_all(&out) {
            if let wasmparser::Payload::ExportSection(r) = payload.unwrap() {
                for e in r {
                    let e = e.unwrap();
                    exports.push((String::from(e.name), e.index));
                }
            }
        }
        assert_eq!(
            exports,
            [
                ("shown".into(), 3),
                ("f".into(), 0),
                ("wpm:g1".into(), 1),
                ("wpm:memory".into(), 0)
            ]
        );
        // Already exposed: left as it is.
        assert_eq!(expose_state(&out).unwrap(), out);
        // No export section at all: one is inserted before the code.
        let bare = wat::parse_str("(module (global (mut f32) (f32.const 1)) (func))").unwrap();
        let out = expose_state(&bare).unwrap();
        assert!(wasmi::Module::new(&wasmi::Engine::default(), &out).is_ok());
        assert_ne!(out, bare);
    }
}
