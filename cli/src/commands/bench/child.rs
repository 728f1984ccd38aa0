//! The processes a bench runs besides itself: the registry (`wpm registry serve`, so its
//! CPU time and memory can be read from /proc apart from the simulated devices) and,
//! when asked, a Mosquitto of its own. Both die with the bench, even when it is killed.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::net::TcpStream;

use crate::client::Client;

/// Makes a child die with the bench, even when the bench is killed and cannot run
/// `kill_on_drop`.
pub fn die_with_parent(cmd: &mut tokio::process::Command) {
    // SAFETY: prctl is async-signal-safe, as pre_exec requires.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Raises the open-file limit so that `needed` sockets fit: the soft limit to the hard
/// one, and the hard one too when the process may (root may, up to the kernel's
/// `nr_open`). Fails, saying what to do, when the limit stays below `needed`.
pub fn raise_fd_limit(needed: u64) -> Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a stack struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            bail!("getrlimit failed");
        }
        let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(lim.rlim_max);
        if lim.rlim_max < needed {
            let raised = libc::rlimit {
                rlim_cur: needed.min(nr_open),
                rlim_max: needed.min(nr_open),
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    if lim.rlim_cur < needed {
        bail!(
            "this run needs {needed} open files but the limit is {} (raise it with `ulimit -n {needed}` as root, or use fewer devices)",
            lim.rlim_cur
        );
    }
    Ok(lim.rlim_cur)
}

/// A process's CPU seconds (user + system), split by what its threads do, and its peak
/// resident memory.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcessCost {
    pub total: f64,
    /// Threads of the embedded broker (its runtime's workers, named `wpm-broker…`).
    pub broker: f64,
    /// SQLite's worker threads (sqlx runs each connection on its own thread): the
    /// database's own work when it runs inside the registry.
    pub database: f64,
    pub peak_rss: u64,
}

/// What `pid` has spent so far ([`ProcessCost`]).
pub fn process_cost(pid: u32) -> Result<ProcessCost> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu = |stat: &str| -> Result<f64> {
        // Fields after the parenthesised command name; utime and stime are 14 and 15.
        let rest = stat.rsplit_once(')').context("odd /proc stat")?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        Ok((f[11].parse::<f64>()? + f[12].parse::<f64>()?) / ticks)
    };
    let mut cost = ProcessCost {
        total: cpu(&std::fs::read_to_string(format!("/proc/{pid}/stat"))?)?,
        ..ProcessCost::default()
    };
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let dir = task?.path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let sum = match name.as_str() {
            n if n.starts_with("wpm-broker") => &mut cost.broker,
            n if n.starts_with("sqlx-sqlite") => &mut cost.database,
            _ => continue,
        };
        // A thread that ended between listing and reading: its time is in the total.
        if let Ok(stat) = std::fs::read_to_string(dir.join("stat")) {
            *sum += cpu(&stat)?;
        }
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    cost.peak_rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024;
    Ok(cost)
}

/// Where the registry child gets its broker.
pub enum RegistryBroker<'a> {
    /// Its own embedded one on this port.
    Embedded { port: u16 },
    /// An external one.
    External(&'a str),
}

/// The registry as a child process on free ports; killed on drop.
pub struct RegistryChild {
    pub child: tokio::process::Child,
    pub client: Client,
    pub key: [u8; 32],
    /// The registry's own login on its embedded broker.
    pub login: Option<(String, String)>,
}

impl RegistryChild {
    pub async fn start(
        dir: &Path,
        broker: RegistryBroker<'_>,
        database: Option<&str>,
    ) -> Result<RegistryChild> {
        let http = format!("127.0.0.1:{}", free_port()?);
        let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
        cmd.args(["registry", "serve", "--data-dir"])
            .arg(dir)
            .args(["--http", &http]);
        match broker {
            RegistryBroker::External(url) => cmd.args(["--broker", url]),
            RegistryBroker::Embedded { port } => {
                cmd.args(["--mqtt-listen", &format!("127.0.0.1:{port}")])
            }
        };
        if let Some(db) = database {
            cmd.args(["--database", db]);
        }
        die_with_parent(&mut cmd);
        cmd.env(
            "RUST_LOG",
            std::env::var("WPM_BENCH_REGISTRY_LOG").unwrap_or("warn,rmqtt=off".into()),
        )
        .env_remove("WPM_TOKEN")
        .stdout(Stdio::null())
        .kill_on_drop(true);
        let mut child = cmd.spawn().context("starting the registry")?;
        let base = format!("http://{http}");
        let deadline = Instant::now() + Duration::from_secs(30);
        let (client, key) = loop {
            if let Ok(token) = std::fs::read_to_string(dir.join("api-token")) {
                let client = Client::with(&base, Some(token.trim().to_string()))?;
                if let Ok(key) = client.public_key().await {
                    break (client, key);
                }
            }
            if let Some(status) = child.try_wait()? {
                bail!("the registry exited during startup ({status})");
            }
            if Instant::now() > deadline {
                bail!("the registry did not come up on {http}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        // The registry's own broker login, with the embedded broker: the bench's raw
        // fan-out clients and publishers use it (devices log in as themselves).
        let login = std::fs::read_to_string(dir.join(wpm_registry::keys::BROKER_PASSWORD_FILE))
            .ok()
            .map(|p| (wpm_broker::REGISTRY_USER.to_string(), p.trim().to_string()));
        Ok(RegistryChild {
            child,
            client,
            key,
            login,
        })
    }

    pub fn pid(&self) -> Result<u32> {
        self.child.id().context("the registry exited")
    }
}

/// A Mosquitto of the bench's own, with the configuration `wpm broker config
/// --mosquitto` writes (without persistence), that can be killed and restarted on the
/// same port.
pub struct OwnMosquitto {
    config: tempfile::NamedTempFile,
    child: Option<tokio::process::Child>,
    pub port: u16,
}

impl OwnMosquitto {
    pub async fn start(port: u16) -> Result<OwnMosquitto> {
        let mut o = wpm_registry::external_broker::MosquittoOptions::new(port);
        o.bind = "127.0.0.1".into();
        o.persistence_dir = None;
        o.sys_interval_s = 1;
        let mut config = tempfile::NamedTempFile::new()?;
        std::io::Write::write_all(
            &mut config,
            wpm_registry::external_broker::mosquitto_conf(&o).as_bytes(),
        )?;
        let mut b = OwnMosquitto {
            config,
            child: None,
            port,
        };
        b.restart().await?;
        Ok(b)
    }

    pub async fn restart(&mut self) -> Result<()> {
        let mut cmd = tokio::process::Command::new("mosquitto");
        cmd.arg("-c")
            .arg(self.config.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().context("starting mosquitto")?;
        self.child = Some(child);
        for _ in 0..100 {
            if TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("mosquitto did not come up on port {}", self.port)
    }

    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill().await;
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }
}

/// A database of the bench's own on the PostgreSQL server `url` points to, dropped at the
/// end, so every run starts from empty tables.
pub struct FreshDatabase {
    pub url: String,
    admin: String,
    name: String,
}

/// For a postgres:// URL, a new database on that server; any other URL is used as is.
pub async fn fresh_database(url: &str) -> Result<FreshDatabase> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Ok(FreshDatabase {
            url: url.to_string(),
            admin: String::new(),
            name: String::new(),
        });
    }
    use sqlx::Connection as _;
    let name = format!("wpm_bench_{}_{}", std::process::id(), free_port()?);
    let mut admin = sqlx::PgConnection::connect(url)
        .await
        .with_context(|| format!("connecting to {}", wpm_registry::db::redact(url)))?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await?;
    let base = url.rsplit_once('/').map_or(url, |(b, _)| b);
    Ok(FreshDatabase {
        url: format!("{base}/{name}"),
        admin: url.to_string(),
        name,
    })
}

impl FreshDatabase {
    /// Drops the bench's database (best effort: a failure only leaves it behind).
    pub async fn drop(self) {
        if self.name.is_empty() {
            return;
        }
        use sqlx::Connection as _;
        if let Ok(mut admin) = sqlx::PgConnection::connect(&self.admin).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(&mut admin)
            .await;
        }
    }
}

/// CPU time of the registry and of the broker: the embedded broker's threads inside the
/// registry process, or the bench's own Mosquitto process.
pub struct Cost {
    registry: u32,
    mosquitto: Option<u32>,
    at: CpuSplit,
}

/// CPU seconds of the registry (its database threads included, its embedded broker's
/// not) and of the broker.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuSplit {
    pub registry: f64,
    /// Of `registry`: SQLite's threads (0 with PostgreSQL, a process of its own).
    pub database: f64,
    pub broker: f64,
}

impl Cost {
    pub fn start(registry: u32, mosquitto: Option<u32>) -> Result<Cost> {
        let mut c = Cost {
            registry,
            mosquitto,
            at: CpuSplit::default(),
        };
        c.at = c.now()?;
        Ok(c)
    }

    fn now(&self) -> Result<CpuSplit> {
        let r = process_cost(self.registry)?;
        let broker = match self.mosquitto {
            Some(pid) => process_cost(pid)?.total,
            None => r.broker,
        };
        Ok(CpuSplit {
            registry: r.total - r.broker,
            database: r.database,
            broker,
        })
    }

    /// CPU seconds since the start.
    pub fn since(&self) -> Result<CpuSplit> {
        let n = self.now()?;
        Ok(CpuSplit {
            registry: n.registry - self.at.registry,
            database: n.database - self.at.database,
            broker: n.broker - self.at.broker,
        })
    }
}
