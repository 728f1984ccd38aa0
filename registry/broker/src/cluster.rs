//! A node of an rmqtt broker cluster: `wpm broker serve --node-id N --peer …` on several
//! machines, kept by rmqtt's broadcast cluster plugin (`rmqtt-cluster-broadcast`).
//!
//! Every node forwards each publish to the nodes whose clients subscribed, serves MQTT 5
//! shared subscriptions across the cluster (the registry replicas' `$share/…` ingest
//! group), copies retained messages to its peers and, after a restart, fetches them back
//! from its peers. No consensus: a node that dies takes with it the sessions of its own
//! clients and what it had accepted and not yet forwarded; clients reconnect (to it, once
//! restarted, or to another node) and devices republish their status.

use anyhow::Context as _;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

/// This node's place in the cluster.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// Unique in the cluster, ≥ 1.
    pub node_id: u64,
    /// Where this node serves its peers (gRPC).
    pub listen: SocketAddr,
    /// Every node of the cluster, this one included: `(id, host:port of its gRPC listener)`.
    pub nodes: Vec<(u64, String)>,
    /// How long a call to a peer may take before it counts as failed; a dead peer costs
    /// each forward at most this.
    pub peer_timeout: Duration,
}

impl ClusterConfig {
    /// Checks the node list: ids unique and ≥ 1, this node among them.
    ///
    /// # Errors
    ///
    /// Duplicate or zero ids, or `node_id` missing from `nodes`.
    pub fn validate(&self) -> anyhow::Result<()> {
        let mut ids: Vec<u64> = self.nodes.iter().map(|(id, _)| *id).collect();
        ids.sort_unstable();
        anyhow::ensure!(
            ids.first().is_some_and(|&id| id >= 1),
            "cluster node ids start at 1"
        );
        anyhow::ensure!(
            ids.windows(2).all(|w| w[0] != w[1]),
            "cluster node ids must be unique: {ids:?}"
        );
        anyhow::ensure!(
            ids.contains(&self.node_id),
            "this node ({}) is not in the cluster's node list {ids:?}",
            self.node_id
        );
        Ok(())
    }

    /// The plugin's configuration, in the TOML rmqtt reads plugin settings from.
    fn plugin_toml(&self) -> String {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|(id, addr)| format!("\"{id}@{addr}\""))
            .collect();
        let mut t = String::new();
        let _ = writeln!(t, "node_grpc_addrs = [{}]", nodes.join(", "));
        let _ = writeln!(
            t,
            "node_grpc_client_timeout = \"{}ms\"",
            self.peer_timeout.as_millis()
        );
        t
    }
}

/// The cluster plugin's name, under which rmqtt looks up its configuration.
const PLUGIN: &str = "rmqtt-cluster-broadcast";

/// Adds the cluster's configuration to a server context being built.
pub(crate) fn configure(
    builder: rmqtt::context::ServerContextBuilder,
    cluster: &ClusterConfig,
) -> rmqtt::context::ServerContextBuilder {
    builder
        .node_id(cluster.node_id)
        .plugins_config_map_add(PLUGIN, cluster.plugin_toml())
        // While a peer's breaker is open, forwards to it and copies of retained messages
        // are skipped, not queued. rmqtt's default keeps it open 30 s, long after a
        // restarted peer is back: a deployment published then would never reach it.
        .circuit_breaker_config(rmqtt::context::CircuitBreakerConfig {
            wait_duration_in_open: Duration::from_secs(1),
            ..Default::default()
        })
}

/// Serves peers and joins the cluster. Peers that are not up yet are reached when they
/// come up.
pub(crate) async fn join(
    scx: &rmqtt::context::ServerContext,
    cluster: &ClusterConfig,
) -> anyhow::Result<()> {
    // Bind-check here: rmqtt's gRPC server only logs a failed bind.
    drop(
        crate::bind(cluster.listen)
            .with_context(|| format!("cluster listener on {}", cluster.listen))?,
    );
    scx.node
        .start_grpc_server(scx.clone(), cluster.listen, true, false);
    rmqtt_cluster_broadcast::register_named(scx, PLUGIN, true, false)
        .await
        .map_err(|e| anyhow::anyhow!("cluster plugin: {e}"))?;
    Ok(())
}

/// The message type the cluster plugin answers on (its default, which we keep).
const MESSAGE_TYPE: rmqtt::grpc::MessageType = 98;

/// Waits until this node holds the retained messages its peers hold, before it serves
/// any client.
///
/// A node that restarts has lost its retained store; the cluster plugin copies it back
/// from the peers a moment after start. A device that subscribed in between would find
/// no deployment, manifest or chunk, and wait for nothing until its next reconnect. So
/// a node asks its peers how many retained messages they hold and does not start its
/// listeners before it has as many (or `deadline` has passed: then it warns and serves).
/// Peers that do not answer (a cluster starting together) count as holding none.
pub(crate) async fn wait_for_retained(
    scx: &rmqtt::context::ServerContext,
    cluster: &ClusterConfig,
    deadline: Duration,
) {
    use rmqtt::grpc::{Message, MessageReply};
    let mut peers_hold = 0usize;
    for (id, addr) in cluster
        .nodes
        .iter()
        .filter(|(id, _)| *id != cluster.node_id)
    {
        let client = scx
            .node
            .new_grpc_client(
                addr,
                Duration::from_secs(2),
                4,
                1,
                &scx.circuit_breaker_config,
            )
            .await;
        let reply = match client {
            Ok(mut c) => {
                c.send_message(
                    MESSAGE_TYPE,
                    Message::GetAllRetains {
                        offset: 0,
                        limit: 1,
                    },
                    Some(Duration::from_secs(2)),
                )
                .await
            }
            Err(e) => Err(e),
        };
        match reply {
            Ok(MessageReply::GetAllRetainsChunk { total_hint, .. }) => {
                peers_hold = peers_hold.max(total_hint)
            }
            Ok(_) => {}
            Err(e) => tracing::info!(node = id, %addr, error = %e, "cluster peer not reachable"),
        }
    }
    if peers_hold == 0 {
        return;
    }
    let start = tokio::time::Instant::now();
    loop {
        let held = usize::try_from(scx.extends.retain().await.count().await).unwrap_or(0);
        if held >= peers_hold {
            tracing::info!(
                retained = held,
                took_ms = start.elapsed().as_millis() as u64,
                "retained messages copied from the cluster"
            );
            return;
        }
        if start.elapsed() > deadline {
            tracing::warn!(
                held,
                peers_hold,
                "serving before every retained message was copied from the cluster"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(node_id: u64, ids: &[u64]) -> ClusterConfig {
        ClusterConfig {
            node_id,
            listen: "127.0.0.1:0".parse().unwrap(),
            nodes: ids
                .iter()
                .map(|&i| (i, format!("127.0.0.1:{}", 5000 + i)))
                .collect(),
            peer_timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn a_node_list_must_hold_this_node_once_with_nonzero_ids() {
        assert!(config(1, &[1, 2, 3]).validate().is_ok());
        assert!(config(4, &[1, 2, 3]).validate().is_err());
        assert!(config(1, &[1, 1, 3]).validate().is_err());
        assert!(config(0, &[0, 1]).validate().is_err());
    }

    #[test]
    fn the_plugin_configuration_names_every_node_and_the_peer_timeout() {
        let t = config(2, &[1, 2]).plugin_toml();
        assert!(
            t.contains(r#"node_grpc_addrs = ["1@127.0.0.1:5001", "2@127.0.0.1:5002"]"#),
            "{t}"
        );
        assert!(t.contains(r#"node_grpc_client_timeout = "5000ms""#), "{t}");
    }
}
