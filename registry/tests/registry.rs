//! The registry against real services: the embedded broker with a temp SQLite, and
//! PostgreSQL (127.0.0.1:5432/test) with Mosquitto (127.0.0.1:1883).

mod common;
mod trust;

use common::*;
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;
use trust::*;
use wpm_manifests::{
    decode, sha256, Chunk, Deployment, ModuleManifest, Target, Topic, TrustedKeys,
};
use wpm_registry::Registry;

const WAIT: Duration = Duration::from_secs(10);

#[test]
fn registry_signing_path_reproduces_the_golden_vector() {
    let want = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../manifests/tests/vectors/deployment.sealed.cbor"),
    )
    .unwrap();
    let key = wpm_manifests::golden::key();
    assert_eq!(
        wpm_registry::seal_deployment(&key, &wpm_manifests::golden::deployment()),
        want
    );
    let want = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../manifests/tests/vectors/module-manifest.sealed.cbor"),
    )
    .unwrap();
    assert_eq!(
        wpm_registry::seal_module_manifest(&key, &wpm_manifests::golden::module_manifest()),
        want
    );
}

/// Auth, upload (valid, invalid, duplicate, conflicting, too large), unknown module.
async fn check_api_basics(reg: &Registry) {
    let api = Api::new(reg);
    let h: serde_json::Value = reqwest::get(format!("{}/v1/health", api.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(h["ok"], true);
    let k: serde_json::Value = reqwest::get(format!("{}/v1/keys", api.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(k["public_key"], hex::encode(reg.public_key()));

    for token in [None, Some("wrong")] {
        let mut req = api.http.get(format!("{}/v1/modules", api.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status().as_u16(), 401);
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"], "missing or wrong API token");
    }

    let name = unique("m");
    let (s, body) = api
        .put_module(&name, "1.0.0", b"hello world".to_vec())
        .await;
    assert_eq!(s, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("not a WebAssembly module"),
        "{body}"
    );
    let (s, body) = api.put_module("bad/name", "1.0.0", module_wasm("x")).await;
    assert_ne!(s, 201, "{body}");

    let wasm = module_wasm(&name);
    let (s, body) = api.put_module(&name, "1.0.0", wasm.clone()).await;
    assert_eq!(s, 201, "{body}");
    assert_eq!(body["sha256"], hex::encode(sha256(&wasm)));
    assert_eq!(body["size"], wasm.len());
    assert_eq!(body["chunk_size"], 64);
    assert_eq!(body["chunks"], wasm.len().div_ceil(64));
    let (s, _) = api.put_module(&name, "1.0.0", wasm.clone()).await;
    assert_eq!(s, 200);
    let (s, body) = api.put_module(&name, "1.0.0", module_wasm("other")).await;
    assert_eq!(s, 409, "{body}");
    let (s, body) = api
        .put_module(&name, "9.9.9", vec![0u8; 1024 * 1024 + 10])
        .await;
    assert_eq!(s, 413, "{body}");
    assert!(body["error"].as_str().unwrap().contains("limit"), "{body}");

    let (s, list) = api.get("/v1/modules").await;
    assert_eq!(s, 200);
    assert!(list
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["name"] == name.as_str() && m["version"] == "1.0.0"));

    let (s, body) = api
        .deploy(json!({"module": unique("nope"), "version": "1.0.0", "group": "g"}))
        .await;
    assert_eq!(s, 404, "{body}");
    assert!(body["error"].as_str().unwrap().contains("no module"));
    let (s, _) = api
        .deploy(json!({"module": name, "version": "1.0.0", "group": "g", "device": "d"}))
        .await;
    assert_eq!(s, 400);
}

/// Deploys two modules to a fresh group; checks sequences, the HTTP answers and what
/// the broker retains. Returns the group and the last sequence.
async fn check_deploy_publishes(reg: &Registry) -> (String, u64) {
    let api = Api::new(reg);
    let group = unique("grp");
    let a = unique("a");
    let b = unique("b");
    let wasm_a = module_wasm(&a);
    let wasm_b = module_wasm(&b);
    assert_eq!(api.put_module(&a, "1.0.0", wasm_a.clone()).await.0, 201);
    assert_eq!(api.put_module(&b, "2.0.0", wasm_b.clone()).await.0, 201);

    let (s, d1) = api
        .deploy(json!({"module": a, "version": "1.0.0", "group": group}))
        .await;
    assert_eq!(s, 201, "{d1}");
    assert_eq!(d1["target"], json!({"kind": "group", "name": group}));
    let (s, d2) = api
        .deploy(json!({"module": b, "version": "2.0.0", "group": group}))
        .await;
    assert_eq!(s, 201, "{d2}");
    let s1 = d1["sequence"].as_u64().unwrap();
    let s2 = d2["sequence"].as_u64().unwrap();
    assert!(s2 > s1, "sequence must increase: {s1} then {s2}");
    // The desired set accumulates: the second deployment keeps the first module.
    let names: Vec<_> = d2["modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names.len(), 2);
    assert!(names.contains(&a) && names.contains(&b));
    let expires = d2["expires_at"].as_u64().unwrap();
    assert_eq!(expires - d2["issued_at"].as_u64().unwrap(), 168 * 3600);

    let (s, list) = api.get("/v1/deployments").await;
    assert_eq!(s, 200);
    assert_eq!(list[0]["sequence"].as_u64().unwrap(), s2, "newest first");

    check_retained(reg, &group, s2, &[(&a, &wasm_a), (&b, &wasm_b)]).await;
    (group, s2)
}

/// What a device subscribing now would receive: the signed deployment for `group` with
/// `sequence`, and for each module a signed manifest and chunks that reassemble to it.
async fn check_retained(reg: &Registry, group: &str, sequence: u64, modules: &[(&str, &[u8])]) {
    let target = Target::Group(group.to_string());
    let deploy_topic = Topic::Deployment(&target).render();
    let mut filters = vec![deploy_topic.clone()];
    let mut expected = 1;
    for (_, wasm) in modules {
        let h = sha256(wasm);
        filters.push(Topic::ModuleManifest(&h).render());
        filters.push(format!("wpm/v1/module/{}/chunk/+", hex::encode(h)));
        expected += 1 + wasm.len().div_ceil(64);
    }
    let got = collect(&reg.mqtt_url(), reg.broker_login(), &filters, WAIT, |m| {
        m.len() >= expected
    })
    .await;
    assert_eq!(got.len(), expected, "retained messages: {:?}", got.keys());

    let trusted = TrustedKeys::new(&[reg.public_key()]);
    let d: Deployment = trusted.open(&got[&deploy_topic]).unwrap();
    assert_eq!(d.sequence, sequence);
    assert_eq!(d.target, target);
    assert_eq!(d.modules.len(), modules.len());
    for (name, wasm) in modules {
        let h = sha256(wasm);
        let r = d.modules.iter().find(|m| m.name == *name).unwrap();
        assert_eq!(*r.sha256, h);
        assert_eq!(r.size as usize, wasm.len());
        let m: ModuleManifest = trusted
            .open(&got[&Topic::ModuleManifest(&h).render()])
            .unwrap();
        assert_eq!(m.chunk_hashes.len(), wasm.len().div_ceil(64));
        let mut bytes = Vec::new();
        for i in 0..m.chunk_hashes.len() as u32 {
            let c: Chunk = decode(&got[&Topic::Chunk(&h, i).render()]).unwrap();
            assert_eq!(c.index, i);
            assert_eq!(*c.module, h);
            assert_eq!(sha256(&c.data), *m.chunk_hashes[i as usize]);
            bytes.extend_from_slice(&c.data);
        }
        assert_eq!(sha256(&bytes), h, "chunks reassemble to the module");
        assert_eq!(&bytes[..], *wasm);
    }
    // A key the devices do not trust opens nothing.
    let stranger = TrustedKeys::new(&[wpm_manifests::KeyPair::from_seed(&[1; 32]).public()]);
    assert!(stranger.open::<Deployment>(&got[&deploy_topic]).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_embedded_broker() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(embedded_config(dir.path())).await.unwrap();
    assert!(reg.mqtt_url().starts_with("mqtt://127.0.0.1:"));
    check_api_basics(&reg).await;
    check_device_identities(&reg).await;
    check_deploy_publishes(&reg).await;
    check_sequence_floors(&reg).await;
    check_ingest(&reg).await;
    check_broker_gate(&reg).await;
    check_scoped_tokens(&reg).await;
    check_bootstrap_revocation(&reg).await;
    reg.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_embedded_restart_republishes() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(embedded_config(dir.path())).await.unwrap();
    let api = Api::new(&reg);
    let name = unique("r");
    let wasm = module_wasm(&name);
    assert_eq!(api.put_module(&name, "1.0.0", wasm.clone()).await.0, 201);
    let group = unique("grp");
    let (s, d) = api
        .deploy(json!({"module": name, "version": "1.0.0", "group": group}))
        .await;
    assert_eq!(s, 201);
    let seq = d["sequence"].as_u64().unwrap();
    let (token, key) = (reg.token().to_string(), reg.public_key());
    reg.shutdown().await.unwrap();

    // The embedded broker stopped with the registry and keeps nothing: anything retained
    // in the new one was republished from the database.
    let reg = Registry::start(embedded_config(dir.path())).await.unwrap();
    assert_eq!(reg.token(), token);
    assert_eq!(reg.public_key(), key);
    check_retained(&reg, &group, seq, &[(&name, &wasm)]).await;
    let api = Api::new(&reg);
    let (s, d2) = api
        .deploy(json!({"module": name, "version": "1.0.0", "group": group}))
        .await;
    assert_eq!(s, 201);
    assert!(d2["sequence"].as_u64().unwrap() > seq);
    reg.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_mosquitto() {
    let pg = PgSchema::create().await;
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(pg_mosquitto_config(dir.path(), &pg))
        .await
        .unwrap();
    assert_eq!(reg.mqtt_url(), MOSQUITTO);
    check_api_basics(&reg).await;
    check_device_identities(&reg).await;
    check_deploy_publishes(&reg).await;
    check_ingest(&reg).await;
    check_scoped_tokens(&reg).await;
    check_bootstrap_revocation(&reg).await;
    reg.shutdown().await.unwrap();
    pg.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_mosquitto_restart_republishes() {
    let pg = PgSchema::create().await;
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::start(pg_mosquitto_config(dir.path(), &pg))
        .await
        .unwrap();
    let (group, seq) = check_deploy_publishes(&reg).await;
    let api = Api::new(&reg);
    let (_, list) = api.get("/v1/deployments").await;
    let modules: Vec<(String, String)> = list[0]["modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_string(),
                m["sha256"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    reg.shutdown().await.unwrap();

    // Mosquitto outlives the registry; wipe what it retained for this group so only a
    // republish can bring it back.
    let target = Target::Group(group.clone());
    let mut filters = vec![Topic::Deployment(&target).render()];
    for (_, h) in &modules {
        filters.push(format!("wpm/v1/module/{h}/manifest"));
        filters.push(format!("wpm/v1/module/{h}/chunk/+"));
    }
    let retained = collect(MOSQUITTO, None, &filters, Duration::from_secs(2), |_| false).await;
    assert!(!retained.is_empty());
    let (wiper, _task) = plain_client(MOSQUITTO, &unique("wiper"), None, None).await;
    for topic in retained.keys() {
        wiper
            .publish(topic.clone(), rumqttc::QoS::AtLeastOnce, true, Vec::new())
            .await
            .unwrap();
    }
    let left = collect(MOSQUITTO, None, &filters, Duration::from_secs(2), |_| false).await;
    assert!(left.is_empty(), "wiped: {:?}", left.keys());
    wiper.disconnect().await.unwrap();

    let reg = Registry::start(pg_mosquitto_config(dir.path(), &pg))
        .await
        .unwrap();
    let wasm: HashMap<String, Vec<u8>> = modules
        .iter()
        .map(|(n, _)| (n.clone(), module_wasm(n)))
        .collect();
    let mods: Vec<(&str, &[u8])> = wasm
        .iter()
        .map(|(n, w)| (n.as_str(), w.as_slice()))
        .collect();
    check_retained(&reg, &group, seq, &mods).await;
    reg.shutdown().await.unwrap();
    pg.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expiring_deployments_are_renewed() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = embedded_config(dir.path());
    config.manifest_ttl = Duration::from_secs(4);
    let reg = Registry::start(config).await.unwrap();
    let api = Api::new(&reg);
    let name = unique("renew");
    let wasm = module_wasm(&name);
    assert_eq!(api.put_module(&name, "1.0.0", wasm.clone()).await.0, 201);
    let device = unique("dev");
    let (s, d) = api
        .deploy(json!({"module": name, "version": "1.0.0", "device": device}))
        .await;
    assert_eq!(s, 201, "{d}");
    let seq = d["sequence"].as_u64().unwrap();
    let expires = d["expires_at"].as_u64().unwrap();

    let target = Target::Device(device.clone());
    let topic = Topic::Deployment(&target).render();
    let trusted = TrustedKeys::new(&[reg.public_key()]);
    let newer = |m: &HashMap<String, Vec<u8>>| {
        m.get(&topic)
            .and_then(|b| trusted.open::<Deployment>(b).ok())
            .is_some_and(|d| d.sequence > seq)
    };
    let got = collect(
        &reg.mqtt_url(),
        reg.broker_login(),
        std::slice::from_ref(&topic),
        WAIT,
        newer,
    )
    .await;
    let renewed: Deployment = trusted
        .open(got.get(&topic).expect("a renewed deployment is retained"))
        .unwrap();
    assert!(renewed.sequence > seq);
    assert!(renewed.expires_at > expires);
    assert_eq!(renewed.modules.len(), 1);
    assert_eq!(*renewed.modules[0].sha256, sha256(&wasm));
    reg.shutdown().await.unwrap();
}
