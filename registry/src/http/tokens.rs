//! API tokens and what each may do.
//!
//! A token is `wpm_<id>_<secret>`: the registry keeps its id, name, scope and the sha256
//! of its secret, never the secret (a copy of the database grants nothing). The token in
//! `<data-dir>/api-token` (or `--token`), made at first start, is an admin token, listed
//! as `bootstrap-…` and revocable like the others once another admin token exists.
//! Scopes:
//!
//! | scope | may |
//! |---|---|
//! | `read` | every `GET` (fleet, modules, deployments, rollouts, devices, events) |
//! | `publish` | `read`, and upload modules |
//! | `deploy` | `read`, and deploy, run rollouts and send device commands |
//! | `admin` | everything: also register, revoke and remove devices, manage tokens, and rotate and retire signing keys |

use super::{ApiError, ApiResult, Shared};
use crate::keys;
use axum::extract::{Path, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse as _, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Read,
    Publish,
    Deploy,
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::Read, Scope::Publish, Scope::Deploy, Scope::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Publish => "publish",
            Scope::Deploy => "deploy",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// Whether a token of this scope may do what needs `needed`.
    pub fn allows(self, needed: Scope) -> bool {
        self == Scope::Admin || self == needed || needed == Scope::Read
    }
}

/// The scope a request needs. Pure.
pub fn needed(method: &Method, path: &str) -> Scope {
    if path.starts_with("/v1/tokens") || (path.starts_with("/v1/keys/") && method != Method::GET) {
        Scope::Admin
    } else if method == Method::GET {
        Scope::Read
    } else if path.starts_with("/v1/modules") {
        Scope::Publish
    } else if path.starts_with("/v1/devices/") && path.ends_with("/commands") {
        Scope::Deploy
    } else if path.starts_with("/v1/devices") {
        Scope::Admin
    } else {
        Scope::Deploy
    }
}

/// `wpm_<id>_<secret>` split, if it has that shape.
fn split(token: &str) -> Option<(&str, &str)> {
    let (id, secret) = token.strip_prefix("wpm_")?.split_once('_')?;
    (!id.is_empty() && !secret.is_empty()).then_some((id, secret))
}

/// The scope of a presented token; `None` for a wrong, unknown or revoked one.
async fn scope_of(state: &Shared, token: &str) -> ApiResult<Option<Scope>> {
    let bootstrap;
    let (id, secret) = if keys::constant_time_eq(token.as_bytes(), state.token.as_bytes()) {
        bootstrap = keys::bootstrap_token_id(token);
        (bootstrap.as_str(), token)
    } else {
        match split(token) {
            Some(parts) => parts,
            None => return Ok(None),
        }
    };
    let Some((scope, hash)) = state.db.live_token(id).await? else {
        return Ok(None);
    };
    let presented = wpm_manifests::sha256(secret.as_bytes());
    Ok(keys::constant_time_eq(&presented, &hash)
        .then(|| Scope::parse(&scope))
        .flatten())
}

/// Lets a request through only with a token whose scope allows it: 401 without a valid
/// token, 403 (naming the scope needed) with one that may not.
pub(super) async fn auth(State(state): State<Shared>, req: Request, next: Next) -> Response {
    let presented = (req.headers().get(header::AUTHORIZATION))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let scope = match presented {
        Some(t) => match scope_of(&state, t).await {
            Ok(s) => s,
            Err(e) => return e.into_response(),
        },
        None => None,
    };
    let Some(scope) = scope else {
        return ApiError::new(StatusCode::UNAUTHORIZED, "missing or wrong API token")
            .into_response();
    };
    let needed = needed(req.method(), req.uri().path());
    if !scope.allows(needed) {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "this token's scope is {}; {} {} needs {}",
                scope.as_str(),
                req.method(),
                req.uri().path(),
                needed.as_str()
            ),
        )
        .into_response();
    }
    next.run(req).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NewToken {
    name: String,
    scope: String,
}

/// `POST /v1/tokens`: the token is in this answer only.
pub(super) async fn create(
    State(state): State<Shared>,
    Json(req): Json<NewToken>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let scope = Scope::parse(&req.scope).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "unknown scope {:?}: read, publish, deploy or admin",
                req.scope
            ),
        )
    })?;
    if req.name.trim().is_empty() || req.name.len() > 200 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "a token needs a name (what or who uses it), at most 200 bytes",
        ));
    }
    let random = keys::random_bytes()?;
    let id = hex::encode(&random[..6]);
    let secret = hex::encode(keys::random_bytes()?);
    (state.db)
        .insert_token(
            &id,
            &req.name,
            scope.as_str(),
            &wpm_manifests::sha256(secret.as_bytes()),
        )
        .await?;
    tracing::info!(id, name = %req.name, scope = scope.as_str(), "API token created");
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": id, "name": req.name, "scope": scope.as_str(),
                    "token": format!("wpm_{id}_{secret}")})),
    ))
}

pub(super) async fn list(State(state): State<Shared>) -> ApiResult<Json<Value>> {
    let tokens: Vec<Value> = (state.db.tokens().await?.iter())
        .map(|t| {
            json!({"id": t.id, "name": t.name, "scope": t.scope,
                   "created_at_ms": t.created_at, "revoked_at_ms": t.revoked_at})
        })
        .collect();
    Ok(Json(json!({ "tokens": tokens })))
}

pub(super) async fn revoke(
    State(state): State<Shared>,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let live = state.db.live_token(&id).await?;
    if live.is_some_and(|(scope, _)| scope == Scope::Admin.as_str())
        && state.db.other_live_admins(&id).await? == 0
    {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "{id} is the last admin token: create another first \
                 (wpm token create NAME --scope admin)"
            ),
        ));
    }
    if !state.db.revoke_token(&id).await? {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no unrevoked token {id}"),
        ));
    }
    tracing::info!(id, "API token revoked");
    Ok(Json(json!({ "revoked": id })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_scope_may_do_what_its_name_says() {
        use Scope::*;
        let cases = [
            (Method::GET, "/v1/fleet/status", Read),
            (Method::GET, "/v1/devices", Read),
            (Method::PUT, "/v1/modules/hello/1.0.0", Publish),
            (Method::POST, "/v1/deployments", Deploy),
            (Method::POST, "/v1/rollouts/3/pause", Deploy),
            (Method::POST, "/v1/devices/d1/commands", Deploy),
            (Method::POST, "/v1/devices", Admin),
            (Method::POST, "/v1/devices/d1/revoke", Admin),
            (Method::DELETE, "/v1/devices/d1", Admin),
            (Method::GET, "/v1/tokens", Admin),
            (Method::POST, "/v1/keys/rotate", Admin),
            (Method::POST, "/v1/keys/retire", Admin),
        ];
        for (method, path, scope) in cases {
            assert_eq!(needed(&method, path), scope, "{method} {path}");
        }
        assert!(Read.allows(Read) && !Read.allows(Publish) && !Read.allows(Deploy));
        assert!(Publish.allows(Read) && Publish.allows(Publish) && !Publish.allows(Deploy));
        assert!(Deploy.allows(Deploy) && !Deploy.allows(Publish) && !Deploy.allows(Admin));
        assert!(Scope::ALL.iter().all(|s| Admin.allows(*s)));
    }

    #[test]
    fn tokens_split_into_id_and_secret() {
        assert_eq!(split("wpm_ab12_s3cret"), Some(("ab12", "s3cret")));
        assert_eq!(split("wpm__s3cret"), None);
        assert_eq!(split("bootstrap-token"), None);
    }
}
