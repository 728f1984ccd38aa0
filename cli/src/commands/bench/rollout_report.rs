//! How `wpm bench rollout` prints its figures: one line per run of a loop, or the full
//! report of one run.

use serde_json::Value;

use crate::output::human_size;

pub(super) fn summary_line(i: usize, r: &Value) -> String {
    format!(
        "run {i}: deploy {:.1} s (distribution {:.1} s), rollout {:.1} s, reports lost {}",
        r["deploy"]["total_seconds"].as_f64().unwrap_or(0.0),
        r["deploy"]["distribution_seconds"].as_f64().unwrap_or(0.0),
        r["rollout"]["total_seconds"].as_f64().unwrap_or(0.0),
        r["reports"]["lost"],
    )
}

/// Reports per device by kind, events by kind in brackets.
fn per_device(v: &Value) -> String {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let events: Vec<String> = (v["events"].as_object().into_iter().flatten())
        .map(|(k, n)| format!("{k} {:.2}", f(n)))
        .collect();
    format!(
        "status {:.2}, presence {:.2}, telemetry {:.2}, events [{}]",
        f(&v["status"]),
        f(&v["presence"]),
        f(&v["telemetry"]),
        events.join(", ")
    )
}

pub(super) fn render(r: &Value) -> String {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let cpu = |v: &Value| {
        format!(
            "registry {:.2} s (SQLite threads {:.2} s) + broker {:.2} s",
            f(&v["registry"]),
            f(&v["database"]),
            f(&v["broker"])
        )
    };
    let bytes = |v: &Value| v.as_u64().map_or("n/a".to_string(), human_size);
    let ratio = |v: &Value| v.as_f64().map_or("n/a".to_string(), |x| format!("{x:.2}"));
    format!(
        "{} module to {} devices via {} ({} database), health window {} turn(s)\n\
         \x20 one-shot group deploy         {:.1} s total: distribution {:.1} s, confirmation {:.1} s\n\
         \x20 staged rollout {:<14} {:.1} s total (stages started at {}), distribution {:.1} s\n\
         \x20 raw fan-out of the same bytes fetch (device pattern) {} s, push {} s\n\
         \x20 deploy distribution / raw     {} (fetch), {} (push)\n\
         \x20 device reports                {} sent, {} written or refused, {} lost ({} more: last wills of {} dropped links)\n\
         \x20 rollout traffic ({})\n\
         \x20   broker → devices            {} messages, {}\n\
         \x20   devices → broker            {} messages, {}\n\
         \x20 CPU per 1,000 devices         deploy: {}; rollout: {}\n\
         \x20 CPU per 1,000 reports         deploy: {} ({} reports); rollout: {} ({} reports)\n\
         \x20 reports per device            deploy: {}\n\
         \x20                               rollout: {}\n\
         \x20 registry peak memory          {}\n\
         \x20 fleet summary answered in     {} ms median, {} ms at most",
        human_size(r["module_size"].as_u64().unwrap_or(0)),
        r["devices"],
        r["broker"].as_str().unwrap_or("?"),
        r["database"].as_str().unwrap_or("?"),
        r["health_turns"],
        f(&r["deploy"]["total_seconds"]),
        f(&r["deploy"]["distribution_seconds"]),
        f(&r["deploy"]["confirmation_seconds"]),
        r["stages"].to_string(),
        f(&r["rollout"]["total_seconds"]),
        r["rollout"]["stage_start_seconds"],
        f(&r["rollout"]["distribution_seconds"]),
        ratio(&r["raw_fanout"]["fetch_seconds"]),
        ratio(&r["raw_fanout"]["push_seconds"]),
        ratio(&r["ratios"]["deploy_distribution_over_fetch"]),
        ratio(&r["ratios"]["deploy_distribution_over_push"]),
        r["reports"]["sent_by_devices"],
        r["reports"]["written_or_refused_by_registry"],
        r["reports"]["lost"],
        r["reports"]["extra"],
        r["reports"]["device_link_drops"],
        r["rollout_traffic"]["counted_at"].as_str().unwrap_or("?"),
        r["rollout_traffic"]["to_devices"]["messages"],
        bytes(&r["rollout_traffic"]["to_devices"]["bytes"]),
        r["rollout_traffic"]["from_devices"]["messages"],
        bytes(&r["rollout_traffic"]["from_devices"]["bytes"]),
        cpu(&r["deploy"]["cpu_seconds_per_1000_devices"]),
        cpu(&r["rollout"]["cpu_seconds_per_1000_devices"]),
        cpu(&r["deploy"]["cpu_seconds_per_1000_reports"]),
        r["deploy"]["reports"],
        cpu(&r["rollout"]["cpu_seconds_per_1000_reports"]),
        r["rollout"]["reports"],
        per_device(&r["deploy"]["reports_per_device"]),
        per_device(&r["rollout"]["reports_per_device"]),
        human_size(r["registry_peak_rss_bytes"].as_u64().unwrap_or(0)),
        ratio(&r["fleet_summary_latency"]["median_ms"]),
        ratio(&r["fleet_summary_latency"]["max_ms"]),
    )
}
