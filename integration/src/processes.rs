//! Child processes the tests start and kill: workspace binaries, registry replicas, a
//! Mosquitto of a test's own.

use crate::{free_port, port_open, wait_for, Api};
use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// The `wpm-registry` binary, built if needed.
pub fn registry_binary() -> Result<PathBuf> {
    workspace_binary("wpm-registry", "wpm-registry")
}

/// The `wpm` CLI binary, built if needed.
pub fn cli_binary() -> Result<PathBuf> {
    workspace_binary("wpm-cli", "wpm")
}

/// A binary of this workspace, built if needed (it is not a target of this crate, so
/// cargo does not build it for these tests by itself).
fn workspace_binary(package: &str, bin: &str) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "-q", "-p", package, "--bin", bin])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .with_context(|| format!("running cargo build -p {package}"))?;
    if !status.success() {
        bail!("cargo build -p {package} failed ({status})");
    }
    // Tests run from target/debug/deps; the binary sits in target/debug.
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .context("test binary outside target/")?
        .join(bin);
    anyhow::ensure!(path.exists(), "{} not found", path.display());
    Ok(path)
}

/// A registry replica in a child process, one of several on one database.
pub struct Replica {
    pub process: Child,
    pub api: Api,
}

impl Replica {
    /// Starts `wpm-registry` on a free HTTP port, using `broker`, splitting ingest with
    /// the replicas of share group `share`, and under the stable name `name`.
    pub fn start(
        data: &std::path::Path,
        db: &str,
        broker: &str,
        share: &str,
        token: &str,
        name: &str,
    ) -> Result<Replica> {
        let http = format!("127.0.0.1:{}", free_port());
        let child = Command::new(registry_binary()?)
            .arg("--data-dir")
            .arg(data)
            .args(["--http", &http, "--broker", broker, "--database", db])
            .args(["--ingest-share-group", share, "--token", token])
            .args(["--replica", name, "--ingest-session-hours", "1"])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()?;
        Ok(Replica {
            process: Child(child),
            api: Api::new(format!("http://{http}"), token),
        })
    }

    /// Waits until it answers HTTP.
    pub async fn wait_up(&self) -> Result<()> {
        wait_for("a replica to answer", Duration::from_secs(30), || async {
            Ok(self.api.get("/v1/health").await.ok().map(|_| ()))
        })
        .await
    }
}

/// A data directory holding one signing key, for replicas that must sign alike.
pub fn shared_data_dir() -> Result<tempfile::TempDir> {
    let data = tempfile::tempdir()?;
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).unwrap();
    std::fs::write(data.path().join("signing.key"), hex::encode(seed))?;
    Ok(data)
}

/// A child process killed (SIGKILL) when dropped.
pub struct Child(pub std::process::Child);

impl Child {
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Mosquitto of the test's own on a free port, without persistence: killing it loses
/// every retained message, as a broker restart without persistence does.
pub struct OwnMosquitto {
    pub port: u16,
    config: tempfile::NamedTempFile,
    process: Option<Child>,
}

impl OwnMosquitto {
    /// With the configuration `wpm broker config --mosquitto` writes, in memory only.
    pub fn start() -> Result<OwnMosquitto> {
        let port = free_port();
        let mut o = wpm_registry::external_broker::MosquittoOptions::new(port);
        o.bind = "127.0.0.1".into();
        o.persistence_dir = None;
        Self::with_config(port, &wpm_registry::external_broker::mosquitto_conf(&o))
    }

    /// With this configuration text, whose (first) listener is on `port`.
    pub fn with_config(port: u16, text: &str) -> Result<OwnMosquitto> {
        let config = tempfile::NamedTempFile::new()?;
        std::fs::write(config.path(), text)?;
        let mut m = OwnMosquitto {
            port,
            config,
            process: None,
        };
        m.restart()?;
        Ok(m)
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// SIGKILL: no clean disconnects, no last wills delivered by a graceful shutdown.
    pub fn kill(&mut self) {
        self.process.take();
    }

    /// SIGHUP: it reads its password and ACL files again.
    pub fn reload(&self) -> Result<()> {
        let pid = (self.process.as_ref().map(|c| c.0.id())).context("mosquitto is not running")?;
        let status = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -HUP {pid} failed");
        Ok(())
    }

    /// Starts it (again) on the same port.
    pub fn restart(&mut self) -> Result<()> {
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(self.config.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting mosquitto (apt-get install mosquitto)")?;
        self.process = Some(Child(child));
        for _ in 0..100 {
            if port_open(self.port) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("mosquitto did not come up on port {}", self.port)
    }
}
