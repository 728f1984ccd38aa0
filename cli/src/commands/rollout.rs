//! `wpm rollout create|status|pause|resume|rollback`: staged rollouts to a group.

use std::io::IsTerminal as _;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};

use crate::client::Client;
use crate::commands::deploy::{parse_module_spec, HealthArgs, ModuleSpec};
use crate::config::Settings;
use crate::output::{emit, emit_json, now_ms, relative_time, Table};
use crate::GlobalArgs;

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Start a staged rollout of NAME@VERSION to a group and follow it
    #[command(after_help = "Examples:
  wpm rollout create hello@2.0.0 --group eu
  wpm rollout create hello@2.0.0 --group eu --stages 5,25,100 --max-failure-pct 2 --no-wait")]
    Create(CreateArgs),
    /// One rollout's progress (with --watch, until it ends), or the list of rollouts
    #[command(after_help = "Examples:
  wpm rollout status
  wpm rollout status 4 --watch
  wpm rollout status 4 --json")]
    Status(StatusArgs),
    /// Stop starting new stages (devices already updating carry on)
    Pause(IdArgs),
    /// Continue a paused rollout
    Resume(IdArgs),
    /// Send every device the rollout reached back to the previous version
    Rollback(IdArgs),
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// What to roll out, as NAME@VERSION (must be published first)
    #[arg(value_name = "NAME@VERSION", value_parser = parse_module_spec)]
    pub module: ModuleSpec,

    /// The group to roll out to (membership: the groups devices report)
    #[arg(long, value_name = "G")]
    pub group: String,

    /// Cumulative percentages of the group per stage, ending with 100
    #[arg(long, value_name = "PCTS", value_delimiter = ',', default_values_t = [1u8, 10, 100])]
    pub stages: Vec<u8>,

    /// Halt and roll back when more than this percentage of the updated devices failed
    #[arg(long, value_name = "PCT", default_value_t = 10)]
    pub max_failure_pct: u8,

    /// A device that has not confirmed the new version within this many seconds failed
    #[arg(long, value_name = "SECS", default_value_t = 600)]
    pub stage_timeout: u64,

    #[command(flatten)]
    pub health: HealthArgs,

    /// Return once the rollout is created instead of following it
    #[arg(long)]
    pub no_wait: bool,

    #[command(flatten)]
    pub conn: crate::ConnArgs,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Rollout id (none: list every rollout)
    pub id: Option<i64>,

    /// Follow the rollout until it completes or is rolled back
    #[arg(long)]
    pub watch: bool,

    #[command(flatten)]
    pub conn: crate::ConnArgs,
}

#[derive(Debug, Args)]
pub struct IdArgs {
    /// Rollout id
    pub id: i64,

    #[command(flatten)]
    pub conn: crate::ConnArgs,
}

impl RolloutCommand {
    pub fn conn_mut(&mut self) -> &mut crate::ConnArgs {
        match self {
            RolloutCommand::Create(a) => &mut a.conn,
            RolloutCommand::Status(a) => &mut a.conn,
            RolloutCommand::Pause(a) | RolloutCommand::Resume(a) | RolloutCommand::Rollback(a) => {
                &mut a.conn
            }
        }
    }
}

fn finished(r: &Value) -> bool {
    matches!(r["state"].as_str(), Some("completed" | "rolled_back"))
}

/// "rollout 4 hello@2.0.0 → group eu: running, stage 2/3 (10 %), 12/100 devices: 11 ok, 1 failed".
pub fn describe(r: &Value) -> String {
    let stages = r["stages"].as_array().map_or(0, Vec::len);
    let stage = r["stage"].as_u64().unwrap_or(0) as usize;
    let pct = stage
        .checked_sub(1)
        .and_then(|i| r["stages"][i].as_u64())
        .map_or(String::new(), |p| format!(" ({p} %)"));
    let c = &r["counts"];
    let mut s = format!(
        "rollout {} {}@{} → group {}: {}, stage {stage}/{stages}{pct}, {} devices: {} ok, {} updating, {} failed",
        r["id"],
        r["module"].as_str().unwrap_or("?"),
        r["version"].as_str().unwrap_or("?"),
        r["group"].as_str().unwrap_or("?"),
        r["state"].as_str().unwrap_or("?"),
        c["assigned"],
        c["succeeded"],
        c["updating"],
        c["failed"],
    );
    if c["rolled_back"].as_u64().unwrap_or(0) > 0 {
        s.push_str(&format!(", {} rolled back", c["rolled_back"]));
    }
    if let Some(reason) = r["reason"].as_str() {
        s.push_str(&format!(" — {reason}"));
    }
    s
}

/// Polls the rollout until it ends, showing its progress on a spinner (stderr, terminals
/// only). Returns the final state.
async fn follow(client: &Client, id: i64, quiet: bool) -> Result<Value> {
    let bar = if quiet || !std::io::stderr().is_terminal() {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} [{elapsed}]") {
            bar.set_style(style);
        }
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    };
    loop {
        let r = client
            .get_query(&format!("/v1/rollouts/{id}"), &[])
            .await
            .with_context(|| format!("cannot get rollout {id}"))?;
        bar.set_message(describe(&r));
        if finished(&r) {
            bar.finish_and_clear();
            return Ok(r);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn device_table(r: &Value) -> String {
    let now = now_ms();
    let mut t = Table::new(&["DEVICE", "STAGE", "STATE", "SEQ", "SINCE", "DETAIL"]);
    for d in r["devices"].as_array().into_iter().flatten() {
        t.row(vec![
            d["device"].as_str().unwrap_or("?").to_string(),
            d["stage"].to_string(),
            d["state"].as_str().unwrap_or("?").to_string(),
            d["sequence"].to_string(),
            relative_time(d["updated_at_ms"].as_u64(), now),
            d["detail"].as_str().unwrap_or("-").to_string(),
        ]);
    }
    t.render()
}

pub async fn run(global: &GlobalArgs, cmd: RolloutCommand) -> Result<()> {
    match cmd {
        RolloutCommand::Create(args) => create(global, args).await,
        RolloutCommand::Status(args) => status(global, args).await,
        RolloutCommand::Pause(args) => action(global, args, "pause").await,
        RolloutCommand::Resume(args) => action(global, args, "resume").await,
        RolloutCommand::Rollback(args) => action(global, args, "rollback").await,
    }
}

async fn create(global: &GlobalArgs, args: CreateArgs) -> Result<()> {
    super::check_name("group", &args.group)?;
    let client = Client::new(&Settings::resolve(&args.conn)?)?;
    let body = json!({
        "module": args.module.name,
        "version": args.module.version,
        "group": args.group,
        "stages": args.stages,
        "max_failure_pct": args.max_failure_pct,
        "stage_timeout_s": args.stage_timeout,
        "health_turns": args.health.health_turns,
        "health_seconds": args.health.health_seconds,
    });
    let r = client
        .post_json("/v1/rollouts", &body)
        .await
        .with_context(|| {
            format!(
                "cannot start a rollout of {}@{}",
                args.module.name, args.module.version
            )
        })?;
    let id = r["id"]
        .as_i64()
        .context("the registry's answer has no rollout id")?;
    if args.no_wait {
        if global.json {
            emit_json(&r);
        } else {
            emit(&format!(
                "{} (follow it: wpm rollout status {id} --watch)",
                describe(&r)
            ));
        }
        return Ok(());
    }
    finish(global, &client, id).await
}

/// Follows a rollout to its end, prints the outcome; an error exit if it rolled back.
async fn finish(global: &GlobalArgs, client: &Client, id: i64) -> Result<()> {
    let r = follow(client, id, global.json || global.quiet).await?;
    if global.json {
        emit_json(&r);
    } else {
        emit(&describe(&r));
    }
    anyhow::ensure!(
        r["state"] == "completed",
        "rollout {id} was rolled back{}",
        r["reason"]
            .as_str()
            .map_or(String::new(), |s| format!(": {s}"))
    );
    Ok(())
}

async fn status(global: &GlobalArgs, args: StatusArgs) -> Result<()> {
    let client = Client::new(&Settings::resolve(&args.conn)?)?;
    let Some(id) = args.id else {
        let list = client
            .get_query("/v1/rollouts", &[])
            .await
            .context("cannot list rollouts")?;
        if global.json {
            emit_json(&list);
        } else {
            let lines: Vec<String> = list
                .as_array()
                .into_iter()
                .flatten()
                .map(describe)
                .collect();
            emit(&if lines.is_empty() {
                "no rollouts yet (wpm rollout create NAME@VERSION --group G)".to_string()
            } else {
                lines.join("\n")
            });
        }
        return Ok(());
    };
    if args.watch {
        return finish(global, &client, id).await;
    }
    let r = client
        .get_query(&format!("/v1/rollouts/{id}"), &[])
        .await
        .with_context(|| format!("cannot get rollout {id}"))?;
    if global.json {
        emit_json(&r);
    } else {
        emit(&format!("{}\n{}", describe(&r), device_table(&r)));
    }
    Ok(())
}

async fn action(global: &GlobalArgs, args: IdArgs, verb: &str) -> Result<()> {
    let client = Client::new(&Settings::resolve(&args.conn)?)?;
    let r = client
        .post_json(&format!("/v1/rollouts/{}/{verb}", args.id), &json!({}))
        .await
        .with_context(|| format!("cannot {verb} rollout {}", args.id))?;
    if global.json {
        emit_json(&r);
    } else {
        emit(&describe(&r));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_progress() {
        let r = json!({"id": 4, "module": "hello", "version": "2.0.0", "group": "eu",
            "state": "rolled_back", "stages": [1, 10, 100], "stage": 2,
            "reason": "halted: 2 of 11 devices failed (threshold 10 %)",
            "counts": {"assigned": 11, "succeeded": 0, "updating": 0, "failed": 0, "rolled_back": 11}});
        assert_eq!(
            describe(&r),
            "rollout 4 hello@2.0.0 → group eu: rolled_back, stage 2/3 (10 %), 11 devices: \
             0 ok, 0 updating, 0 failed, 11 rolled back — halted: 2 of 11 devices failed (threshold 10 %)"
        );
        assert!(finished(&r));
    }
}
