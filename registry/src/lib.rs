//! The wpm registry: stores modules and deployments, signs what devices must run,
//! publishes it over MQTT, and ingests device status into the database.
//!
//! ```text
//! HTTP (axum) ──▶ db (sqlx Any: SQLite / PostgreSQL) ──▶ publish (rumqttc, retained QoS 1)
//!                                    ▲                          │
//!                 ingest (rumqttc) ──┘◀── status/presence/events ◀── broker (embedded rmqtt or external)
//! ```

pub mod config;
pub mod db;
pub mod deploy;
pub mod external_broker;
pub mod http;
pub mod ingest;
pub mod keys;
pub mod publish;
pub mod retained_guard;
pub mod rollout;
pub mod signer;
pub mod trust;

pub use config::{Config, ServeArgs};

/// The registry's log filter unless RUST_LOG says otherwise: the embedded broker logs
/// every device connection and disconnection at info, which would drown the registry's
/// own lines with a fleet attached.
pub const DEFAULT_LOG_FILTER: &str = "info,rmqtt=warn,rmqtt_net=warn";
pub use keys::{seal_deployment, seal_module_manifest};

use anyhow::Context as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// A running registry.
pub struct Registry {
    http_addr: SocketAddr,
    /// `http` or `https`.
    http_scheme: &'static str,
    mqtt_url: String,
    token: String,
    signer: Arc<signer::Signer>,
    stop: watch::Sender<bool>,
    http_task: tokio::task::JoinHandle<std::io::Result<()>>,
    renew_task: tokio::task::JoinHandle<()>,
    background: Vec<tokio::task::JoinHandle<()>>,
    publisher: Arc<publish::Publisher>,
    ingest: ingest::Ingest,
    db: db::Db,
    broker: Option<wpm_broker::Broker>,
    /// The registry's own login on the embedded broker.
    broker_login: Option<(String, String)>,
}

impl Registry {
    /// Starts everything and returns once the HTTP API answers and both MQTT connections
    /// (publisher, ingest with its subscriptions) are up, after republishing all deployed
    /// state to the broker.
    pub async fn start(config: Config) -> anyhow::Result<Registry> {
        anyhow::ensure!(
            (64..=65536).contains(&config.chunk_size),
            "chunk size must be between 64 and 65536 bytes, not {}",
            config.chunk_size
        );
        anyhow::ensure!(
            !config.manifest_ttl.is_zero(),
            "the manifest TTL must be positive"
        );
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating {}", config.data_dir.display()))?;
        let token = keys::load_or_create_token(&config.data_dir, config.token.as_deref())?;
        let db = db::Db::connect(&config.database_url()).await?;
        db.ensure_bootstrap_token(
            &keys::bootstrap_token_id(&token),
            &wpm_manifests::sha256(token.as_bytes()),
        )
        .await?;
        trust::recover(&config.data_dir, &db).await?;
        let signer = Arc::new(signer::Signer::load(&config.data_dir)?);

        let max_packet = config.max_packet_size();
        let mut embedded = None;
        let credentials;
        let mut client_tls = None;
        let (host, port, mqtt_url) = match &config.broker {
            Some(url) => {
                credentials = url.login.clone();
                if url.tls {
                    client_tls = Some(wpm_transport::client_config(config.broker_ca.as_deref())?);
                }
                (url.host.clone(), url.port, url.with_login(None).to_string())
            }
            None => {
                let password = keys::load_or_create_broker_password(&config.data_dir)?;
                let mut broker =
                    wpm_broker::BrokerConfig::new(config.mqtt_listen, max_packet as u32);
                broker.access = Some(wpm_broker::Access {
                    registry_password: password.clone(),
                    devices: Arc::new(db.clone()),
                });
                broker.device_tls = config.tls.clone();
                let b = wpm_broker::Broker::start(broker)?;
                // The registry's own clients stay on the loopback listener, in the clear.
                let own = b.registry_addr();
                let scheme = if config.tls.is_some() {
                    "mqtts"
                } else {
                    "mqtt"
                };
                let url = format!("{scheme}://{}", b.addr());
                embedded = Some(b);
                credentials = Some((wpm_broker::REGISTRY_USER.to_string(), password));
                (own.ip().to_string(), own.port(), url)
            }
        };
        let broker_stats = embedded.as_ref().map(|b| b.stats());
        let settings = publish::MqttSettings {
            host,
            port,
            max_packet_size: max_packet,
            credentials: credentials.clone(),
            tls: client_tls,
        };

        let (stop, stop_rx) = watch::channel(false);
        let publisher = Arc::new(
            publish::Publisher::connect(&settings, signer.clone(), stop_rx.clone())
                .await
                .with_context(|| format!("MQTT broker {mqtt_url}"))?,
        );
        let stats = Arc::new(ingest::IngestStats::default());
        if let Some(g) = &config.ingest_share_group {
            anyhow::ensure!(
                wpm_manifests::valid_name(g),
                "invalid ingest share group {g:?}"
            );
        }
        let replica = match &config.replica {
            Some(r) => {
                anyhow::ensure!(wpm_manifests::valid_name(r), "invalid replica name {r:?}");
                format!("wpm-registry-{r}")
            }
            None => keys::load_or_create_client_id(&config.data_dir)?,
        };
        let wake_controller = Arc::new(tokio::sync::Notify::new());
        let ingest = ingest::Ingest::start(
            &settings,
            ingest::IngestConfig {
                client_id: format!("{replica}-ingest"),
                session_expiry: config.ingest_session_expiry,
                share_group: config.ingest_share_group.clone(),
            },
            db.clone(),
            stats.clone(),
            wake_controller.clone(),
            stop_rx.clone(),
        )
        .await
        .with_context(|| format!("MQTT broker {mqtt_url}"))?;
        publish::republish_all(&db, &publisher).await?;

        let deployer = Arc::new(deploy::Deployer {
            db: db.clone(),
            signer: signer.clone(),
            publisher: publisher.clone(),
            manifest_ttl: config.manifest_ttl,
            lock: tokio::sync::Mutex::new(()),
        });
        let renew_task = tokio::spawn(deploy::renew_loop(deployer.clone(), stop_rx.clone()));
        let controller = Arc::new(rollout::Controller {
            deployer: deployer.clone(),
            // The pid lets an operator (and the replicas test) tell which process holds the lease.
            holder: format!("{replica}-pid{}", std::process::id()),
            wake: wake_controller.clone(),
            last_pass_ms: Default::default(),
            last_full_pass_ms: Default::default(),
            counts: Default::default(),
        });
        let guard_stats = Arc::new(retained_guard::GuardStats::default());
        let background = vec![
            tokio::spawn(retained_guard::run(
                settings.clone(),
                deployer.clone(),
                guard_stats.clone(),
                stop_rx.clone(),
            )),
            tokio::spawn(deploy::republish_on_reconnect(
                deployer.clone(),
                stop_rx.clone(),
            )),
            tokio::spawn(rollout::controller_loop(controller, stop_rx.clone())),
            tokio::spawn(trust::follow_loop(deployer.clone(), stop_rx.clone())),
        ];
        let state = Arc::new(http::AppState {
            db: db.clone(),
            signer: signer.clone(),
            token: token.clone(),
            deployer,
            stats,
            wake_controller,
            broker_stats,
            retained: guard_stats,
            chunk_size: config.chunk_size,
            max_module_size: config.max_module_size,
        });
        let listener = tokio::net::TcpListener::bind(config.http)
            .await
            .with_context(|| format!("HTTP API cannot listen on {}", config.http))?;
        let http_addr = listener.local_addr()?;
        let http_task = match &config.tls {
            None => tokio::spawn(serve_http(listener, http::router(state), stop_rx.clone())),
            Some(files) => {
                let tls = wpm_transport::server_config(files)?;
                tokio::spawn(serve_https(
                    listener,
                    http::router(state),
                    tls,
                    stop_rx.clone(),
                ))
            }
        };
        let http_scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        tracing::info!(http = %http_addr, mqtt = %mqtt_url, "registry ready");
        Ok(Registry {
            http_addr,
            http_scheme,
            mqtt_url,
            token,
            signer,
            stop,
            http_task,
            renew_task,
            background,
            publisher,
            ingest,
            db,
            broker: embedded,
            broker_login: credentials,
        })
    }

    /// `http://127.0.0.1:PORT`, or `https://…` (the real port when started with port 0).
    pub fn http_url(&self) -> String {
        let ip = if self.http_addr.ip().is_unspecified() {
            std::net::IpAddr::from([127, 0, 0, 1])
        } else {
            self.http_addr.ip()
        };
        format!(
            "{}://{}",
            self.http_scheme,
            SocketAddr::new(ip, self.http_addr.port())
        )
    }

    /// `mqtt://host:port` devices should connect to.
    pub fn mqtt_url(&self) -> String {
        self.mqtt_url.clone()
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// The username and password of the registry's own clients on its broker (the
    /// embedded one's, or the login in the external broker's URL; `None` for an open
    /// broker): for operator tools on this machine, which may read and publish anything.
    pub fn broker_login(&self) -> Option<(String, String)> {
        self.broker_login.clone()
    }

    /// The ed25519 key devices must trust.
    pub fn public_key(&self) -> [u8; 32] {
        self.signer.key().public()
    }

    /// Stops the HTTP API, the MQTT clients (flushing the ingest), the embedded broker,
    /// and closes the database.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        let http = self.http_task.await;
        let _ = self.renew_task.await;
        for task in self.background {
            let _ = task.await;
        }
        self.ingest.shutdown().await;
        if let Ok(p) = Arc::try_unwrap(self.publisher) {
            p.shutdown().await;
        }
        self.db.close().await;
        if let Some(b) = self.broker {
            // Joins the broker's threads: not on a runtime worker.
            tokio::task::spawn_blocking(move || b.stop()).await?;
        }
        http.context("HTTP task panicked")?
            .context("HTTP server failed")?;
        Ok(())
    }
}

/// Serves the API in the clear until `stop` flips.
async fn serve_http(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
}

/// Serves the API over TLS until `stop` flips. axum-server does each handshake in a
/// task of its own, so a client that stalls its handshake holds up nobody else.
async fn serve_https(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    tls: Arc<wpm_transport::rustls::ServerConfig>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let handle = axum_server::Handle::new();
    let on_stop = handle.clone();
    tokio::spawn(async move {
        let _ = stop.wait_for(|s| *s).await;
        on_stop.graceful_shutdown(Some(Duration::from_secs(5)));
    });
    let config = axum_server::tls_rustls::RustlsConfig::from_config(tls);
    axum_server::from_tcp_rustls(listener.into_std()?, config)?
        .handle(handle)
        .serve(router.into_make_service())
        .await
}

/// Starts the registry and runs it until Ctrl-C (or SIGTERM).
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let registry = Registry::start(Config::from(args)).await?;
    println!("wpm registry");
    println!("  HTTP API    {}", registry.http_url());
    println!("  MQTT broker {}", registry.mqtt_url());
    println!("  public key  {}", hex::encode(registry.public_key()));
    wait_for_signal().await;
    tracing::info!("shutting down");
    registry.shutdown().await
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
