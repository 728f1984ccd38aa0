//! How wpm's PC-side parts reach each other: the broker URL every client parses the
//! same way, and the TLS configurations of clients and servers.
//!
//! One crypto provider (aws-lc-rs) is named explicitly everywhere: the dependency tree
//! enables two of them in rustls, and with two a configuration built on the "process
//! default" panics.

mod broker_url;
mod tls;

pub use broker_url::BrokerUrl;
pub use rustls;
pub use tls::{client_config, server_config, TlsFiles};
