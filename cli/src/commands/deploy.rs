//! `wpm deploy NAME@VERSION --group G | --device D | --fleet`.

use anyhow::{Context, Result};
use clap::{ArgGroup, Args};
use serde_json::Value;

use crate::client::{Client, DeployRequest, Deployment};
use crate::config::Settings;
use crate::output::{emit, emit_json, now_ms, relative_future};
use crate::GlobalArgs;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleSpec {
    pub name: String,
    pub version: String,
}

/// clap value parser: a bad spec is an argument error (exit code 2) with this message.
pub fn parse_module_spec(s: &str) -> Result<ModuleSpec, String> {
    let (name, version) = s
        .split_once('@')
        .ok_or_else(|| format!("expected NAME@VERSION, e.g. hello@1.0.0 (`{s}` has no `@`)"))?;
    if name.is_empty() || version.is_empty() {
        return Err(format!(
            "expected NAME@VERSION, e.g. hello@1.0.0 (`{s}` has an empty {})",
            if name.is_empty() { "name" } else { "version" }
        ));
    }
    if !wpm_manifests::valid_name(name) {
        return Err(format!(
            "invalid module name `{name}`: use 1 to 64 of A-Z a-z 0-9 _ - ."
        ));
    }
    Ok(ModuleSpec {
        name: name.to_string(),
        version: version.to_string(),
    })
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("target").required(true).args(["group", "device", "fleet"])))]
pub struct DeployArgs {
    /// What to deploy, as NAME@VERSION (must be published first)
    #[arg(value_name = "NAME@VERSION", value_parser = parse_module_spec)]
    pub module: ModuleSpec,

    /// Deploy to every device in this group
    #[arg(long, value_name = "G")]
    pub group: Option<String>,

    /// Deploy to this one device
    #[arg(long, value_name = "D")]
    pub device: Option<String>,

    /// Deploy to every device in the fleet
    #[arg(long)]
    pub fleet: bool,

    #[command(flatten)]
    pub health: HealthArgs,

    #[command(flatten)]
    pub conn: crate::ConnArgs,
}

/// The health window a new version must pass on each device before it is confirmed and
/// the old version freed (shared by `deploy` and `rollout create`).
#[derive(Debug, Clone, Args)]
pub struct HealthArgs {
    /// Scheduler turns the new version must run without trapping [registry default: 3]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub health_turns: Option<u32>,

    /// Seconds the new version must stay up [registry default: 0]
    #[arg(long, value_name = "S")]
    pub health_seconds: Option<u32>,
}

/// The registry gives `expires_at` in unix seconds (the manifest's own unit); accept
/// milliseconds too, told apart by magnitude (1e11 s is the year 5138, 1e11 ms is 1973).
fn unix_to_ms(t: u64) -> u64 {
    if t < 100_000_000_000 {
        t.saturating_mul(1000)
    } else {
        t
    }
}

pub fn describe(spec: &str, d: &Deployment) -> String {
    let expires = match &d.expires_at {
        Value::Number(n) => n
            .as_u64()
            .map(|t| format!(", expires {}", relative_future(unix_to_ms(t), now_ms())))
            .unwrap_or_default(),
        Value::String(s) => format!(", expires {s}"),
        _ => String::new(),
    };
    format!(
        "deployed {spec} to {} as sequence {}{expires}",
        d.target, d.sequence
    )
}

pub async fn deploy(client: &Client, req: &DeployRequest) -> Result<(Deployment, Value)> {
    client
        .deploy(req)
        .await
        .with_context(|| format!("cannot deploy {}@{}", req.module, req.version))
}

pub async fn run(global: &GlobalArgs, args: DeployArgs) -> Result<()> {
    if let Some(g) = &args.group {
        super::check_name("group", g)?;
    }
    if let Some(d) = &args.device {
        super::check_name("device id", d)?;
    }
    let settings = Settings::resolve(&args.conn)?;
    let client = Client::new(&settings)?;
    let req = DeployRequest {
        module: args.module.name.clone(),
        version: args.module.version.clone(),
        group: args.group,
        device: args.device,
        health_turns: args.health.health_turns,
        health_seconds: args.health.health_seconds,
    };
    let (deployment, raw) = deploy(&client, &req).await?;
    if global.json {
        emit_json(&raw);
    } else {
        emit(&describe(
            &format!("{}@{}", req.module, req.version),
            &deployment,
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_in_seconds_or_milliseconds() {
        let now_s = now_ms() / 1000;
        let d = |expires: u64| Deployment {
            sequence: 4,
            target: crate::client::DeployTarget {
                kind: "group".into(),
                name: Some("eu".into()),
            },
            expires_at: expires.into(),
        };
        let week = 7 * 86_400 + 60;
        assert_eq!(
            describe("hello@1", &d(now_s + week)),
            "deployed hello@1 to group eu as sequence 4, expires in 7d"
        );
        assert_eq!(
            describe("hello@1", &d((now_s + week) * 1000)),
            "deployed hello@1 to group eu as sequence 4, expires in 7d"
        );
    }

    #[test]
    fn module_specs() {
        assert_eq!(
            parse_module_spec("hello@1.0.0").unwrap(),
            ModuleSpec {
                name: "hello".into(),
                version: "1.0.0".into()
            }
        );
        assert!(parse_module_spec("hello").unwrap_err().contains("no `@`"));
        assert!(parse_module_spec("@1.0")
            .unwrap_err()
            .contains("empty name"));
        assert!(parse_module_spec("hello@")
            .unwrap_err()
            .contains("empty version"));
        assert!(parse_module_spec("a/b@1").is_err());
    }
}
