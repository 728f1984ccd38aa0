//! Scoped API tokens: each does what its scope says and nothing more; a revoked one
//! does nothing; the database holds no secret.

use crate::common::*;
use reqwest::Method;
use serde_json::json;
use wpm_registry::Registry;

/// `api` with another token.
fn with_token(api: &Api, token: &str) -> Api {
    Api {
        token: token.to_string(),
        ..api.clone()
    }
}

pub async fn check_scoped_tokens(reg: &Registry) {
    let admin = Api::new(reg);
    let mut tokens = std::collections::HashMap::new();
    for scope in ["read", "publish", "deploy", "admin"] {
        let (status, t) = admin
            .send(
                Method::POST,
                "/v1/tokens",
                Some(json!({"name": format!("ci {scope}"), "scope": scope})),
            )
            .await;
        assert_eq!(status, 201, "{t}");
        assert!(t["token"].as_str().unwrap().starts_with("wpm_"), "{t}");
        tokens.insert(
            scope,
            (
                t["id"].as_str().unwrap().to_string(),
                t["token"].as_str().unwrap().to_string(),
            ),
        );
    }
    let (status, t) = admin
        .send(
            Method::POST,
            "/v1/tokens",
            Some(json!({"name": "x", "scope": "root"})),
        )
        .await;
    assert_eq!(status, 400, "{t}");

    let name = unique("scoped");
    let group = unique("scoped");
    let as_scope = |scope| with_token(&admin, &tokens[scope].1);
    let upload = |api: Api, version: &'static str| {
        let name = name.clone();
        async move { api.put_module(&name, version, module_wasm(version)).await.0 }
    };
    let deploy = |api: Api| {
        let (name, group) = (name.clone(), group.clone());
        async move {
            api.send(
                Method::POST,
                "/v1/deployments",
                Some(json!({"module": name, "version": "1.0.0", "group": group})),
            )
            .await
        }
    };

    // read: looks, changes nothing.
    assert_eq!(as_scope("read").get("/v1/fleet/status").await.0, 200);
    assert_eq!(upload(as_scope("read"), "1.0.0").await, 403);
    assert_eq!(deploy(as_scope("read")).await.0, 403);
    // publish: uploads, cannot deploy.
    assert_eq!(upload(as_scope("publish"), "1.0.0").await, 201);
    let (status, answer) = deploy(as_scope("publish")).await;
    assert_eq!(status, 403, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("needs deploy"),
        "{answer}"
    );
    // deploy: deploys, cannot upload or register devices or make tokens.
    assert_eq!(deploy(as_scope("deploy")).await.0, 201);
    assert_eq!(upload(as_scope("deploy"), "2.0.0").await, 403);
    let register = json!({"devices": [{"id": unique("d"), "public_key": "11".repeat(32)}]});
    let d = as_scope("deploy");
    assert_eq!(
        d.send(Method::POST, "/v1/devices", Some(register.clone()))
            .await
            .0,
        403
    );
    assert_eq!(d.get("/v1/tokens").await.0, 403);
    // admin: manages tokens.
    let a = as_scope("admin");
    let (status, list) = a.get("/v1/tokens").await;
    assert_eq!(status, 200);
    assert!(
        !list.to_string().contains(&tokens["read"].1),
        "a secret is listed: {list}"
    );

    // Revoked: nothing, not even reading.
    let path = format!("/v1/tokens/{}/revoke", tokens["read"].0);
    assert_eq!(a.send(Method::POST, &path, None).await.0, 200);
    assert_eq!(a.send(Method::POST, &path, None).await.0, 404);
    assert_eq!(as_scope("read").get("/v1/fleet/status").await.0, 401);
    // A token with the right id and a wrong secret.
    let (id, secret) = (&tokens["admin"].0, "00".repeat(32));
    let forged = with_token(&admin, &format!("wpm_{id}_{secret}"));
    assert_eq!(forged.get("/v1/fleet/status").await.0, 401);
}

/// The bootstrap token is listed and can be revoked, but never the last admin token.
/// Leaves the registry with no bootstrap token: run it last.
pub async fn check_bootstrap_revocation(reg: &Registry) {
    let bootstrap = Api::new(reg);
    let (status, list) = bootstrap.get("/v1/tokens").await;
    assert_eq!(status, 200, "{list}");
    let live_admins: Vec<String> = (list["tokens"].as_array().unwrap().iter())
        .filter(|t| t["scope"] == "admin" && t["revoked_at_ms"].is_null())
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect();
    let boot = (live_admins.iter())
        .find(|id| id.starts_with("bootstrap-"))
        .expect("the bootstrap token is listed")
        .clone();
    for id in live_admins.iter().filter(|id| **id != boot) {
        let path = format!("/v1/tokens/{id}/revoke");
        assert_eq!(bootstrap.send(Method::POST, &path, None).await.0, 200);
    }
    // Alone, it cannot be revoked: that would lock every operator out.
    let path = format!("/v1/tokens/{boot}/revoke");
    let (status, answer) = bootstrap.send(Method::POST, &path, None).await;
    assert_eq!(status, 409, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("last admin token"),
        "{answer}"
    );
    let (status, t) = bootstrap
        .send(
            Method::POST,
            "/v1/tokens",
            Some(json!({"name": "ops", "scope": "admin"})),
        )
        .await;
    assert_eq!(status, 201, "{t}");
    let ops = with_token(&bootstrap, t["token"].as_str().unwrap());
    assert_eq!(ops.send(Method::POST, &path, None).await.0, 200);
    assert_eq!(bootstrap.get("/v1/fleet/status").await.0, 401);
    assert_eq!(ops.get("/v1/fleet/status").await.0, 200);
}
