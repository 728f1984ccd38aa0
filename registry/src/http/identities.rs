//! `/v1/devices`: registering, listing, revoking and removing device identities.

use super::{check_device_id, ApiError, ApiResult, Shared};
use crate::db::{self, NewIdentity};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use wpm_manifests::valid_name;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RegisterRequest {
    devices: Vec<DeviceKey>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeviceKey {
    id: String,
    /// The device's ed25519 public key, 64 hex digits.
    public_key: String,
    #[serde(default)]
    groups: Vec<String>,
}

/// Largest registration in one request: an import of a whole production batch.
const MAX_DEVICES_PER_REQUEST: usize = 100_000;
/// A registration body of that many devices (id, key and a few groups each fit in 256
/// bytes of JSON).
pub(super) const MAX_REGISTRATION_BODY: usize = MAX_DEVICES_PER_REQUEST * 256;

fn bad(msg: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, msg)
}

fn parse(d: DeviceKey) -> ApiResult<NewIdentity> {
    check_device_id(&d.id)?;
    if let Some(g) = d.groups.iter().find(|g| !valid_name(g)) {
        return Err(bad(format!("device {}: invalid group {g:?}", d.id)));
    }
    let key: [u8; 32] = hex::decode(&d.public_key)
        .ok()
        .and_then(|k| k.try_into().ok())
        .ok_or_else(|| {
            bad(format!(
                "device {}: public_key must be 64 hex digits (an ed25519 public key)",
                d.id
            ))
        })?;
    if wpm_manifests::TrustedKeys::new(&[key]).is_empty() {
        return Err(bad(format!(
            "device {}: public_key is not a valid ed25519 point",
            d.id
        )));
    }
    // Ingest checks seals in batches, which single checks agree with only for keys
    // that are not of small order; no key made from a seed is.
    if wpm_manifests::is_weak_key(&key) {
        return Err(bad(format!(
            "device {}: public_key is of small order (not made from a secret key)",
            d.id
        )));
    }
    Ok(NewIdentity {
        id: d.id,
        public_key: key,
        groups: d.groups,
    })
}

/// Registers devices, all or none: 201 with how many were new and each device's
/// sequence floor (the newest deployment addressing it now, which its provisioning
/// record carries), 409 naming the devices already registered with another key.
pub(super) async fn register(
    State(state): State<Shared>,
    body: Result<Json<RegisterRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let Json(req) = body.map_err(|e| bad(e.body_text()))?;
    if req.devices.is_empty() || req.devices.len() > MAX_DEVICES_PER_REQUEST {
        return Err(bad(format!(
            "give 1 to {MAX_DEVICES_PER_REQUEST} devices, not {}",
            req.devices.len()
        )));
    }
    let mut seen = std::collections::HashSet::new();
    let mut devices = Vec::with_capacity(req.devices.len());
    for d in req.devices {
        if !seen.insert(d.id.clone()) {
            return Err(bad(format!("device {} is given twice", d.id)));
        }
        devices.push(parse(d)?);
    }
    match state.db.register_devices(&devices, db::now_ms()).await? {
        Ok(added) => Ok((
            StatusCode::CREATED,
            Json(json!({
                "registered": added,
                "already_registered": devices.len() - added,
                "sequence_floors": state.db.sequence_floors(&devices).await?,
            })),
        )),
        Err(conflicts) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "already registered with another key (remove a device before giving it a new \
                 key): {}",
                conflicts.join(", ")
            ),
        )),
    }
}

pub(super) async fn list(State(state): State<Shared>) -> ApiResult<Json<Value>> {
    let devices: Vec<Value> = state
        .db
        .identities()
        .await?
        .iter()
        .map(|i| {
            json!({
                "id": i.id,
                "public_key": hex::encode(i.public_key),
                "groups": i.groups,
                "registered_at_ms": i.registered_at,
                "revoked_at_ms": i.revoked_at,
                "state": if i.revoked_at.is_some() { "revoked" } else { "active" },
            })
        })
        .collect();
    Ok(Json(json!({ "devices": devices })))
}

pub(super) async fn revoke(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    check_device_id(&id)?;
    if !state.db.revoke_device(&id, db::now_ms()).await? {
        return Err(not_registered(&id));
    }
    tracing::warn!(device = %id, "device revoked");
    Ok(Json(json!({ "id": id, "state": "revoked" })))
}

pub(super) async fn remove(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    check_device_id(&id)?;
    if !state.db.remove_device(&id).await? {
        return Err(not_registered(&id));
    }
    tracing::info!(device = %id, "device removed");
    Ok(StatusCode::NO_CONTENT)
}

fn not_registered(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no device {id:?} is registered"),
    )
}
