//! A real firmware image in the fleet: the QEMU mps2-an505 board's `netdevice` (the same
//! device loop, device-pm core and wasmi as the nRF9160 image, on a Cortex-M33, over the
//! emulated LAN9118 Ethernet) joins three simulated devices in one group, and all four
//! install hello 1.0.0 and then upgrade to 2.0.0 from the registry. Between the two the
//! registry rotates its signing key, and after them it retires the old one: the
//! firmware follows the trust chain as the simulated devices do.
//!
//! The broker is the registry's embedded one, the single-machine default: the firmware
//! speaks MQTT 5 (rust-mqtt 0.6), the simulated devices too, with the same tunables.
//!
//! Needs `qemu-system-arm` (installed by `bash firmware/run-qemu-tests`, which CI runs
//! before `cargo test`) and the firmware toolchain target; the test builds the firmware
//! itself (cargo does nothing when it is up to date).

use anyhow::{bail, Context, Result};
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use wpm_integration::{cli_binary, unique, Backend, Env};

/// wasmi under TCG emulation is slower than the simulator, and QEMU's device turns once
/// a second (3 turns of health check per upgrade): generous.
const CONVERGE: Duration = Duration::from_secs(240);

fn firmware_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../firmware")
}

/// Runs cargo in the firmware workspace, which has its own target (`.cargo/config.toml`)
/// and target directory: what the test's own cargo exported must not leak into it.
fn firmware_cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(args)
        .current_dir(firmware_dir())
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .context("running cargo in firmware/")?;
    if !out.status.success() {
        bail!(
            "`cargo {}` in firmware/ failed ({}):\n{}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Provisions the QEMU device as an operator would: `wpm device add` makes its key pair
/// and registers the public half, then the firmware's own tool turns the record into
/// the flash region.
fn provision(out: &Path, env: &Env, device: &str, group: &str, port: u16) -> Result<()> {
    let record = out.with_extension("json");
    let status = Command::new(cli_binary()?)
        .args(["device", "add", device, "--group", group, "--out"])
        .arg(&record)
        .args(["--registry", &env.registry.http_url()])
        .args(["--token", env.registry.token()])
        .status()
        .context("running wpm device add")?;
    if !status.success() {
        bail!("wpm device add failed ({status})");
    }
    firmware_cargo(&[
        "build",
        "--release",
        "--locked",
        "--target",
        "x86_64-unknown-linux-gnu",
        "-p",
        "wpm-provision",
    ])?;
    let tool = firmware_dir().join("target/x86_64-unknown-linux-gnu/release/wpm-provision");
    let broker = format!("10.0.2.2:{port}");
    let status = Command::new(&tool)
        .arg("--record")
        .arg(&record)
        .args(["--broker", &broker, "--out"])
        .arg(out)
        .status()
        .with_context(|| format!("running {}", tool.display()))?;
    if !status.success() {
        bail!("wpm-provision failed ({status})");
    }
    Ok(())
}

/// QEMU, killed when the test ends however it ends.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn boot(elf: &Path, prov: &Path) -> Result<Qemu> {
    if Command::new("qemu-system-arm")
        .arg("--version")
        .output()
        .is_err()
    {
        bail!("qemu-system-arm is not installed: run `bash firmware/run-qemu-tests` first (it installs it)");
    }
    // No -icount: the guest's clocks follow the host's, as MQTT keep-alives need.
    // 10.0.2.2 in QEMU's user-mode network is the host's 127.0.0.1.
    let mut child = Command::new("qemu-system-arm")
        .args(["-M", "mps2-an505", "-nographic"])
        .args(["-semihosting-config", "enable=on,target=native"])
        .args(["-nic", "user,model=lan9118"])
        .arg("-kernel")
        .arg(elf)
        .arg("-device")
        .arg(format!(
            "loader,file={},addr=0x10180000,force-raw=on",
            prov.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-arm")?;
    // The device's console (semihosting) goes to the test's output, shown on failure.
    for (name, pipe) in [
        (
            "stdout",
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ),
        (
            "stderr",
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ),
    ] {
        if let Some(pipe) = pipe {
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    println!("qemu-0 {name}: {line}");
                }
            });
        }
    }
    Ok(Qemu(child))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn qemu_device_installs_and_upgrades_with_the_fleet() -> Result<()> {
    firmware_cargo(&["build", "--release", "--locked", "-p", "wpm-qemu-an505"])?;
    let elf = firmware_dir().join("target/thumbv8m.main-none-eabihf/release/netdevice");

    let env = Env::start(Backend::EmbeddedSqlite).await?;
    let port = env.mqtt_url.parse::<wpm_transport::BrokerUrl>()?.port;
    let group = unique("qemu");
    let dir = tempfile::tempdir()?;
    let prov = dir.path().join("prov.bin");
    provision(&prov, &env, "qemu-0", &group, port)?;
    let mut qemu = boot(&elf, &prov)?;

    let fleet = env.api.start_fleet(env.fleet_config(3, &group)).await?;
    let mut devices = fleet.device_ids().to_vec();
    devices.push("qemu-0".to_string());

    env.api.publish_hello().await?;
    for version in ["1.0.0", "2.0.0"] {
        if version == "2.0.0" {
            // 2.0.0 is sealed by a key the devices learn from the trust chain.
            env.api.post("/v1/keys/rotate", json!({})).await?.ok()?;
            env.api.wait_trust_epoch(1, CONVERGE).await?;
        }
        let started = std::time::Instant::now();
        env.api.deploy("hello", version, &group).await?.ok()?;
        let converged = env
            .api
            .wait_running(&devices, "hello", version, CONVERGE)
            .await;
        if let Ok(Some(status)) = qemu.0.try_wait() {
            bail!("QEMU exited ({status}) while waiting for hello@{version}");
        }
        converged?;
        println!(
            "deploy → 3 simulated devices + qemu-0 run hello@{version}: {:?}",
            started.elapsed()
        );
    }
    // The emulated device's health check passed (3 turns of 2.0.0 without a trap) and
    // it deleted 1.0.0 from its flash.
    env.api
        .wait_event("qemu-0", "removed", "1.0.0", CONVERGE)
        .await
        .context("qemu-0 confirming hello 2.0.0")?;
    // Upgraded, not added: v1 runs nowhere any more, the QEMU device included.
    let status = env.api.fleet_status().await?;
    for d in &devices {
        assert!(
            !wpm_integration::device_runs(&status, d, "hello", "1.0.0"),
            "{d} still runs hello 1.0.0"
        );
    }
    // Retired: the QEMU device, like the others, trusts the new key alone, in its flash.
    let retired = env.api.post("/v1/keys/retire", json!({})).await?.ok()?;
    assert_eq!(retired["epoch"], 2, "{retired}");
    env.api.wait_trust_epoch(2, CONVERGE).await?;
    drop(qemu);
    fleet.stop().await?;
    env.registry.shutdown().await
}
