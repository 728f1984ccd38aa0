//! `wpm device start|stop|pin|unpin|evict DEVICE MODULE`: signed lifecycle commands.

use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};

use crate::client::Client;
use crate::config::Settings;
use crate::output::{emit, emit_json};
use crate::GlobalArgs;

#[derive(Debug, Args)]
pub struct CommandArgs {
    /// Device id
    #[arg(value_name = "DEVICE")]
    pub device: String,

    /// Module name
    #[arg(value_name = "MODULE")]
    pub module: String,

    /// Return once the registry has sent the command, without waiting for the device
    #[arg(long)]
    pub no_wait: bool,

    /// How long to wait for the device's answer, in seconds
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub timeout: u64,

    #[command(flatten)]
    pub conn: crate::ConnArgs,
}

/// The device's answer to command `sequence` among its events, if there is one yet.
pub fn answer(events: &[Value], sequence: u64) -> Option<&Value> {
    events.iter().find(|e| {
        matches!(
            e["kind"].as_str(),
            Some("command_applied" | "command_rejected")
        ) && e["detail"]["sequence"].as_u64() == Some(sequence)
    })
}

pub async fn run(global: &GlobalArgs, verb: &str, args: CommandArgs) -> Result<()> {
    super::check_name("device id", &args.device)?;
    super::check_name("module name", &args.module)?;
    let client = Client::new(&Settings::resolve(&args.conn)?)?;
    let sent = client
        .post_json(
            &format!("/v1/devices/{}/commands", args.device),
            &json!({"action": verb, "module": args.module}),
        )
        .await
        .with_context(|| format!("cannot send `{verb} {}` to {}", args.module, args.device))?;
    let sequence = sent["sequence"]
        .as_u64()
        .context("the registry's answer has no sequence")?;
    if args.no_wait {
        if global.json {
            emit_json(&sent);
        } else {
            emit(&format!(
                "sent {verb} {} to {} as sequence {sequence}",
                args.module, args.device
            ));
        }
        return Ok(());
    }
    let bar = if global.json || global.quiet || !std::io::stderr().is_terminal() {
        ProgressBar::hidden()
    } else {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} [{elapsed}]") {
            bar.set_style(style);
        }
        bar.set_message(format!(
            "waiting for {} to {verb} {} (sequence {sequence})",
            args.device, args.module
        ));
        bar.enable_steady_tick(Duration::from_millis(120));
        bar
    };
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let event = loop {
        let events = client
            .get_query(
                &format!("/v1/devices/{}/events", args.device),
                &[("limit", "200".to_string())],
            )
            .await
            .with_context(|| format!("cannot get the events of {}", args.device))?;
        if let Some(e) = answer(events.as_array().map_or(&[][..], Vec::as_slice), sequence) {
            break e.clone();
        }
        if Instant::now() > deadline {
            bar.finish_and_clear();
            bail!(
                "no answer from {} to command {sequence} within {} s (offline? the command \
                 expires 5 minutes after it was sent)",
                args.device,
                args.timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    bar.finish_and_clear();
    let applied = event["kind"] == "command_applied";
    if global.json {
        emit_json(&json!({"sequence": sequence, "applied": applied, "event": event}));
    } else if applied {
        emit(&format!(
            "{}: {verb} {} applied (sequence {sequence})",
            args.device, args.module
        ));
    }
    if !applied {
        bail!(
            "{} rejected `{verb} {}`: {}",
            args.device,
            args.module,
            event["detail"]["reason"]
                .as_str()
                .unwrap_or("no reason given")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_answer_to_its_own_sequence() {
        let events = vec![
            json!({"kind": "command_applied", "detail": {"sequence": 7, "action": {"verb": "stop", "module": "a"}}}),
            json!({"kind": "command_rejected", "detail": {"sequence": 9, "reason": "unknown module"}}),
            json!({"kind": "started", "detail": {"module": "a"}}),
        ];
        assert_eq!(answer(&events, 9).unwrap()["kind"], "command_rejected");
        assert_eq!(answer(&events, 7).unwrap()["kind"], "command_applied");
        assert!(answer(&events, 8).is_none());
    }
}
