//! The `wpm` binary against a real registry started in-process (temp data dir, SQLite,
//! embedded broker on a free port), and in the second test real simulated devices too.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;

const HELLO_WAT: &str = include_str!("../../examples/hello/v1.wat");
const HELLO_V2_WAT: &str = include_str!("../../examples/hello/v2.wat");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Registry with its data in `dir/wpm-data`, the layout `wpm` looks for by default.
async fn start_registry(dir: &Path) -> wpm_registry::Registry {
    let mut config = wpm_registry::Config::new(dir.join("wpm-data"));
    config.http = SocketAddr::from(([127, 0, 0, 1], 0));
    config.mqtt_listen = SocketAddr::from(([127, 0, 0, 1], free_port()));
    wpm_registry::Registry::start(config)
        .await
        .expect("registry starts")
}

async fn wpm(args: &[&str], cwd: &Path) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_wpm"))
        .args(args)
        .current_dir(cwd)
        .env_remove("WPM_REGISTRY")
        .env_remove("WPM_TOKEN")
        .env_remove("RUST_LOG")
        .env("XDG_CONFIG_HOME", cwd.join("no-config"))
        .output()
        .await
        .expect("run wpm")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "wpm failed: {}\n{}",
        stdout(o),
        stderr(o)
    );
    stdout(o)
}

fn json(o: &Output) -> Value {
    serde_json::from_str(&ok(o)).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(o)))
}

fn fails_with(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected failure: {}\n{err}",
        stdout(o)
    );
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(needle), "wanted {needle:?} in:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publish_deploy_and_status_against_a_real_registry() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let registry = start_registry(cwd).await;
    let url = registry.http_url();
    let token = registry.token().to_string();
    std::fs::write(cwd.join("hello.wat"), HELLO_WAT).unwrap();
    let conn = ["--registry", url.as_str(), "--token", token.as_str()];
    let with = |args: &[&'static str]| -> Vec<String> {
        args.iter()
            .map(|s| s.to_string())
            .chain(conn.iter().map(|s| s.to_string()))
            .collect()
    };
    let run = |args: Vec<String>| async move {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        wpm(&refs, cwd).await
    };

    // Publish: the registry's digest is the sha256 of the wasm the CLI assembled.
    let wasm = wat::parse_str(HELLO_WAT).unwrap();
    let o = run(with(&[
        "publish",
        "hello.wat",
        "--name",
        "hello",
        "--version",
        "1.0.0",
        "--priority",
        "5",
        "--json",
    ]))
    .await;
    let published = json(&o);
    assert_eq!(published["name"], "hello");
    assert_eq!(published["version"], "1.0.0");
    assert_eq!(
        published["sha256"].as_str().unwrap(),
        hex::encode(wpm_manifests::sha256(&wasm))
    );
    assert_eq!(published["size"].as_u64().unwrap(), wasm.len() as u64);
    assert!(published["chunks"].as_u64().unwrap() >= 1);
    assert_eq!(published["created"], true);

    // The same bytes again: accepted, reported as already there.
    let o = run(with(&[
        "publish",
        "hello.wat",
        "--name",
        "hello",
        "--version",
        "1.0.0",
    ]))
    .await;
    let text = ok(&o);
    assert!(
        text.starts_with("already published (same bytes) hello@1.0.0"),
        "{text}"
    );
    assert!(
        text.contains(&hex::encode(wpm_manifests::sha256(&wasm))),
        "{text}"
    );

    // Other bytes under the same name@version: the registry's 409 message comes through.
    std::fs::write(
        cwd.join("other.wat"),
        "(module (func (export \"wpm_tick\")))",
    )
    .unwrap();
    let o = run(with(&[
        "publish",
        "other.wat",
        "--name",
        "hello",
        "--version",
        "1.0.0",
    ]))
    .await;
    fails_with(&o, "registry answered 409");

    // Not wasm at all: the registry's 400 message comes through.
    std::fs::write(cwd.join("notes.wasm"), "this is not a module").unwrap();
    let o = run(with(&[
        "publish",
        "notes.wasm",
        "--name",
        "notes",
        "--version",
        "1",
    ]))
    .await;
    fails_with(&o, "registry answered 400");
    fails_with(&o, "cannot publish notes@1");

    // A wrong token: 401 with the hint on where tokens come from.
    let o = wpm(
        &["fleet", "status", "--registry", &url, "--token", "wrong"],
        cwd,
    )
    .await;
    fails_with(&o, "401 Unauthorized");
    fails_with(&o, "the token was refused");
    fails_with(&o, "api-token");

    // No token anywhere: wpm falls back to ./wpm-data/api-token, as written by the registry.
    let o = wpm(&["modules", "list", "--registry", &url], cwd).await;
    let text = ok(&o);
    assert!(text.contains("hello") && text.contains("1.0.0"), "{text}");
    // ... but not from another directory.
    let elsewhere = tempfile::tempdir().unwrap();
    let o = wpm(&["modules", "list", "--registry", &url], elsewhere.path()).await;
    fails_with(&o, "no token was given");

    let o = run(with(&["modules", "list", "--json"])).await;
    let list = json(&o);
    assert!(
        list.as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "hello" && m["version"] == "1.0.0"),
        "{list}"
    );

    // Deploy to a group, then to the fleet: sequences increase.
    let o = run(with(&["deploy", "hello@1.0.0", "--group", "g1", "--json"])).await;
    let d1 = json(&o);
    assert_eq!(d1["target"]["kind"], "group");
    assert_eq!(d1["target"]["name"], "g1");
    let seq1 = d1["sequence"].as_u64().unwrap();
    assert!(seq1 >= 1);
    let o = run(with(&["deploy", "hello@1.0.0", "--fleet"])).await;
    let text = ok(&o);
    assert!(
        text.starts_with("deployed hello@1.0.0 to fleet as sequence "),
        "{text}"
    );
    let seq2: u64 = text
        .trim_start_matches("deployed hello@1.0.0 to fleet as sequence ")
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(seq2 > seq1, "{text}");

    // Deploying what was never published fails with the registry's message.
    let o = run(with(&["deploy", "nothing@9.9.9", "--device", "dev-1"])).await;
    fails_with(&o, "cannot deploy nothing@9.9.9");
    fails_with(&o, "registry answered 404");

    // No device has reported: empty but valid status, JSON and text.
    let o = run(with(&["fleet", "status", "--json"])).await;
    let status = json(&o);
    assert_eq!(status["devices"], Value::Array(vec![]), "{status}");
    let o = run(with(&["fleet", "status"])).await;
    let text = ok(&o);
    assert!(text.contains("0 devices, 0 online"), "{text}");

    registry.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn simulated_devices_install_what_the_cli_deploys() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path();
    let registry = start_registry(cwd).await;
    let url = registry.http_url();
    std::fs::write(cwd.join("hello.wat"), HELLO_WAT).unwrap();

    let mut cfg =
        wpm_sim::FleetConfig::new(registry.mqtt_url(), vec![registry.public_key()], [3; 32]);
    cfg.devices = 2;
    cfg.groups = vec!["field".into()];
    cfg.id_prefix = "t".into();
    register_fleet(&registry, &cfg).await;
    let fleet = wpm_sim::Fleet::start(cfg)
        .await
        .expect("simulated devices start");
    let ids = fleet.device_ids().to_vec();

    // The token comes from ./wpm-data/api-token (cwd is the registry's parent dir).
    let o = wpm(
        &[
            "publish",
            "hello.wat",
            "--name",
            "hello",
            "--version",
            "1.0.0",
            "--registry",
            &url,
        ],
        cwd,
    )
    .await;
    ok(&o);
    let o = wpm(
        &[
            "deploy",
            "hello@1.0.0",
            "--group",
            "field",
            "--registry",
            &url,
        ],
        cwd,
    )
    .await;
    ok(&o);

    // Wait until both devices report hello running, through the CLI's own JSON.
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let o = wpm(
            &[
                "fleet",
                "status",
                "--json",
                "--group",
                "field",
                "--registry",
                &url,
            ],
            cwd,
        )
        .await;
        let status = json(&o);
        let running = status["devices"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| {
                d["modules"].as_array().is_some_and(|ms| {
                    ms.iter()
                        .any(|m| m["name"] == "hello" && m["state"] == "running")
                })
            })
            .count();
        if running == ids.len() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "devices did not run hello within 60 s: {status}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(status["devices"].as_array().unwrap().len(), ids.len());

    // The table and summary tell the same story; a group filter that matches nothing is empty.
    let o = wpm(&["fleet", "status", "--registry", &url], cwd).await;
    let text = ok(&o);
    for id in &ids {
        assert!(text.contains(id.as_str()), "{text}");
    }
    assert!(text.contains("hello@1.0.0 running"), "{text}");
    assert!(
        text.contains("2 devices, 2 online; hello@1.0.0: 2 (2 running)"),
        "{text}"
    );
    let o = wpm(
        &[
            "fleet",
            "status",
            "--json",
            "--group",
            "nowhere",
            "--registry",
            &url,
        ],
        cwd,
    )
    .await;
    assert_eq!(json(&o)["devices"], Value::Array(vec![]));

    // The device's events include the install.
    let o = wpm(
        &["device", "events", &ids[0], "--json", "--registry", &url],
        cwd,
    )
    .await;
    let events = json(&o);
    assert!(!events.as_array().unwrap().is_empty(), "{events}");

    // Lifecycle commands, with the registry given before the subcommand: the CLI waits
    // for the device's answer to its command's sequence.
    let o = wpm(
        &[
            "--registry",
            &url,
            "--json",
            "device",
            "stop",
            &ids[0],
            "hello",
        ],
        cwd,
    )
    .await;
    let answer = json(&o);
    assert_eq!(answer["applied"], true, "{answer}");
    let o = wpm(
        &["--registry", &url, "device", "start", &ids[0], "hello"],
        cwd,
    )
    .await;
    assert!(ok(&o).contains("start hello applied"), "{}", stdout(&o));
    let o = wpm(
        &["--registry", &url, "device", "stop", &ids[0], "nosuch"],
        cwd,
    )
    .await;
    fails_with(&o, "rejected");

    // A staged rollout followed to its end.
    std::fs::write(cwd.join("hello2.wat"), HELLO_V2_WAT).unwrap();
    let o = wpm(
        &[
            "--registry",
            &url,
            "publish",
            "hello2.wat",
            "--name",
            "hello",
            "--version",
            "2.0.0",
        ],
        cwd,
    )
    .await;
    ok(&o);
    let o = wpm(
        &[
            "--registry",
            &url,
            "--json",
            "rollout",
            "create",
            "hello@2.0.0",
            "--group",
            "field",
            "--stages",
            "50,100",
        ],
        cwd,
    )
    .await;
    let r = json(&o);
    assert_eq!(r["state"], "completed", "{r}");
    assert_eq!(r["counts"]["succeeded"], 2, "{r}");
    let o = wpm(&["--registry", &url, "rollout", "status"], cwd).await;
    assert!(
        ok(&o).contains("hello@2.0.0 → group field: completed"),
        "{}",
        stdout(&o)
    );

    fleet.stop().await.unwrap();
    registry.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_the_whole_system_until_ctrl_c() {
    use tokio::io::{AsyncBufReadExt, BufReader};

    let dir = tempfile::tempdir().unwrap();
    let mqtt = format!("127.0.0.1:{}", free_port());
    let data_dir = dir.path().join("demo-data");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_wpm"))
        .args([
            "demo",
            "--devices",
            "2",
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--http",
            "127.0.0.1:0",
            "--mqtt",
            &mqtt,
            "--every",
            "1",
        ])
        .current_dir(dir.path())
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Drain stderr all along so a chatty child can never block on a full pipe.
    let mut stderr_pipe = child.stderr.take().unwrap();
    let stderr_task = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut err = String::new();
        let _ = stderr_pipe.read_to_string(&mut err).await;
        err
    });
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = String::new();
    let (mut all_running, mut telemetry) = (false, false);
    let wait = tokio::time::timeout(Duration::from_secs(90), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            all_running |= line.contains("2 devices, 2 online; hello@1.0.0: 2 (2 running)");
            telemetry |= line.starts_with("[telemetry] demo-") && line.contains("\"hello\":1");
            seen.push_str(&line);
            seen.push('\n');
            if all_running && telemetry {
                return;
            }
        }
    })
    .await;
    assert!(wait.is_ok(), "demo did not get the fleet running:\n{seen}");
    // Keep reading stdout (the demo prints on) until it exits.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    assert!(seen.contains("published hello@1.0.0"), "{seen}");
    assert!(
        seen.contains("deployed hello@1.0.0 to group demo as sequence"),
        "{seen}"
    );
    assert!(seen.contains("export WPM_TOKEN="), "{seen}");
    assert!(data_dir.join("api-token").exists());

    // Ctrl-C: a clean stop with exit code 0.
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("demo stops after Ctrl-C")
        .unwrap();
    let err = stderr_task.await.unwrap();
    assert!(status.success(), "demo exit {status}:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Registers a simulated fleet's device keys, as `wpm sim` does before it starts one.
async fn register_fleet(registry: &wpm_registry::Registry, cfg: &wpm_sim::FleetConfig) {
    let devices: Vec<Value> = cfg
        .identities()
        .into_iter()
        .map(|(id, key)| serde_json::json!({"id": id, "public_key": hex::encode(key), "groups": cfg.groups}))
        .collect();
    let answer = reqwest::Client::new()
        .post(format!("{}/v1/devices", registry.http_url()))
        .bearer_auth(registry.token())
        .json(&serde_json::json!({ "devices": devices }))
        .send()
        .await
        .expect("registry answers");
    assert!(answer.status().is_success(), "{}", answer.status());
}
