//! Read-only views: `wpm fleet status`, `wpm modules list`, `wpm device events`.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::Value;

use crate::client::{Client, DeviceRow, FleetStatus};
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

    #[command(flatten)]
    pub conn: crate::ConnArgs,
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

fn keep(row: &DeviceRow, group: Option<&str>, module: Option<&str>) -> bool {
    group.is_none_or(|g| row.groups.iter().any(|x| x == g))
        && module.is_none_or(|m| row.modules.iter().any(|x| x.name == m))
}

/// Applies the filters to the typed rows and to the raw JSON alike, so `--json` passes the
/// registry's own objects through, untouched apart from the filtering.
pub fn filter(
    status: FleetStatus,
    raw: Value,
    group: Option<&str>,
    module: Option<&str>,
) -> (Vec<DeviceRow>, Value) {
    let raw_devices = match raw.get("devices") {
        Some(Value::Array(a)) => a.clone(),
        _ => Vec::new(),
    };
    let mut rows = Vec::new();
    let mut kept = Vec::new();
    for (i, row) in status.devices.into_iter().enumerate() {
        if keep(&row, group, module) {
            if let Some(r) = raw_devices.get(i) {
                kept.push(r.clone());
            }
            rows.push(row);
        }
    }
    let mut out = raw;
    if let Some(obj) = out.as_object_mut() {
        obj.insert("devices".into(), Value::Array(kept));
    }
    (rows, out)
}

/// The device table, one line per device.
pub fn render_table(rows: &[DeviceRow], now: u64) -> String {
    let mut t = Table::new(&[
        "DEVICE",
        "ONLINE",
        "SEQ",
        "MODULES",
        "SLOTS",
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
        .fleet_status()
        .await
        .context("cannot get the fleet status")?;
    let (rows, raw) = filter(fs, raw, args.group.as_deref(), args.module.as_deref());
    if global.json {
        emit_json(&raw);
        return Ok(());
    }
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
    fn filters_rows_and_raw_json_together() {
        let raw = sample();
        let fs: FleetStatus = serde_json::from_value(raw.clone()).unwrap();
        let (rows, out) = filter(fs, raw, Some("us"), None);
        assert_eq!(rows.len(), 1);
        assert_eq!(out["devices"].as_array().unwrap().len(), 1);
        assert_eq!(out["devices"][0]["device"], "b");
        // Fields the CLI does not model still pass through.
        assert_eq!(out["devices"][0]["slots_total"], 4);

        let raw = sample();
        let fs: FleetStatus = serde_json::from_value(raw.clone()).unwrap();
        let (rows, _) = filter(fs, raw, None, Some("x"));
        assert_eq!(
            rows.iter().map(|r| r.device.as_str()).collect::<Vec<_>>(),
            ["b"]
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
