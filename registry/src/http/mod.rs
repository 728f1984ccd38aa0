//! The HTTP API (see docs/interfaces.md). JSON everywhere; every error is
//! `{"error": "..."}`.

mod identities;
mod rollouts;
mod tokens;

use crate::db::{self, Db, DesiredChange, InsertOutcome, ModuleRow};
use crate::deploy::Deployer;
use crate::ingest::IngestStats;

use crate::rollout::{self, NewRollout, RolloutState};
use axum::extract::rejection::{BytesRejection, JsonRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;

use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use wpm_manifests::{
    sha256, valid_name, Action, Command, Deployment, HealthWindow, KeyPair, Sealed, Target,
};

/// Everything the handlers share.
pub struct AppState {
    pub db: Db,
    pub key: Arc<KeyPair>,
    pub token: String,
    pub deployer: Arc<Deployer>,
    pub stats: Arc<IngestStats>,
    /// Wakes the rollout controller (a rollout was created or changed).
    pub wake_controller: Arc<tokio::sync::Notify>,
    /// Counters of the embedded broker, when the registry runs one.
    pub broker_stats: Option<Arc<wpm_broker::BrokerStats>>,
    /// Repairs of what the registry retains on the broker.
    pub retained: Arc<crate::retained_guard::GuardStats>,
    pub chunk_size: u32,
    pub max_module_size: usize,
}

pub type Shared = Arc<AppState>;

/// An error answer.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl ApiError {
    fn new(status: StatusCode, msg: impl Into<String>) -> Self {
        ApiError(status, msg.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        tracing::error!(error = format!("{e:#}"), "internal error");
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// A module version that was uploaded, or 404 saying how to upload it.
async fn published_module(
    state: &Shared,
    name: &str,
    version: &str,
) -> ApiResult<crate::db::ModuleRow> {
    state.db.module(name, version).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no module {name}@{version}: upload it first (PUT /v1/modules/{name}/{version})"
            ),
        )
    })
}

pub fn router(state: Shared) -> Router {
    let authed = Router::new()
        .route("/v1/modules", get(list_modules))
        .route("/v1/modules/{name}/{version}", put(upload_module))
        .route("/v1/deployments", get(list_deployments).post(deploy))
        .route("/v1/fleet/status", get(fleet_status))
        .route(
            "/v1/devices",
            get(identities::list)
                .post(identities::register)
                .layer(DefaultBodyLimit::max(identities::MAX_REGISTRATION_BODY)),
        )
        .route(
            "/v1/devices/{id}",
            axum::routing::delete(identities::remove),
        )
        .route("/v1/devices/{id}/revoke", post(identities::revoke))
        .route("/v1/devices/{id}/events", get(device_events))
        .route("/v1/devices/{id}/commands", post(device_command))
        .route(
            "/v1/rollouts",
            get(rollouts::list_rollouts).post(rollouts::create_rollout),
        )
        .route("/v1/rollouts/{id}", get(rollouts::get_rollout))
        .route("/v1/rollouts/{id}/{action}", post(rollouts::rollout_action))
        .route("/v1/tokens", get(tokens::list).post(tokens::create))
        .route("/v1/tokens/{id}/revoke", post(tokens::revoke))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            tokens::auth,
        ));
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/keys", get(public_keys))
        .merge(authed)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        // The upload handler enforces the real limit with a JSON answer; this one only
        // keeps a client from streaming unbounded bodies into memory.
        .layer(DefaultBodyLimit::max(state.max_module_size + 1))
        .with_state(state)
}

async fn health(State(state): State<Shared>) -> Json<Value> {
    let s = &state.stats;
    let broker = state.broker_stats.as_ref().map(|b| {
        let (received, received_bytes) = b.received();
        let (delivered, delivered_bytes) = b.delivered();
        let dropped: serde_json::Map<String, Value> = b
            .dropped()
            .into_iter()
            .map(|(r, n)| (r.as_str().to_string(), json!(n)))
            .collect();
        json!({
            "received": received,
            "received_bytes": received_bytes,
            "delivered": delivered,
            "delivered_bytes": delivered_bytes,
            "dropped": dropped,
            "refused": {
                "logins": b.refused_logins.load(Ordering::Relaxed),
                "subscribes": b.refused_subscribes.load(Ordering::Relaxed),
            },
        })
    });
    let refused: serde_json::Map<String, Value> = s
        .refused()
        .into_iter()
        .map(|(r, n)| (r.as_str().to_string(), json!(n)))
        .collect();
    Json(json!({
        "ok": true,
        "ingest": {
            "received": s.received.load(Ordering::Relaxed),
            "redelivered": s.redelivered.load(Ordering::Relaxed),
            "retained": s.retained.load(Ordering::Relaxed),
            "written": s.written.load(Ordering::Relaxed),
            "refused": refused,
            "pending": s.pending(),
            "write_retries": s.write_retries.load(Ordering::Relaxed),
        },
        "broker": broker,
        "retained": {
            "repaired": state.retained.repaired.load(Ordering::Relaxed),
        },
    }))
}

async fn public_keys(State(state): State<Shared>) -> Json<Value> {
    Json(json!({ "public_key": hex::encode(state.key.public()) }))
}

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

async fn list_modules(State(state): State<Shared>) -> ApiResult<Json<Value>> {
    let modules = state.db.modules().await?;
    Ok(Json(Value::Array(
        modules.iter().map(module_json).collect(),
    )))
}

#[derive(Deserialize)]
struct UploadParams {
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

async fn upload_module(
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployRequest {
    module: String,
    version: String,
    group: Option<String>,
    device: Option<String>,
    /// Health window asked of the new version (turns, seconds); default 3 turns.
    health_turns: Option<u32>,
    health_seconds: Option<u32>,
}

/// The health window of a request: `None` when it names neither part.
fn health_window(turns: Option<u32>, seconds: Option<u32>) -> ApiResult<Option<HealthWindow>> {
    if turns.is_none() && seconds.is_none() {
        return Ok(None);
    }
    let w = HealthWindow {
        turns: turns.unwrap_or(HealthWindow::DEFAULT.turns),
        seconds: seconds.unwrap_or(HealthWindow::DEFAULT.seconds),
    };
    if w.turns == 0 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "health_turns must be at least 1: a new version must run before it is confirmed",
        ));
    }
    Ok(Some(w))
}

fn target_json(t: &Target) -> Value {
    match t {
        Target::Fleet => json!({ "kind": "fleet" }),
        Target::Group(g) => json!({ "kind": "group", "name": g }),
        Target::Device(d) => json!({ "kind": "device", "name": d }),
    }
}

fn deployment_json(d: &Deployment, created_at_ms: Option<i64>) -> Value {
    let mut v = json!({
        "sequence": d.sequence,
        "target": target_json(&d.target),
        "modules": d.modules.iter().map(|m| json!({
            "name": m.name,
            "version": m.version,
            "sha256": hex::encode(*m.sha256),
        })).collect::<Vec<_>>(),
        "issued_at": d.issued_at,
        "expires_at": d.expires_at,
        "health": d.health.unwrap_or(HealthWindow::DEFAULT),
    });
    if let Some(c) = created_at_ms {
        v["created_at_ms"] = json!(c);
    }
    v
}

async fn deploy(
    State(state): State<Shared>,
    body: Result<Json<DeployRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let Json(req) = body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let target = match (req.group, req.device) {
        (Some(_), Some(_)) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "give either \"group\" or \"device\", not both",
            ))
        }
        (Some(g), None) => Target::Group(g),
        (None, Some(d)) => Target::Device(d),
        (None, None) => Target::Fleet,
    };
    if let Target::Group(n) | Target::Device(n) = &target {
        if !valid_name(n) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("invalid target name {n:?}"),
            ));
        }
    }
    let module = published_module(&state, &req.module, &req.version).await?;

    let health = health_window(req.health_turns, req.health_seconds)?;
    let (deployment, row) = state
        .deployer
        .deploy(&target, &DesiredChange::Set(module.clone()), health)
        .await?;
    tracing::info!(sequence = row.sequence, target = ?target, module = %module.name, version = %module.version, "deployed");
    Ok((
        StatusCode::CREATED,
        Json(deployment_json(&deployment, Some(row.created_at))),
    ))
}

#[derive(Deserialize)]
struct LimitParam {
    limit: Option<i64>,
}

async fn list_deployments(
    State(state): State<Shared>,
    Query(p): Query<LimitParam>,
) -> ApiResult<Json<Value>> {
    let rows = state
        .db
        .deployments(p.limit.unwrap_or(100).clamp(1, 10_000))
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        // Our own database: the envelope is decoded, not verified (the key may have
        // been rotated since).
        let sealed: Sealed = wpm_manifests::decode(&r.sealed)
            .map_err(|e| anyhow::anyhow!("stored deployment {} is corrupt: {e}", r.sequence))?;
        let d: Deployment = wpm_manifests::decode(&sealed.body)
            .map_err(|e| anyhow::anyhow!("stored deployment {} is corrupt: {e}", r.sequence))?;
        out.push(deployment_json(&d, Some(r.created_at)));
    }
    Ok(Json(Value::Array(out)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FleetFilter {
    group: Option<String>,
    module: Option<String>,
    /// `online`, `offline` or `failing`.
    state: Option<String>,
    /// Only the summary, no device list (for large fleets).
    #[serde(default)]
    summary_only: bool,
}

async fn fleet_status(
    State(state): State<Shared>,
    filter: Result<Query<FleetFilter>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(f) = filter.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    if let Some(s) = f.state.as_deref() {
        if !["online", "offline", "failing"].contains(&s) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("unknown state {s:?}: use online, offline or failing"),
            ));
        }
    }
    let filter = db::FleetFilter {
        group: f.group,
        module: f.module,
        state: f.state,
    };
    let s = state.db.fleet_summary(&filter).await?;
    let versions: serde_json::Map<String, Value> = s
        .versions
        .iter()
        .map(|v| {
            (
                format!("{}@{}", v.name, v.version),
                json!({ "devices": v.devices, "running": v.running }),
            )
        })
        .collect();
    let summary = json!({
        "devices": s.devices,
        "online": s.online,
        "offline": s.devices - s.online,
        "failing": s.failing,
        "versions": versions,
    });
    if f.summary_only {
        return Ok(Json(json!({ "summary": summary })));
    }
    let devices: Vec<Value> = state
        .db
        .fleet(&filter)
        .await?
        .iter()
        .map(|d| {
            json!({
                "device": d.id,
                "groups": d.groups,
                "online": d.online,
                "last_seen_ms": d.last_seen,
                "sequence": d.sequence,
                "slots_used": d.slots_used,
                "slots_total": d.slots_total,
                "flash_free": d.flash_free,
                "ram_free": d.ram_free,
                "last_error": d.last_error,
                "modules": d.modules.iter().map(|m| json!({
                    "name": m.name,
                    "version": m.version,
                    "sha256": hex::encode(&m.sha256),
                    "state": m.state,
                    "last_error": m.last_error,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(Json(json!({ "summary": summary, "devices": devices })))
}

fn check_device_id(id: &str) -> ApiResult<()> {
    if valid_name(id) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid device id {id:?}"),
        ))
    }
}

/// How long a lifecycle command stays valid: long enough for a device on a slow link,
/// short enough that a captured command is useless soon after.
pub const COMMAND_TTL_SECS: u64 = 300;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandRequest {
    action: String,
    module: String,
}

async fn device_command(
    State(state): State<Shared>,
    Path(id): Path<String>,
    body: Result<Json<CommandRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    check_device_id(&id)?;
    let Json(req) = body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    if !valid_name(&req.module) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid module name {:?}", req.module),
        ));
    }
    let action = match req.action.as_str() {
        "start" => Action::Start(req.module),
        "stop" => Action::Stop(req.module),
        "pin" => Action::Pin(req.module),
        "unpin" => Action::Unpin(req.module),
        "evict" => Action::Evict(req.module),
        other => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("unknown action {other:?}: use start, stop, pin, unpin or evict"),
            ))
        }
    };
    let sequence = state.db.next_sequence().await?;
    let issued_at = db::now_ms() as u64 / 1000;
    let command = Command {
        device: id.clone(),
        sequence,
        issued_at,
        expires_at: issued_at + COMMAND_TTL_SECS,
        action,
    };
    state
        .deployer
        .publisher
        .publish_command(&id, state.key.seal(&command))
        .await?;
    tracing::info!(device = %id, sequence, action = command.action.verb(), module = command.action.module(), "command sent");
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "sequence": sequence, "expires_at": command.expires_at })),
    ))
}

async fn device_events(
    State(state): State<Shared>,
    Path(id): Path<String>,
    Query(p): Query<LimitParam>,
) -> ApiResult<Json<Value>> {
    check_device_id(&id)?;
    let events = state
        .db
        .events(&id, p.limit.unwrap_or(100).clamp(1, 10_000))
        .await?;
    Ok(Json(Value::Array(
        events
            .iter()
            .map(|e| {
                json!({
                    "at_ms": e.at_ms,
                    "kind": e.kind,
                    "detail": serde_json::from_str::<Value>(&e.detail).unwrap_or(Value::Null),
                })
            })
            .collect(),
    )))
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
