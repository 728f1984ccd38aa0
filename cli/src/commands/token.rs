//! `wpm token create|list|revoke`: scoped API tokens (registry/src/http/tokens.rs says
//! what each scope may do). Managing tokens needs an admin token.

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::json;

use crate::client::Client;
use crate::config::Settings;
use crate::output::{emit, emit_json, now_ms, relative_time, Table};
use crate::GlobalArgs;

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a token; it is printed once and only its hash is kept
    #[command(after_help = "Examples:
  wpm token create ci-publisher --scope publish
  wpm token create grafana --scope read")]
    Create(CreateArgs),
    /// The tokens, their scopes and whether they are revoked (never their secrets)
    List(ConnOnly),
    /// Revoke a token by its id: it is refused from the next request on
    Revoke(RevokeArgs),
}

impl TokenCommand {
    pub fn conn_mut(&mut self) -> &mut crate::ConnArgs {
        match self {
            TokenCommand::Create(a) => &mut a.conn,
            TokenCommand::List(a) => &mut a.conn,
            TokenCommand::Revoke(a) => &mut a.conn,
        }
    }
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// What or who uses it
    #[arg(value_name = "NAME")]
    pub name: String,
    /// read (every GET), publish (read + upload modules), deploy (read + deploy, rollouts,
    /// device commands) or admin (everything)
    #[arg(long, value_parser = ["read", "publish", "deploy", "admin"])]
    pub scope: String,
    #[command(flatten)]
    pub conn: crate::ConnArgs,
}

#[derive(Debug, Args)]
pub struct ConnOnly {
    #[command(flatten)]
    pub conn: crate::ConnArgs,
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The token's id (`wpm token list`)
    #[arg(value_name = "ID")]
    pub id: String,
    #[command(flatten)]
    pub conn: crate::ConnArgs,
}

pub async fn run(global: &GlobalArgs, cmd: TokenCommand) -> Result<()> {
    match cmd {
        TokenCommand::Create(a) => {
            let client = Client::new(&Settings::resolve(&a.conn)?)?;
            let answer = client
                .post_json("/v1/tokens", &json!({"name": a.name, "scope": a.scope}))
                .await?;
            if global.json {
                emit_json(&answer);
            } else {
                emit(&format!(
                    "{}\n(token {} with scope {}: shown this once, keep it secret)",
                    answer["token"].as_str().unwrap_or_default(),
                    answer["id"].as_str().unwrap_or_default(),
                    a.scope
                ));
            }
        }
        TokenCommand::List(a) => {
            let client = Client::new(&Settings::resolve(&a.conn)?)?;
            let answer = client.get_query("/v1/tokens", &[]).await?;
            if global.json {
                emit_json(&answer);
                return Ok(());
            }
            let now = now_ms();
            let mut t = Table::new(&["ID", "NAME", "SCOPE", "CREATED", "STATE"]);
            for k in answer["tokens"].as_array().into_iter().flatten() {
                let state = match k["revoked_at_ms"].as_u64() {
                    Some(at) => format!("revoked {}", relative_time(Some(at), now)),
                    None => "active".to_string(),
                };
                t.row(vec![
                    k["id"].as_str().unwrap_or_default().to_string(),
                    k["name"].as_str().unwrap_or_default().to_string(),
                    k["scope"].as_str().unwrap_or_default().to_string(),
                    relative_time(k["created_at_ms"].as_u64(), now),
                    state,
                ]);
            }
            emit(&t.render());
        }
        TokenCommand::Revoke(a) => {
            let client = Client::new(&Settings::resolve(&a.conn)?)?;
            let answer = client
                .post_json(&format!("/v1/tokens/{}/revoke", a.id), &json!({}))
                .await?;
            if global.json {
                emit_json(&answer);
            } else {
                emit(&format!("token {} revoked", a.id));
            }
        }
    }
    Ok(())
}
