//! `mqtt://[USER:PASSWORD@]HOST[:PORT]` and `mqtts://…`: where a client finds the
//! broker, whether it speaks TLS there, and the login it uses.

use anyhow::{bail, Context as _};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// A parsed broker URL. `tcp://` is read as `mqtt://` and `ssl://` as `mqtts://` (the
/// spellings other MQTT tools accept); a bare `HOST:PORT` is plain MQTT.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// MQTT over TLS.
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Username and password, for a broker that wants a login.
    pub login: Option<(String, String)>,
}

impl BrokerUrl {
    /// The rumqttc transport for this URL: TCP, or TLS that trusts the certificates
    /// in `ca` (PEM), or the system's roots when `ca` is `None`.
    ///
    /// # Errors
    /// The CA file cannot be read or holds no certificate.
    pub fn transport(&self, ca: Option<&Path>) -> anyhow::Result<rumqttc::Transport> {
        Ok(if self.tls {
            let config = crate::client_config(ca)?;
            rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(config))
        } else {
            rumqttc::Transport::tcp()
        })
    }

    /// The same broker with another login (or none).
    pub fn with_login(&self, login: Option<(String, String)>) -> BrokerUrl {
        BrokerUrl {
            login,
            ..self.clone()
        }
    }

    fn scheme(&self) -> &'static str {
        if self.tls {
            "mqtts"
        } else {
            "mqtt"
        }
    }
}

impl FromStr for BrokerUrl {
    type Err = anyhow::Error;

    /// # Errors
    /// An unknown scheme, no host, a bad port, or a user without a password.
    fn from_str(url: &str) -> anyhow::Result<BrokerUrl> {
        let (tls, rest) = match url.split_once("://") {
            Some(("mqtt" | "tcp", rest)) => (false, rest),
            Some(("mqtts" | "ssl", rest)) => (true, rest),
            Some((scheme, _)) => bail!(
                "unsupported broker URL scheme {scheme:?} in {:?}: use mqtt://HOST:PORT or mqtts://HOST:PORT",
                redacted(url)
            ),
            None => (false, url),
        };
        let rest = rest.trim_end_matches('/');
        let (login, hostport) = match rest.rsplit_once('@') {
            Some((userinfo, hostport)) => match userinfo.split_once(':') {
                Some((user, password)) if !user.is_empty() => {
                    (Some((user.to_string(), password.to_string())), hostport)
                }
                _ => bail!(
                    "the broker URL names a user but no password: mqtt://USER:PASSWORD@HOST:PORT"
                ),
            },
            None => (None, rest),
        };
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = match hostport.rsplit_once(':') {
            // An IPv6 address without a port: `[::1]`.
            Some((h, p)) if !p.ends_with(']') => (
                h,
                p.parse()
                    .with_context(|| format!("bad port in broker URL {:?}", redacted(url)))?,
            ),
            _ => (hostport, default_port),
        };
        let host = host.trim_matches(['[', ']']);
        if host.is_empty() {
            bail!("no host in broker URL {:?}", redacted(url));
        }
        Ok(BrokerUrl {
            tls,
            host: host.to_string(),
            port,
            login,
        })
    }
}

/// The URL with the password left out: fit for logs, errors and `ps`.
impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match &self.login {
            Some((user, _)) => write!(f, "{}://{user}:***@{host}:{}", self.scheme(), self.port),
            None => write!(f, "{}://{host}:{}", self.scheme(), self.port),
        }
    }
}

impl fmt::Debug for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A URL as given, its login left out, for an error about it.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> BrokerUrl {
        s.parse().unwrap()
    }

    #[test]
    fn schemes_ports_and_logins() {
        let u = url("mqtt://127.0.0.1:1883");
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.login),
            (false, "127.0.0.1", 1883, None)
        );
        assert_eq!(url("tcp://h").port, 1883);
        assert_eq!(url("h:1884").port, 1884);
        let u = url("mqtts://broker.example");
        assert!(u.tls);
        assert_eq!(u.port, 8883);
        assert!(url("ssl://h:1").tls);
        let u = url("mqtts://wpm-registry:s3:cret@10.0.0.2:1884/");
        assert_eq!(u.login, Some(("wpm-registry".into(), "s3:cret".into())));
        assert_eq!(u.host, "10.0.0.2");
        assert_eq!(url("mqtt://[::1]:1883").host, "::1");
        assert_eq!(url("mqtt://[::1]").port, 1883);
    }

    #[test]
    fn mistakes_are_refused_with_the_password_left_out() {
        for bad in [
            "http://h:1",
            "mqtt://:1883",
            "mqtt://h:port",
            "mqtt://user@h:1",
        ] {
            assert!(bad.parse::<BrokerUrl>().is_err(), "{bad}");
        }
        let e = "ws://u:topsecret@h:1".parse::<BrokerUrl>().unwrap_err();
        assert!(!e.to_string().contains("topsecret"), "{e}");
    }

    #[test]
    fn shown_without_the_password() {
        let u = url("mqtts://u:topsecret@h:8883");
        assert_eq!(u.to_string(), "mqtts://u:***@h:8883");
        assert_eq!(format!("{u:?}"), "mqtts://u:***@h:8883");
        assert_eq!(url("mqtt://[::1]:1").to_string(), "mqtt://[::1]:1");
    }
}
