//! Where the registry is and which token to send: flags > environment > config file >
//! `./wpm-data/api-token`. Clap already merges flags with the environment, so this file only
//! adds the two lower layers.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Deserialize;

use crate::ConnArgs;

pub const DEFAULT_REGISTRY: &str = "http://127.0.0.1:8470";

/// The registry's default data directory writes its token here; reading it lets a user on the
/// same machine run `wpm registry serve` in one terminal and `wpm publish` in another with no
/// setup at all.
pub const LOCAL_TOKEN_FILE: &str = "wpm-data/api-token";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    registry: Option<String>,
    token: Option<String>,
    ca_file: Option<PathBuf>,
}

/// Resolved connection settings for the registry API.
#[derive(Debug, Clone)]
pub struct Settings {
    pub registry: String,
    pub token: Option<String>,
    /// CA the registry's (https) and the broker's (mqtts) certificates must chain to.
    pub ca_file: Option<PathBuf>,
}

/// `$XDG_CONFIG_HOME/wpm/config.toml`, else `~/.config/wpm/config.toml`.
pub fn default_config_path() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").filter(|v| !v.is_empty())?).join(".config"),
    };
    Some(base.join("wpm").join("config.toml"))
}

fn read_config(path: &Path, explicit: bool) -> Result<FileConfig> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
        }
        // A missing default file is normal; a missing file the user named is a mistake.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
            Ok(FileConfig::default())
        }
        Err(e) => Err(e).with_context(|| format!("cannot read config file {}", path.display())),
    }
}

fn read_token_file(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let token = text.trim();
            Ok((!token.is_empty()).then(|| token.to_string()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read token file {}", path.display())),
    }
}

impl Settings {
    pub fn resolve(global: &ConnArgs) -> Result<Settings> {
        let (path, explicit) = match &global.config {
            Some(p) => (Some(p.clone()), true),
            None => (default_config_path(), false),
        };
        let file = match &path {
            Some(p) => read_config(p, explicit)?,
            None => FileConfig::default(),
        };
        let registry = global
            .registry
            .clone()
            .or(file.registry)
            .unwrap_or_else(|| DEFAULT_REGISTRY.to_string());
        let registry = registry.trim_end_matches('/').to_string();
        if !(registry.starts_with("http://") || registry.starts_with("https://")) {
            anyhow::bail!("registry address must start with http:// or https://, got `{registry}`");
        }
        let mut token = global.token.clone().or(file.token);
        if token.is_none() {
            token = read_token_file(Path::new(LOCAL_TOKEN_FILE))?;
            if token.is_some() {
                tracing::debug!("using the API token from ./{LOCAL_TOKEN_FILE}");
            }
        }
        let ca_file = global.ca_file.clone().or(file.ca_file);
        Ok(Settings {
            registry,
            token,
            ca_file,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_parses_both_keys() {
        let c: FileConfig = toml::from_str(
            "registry = \"https://r:1\"\ntoken = \"abc\"\nca_file = \"/etc/wpm/ca.pem\"\n",
        )
        .unwrap();
        assert_eq!(c.registry.as_deref(), Some("https://r:1"));
        assert_eq!(c.token.as_deref(), Some("abc"));
        assert_eq!(c.ca_file, Some(PathBuf::from("/etc/wpm/ca.pem")));
    }

    #[test]
    fn config_file_rejects_typos() {
        assert!(toml::from_str::<FileConfig>("regsitry = \"x\"").is_err());
    }

    #[test]
    fn missing_default_config_is_fine_missing_explicit_is_not() {
        let p = Path::new("/nonexistent/wpm/config.toml");
        assert!(read_config(p, false).is_ok());
        assert!(read_config(p, true).is_err());
    }
}
