//! Typed client for the registry HTTP API (docs/interfaces.md). Every call turns transport
//! failures and the registry's `{"error": ...}` answers into messages an operator can act on.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use indicatif::ProgressBar;
use reqwest::{RequestBuilder, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::Settings;

/// Upload piece size: small enough that the progress bar moves several times even for a
/// module of a few KiB, large enough not to matter for throughput.
const UPLOAD_PIECE: usize = 4 * 1024;

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

/// Optional placement hints stored with a module version.
#[derive(Debug, Default, Clone, Serialize)]
pub struct PublishOptions {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_limit: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fuel_per_turn: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub priority: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pinned: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct PublishedModule {
    pub name: String,
    pub version: String,
    pub sha256: String,
    pub size: u64,
    pub chunks: u64,
    #[serde(default)]
    pub chunk_size: Option<u64>,
}

pub struct PublishOutcome {
    pub module: PublishedModule,
    /// The registry's answer as sent, for `--json`.
    pub raw: Value,
    /// false when the registry already held these exact bytes under that name@version.
    pub created: bool,
}

/// Exactly one of group/device, or neither for the whole fleet.
#[derive(Debug, Clone, Serialize)]
pub struct DeployRequest {
    pub module: String,
    pub version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Health window asked of the new version; the registry's default when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_turns: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_seconds: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Deployment {
    pub sequence: u64,
    pub target: DeployTarget,
    #[serde(default)]
    pub expires_at: Value,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DeployTarget {
    pub kind: String,
    #[serde(default)]
    pub name: Option<String>,
}

impl std::fmt::Display for DeployTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.name {
            Some(name) => write!(f, "{} {}", self.kind, name),
            None => f.write_str(&self.kind),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct FleetStatus {
    pub devices: Vec<DeviceRow>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DeviceRow {
    pub device: String,
    #[serde(default)]
    pub online: bool,
    #[serde(default)]
    pub last_seen_ms: Option<u64>,
    #[serde(default)]
    pub sequence: Option<u64>,
    #[serde(default)]
    pub slots_used: Option<u64>,
    #[serde(default)]
    pub slots_total: Option<u64>,
    #[serde(default)]
    pub flash_free: Option<u64>,
    #[serde(default)]
    pub ram_free: Option<u64>,
    #[serde(default)]
    pub last_error: Option<String>,
    #[serde(default)]
    pub modules: Vec<DeviceModule>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DeviceModule {
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ModuleInfo {
    pub name: String,
    pub version: String,
    pub sha256: String,
    pub size: u64,
    #[serde(default)]
    pub chunks: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct DeviceEvent {
    pub at_ms: u64,
    pub kind: String,
    #[serde(default)]
    pub detail: Value,
}

impl Client {
    pub fn new(settings: &Settings) -> Result<Client> {
        Client::with_ca(
            &settings.registry,
            settings.token.clone(),
            settings.ca_file.as_deref(),
        )
    }

    pub fn with(base: &str, token: Option<String>) -> Result<Client> {
        Client::with_ca(base, token, None)
    }

    /// A client of the registry at `base`; an `https://` one's certificate must chain
    /// to `ca` (PEM), or to the system's roots when `ca` is `None`.
    pub fn with_ca(base: &str, token: Option<String>, ca: Option<&Path>) -> Result<Client> {
        let mut http = reqwest::Client::builder()
            .user_agent(concat!("wpm/", env!("CARGO_PKG_VERSION")))
            // A dead registry should fail fast; a slow upload over a poor link should not.
            .connect_timeout(Duration::from_secs(10));
        if base.starts_with("https://") {
            let tls = wpm_transport::client_config(ca)?;
            http = http.tls_backend_preconfigured((*tls).clone());
        }
        let http = http.build().context("cannot set up the HTTP client")?;
        Ok(Client {
            http,
            base: base.trim_end_matches('/').to_string(),
            token,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    fn authed(&self, req: RequestBuilder) -> RequestBuilder {
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    /// Sends and maps every failure to an operator-facing error.
    async fn send(&self, req: RequestBuilder) -> Result<Response> {
        let resp = req.send().await.map_err(|e| self.transport_error(e))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.text().await.unwrap_or_default();
        Err(self.http_error(status, &body))
    }

    fn transport_error(&self, e: reqwest::Error) -> anyhow::Error {
        if e.is_connect() {
            // reqwest nests hyper's and the OS's errors several levels deep; the innermost
            // one ("Connection refused") is the only one that tells the operator anything.
            let mut root: &dyn std::error::Error = &e;
            while let Some(next) = root.source() {
                root = next;
            }
            anyhow!("{root}").context(format!(
                "cannot reach the registry at {}: is it running? (wpm registry serve)",
                self.base
            ))
        } else if e.is_timeout() {
            anyhow::Error::new(e).context(format!("the registry at {} timed out", self.base))
        } else {
            anyhow::Error::new(e)
                .context(format!("request to the registry at {} failed", self.base))
        }
    }

    fn http_error(&self, status: StatusCode, body: &str) -> anyhow::Error {
        // The registry answers `{"error": "..."}`; anything else (a proxy's HTML page, say) is
        // shown trimmed so the operator still sees what came back.
        let message = serde_json::from_str::<Value>(body)
            .ok()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| {
                let t = body.trim();
                if t.is_empty() {
                    status
                        .canonical_reason()
                        .unwrap_or("no message")
                        .to_string()
                } else {
                    t.chars().take(300).collect()
                }
            });
        let code = status.as_u16();
        if status == StatusCode::UNAUTHORIZED {
            let hint = if self.token.is_some() {
                "the token was refused"
            } else {
                "no token was given"
            };
            anyhow!(
                "registry answered 401 Unauthorized: {message}\n\
                 hint: {hint}; pass --token, set WPM_TOKEN or `token` in the config file \
                 (the registry writes its token to <data-dir>/api-token)"
            )
        } else {
            anyhow!("registry answered {code}: {message}")
        }
    }

    async fn json(&self, resp: Response) -> Result<Value> {
        resp.json::<Value>()
            .await
            .with_context(|| format!("the registry at {} sent an unreadable answer", self.base))
    }

    async fn get_json(&self, path: &str) -> Result<Value> {
        let resp = self
            .send(self.authed(self.http.get(self.url(path))))
            .await?;
        self.json(resp).await
    }

    /// The registry's ed25519 public key (devices must trust it).
    pub async fn public_key(&self) -> Result<[u8; 32]> {
        let v = self.get_json("/v1/keys").await?;
        let hex_key = v
            .get("public_key")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("/v1/keys answer has no `public_key`"))?;
        parse_key(hex_key).context("the registry's /v1/keys answer")
    }

    /// Uploads module bytes; `progress` follows the bytes as they are handed to the socket.
    pub async fn publish(
        &self,
        name: &str,
        version: &str,
        options: &PublishOptions,
        wasm: Vec<u8>,
        progress: &ProgressBar,
    ) -> Result<PublishOutcome> {
        let total = wasm.len() as u64;
        progress.set_length(total);
        let bytes = Bytes::from(wasm);
        let pieces: Vec<Bytes> = (0..bytes.len())
            .step_by(UPLOAD_PIECE)
            .map(|start| bytes.slice(start..(start + UPLOAD_PIECE).min(bytes.len())))
            .collect();
        let bar = progress.clone();
        // The stream is polled by hyper only as fast as the connection accepts data, so the
        // bar advances with the upload rather than jumping to 100% at once.
        let body = futures_util::stream::iter(pieces.into_iter().map(move |piece| {
            bar.inc(piece.len() as u64);
            Ok::<Bytes, std::io::Error>(piece)
        }));
        let path = format!("/v1/modules/{name}/{version}");
        let req = self
            .authed(self.http.put(self.url(&path)))
            .query(options)
            .header(reqwest::header::CONTENT_TYPE, "application/wasm")
            .header(reqwest::header::CONTENT_LENGTH, total)
            .body(reqwest::Body::wrap_stream(body));
        let resp = self.send(req).await?;
        let created = resp.status() == StatusCode::CREATED;
        let raw = self.json(resp).await?;
        let module = serde_json::from_value(raw.clone())
            .context("the registry's publish answer is missing fields")?;
        Ok(PublishOutcome {
            module,
            raw,
            created,
        })
    }

    pub async fn modules(&self) -> Result<(Vec<ModuleInfo>, Value)> {
        let raw = self.get_json("/v1/modules").await?;
        let list = serde_json::from_value(raw.clone())
            .context("the registry's module list has an unexpected shape")?;
        Ok((list, raw))
    }

    pub async fn deploy(&self, req: &DeployRequest) -> Result<(Deployment, Value)> {
        let http = self
            .authed(self.http.post(self.url("/v1/deployments")))
            .json(req);
        let resp = self.send(http).await?;
        let raw = self.json(resp).await?;
        let d = serde_json::from_value(raw.clone())
            .context("the registry's deployment answer has an unexpected shape")?;
        Ok((d, raw))
    }

    /// GET a path (with query pairs) as JSON.
    pub async fn get_query(&self, path: &str, query: &[(&str, String)]) -> Result<Value> {
        let resp = self
            .send(self.authed(self.http.get(self.url(path)).query(query)))
            .await?;
        self.json(resp).await
    }

    /// POST a JSON body, answer as JSON.
    pub async fn post_json(&self, path: &str, body: &Value) -> Result<Value> {
        let resp = self
            .send(self.authed(self.http.post(self.url(path)).json(body)))
            .await?;
        self.json(resp).await
    }

    /// DELETE a path; the answer's body is not used.
    pub async fn delete(&self, path: &str) -> Result<()> {
        self.send(self.authed(self.http.delete(self.url(path))))
            .await?;
        Ok(())
    }

    /// Typed rows plus the raw answer for JSON pass-through; the registry filters by
    /// the `query` pairs (group, module, state).
    pub async fn fleet_status(&self, query: &[(&str, String)]) -> Result<(FleetStatus, Value)> {
        let raw = self.get_query("/v1/fleet/status", query).await?;
        let fs = serde_json::from_value(raw.clone())
            .context("the registry's fleet status has an unexpected shape")?;
        Ok((fs, raw))
    }

    pub async fn device_events(
        &self,
        device: &str,
        limit: Option<u32>,
    ) -> Result<(Vec<DeviceEvent>, Value)> {
        let mut req = self.authed(
            self.http
                .get(self.url(&format!("/v1/devices/{device}/events"))),
        );
        if let Some(limit) = limit {
            req = req.query(&[("limit", limit)]);
        }
        let resp = self.send(req).await?;
        let raw = self.json(resp).await?;
        let ev = serde_json::from_value(raw.clone())
            .context("the registry's event list has an unexpected shape")?;
        Ok((ev, raw))
    }
}

/// A 32-byte ed25519 public key in hex.
pub fn parse_key(s: &str) -> Result<[u8; 32]> {
    let mut key = [0u8; 32];
    hex::decode_to_slice(s.trim(), &mut key)
        .map_err(|e| anyhow!("`{s}` is not a 64-digit hex ed25519 public key ({e})"))?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_parsing() {
        assert_eq!(parse_key(&"ab".repeat(32)).unwrap(), [0xab; 32]);
        assert!(parse_key("abcd").is_err());
        assert!(parse_key(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn http_errors_show_the_registry_message_and_401_hint() {
        let c = Client::with("http://127.0.0.1:1", Some("t".into())).unwrap();
        let e = c.http_error(
            StatusCode::CONFLICT,
            r#"{"error":"hello@1.0.0 holds other bytes"}"#,
        );
        assert_eq!(
            e.to_string(),
            "registry answered 409: hello@1.0.0 holds other bytes"
        );
        let e = c.http_error(StatusCode::UNAUTHORIZED, r#"{"error":"bad token"}"#);
        assert!(e.to_string().contains("401 Unauthorized: bad token"));
        assert!(e.to_string().contains("WPM_TOKEN"));
        let e = c.http_error(StatusCode::BAD_GATEWAY, "");
        assert_eq!(e.to_string(), "registry answered 502: Bad Gateway");
    }

    #[test]
    fn publish_options_only_send_what_was_given() {
        let o = PublishOptions {
            priority: Some(3),
            pinned: Some(true),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&o).unwrap(),
            serde_json::json!({"priority": 3, "pinned": true})
        );
    }
}
