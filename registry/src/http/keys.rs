//! `/v1/keys`: the signing key and the trust chain; rotating and retiring keys
//! (`crate::trust`).

use super::{ApiError, ApiResult, Shared};
use crate::trust::{self, RetireError, TrustView};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

fn view_json(v: &TrustView) -> Json<Value> {
    Json(json!({
        // The key to provision new devices with.
        "public_key": hex::encode(v.signing_key),
        "epoch": v.epoch,
        "trusted_keys": v.keys.iter().map(hex::encode).collect::<Vec<_>>(),
        "devices_behind": v.devices_behind,
    }))
}

/// `GET /v1/keys` (no token needed: public keys only).
pub(super) async fn show(State(state): State<Shared>) -> ApiResult<Json<Value>> {
    let signing = state.signer.key().public();
    Ok(view_json(&trust::view(&state.db, signing).await?))
}

/// `POST /v1/keys/rotate`.
pub(super) async fn rotate(State(state): State<Shared>) -> ApiResult<Json<Value>> {
    let v = trust::rotate(&state.deployer)
        .await
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, format!("{e:#}")))?;
    Ok(view_json(&v))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RetireRequest {
    /// Retire even though devices have not reported the newest epoch (they then trust
    /// no key the registry signs with): how a compromised key is distrusted.
    #[serde(default)]
    force: bool,
}

/// `POST /v1/keys/retire`.
pub(super) async fn retire(
    State(state): State<Shared>,
    body: Option<Json<RetireRequest>>,
) -> ApiResult<Json<Value>> {
    let force = body.map(|Json(r)| r.force).unwrap_or_default();
    match trust::retire(&state.deployer, force).await {
        Ok(v) => Ok(view_json(&v)),
        Err(RetireError::NothingToRetire) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "devices already trust the signing key alone: nothing to retire",
        )),
        Err(RetireError::FleetBehind { epoch, devices }) => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "{devices} registered device(s) have not reported trust epoch {epoch} yet; \
                 retiring now would leave them trusting no key the registry signs with \
                 (force it to distrust a compromised key)"
            ),
        )),
        Err(RetireError::Failed(e)) => Err(e.into()),
    }
}
