//! `/v1/modules`: uploading (validated and sized here, once for every side) and listing
//! modules.

use super::{ApiError, ApiResult, Shared};
use crate::db::{self, InsertOutcome, ModuleRow};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use wpm_manifests::{sha256, valid_name};
fn module_json(m: &ModuleRow) -> Value {
    json!({
        "name": m.name,
        "version": m.version,
        "sha256": hex::encode(m.sha256),
        "size": m.size,
        "chunks": m.chunk_count(),
        "chunk_size": m.chunk_size,
        "memory_limit": m.memory_limit,
        "fuel_per_turn": m.fuel_per_turn,
        "priority": m.priority,
        "pinned": m.pinned,
        "created_at_ms": m.created_at,
    })
}

pub(super) async fn list_modules(State(state): State<Shared>) -> ApiResult<Json<Value>> {
    let modules = state.db.modules().await?;
    Ok(Json(Value::Array(
        modules.iter().map(module_json).collect(),
    )))
}

#[derive(Deserialize)]
pub(super) struct UploadParams {
    memory_limit: Option<u32>,
    fuel_per_turn: Option<u64>,
    priority: Option<u8>,
    pinned: Option<bool>,
}

/// Fuel per scheduler turn when the uploader gives none.
pub const DEFAULT_FUEL_PER_TURN: u64 = 100_000;

/// The wasm features the device runtime (wasmi 2) supports, custom page sizes included
/// (64 KiB pages do not fit a 256 KiB RAM device well).
fn wasm_features() -> wasmparser::WasmFeatures {
    use wasmparser::WasmFeatures as F;
    F::MUTABLE_GLOBAL
        | F::MULTI_VALUE
        | F::MULTI_MEMORY
        | F::SATURATING_FLOAT_TO_INT
        | F::SIGN_EXTENSION
        | F::BULK_MEMORY
        | F::REFERENCE_TYPES
        | F::GC_TYPES
        | F::TAIL_CALL
        | F::EXTENDED_CONST
        | F::FLOATS
        | F::CUSTOM_PAGE_SIZES
}

/// The first linear memory a module declares, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeclaredMemory {
    pub initial: u64,
    /// The declared maximum; the initial size where none is declared, because a device
    /// grants no more than the limit and an operator who wants growth says how much.
    pub maximum: u64,
}

/// Validates `bytes` as a module the devices can run; returns the memory it declares
/// (zero without one).
pub fn validate_wasm(bytes: &[u8]) -> Result<DeclaredMemory, String> {
    let mut v = wasmparser::Validator::new_with_features(wasm_features());
    let types = v
        .validate_all(bytes)
        // wasmparser's message can run over several lines with debug dumps of the bytes;
        // its first line and the offset say what is wrong.
        .map_err(|e| {
            format!(
                "not a WebAssembly module: {} (at byte {})",
                e.message().lines().next().unwrap_or("invalid").trim(),
                e.offset()
            )
        })?;
    if types.as_ref().memory_count() == 0 {
        return Ok(DeclaredMemory {
            initial: 0,
            maximum: 0,
        });
    }
    let m = types.as_ref().memory_at(0);
    let page = 1u64 << m.page_size_log2.unwrap_or(16);
    Ok(DeclaredMemory {
        initial: m.initial.saturating_mul(page),
        maximum: m.maximum.unwrap_or(m.initial).saturating_mul(page),
    })
}

pub(super) async fn upload_module(
    State(state): State<Shared>,
    Path((name, version)): Path<(String, String)>,
    params: Result<Query<UploadParams>, axum::extract::rejection::QueryRejection>,
    body: Result<axum::body::Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    for (what, v) in [("module name", &name), ("version", &version)] {
        if !valid_name(v) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("invalid {what} {v:?}: 1 to 64 of A-Z a-z 0-9 _ - . not starting with ."),
            ));
        }
    }
    let Query(params) =
        params.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "module larger than the limit of {} bytes",
                state.max_module_size
            ),
        )
    };
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large()
        } else {
            ApiError::new(e.status(), e.body_text())
        }
    })?;
    if body.len() > state.max_module_size {
        return Err(too_large());
    }
    let memory = validate_wasm(&body).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    let memory_limit = match params.memory_limit {
        Some(l) if u64::from(l) < memory.initial => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "memory_limit {l} is below the module's initial memory of {} bytes",
                    memory.initial
                ),
            ))
        }
        Some(l) => l,
        // Default: what the module declares, no more. Slots are carved from a device's
        // RAM by these limits, so a 1 KiB module (custom page size) must not reserve a
        // 64 KiB page.
        None => u32::try_from(memory.maximum).map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "the module's initial memory exceeds 4 GiB",
            )
        })?,
    };
    let module = ModuleRow {
        name,
        version,
        sha256: sha256(&body),
        size: body.len() as u32,
        chunk_size: state.chunk_size,
        memory_limit,
        fuel_per_turn: params.fuel_per_turn.unwrap_or(DEFAULT_FUEL_PER_TURN),
        priority: params.priority.unwrap_or(0),
        pinned: params.pinned.unwrap_or(false),
        created_at: db::now_ms(),
    };
    match state.db.insert_module(&module, &body).await? {
        InsertOutcome::Created => {
            tracing::info!(name = %module.name, version = %module.version, size = module.size, "module uploaded");
            Ok((StatusCode::CREATED, Json(module_json(&module))))
        }
        InsertOutcome::Unchanged(existing) => Ok((StatusCode::OK, Json(module_json(&existing)))),
        InsertOutcome::Conflict(existing) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "{}@{} already exists with other bytes (sha256 {}); publish a new version",
                existing.name,
                existing.version,
                hex::encode(existing.sha256)
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_wasm_and_reads_memory() {
        let empty = b"\0asm\x01\0\0\0";
        let none = DeclaredMemory {
            initial: 0,
            maximum: 0,
        };
        assert_eq!(validate_wasm(empty), Ok(none));
        // (module (memory 2))
        let mem = [
            0, 0x61, 0x73, 0x6d, 1, 0, 0, 0, 5, 3, 1, 0, 2, // memory section: 1 memory, min 2
        ];
        let two_pages = DeclaredMemory {
            initial: 2 * 65536,
            maximum: 2 * 65536,
        };
        assert_eq!(validate_wasm(&mem), Ok(two_pages));
        // A 1 KiB memory with a custom page size of 1 byte, growable to 4 KiB.
        let small = wat::parse_str("(module (memory 1024 4096 (pagesize 1)))").unwrap();
        let small_limits = DeclaredMemory {
            initial: 1024,
            maximum: 4096,
        };
        assert_eq!(validate_wasm(&small), Ok(small_limits));
        let err = validate_wasm(b"hello world").unwrap_err();
        assert!(err.starts_with("not a WebAssembly module"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }
}
