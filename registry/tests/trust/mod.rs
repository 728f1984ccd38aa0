//! Device identities and what the fleet says: registration, sequence floors, the
//! registry's checks of sealed reports, the embedded broker's gate, and scoped API tokens. Run against each
//! backend by `registry.rs`.

mod tokens;

pub use tokens::{check_bootstrap_revocation, check_scoped_tokens};

use super::WAIT;
use crate::common::*;
use serde_json::json;
use wpm_manifests::{
    encode, DeviceStatus, Event, EventKind, ModuleState, ModuleStatus, Presence, ReportBody,
    Target, Topic,
};
use wpm_registry::Registry;

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
pub async fn check_ingest(reg: &Registry) {
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
        trust_epoch: None,
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
pub async fn check_sequence_floors(reg: &Registry) {
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
pub async fn check_broker_gate(reg: &Registry) {
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
pub async fn check_device_identities(reg: &Registry) {
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
