//! The built `wpm` binary, without a registry: help texts, argument errors, local failures and
//! an unreachable registry. Every failure must be a clear message and an exit code, never a
//! panic.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};

fn wpm(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wpm"))
        .args(args)
        .current_dir(cwd)
        // Isolate from the developer's own settings.
        .env_remove("WPM_REGISTRY")
        .env_remove("WPM_TOKEN")
        .env_remove("RUST_LOG")
        .env("XDG_CONFIG_HOME", cwd.join("no-config"))
        .output()
        .expect("run wpm")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn assert_no_panic(o: &Output) {
    let (out, err) = text(o);
    assert!(
        !out.contains("panicked") && !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "panic:\n{out}\n{err}"
    );
}

/// A port on 127.0.0.1 with nothing listening: bind, note the port, close.
fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn every_command_has_help_with_examples() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--help"],
            &["publish", "deploy", "fleet", "demo", "Examples:"],
        ),
        (
            &["publish", "--help"],
            &[
                "--name",
                "--version",
                "--memory-limit",
                "--fuel-per-turn",
                "--priority",
                "--pinned",
                "--registry",
                "--token",
                "--json",
                "Examples:",
            ],
        ),
        (
            &["deploy", "--help"],
            &[
                "NAME@VERSION",
                "--group",
                "--device",
                "--fleet",
                "Examples:",
            ],
        ),
        (&["fleet", "--help"], &["status"]),
        (
            &["fleet", "status", "--help"],
            &["--group", "--module", "--json", "Examples:"],
        ),
        (&["modules", "list", "--help"], &["--registry", "Examples:"]),
        (
            &["device", "events", "--help"],
            &["DEVICE", "--limit", "Examples:"],
        ),
        (&["registry", "serve", "--help"], &["--data-dir", "--http"]),
        (
            &["sim", "--help"],
            &[
                "--devices",
                "--broker",
                "--group",
                "--trust",
                "--id-prefix",
                "Examples:",
            ],
        ),
        (
            &["demo", "--help"],
            &["--devices", "--data-dir", "Examples:"],
        ),
    ];
    for (args, needles) in cases {
        let o = wpm(args, dir.path());
        let (out, err) = text(&o);
        assert!(o.status.success(), "{args:?}: {err}");
        for n in *needles {
            assert!(
                out.contains(n),
                "`wpm {}` help lacks {n}:\n{out}",
                args.join(" ")
            );
        }
    }
}

#[test]
fn bad_arguments_are_clap_errors_with_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["deploy", "hello", "--group", "eu"], "has no `@`"),
        (&["deploy", "hello@", "--fleet"], "empty version"),
        (&["deploy", "hello@1.0.0"], "--group"),
        (
            &["deploy", "hello@1.0.0", "--group", "a", "--fleet"],
            "cannot be used with",
        ),
        (&["publish", "x.wasm", "--name", "x"], "--version"),
        (
            &[
                "publish",
                "x.wasm",
                "--name",
                "x",
                "--version",
                "1",
                "--memory-limit",
                "lots",
            ],
            "invalid value",
        ),
        (&["fleet"], "Usage"),
        (&["frobnicate"], "unrecognized subcommand"),
        (
            &["sim", "--devices", "many"],
            "invalid value 'many' for '--devices",
        ),
    ];
    for (args, needle) in cases {
        let o = wpm(args, dir.path());
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(needle),
            "{args:?}: wanted {needle:?} in:\n{err}"
        );
        assert_no_panic(&o);
    }
}

#[test]
fn publish_of_a_missing_file_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let o = wpm(
        &["publish", "nope.wasm", "--name", "x", "--version", "1.0.0"],
        dir.path(),
    );
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("error: cannot read module file nope.wasm"),
        "{err}"
    );
    assert!(err.contains("No such file"), "{err}");
    assert_no_panic(&o);
}

#[test]
fn publish_of_invalid_wat_points_at_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.wat"),
        "(module\n  (func (export \"wpm_tick\")\n    i32.frobnicate))\n",
    )
    .unwrap();
    let o = wpm(
        &["publish", "bad.wat", "--name", "bad", "--version", "1.0.0"],
        dir.path(),
    );
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("bad.wat is not valid WebAssembly text"),
        "{err}"
    );
    assert!(err.contains("bad.wat:3:5"), "{err}");
    assert_no_panic(&o);
}

#[test]
fn invalid_names_are_refused_before_any_network() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("m.wat"), "(module)").unwrap();
    let o = wpm(
        &["publish", "m.wat", "--name", "a/b", "--version", "1"],
        dir.path(),
    );
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("invalid module name `a/b`"), "{err}");
}

#[test]
fn unreachable_registry_says_so() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("m.wat"), "(module)").unwrap();
    let url = format!("http://127.0.0.1:{}", closed_port());
    let runs: &[&[&str]] = &[
        &["publish", "m.wat", "--name", "m", "--version", "1"],
        &["deploy", "m@1", "--fleet"],
        &["fleet", "status"],
        &["modules", "list"],
        &["device", "events", "dev-1"],
    ];
    for args in runs {
        let mut args = args.to_vec();
        args.extend(["--registry", &url]);
        let o = wpm(&args, dir.path());
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains(&format!(
                "cannot reach the registry at {url}: is it running? (wpm registry serve)"
            )),
            "{args:?}: {err}"
        );
        assert!(err.starts_with("error: "), "{err}");
        assert_no_panic(&o);
    }
}

#[test]
fn registry_url_from_environment_and_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let env_port = closed_port();
    let o = Command::new(env!("CARGO_BIN_EXE_wpm"))
        .args(["fleet", "status"])
        .current_dir(dir.path())
        .env("WPM_REGISTRY", format!("http://127.0.0.1:{env_port}"))
        .env("XDG_CONFIG_HOME", dir.path())
        .output()
        .unwrap();
    assert!(
        text(&o).1.contains(&format!("127.0.0.1:{env_port}")),
        "{:?}",
        text(&o)
    );

    let cfg_port = closed_port();
    let cfg = dir.path().join("wpm.toml");
    std::fs::write(
        &cfg,
        format!("registry = \"http://127.0.0.1:{cfg_port}\"\ntoken = \"t\"\n"),
    )
    .unwrap();
    let o = wpm(
        &["fleet", "status", "--config", cfg.to_str().unwrap()],
        dir.path(),
    );
    assert!(
        text(&o).1.contains(&format!("127.0.0.1:{cfg_port}")),
        "{:?}",
        text(&o)
    );

    // A flag beats the config file.
    let o = wpm(
        &[
            "fleet",
            "status",
            "--config",
            cfg.to_str().unwrap(),
            "--registry",
            &format!("http://127.0.0.1:{env_port}"),
        ],
        dir.path(),
    );
    assert!(
        text(&o).1.contains(&format!("127.0.0.1:{env_port}")),
        "{:?}",
        text(&o)
    );

    // A config file the user names must exist and parse.
    let o = wpm(&["fleet", "status", "--config", "missing.toml"], dir.path());
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("cannot read config file missing.toml"));
    std::fs::write(&cfg, "registry = [").unwrap();
    let o = wpm(
        &["fleet", "status", "--config", cfg.to_str().unwrap()],
        dir.path(),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("invalid config file"), "{:?}", text(&o));
    assert_no_panic(&o);
}

#[test]
fn sim_and_demo_refuse_bad_settings_before_starting() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &["sim", "--devices", "0", "--trust", &"ab".repeat(32)],
            "--devices must be at least 1",
        ),
        (
            &["sim", "--broker", "http://x:1", "--trust", &"ab".repeat(32)],
            "bad --broker (want mqtt://HOST:PORT or mqtts://HOST:PORT)",
        ),
        (
            &["sim", "--trust", "abcd"],
            "not a 64-digit hex ed25519 public key",
        ),
        (
            &["sim", "--group", "a/b", "--trust", &"ab".repeat(32)],
            "invalid group `a/b`",
        ),
        (&["demo", "--devices", "0"], "--devices must be at least 1"),
    ];
    for (args, needle) in cases {
        let o = wpm(args, dir.path());
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains(needle),
            "{args:?}: wanted {needle:?} in:\n{err}"
        );
        assert_no_panic(&o);
    }
    // Without --trust, the key comes from the registry, which must then be reachable.
    let url = format!("http://127.0.0.1:{}", closed_port());
    let o = wpm(&["sim", "--registry", &url], dir.path());
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot fetch the registry key"), "{err}");
    assert!(err.contains("cannot reach the registry"), "{err}");
}
