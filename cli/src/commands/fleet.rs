//! Read-only views: `wpm fleet status`, `wpm modules list`, `wpm device events`.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::Value;

use crate::client::{Client, DeviceRow};
use crate::config::Settings;
use crate::output::{emit, emit_json, human_size, now_ms, relative_time, Table};
use crate::GlobalArgs;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Only devices in this group
    #[arg(long, value_name = "G")]
    pub group: Option<String>,

    /// Only devices that have this module (any version, any state)
    #[arg(long, value_name = "NAME")]
    pub module: Option<String>,

    /// Only devices in this state (online and offline follow the MQTT last will; failing:
    /// a module failed or the device reports an error)
    #[arg(long, value_enum)]
    pub state: Option<DeviceStateFilter>,

    #[command(flatten)]
    pub conn: crate::ConnArgs,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum DeviceStateFilter {
    Online,
    Offline,
    Failing,
}

impl DeviceStateFilter {
    fn as_str(self) -> &'static str {
        match self {
            DeviceStateFilter::Online => "online",
            DeviceStateFilter::Offline => "offline",
            DeviceStateFilter::Failing => "failing",
        }
    }
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub conn: crate::ConnArgs,
}

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Device id
    #[arg(value_name = "DEVICE")]
    pub device: String,

    /// Most events to show
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub limit: u32,

    #[command(flatten)]
    pub conn: crate::ConnArgs,
}

/// The registry filters; these are its query parameters.
pub fn status_query(args: &StatusArgs) -> Vec<(&'static str, String)> {
    let mut q = Vec::new();
    if let Some(g) = &args.group {
        q.push(("group", g.clone()));
    }
    if let Some(m) = &args.module {
        q.push(("module", m.clone()));
    }
    if let Some(s) = args.state {
        q.push(("state", s.as_str().to_string()));
    }
    q
}

/// The device table, one line per device.
pub fn render_table(rows: &[DeviceRow], now: u64) -> String {
    let mut t = Table::new(&[
        "DEVICE",
        "ONLINE",
        "SEQ",
        "MODULES",
        "SLOTS",
        "FLASH FREE",
        "RAM FREE",
        "LAST ERROR",
        "LAST SEEN",
    ]);
    for r in rows {
        let modules = if r.modules.is_empty() {
            "-".to_string()
        } else {
            r.modules
                .iter()
                .map(|m| {
                    let state = if m.state.is_empty() { "?" } else { &m.state };
                    format!("{}@{} {state}", m.name, m.version)
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        let slots = match (r.slots_used, r.slots_total) {
            (Some(u), Some(t)) => format!("{u}/{t}"),
            _ => "-".into(),
        };
        // A module's own error (a trap, a failed health check) is as important as the
        // device's; show the device's first, else the first module error.
        let error = r
            .last_error
            .clone()
            .or_else(|| {
                r.modules
                    .iter()
                    .find_map(|m| m.last_error.as_ref().map(|e| format!("{}: {e}", m.name)))
            })
            .unwrap_or_else(|| "-".into());
        t.row(vec![
            r.device.clone(),
            if r.online { "yes" } else { "no" }.into(),
            r.sequence.map_or("-".into(), |s| s.to_string()),
            modules,
            slots,
            r.flash_free.map_or("-".into(), human_size),
            r.ram_free.map_or("-".into(), human_size),
            error,
            relative_time(r.last_seen_ms, now),
        ]);
    }
    t.render()
}

/// "5 devices, 4 online; hello@1.0.0: 5 (4 running, 1 downloading)".
pub fn summary(rows: &[DeviceRow]) -> String {
    let online = rows.iter().filter(|r| r.online).count();
    let mut per_version: BTreeMap<String, (usize, BTreeMap<String, usize>)> = BTreeMap::new();
    for r in rows {
        for m in &r.modules {
            let entry = per_version
                .entry(format!("{}@{}", m.name, m.version))
                .or_default();
            entry.0 += 1;
            let state = if m.state.is_empty() { "?" } else { &m.state };
            *entry.1.entry(state.to_string()).or_default() += 1;
        }
    }
    let noun = if rows.len() == 1 { "device" } else { "devices" };
    let mut s = format!("{} {noun}, {online} online", rows.len());
    for (spec, (count, states)) in per_version {
        let states = states
            .iter()
            .map(|(state, n)| format!("{n} {state}"))
            .collect::<Vec<_>>()
            .join(", ");
        s.push_str(&format!("; {spec}: {count} ({states})"));
    }
    s
}

pub async fn status(global: &GlobalArgs, args: StatusArgs) -> Result<()> {
    let client = Client::new(&Settings::resolve(&args.conn)?)?;
    let (fs, raw) = client
        .fleet_status(&status_query(&args))
        .await
        .context("cannot get the fleet status")?;
    if global.json {
        emit_json(&raw);
        return Ok(());
    }
    let rows = fs.devices;
    if rows.is_empty() {
        emit(&format!("no devices{}", filter_note(&args)));
    } else {
        emit(&render_table(&rows, now_ms()));
    }
    emit(&summary(&rows));
    Ok(())
}

fn filter_note(args: &StatusArgs) -> String {
    let mut parts = Vec::new();
    if let Some(g) = &args.group {
        parts.push(format!("in group {g}"));
    }
    if let Some(m) = &args.module {
        parts.push(format!("with module {m}"));
    }
    if let Some(st) = args.state {
        parts.push(st.as_str().to_string());
    }
    if parts.is_empty() {
        " have reported yet".into()
    } else {
        format!(" {}", parts.join(" "))
    }
}

pub async fn modules_list(global: &GlobalArgs, args: ListArgs) -> Result<()> {
    let client = Client::new(&Settings::resolve(&args.conn)?)?;
    let (list, raw) = client.modules().await.context("cannot list modules")?;
    if global.json {
        emit_json(&raw);
        return Ok(());
    }
    if list.is_empty() {
        emit("no modules published yet (wpm publish FILE --name NAME --version VERSION)");
        return Ok(());
    }
    let mut t = Table::new(&["NAME", "VERSION", "SIZE", "CHUNKS", "SHA256"]);
    for m in list {
        t.row(vec![
            m.name,
            m.version,
            human_size(m.size),
            m.chunks.map_or("-".into(), |c| c.to_string()),
            m.sha256,
        ]);
    }
    emit(&t.render());
    Ok(())
}

pub async fn device_events(global: &GlobalArgs, args: EventsArgs) -> Result<()> {
    super::check_name("device id", &args.device)?;
    let client = Client::new(&Settings::resolve(&args.conn)?)?;
    let (events, raw) = client
        .device_events(&args.device, Some(args.limit))
        .await
        .with_context(|| format!("cannot get the events of device {}", args.device))?;
    if global.json {
        emit_json(&raw);
        return Ok(());
    }
    if events.is_empty() {
        emit(&format!("no events from {} yet", args.device));
        return Ok(());
    }
    let now = now_ms();
    let mut t = Table::new(&["WHEN", "KIND", "DETAIL"]);
    for e in events {
        let detail = match &e.detail {
            Value::Null => String::new(),
            Value::Object(o) if o.is_empty() => String::new(),
            Value::Object(o) => o
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => format!("{k}={s}"),
                    other => format!("{k}={other}"),
                })
                .collect::<Vec<_>>()
                .join(" "),
            other => other.to_string(),
        };
        t.row(vec![relative_time(Some(e.at_ms), now), e.kind, detail]);
    }
    emit(&t.render());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::FleetStatus;
    use serde_json::json;

    fn sample() -> Value {
        json!({"devices": [
            {"device": "a", "groups": ["eu"], "online": true, "last_seen_ms": 9_000,
             "sequence": 3, "slots_used": 1, "slots_total": 4, "flash_free": 1, "ram_free": 2,
             "last_error": null,
             "modules": [{"name": "hello", "version": "1.0.0", "sha256": "ab", "state": "running", "last_error": null}]},
            {"device": "b", "groups": ["us"], "online": false, "last_seen_ms": null,
             "sequence": 0, "slots_used": 0, "slots_total": 4, "last_error": "flash full",
             "modules": [{"name": "hello", "version": "1.0.0", "sha256": "ab", "state": "downloading", "last_error": null},
                         {"name": "x", "version": "2", "sha256": "cd", "state": "failed", "last_error": "trap"}]}
        ]})
    }

    #[test]
    fn filters_become_the_registry_query() {
        let args = StatusArgs {
            group: Some("eu".into()),
            module: None,
            state: Some(DeviceStateFilter::Failing),
            conn: crate::ConnArgs {
                registry: None,
                token: None,
                config: None,
                ca_file: None,
            },
        };
        assert_eq!(
            status_query(&args),
            [
                ("group", "eu".to_string()),
                ("state", "failing".to_string())
            ]
        );
    }

    #[test]
    fn table_and_summary() {
        let raw = sample();
        let fs: FleetStatus = serde_json::from_value(raw).unwrap();
        let table = render_table(&fs.devices, 12_000);
        assert!(table.contains("hello@1.0.0 running"), "{table}");
        assert!(table.contains("3s ago"), "{table}");
        assert!(table.contains("never"), "{table}");
        assert!(table.contains("flash full"), "{table}");
        assert!(table.contains("1/4"), "{table}");
        assert_eq!(
            summary(&fs.devices),
            "2 devices, 1 online; hello@1.0.0: 2 (1 downloading, 1 running); x@2: 1 (1 failed)"
        );
    }
}
