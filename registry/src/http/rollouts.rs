//! `/v1/rollouts`: creating, following, pausing, resuming and rolling back staged
//! rollouts.

use super::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RolloutRequest {
    module: String,
    version: String,
    group: String,
    stages: Option<Vec<u8>>,
    max_failure_pct: Option<u8>,
    stage_timeout_s: Option<u64>,
    health_turns: Option<u32>,
    health_seconds: Option<u32>,
}

/// Default stages: a canary, a tenth, everyone.
pub const DEFAULT_STAGES: [u8; 3] = [1, 10, 100];
pub const DEFAULT_MAX_FAILURE_PCT: u8 = 10;
pub const DEFAULT_STAGE_TIMEOUT_S: u64 = 600;

async fn rollout_json(db: &Db, r: &rollout::Rollout, with_devices: bool) -> ApiResult<Value> {
    let mut v = serde_json::to_value(r).map_err(anyhow::Error::from)?;
    v["counts"] = json!(db.rollout_counts(r.id).await?);
    if with_devices {
        v["devices"] = json!(db.rollout_devices(r.id).await?);
    }
    Ok(v)
}

pub(super) async fn create_rollout(
    State(state): State<Shared>,
    body: Result<Json<RolloutRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let Json(req) = body.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    if !valid_name(&req.group) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid group {:?}", req.group),
        ));
    }
    let stages = req.stages.unwrap_or(DEFAULT_STAGES.to_vec());
    rollout::check_stages(&stages).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    let max_failure_pct = req.max_failure_pct.unwrap_or(DEFAULT_MAX_FAILURE_PCT);
    if max_failure_pct > 100 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "max_failure_pct is a percentage (0 to 100)",
        ));
    }
    let module = published_module(&state, &req.module, &req.version).await?;
    let previous = state
        .db
        .desired_set(&Target::Group(req.group.clone()))
        .await?
        .into_iter()
        .find(|m| m.name == module.name)
        .map(|m| m.version);
    if previous.as_deref() == Some(module.version.as_str()) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "group {} already runs {}@{}",
                req.group, module.name, module.version
            ),
        ));
    }
    let health = health_window(req.health_turns, req.health_seconds)?;
    let new = NewRollout {
        module,
        group: req.group,
        stages,
        max_failure_pct,
        health: health.unwrap_or(HealthWindow::DEFAULT),
        stage_timeout: std::time::Duration::from_secs(
            req.stage_timeout_s
                .unwrap_or(DEFAULT_STAGE_TIMEOUT_S)
                .max(1),
        ),
    };
    let r = state
        .db
        .create_rollout(&new, previous.as_deref())
        .await?
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, e))?;
    tracing::info!(rollout = r.id, module = %r.module, version = %r.version, group = %r.group, "rollout created");
    state.wake_controller.notify_one();
    Ok((
        StatusCode::CREATED,
        Json(rollout_json(&state.db, &r, false).await?),
    ))
}

pub(super) async fn list_rollouts(State(state): State<Shared>) -> ApiResult<Json<Value>> {
    let mut out = Vec::new();
    for r in state.db.rollouts(false).await? {
        out.push(rollout_json(&state.db, &r, false).await?);
    }
    Ok(Json(Value::Array(out)))
}

async fn find_rollout(db: &Db, id: i64) -> ApiResult<rollout::Rollout> {
    db.rollout(id)
        .await?
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no rollout {id}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RolloutQuery {
    /// List every device of the rollout (default); `false`: counts only, for followers
    /// of a large rollout.
    devices: Option<bool>,
}

pub(super) async fn get_rollout(
    State(state): State<Shared>,
    Path(id): Path<i64>,
    Query(q): Query<RolloutQuery>,
) -> ApiResult<Json<Value>> {
    let r = find_rollout(&state.db, id).await?;
    Ok(Json(
        rollout_json(&state.db, &r, q.devices.unwrap_or(true)).await?,
    ))
}

/// pause, resume, rollback: a state change the controller acts on at its next pass.
pub(super) async fn rollout_action(
    State(state): State<Shared>,
    Path((id, action)): Path<(i64, String)>,
) -> ApiResult<Json<Value>> {
    use RolloutState::*;
    let (from, to, reason): (&[RolloutState], _, _) = match action.as_str() {
        "pause" => (&[Running], Paused, None),
        "resume" => (&[Paused], Running, None),
        "rollback" => (
            &[Running, Paused, Completed],
            RollingBack,
            Some("rolled back by the operator"),
        ),
        other => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!("unknown rollout action {other:?}: use pause, resume or rollback"),
            ))
        }
    };
    let r = find_rollout(&state.db, id).await?;
    if !state.db.set_rollout_state(id, from, to, reason).await? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("rollout {id} is {}: cannot {action} it", r.state.as_str()),
        ));
    }
    state.wake_controller.notify_one();
    let r = find_rollout(&state.db, id).await?;
    Ok(Json(rollout_json(&state.db, &r, false).await?))
}
