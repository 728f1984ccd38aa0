//! The registry against real services: the embedded broker with a temp SQLite, and
//! PostgreSQL (127.0.0.1:5432/test) with Mosquitto (127.0.0.1:1883).

mod common;

use common::*;
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;
use wpm_manifests::{
    decode, encode, sha256, Chunk, Deployment, DeviceStatus, Event, EventKind, ModuleManifest,
    ModuleState, ModuleStatus, Presence, ReportBody, Target, Topic, TrustedKeys,
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

/// Refusals counted so far for `reason` (`/v1/health`).
async fn refused(api: &Api, reason: &str) -> u64 {
    let (_, h) = api.get("/v1/health").await;
    h["ingest"]["refused"][reason]
        .as_u64()
        .unwrap_or_else(|| panic!("no refusal count for {reason} in {h}"))
}

/// Waits until `reason` was counted more than `before` times.
async fn counted(api: &Api, reason: &str, before: u64) {
    eventually(WAIT, || async {
        (refused(api, reason).await > before).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("{reason} not counted"));
}

fn fleet_device(fleet: &serde_json::Value, id: &str) -> Option<serde_json::Value> {
    fleet["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == id)
        .cloned()
}

/// A registered device's sealed reports show up in the fleet view; what its key did not
/// seal, what was seen before, and what an unregistered or revoked device says are
/// counted and dropped; the announced last will marks the device offline.
async fn check_ingest(reg: &Registry) {
    let api = Api::new(reg);
    let id = unique("dev");
    let group = unique("grp");
    let dev = FakeDevice::connect(reg, &id).await;
    dev.report(
        Topic::Presence(&id).render(),
        ReportBody::Presence(Presence {
            online: true,
            will: Some(1),
        }),
    )
    .await;
    let mut status = DeviceStatus {
        device: id.clone(),
        groups: vec![group.clone()],
        sequence: 7,
        modules: vec![ModuleStatus {
            name: "hello".into(),
            version: "1.0.0".into(),
            sha256: [3u8; 32].into(),
            state: ModuleState::Running,
            last_error: None,
        }],
        slots_used: 1,
        slots_total: 4,
        flash_free: 500_000,
        ram_free: 90_000,
        last_error: Some("none really".into()),
        at_ms: 1_790_000_000_000,
    };
    let genuine = dev.seal(ReportBody::Status(status.clone()));
    dev.publish(Topic::Status(&id).render(), genuine.clone())
        .await;
    let event = Event {
        device: id.clone(),
        at_ms: 1_790_000_000_500,
        kind: EventKind::Installed {
            module: "hello".into(),
            version: "1.0.0".into(),
        },
    };
    dev.report(Topic::Events(&id).render(), ReportBody::Event(event))
        .await;

    let device = eventually(WAIT, || async {
        let (_, fleet) = api.get("/v1/fleet/status").await;
        fleet_device(&fleet, &id).filter(|d| d["sequence"] == 7)
    })
    .await
    .expect("device shows up in the fleet status");
    assert_eq!(device["groups"], json!([group]));
    assert_eq!(device["online"], true);
    assert_eq!(device["slots_used"], 1);
    assert_eq!(device["slots_total"], 4);
    assert_eq!(device["flash_free"], 500_000);
    assert_eq!(device["ram_free"], 90_000);
    assert_eq!(device["last_error"], "none really");
    assert!(device["last_seen_ms"].as_i64().unwrap() > 0);
    assert_eq!(
        device["modules"],
        json!([{"name": "hello", "version": "1.0.0", "sha256": hex::encode([3u8; 32]),
                "state": "running", "last_error": null}])
    );
    let events = eventually(WAIT, || async {
        let (_, ev) = api.get(&format!("/v1/devices/{id}/events?limit=5")).await;
        (!ev.as_array().unwrap().is_empty()).then_some(ev)
    })
    .await
    .expect("event ingested");
    assert_eq!(events[0]["kind"], "installed");
    assert_eq!(events[0]["at_ms"], 1_790_000_000_500u64);
    assert_eq!(
        events[0]["detail"],
        json!({"module": "hello", "version": "1.0.0"})
    );

    // Everything below tries to change the device's record; none of it may.
    status.sequence = 666;
    status.last_error = Some("forged".into());
    let status_topic = Topic::Status(&id).render();
    let before = |reason: &'static str| {
        let api = &api;
        async move { refused(api, reason).await }
    };
    // Garbage and an unsigned record.
    let unsealed = before("not_a_sealed_report").await;
    dev.publish(status_topic.clone(), vec![0xff, 0xfe, 0x01])
        .await;
    dev.publish(status_topic.clone(), encode(&status)).await;
    counted(&api, "not_a_sealed_report", unsealed + 1).await;
    // Sealed by a key that is not the device's.
    let forged = before("bad_signature").await;
    let stranger = wpm_manifests::KeyPair::from_seed(&[0x66; 32]);
    dev.publish(
        status_topic.clone(),
        seal(&stranger, &id, 1 << 40, ReportBody::Status(status.clone())),
    )
    .await;
    counted(&api, "bad_signature", forged).await;
    // The genuine report again, as an attacker who recorded it would send it.
    let duplicates = before("duplicate_report").await;
    dev.publish(status_topic.clone(), genuine).await;
    counted(&api, "duplicate_report", duplicates).await;
    // A device nobody registered. The embedded broker would not let it in at all;
    // published through the registry's own login there (a broker that lets anything
    // through), it still does not enter the fleet.
    let unknown = before("unknown_device").await;
    let invented = unique("invented");
    let (anyone, _task) =
        plain_client(&reg.mqtt_url(), &unique("anyone"), reg.broker_login(), None).await;
    anyone
        .publish(
            Topic::Status(&invented).render(),
            rumqttc::QoS::AtLeastOnce,
            false,
            seal(&stranger, &invented, 5, ReportBody::Status(status.clone())),
        )
        .await
        .unwrap();
    counted(&api, "unknown_device", unknown).await;
    let (_, fleet) = api.get("/v1/fleet/status").await;
    assert_eq!(fleet_device(&fleet, &id).unwrap()["sequence"], 7);
    assert!(fleet_device(&fleet, &invented).is_none());

    let key = wpm_manifests::KeyPair::from_seed(&dev.key.seed());
    dev.cut_power();
    eventually(WAIT, || async {
        let (_, fleet) = api.get("/v1/fleet/status").await;
        (fleet_device(&fleet, &id)?["online"] == false).then_some(())
    })
    .await
    .expect("the announced last will marks the device offline");

    // Revoked: even its own fresh, genuine reports are dropped.
    assert_eq!(api.revoke(&id).await, 200);
    // (The embedded broker no longer lets it log in; see check_broker_gate.)
    let revoked = before("revoked_device").await;
    anyone
        .publish(
            status_topic.clone(),
            rumqttc::QoS::AtLeastOnce,
            false,
            seal(&key, &id, 1 << 33, ReportBody::Status(status)),
        )
        .await
        .unwrap();
    counted(&api, "revoked_device", revoked).await;
    let (_, fleet) = api.get("/v1/fleet/status").await;
    assert_eq!(fleet_device(&fleet, &id).unwrap()["sequence"], 7);
    // Every refusal above was the report's fault, none the database's.
    assert_eq!(refused(&api, "database_refused").await, 0);
}

/// A device registered into a group is told the sequence of the newest deployment that
/// addresses it, for its provisioning record's floor.
async fn check_sequence_floors(reg: &Registry) {
    use reqwest::Method;
    let api = Api::new(reg);
    let (name, group) = (unique("floor"), unique("grp"));
    assert_eq!(
        api.put_module(&name, "1.0.0", module_wasm(&name)).await.0,
        201
    );
    let (s, d) = api
        .deploy(json!({"module": name, "version": "1.0.0", "group": group}))
        .await;
    assert_eq!(s, 201, "{d}");
    let sequence = d["sequence"].as_u64().unwrap();
    let key = hex::encode(wpm_manifests::KeyPair::from_seed(&[7; 32]).public());
    let (inside, outside) = (unique("in"), unique("out"));
    let (s, r) = api
        .send(
            Method::POST,
            "/v1/devices",
            Some(json!({"devices": [
                {"id": inside, "public_key": key, "groups": [group]},
                {"id": outside, "public_key": key, "groups": [unique("other")]},
            ]})),
        )
        .await;
    assert_eq!(s, 201, "{r}");
    assert_eq!(r["sequence_floors"][&inside], sequence, "{r}");
    // The other group has no deployment; the floor is the fleet's, older.
    assert!(
        r["sequence_floors"][&outside].as_u64().unwrap() < sequence,
        "{r}"
    );
}

/// The embedded broker lets in only registered devices with their own login and the
/// registry's clients, and lets a device publish only its own reports and subscribe
/// only to what it needs; every refusal is counted in `/v1/health`.
async fn check_broker_gate(reg: &Registry) {
    let api = Api::new(reg);
    let url = reg.mqtt_url();
    let broker = |h: &serde_json::Value, path: &[&str]| {
        path.iter()
            .fold(h["broker"].clone(), |v, k| v[*k].clone())
            .as_u64()
            .unwrap()
    };
    let health = || async { api.get("/v1/health").await.1 };
    let h0 = health().await;

    let id = unique("gate");
    let dev = FakeDevice::connect(reg, &id).await;
    let victim = unique("victim");
    let victim_dev = FakeDevice::connect(reg, &victim).await;
    let victim_login = Some((
        victim.clone(),
        wpm_manifests::login_password(&victim_dev.key, &victim),
    ));
    // Anonymous, a wrong password, another device's login under one's own client id,
    // and a device's genuine login after it was revoked: all refused.
    assert!(try_client(&url, &unique("anon"), None, None).await.is_err());
    let wrong = Some((victim.clone(), "00".repeat(64)));
    assert!(try_client(&url, &victim, wrong, None).await.is_err());
    assert!(
        try_client(&url, &unique("thief"), victim_login.clone(), None)
            .await
            .is_err()
    );
    let h1 = health().await;
    assert_eq!(
        broker(&h1, &["refused", "logins"]) - broker(&h0, &["refused", "logins"]),
        3
    );

    // With its own login a device may not write another device's reports, nor the
    // registry's deployment, module, chunk or command topics.
    let fake = [0x11u8; 32];
    let status = dev.seal(ReportBody::Presence(Presence {
        online: true,
        will: None,
    }));
    for topic in [
        Topic::Status(&victim).render(),
        Topic::Deployment(&Target::Fleet).render(),
        Topic::ModuleManifest(&fake).render(),
        Topic::Chunk(&fake, 0).render(),
        Topic::Command(&victim).render(),
    ] {
        dev.publish(topic, status.clone()).await;
    }
    let dropped = eventually(WAIT, || async {
        let h = health().await;
        let n = broker(&h, &["dropped", "publish_not_authorized"])
            - broker(&h0, &["dropped", "publish_not_authorized"]);
        (n >= 5).then_some(n)
    })
    .await;
    assert_eq!(dropped, Some(5));
    // Nor read every device's reports, or join the registry's ingest share group.
    for filter in [
        "#",
        "wpm/v1/device/+/status",
        "$share/wpm-ingest/wpm/v1/device/+/status",
    ] {
        dev.client
            .subscribe(filter, rumqttc::QoS::AtLeastOnce)
            .await
            .unwrap();
    }
    eventually(WAIT, || async {
        let h = health().await;
        (broker(&h, &["refused", "subscribes"]) - broker(&h0, &["refused", "subscribes"]) >= 3)
            .then_some(())
    })
    .await
    .expect("3 subscriptions refused");

    // Revoked: its own login no longer opens the broker.
    assert_eq!(api.revoke(&victim).await, 200);
    victim_dev.cut_power();
    assert!(try_client(&url, &victim, victim_login, None).await.is_err());
}

/// Registering device keys (all or none, repeatable with the same key, a conflict with
/// another), listing, revoking and removing them; malformed keys and ids are refused.
async fn check_device_identities(reg: &Registry) {
    use reqwest::Method;
    let api = Api::new(reg);
    let (a, b) = (unique("id-a"), unique("id-b"));
    let key = |seed: u8| hex::encode(wpm_manifests::KeyPair::from_seed(&[seed; 32]).public());
    let register = |devices: serde_json::Value| {
        api.send(
            Method::POST,
            "/v1/devices",
            Some(json!({ "devices": devices })),
        )
    };
    let (s, r) = register(json!([{"id": a, "public_key": key(1), "groups": ["eu"]},
                                 {"id": b, "public_key": key(2)}]))
    .await;
    assert_eq!((s, r["registered"].as_u64()), (201, Some(2)), "{r}");
    // A production batch of 10,000 in one request.
    let batch = unique("batch");
    let many: Vec<serde_json::Value> = (0..10_000u32)
        .map(|i| json!({"id": format!("{batch}-{i:05}"), "public_key": key(1), "groups": ["eu"]}))
        .collect();
    let (s, r) = register(json!(many)).await;
    assert_eq!((s, r["registered"].as_u64()), (201, Some(10_000)), "{r}");
    // Provisioning again with the same key changes nothing.
    let (s, r) = register(json!([{"id": a, "public_key": key(1), "groups": ["eu"]}])).await;
    assert_eq!((s, r["already_registered"].as_u64()), (201, Some(1)), "{r}");
    // Another key for a registered device is refused, and nothing of the request is kept.
    let c = unique("id-c");
    let (s, r) = register(json!([{"id": c, "public_key": key(3)},
                                 {"id": a, "public_key": key(4)}]))
    .await;
    assert_eq!(s, 409, "{r}");
    assert!(r["error"].as_str().unwrap().contains(&a), "{r}");
    for bad in [
        json!([{"id": "x/y", "public_key": key(5)}]),
        json!([{"id": c, "public_key": "abcd"}]),
        // The identity point: of small order, made from no secret key.
        json!([{"id": c, "public_key": format!("01{}", "00".repeat(31))}]),
        json!([{"id": c, "public_key": key(5), "groups": ["a+b"]}]),
        json!([{"id": c, "public_key": key(5)}, {"id": c, "public_key": key(5)}]),
        json!([]),
    ] {
        let (s, r) = register(bad.clone()).await;
        assert_eq!(s, 400, "{bad} -> {r}");
    }
    let listed = |r: &serde_json::Value, id: &str| {
        r["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == id)
            .cloned()
    };
    let (s, r) = api.get("/v1/devices").await;
    assert_eq!(s, 200);
    let da = listed(&r, &a).expect("a is listed");
    assert_eq!(
        (&da["public_key"], &da["groups"], &da["state"]),
        (&json!(key(1)), &json!(["eu"]), &json!("active"))
    );
    assert!(
        listed(&r, &c).is_none(),
        "a refused registration left {c} behind"
    );

    let (s, _) = api
        .send(Method::POST, &format!("/v1/devices/{a}/revoke"), None)
        .await;
    assert_eq!(s, 200);
    let (_, r) = api.get("/v1/devices").await;
    assert_eq!(listed(&r, &a).unwrap()["state"], "revoked");
    let (s, _) = api
        .send(Method::POST, &format!("/v1/devices/{c}/revoke"), None)
        .await;
    assert_eq!(s, 404);

    let (s, _) = api
        .send(Method::DELETE, &format!("/v1/devices/{b}"), None)
        .await;
    assert_eq!(s, 204);
    let (s, _) = api
        .send(Method::DELETE, &format!("/v1/devices/{b}"), None)
        .await;
    assert_eq!(s, 404);
    let (_, r) = api.get("/v1/devices").await;
    assert!(listed(&r, &b).is_none());
    // Removed, the device may be provisioned again with a new key.
    let (s, r) = register(json!([{"id": b, "public_key": key(6)}])).await;
    assert_eq!(s, 201, "{r}");

    let anonymous = reqwest::get(format!("{}/v1/devices", api.base))
        .await
        .unwrap();
    assert_eq!(anonymous.status().as_u16(), 401);
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
