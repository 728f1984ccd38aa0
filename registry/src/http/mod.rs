//! The HTTP API (see docs/interfaces.md). JSON everywhere; every error is
//! `{"error": "..."}`.

mod identities;
mod keys;
mod modules;
mod rollouts;
mod tokens;

pub use modules::{validate_wasm, DeclaredMemory};

use crate::db::{self, Db, DesiredChange};
use crate::deploy::Deployer;
use crate::ingest::IngestStats;
use crate::rollout::{self, NewRollout, RolloutState};
use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use wpm_manifests::{valid_name, Action, Command, Deployment, HealthWindow, Sealed, Target};

/// Everything the handlers share.
pub struct AppState {
    pub db: Db,
    pub signer: Arc<crate::signer::Signer>,
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
        .route("/v1/modules", get(modules::list_modules))
        .route("/v1/modules/{name}/{version}", put(modules::upload_module))
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
        .route("/v1/keys/rotate", post(keys::rotate))
        .route("/v1/keys/retire", post(keys::retire))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            tokens::auth,
        ));
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/keys", get(keys::show))
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
        .publish_command(&id, state.signer.key().seal(&command))
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
