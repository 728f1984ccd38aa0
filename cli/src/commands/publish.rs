//! `wpm publish`: read a module, turn WAT into wasm, upload it with a progress bar.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::client::{Client, PublishOptions, PublishOutcome};
use crate::config::Settings;
use crate::output::{emit, emit_json, human_size};
use crate::GlobalArgs;

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// The module: a .wasm binary, or a .wat text file (converted to wasm before upload)
    #[arg(value_name = "FILE")]
    pub file: PathBuf,

    /// Module name (1-64 of A-Z a-z 0-9 _ - .)
    #[arg(long)]
    pub name: String,

    /// Version; a name@version is immutable once published
    #[arg(long)]
    pub version: String,

    /// Most linear memory the module may use on a device, in bytes
    #[arg(long, value_name = "BYTES")]
    pub memory_limit: Option<u64>,

    /// Fuel (wasmi instruction budget) the module gets per scheduler turn
    #[arg(long, value_name = "N")]
    pub fuel_per_turn: Option<u64>,

    /// Eviction priority: when slots run out, lower priority modules are evicted first
    #[arg(long, value_name = "P", allow_negative_numbers = true)]
    pub priority: Option<i64>,

    /// Never evict this module from its runtime slot
    #[arg(long)]
    pub pinned: bool,

    #[command(flatten)]
    pub conn: crate::ConnArgs,
}

/// Reads FILE; `.wat` files are assembled here so the registry only ever sees wasm.
pub fn load_module(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read module file {}", path.display()))?;
    let is_wat = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("wat"));
    if !is_wat {
        return Ok(bytes);
    }
    let text = String::from_utf8(bytes)
        .with_context(|| format!("{} is not UTF-8 text", path.display()))?;
    wat_to_wasm(&text, path)
}

/// wat's error already names the file, line and column and shows the offending line.
pub fn wat_to_wasm(text: &str, path: &Path) -> Result<Vec<u8>> {
    wat::Parser::new()
        .parse_str(Some(path), text)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("{} is not valid WebAssembly text", path.display()))
}

/// Versions go into the URL path; refuse what would change its meaning.
fn check_version(version: &str) -> Result<()> {
    if version.is_empty()
        || version.len() > 64
        || version.chars().any(|c| {
            c.is_whitespace() || c.is_control() || matches!(c, '/' | '?' | '#' | '%' | '@')
        })
    {
        bail!("invalid version `{version}`: use something like 1.0.0 (no spaces, / ? # % @)");
    }
    Ok(())
}

fn progress_bar(hidden: bool) -> ProgressBar {
    // A bar on a pipe or in a log file is noise; JSON consumers want a clean stream too.
    if hidden || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "uploading {bar:30.cyan/blue} {bytes}/{total_bytes} {bytes_per_sec} {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// Publishes already-loaded bytes; shared with `wpm demo`.
pub async fn publish_bytes(
    client: &Client,
    name: &str,
    version: &str,
    options: &PublishOptions,
    wasm: Vec<u8>,
    hide_progress: bool,
) -> Result<PublishOutcome> {
    super::check_name("module name", name)?;
    check_version(version)?;
    let bar = progress_bar(hide_progress);
    let result = client.publish(name, version, options, wasm, &bar).await;
    bar.finish_and_clear();
    result.with_context(|| format!("cannot publish {name}@{version}"))
}

pub fn describe(outcome: &PublishOutcome) -> String {
    let m = &outcome.module;
    let verb = if outcome.created {
        "published"
    } else {
        "already published (same bytes)"
    };
    let chunks = match m.chunk_size {
        Some(cs) => format!("{} x {}", m.chunks, human_size(cs)),
        None => m.chunks.to_string(),
    };
    format!(
        "{verb} {}@{}\n  sha256  {}\n  size    {} ({} bytes)\n  chunks  {chunks}",
        m.name,
        m.version,
        m.sha256,
        human_size(m.size),
        m.size
    )
}

pub async fn run(global: &GlobalArgs, args: PublishArgs) -> Result<()> {
    // Check the cheap, local things before touching the network.
    super::check_name("module name", &args.name)?;
    check_version(&args.version)?;
    let wasm = load_module(&args.file)?;
    let settings = Settings::resolve(&args.conn)?;
    let client = Client::new(&settings)?;
    let options = PublishOptions {
        memory_limit: args.memory_limit,
        fuel_per_turn: args.fuel_per_turn,
        priority: args.priority,
        pinned: args.pinned.then_some(true),
    };
    let outcome = publish_bytes(
        &client,
        &args.name,
        &args.version,
        &options,
        wasm,
        global.json || global.quiet,
    )
    .await?;
    if global.json {
        let mut raw = outcome.raw.clone();
        if let Some(obj) = raw.as_object_mut() {
            // The HTTP status (201 vs 200) is otherwise lost in JSON mode.
            obj.insert("created".into(), outcome.created.into());
        }
        emit_json(&raw);
    } else {
        emit(&describe(&outcome));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wat_errors_name_file_line_and_column() {
        let err = wat_to_wasm(
            "(module\n  (func (result i32)\n    i32.bogus))",
            Path::new("m.wat"),
        )
        .unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("m.wat:3:"), "{text}");
        assert!(text.contains("not valid WebAssembly text"), "{text}");
    }

    #[test]
    fn wat_converts() {
        let wasm = wat_to_wasm("(module)", Path::new("m.wat")).unwrap();
        assert_eq!(&wasm[..4], b"\0asm");
    }

    #[test]
    fn versions() {
        assert!(check_version("1.0.0").is_ok());
        assert!(check_version("1.0.0-rc.1+build.5").is_ok());
        assert!(check_version("1.0/0").is_err());
        assert!(check_version("").is_err());
        assert!(check_version("1 0").is_err());
    }
}
