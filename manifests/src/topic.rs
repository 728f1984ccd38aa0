//! Every MQTT topic wpm uses is built here and nowhere else.
//!
//! ```text
//! wpm/v1/deploy/fleet                     retained signed Deployment for the fleet
//! wpm/v1/deploy/group/{group}             retained signed Deployment for a group
//! wpm/v1/deploy/device/{device}           retained signed Deployment for one device
//! wpm/v1/module/{sha256}/manifest         retained signed ModuleManifest (chunk index)
//! wpm/v1/module/{sha256}/chunk/{index}    retained Chunk
//! wpm/v1/device/{device}/status           retained DeviceStatus
//! wpm/v1/device/{device}/presence         retained Presence (offline = last will)
//! wpm/v1/device/{device}/events           Event
//! wpm/v1/device/{device}/telemetry/{mod}  module telemetry, bytes as the module gave them
//! wpm/v1/device/{device}/command          signed Command (not retained)
//! ```
//!
//! Modules are addressed by content (sha256), so the same bytes deployed under two names
//! or to two groups travel and are retained once.

use crate::types::Target;
use alloc::format;
use alloc::string::String;

/// The version prefix of every topic.
pub const PREFIX: &str = "wpm/v1";
/// [`Topic::Trust`], as a constant: a device compares every incoming topic with it.
pub const TRUST_TOPIC: &str = "wpm/v1/trust";

/// One concrete topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topic<'a> {
    Deployment(&'a Target),
    ModuleManifest(&'a [u8; 32]),
    Chunk(&'a [u8; 32], u32),
    Status(&'a str),
    Presence(&'a str),
    Events(&'a str),
    Telemetry(&'a str, &'a str),
    Command(&'a str),
    /// The registry's chain of trust updates (`crate::trust`), retained.
    Trust,
}

impl Topic<'_> {
    /// The topic string.
    pub fn render(&self) -> String {
        match self {
            Topic::Deployment(Target::Fleet) => format!("{PREFIX}/deploy/fleet"),
            Topic::Deployment(Target::Group(g)) => format!("{PREFIX}/deploy/group/{g}"),
            Topic::Deployment(Target::Device(d)) => format!("{PREFIX}/deploy/device/{d}"),
            Topic::ModuleManifest(h) => format!("{PREFIX}/module/{}/manifest", hex::encode(h)),
            Topic::Chunk(h, i) => format!("{PREFIX}/module/{}/chunk/{i}", hex::encode(h)),
            Topic::Status(d) => format!("{PREFIX}/device/{d}/status"),
            Topic::Presence(d) => format!("{PREFIX}/device/{d}/presence"),
            Topic::Events(d) => format!("{PREFIX}/device/{d}/events"),
            Topic::Telemetry(d, m) => format!("{PREFIX}/device/{d}/telemetry/{m}"),
            Topic::Command(d) => format!("{PREFIX}/device/{d}/command"),
            Topic::Trust => TRUST_TOPIC.into(),
        }
    }
}

/// Subscriptions the registry makes across the fleet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicFilter {
    AllStatus,
    AllPresence,
    AllEvents,
    AllTelemetry,
}

impl TopicFilter {
    pub fn render(self) -> String {
        match self {
            TopicFilter::AllStatus => format!("{PREFIX}/device/+/status"),
            TopicFilter::AllPresence => format!("{PREFIX}/device/+/presence"),
            TopicFilter::AllEvents => format!("{PREFIX}/device/+/events"),
            TopicFilter::AllTelemetry => format!("{PREFIX}/device/+/telemetry/+"),
        }
    }
}

/// A device-side topic, parsed back: which device it is about, and what it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceTopic<'a> {
    Status(&'a str),
    Presence(&'a str),
    Events(&'a str),
    Telemetry(&'a str, &'a str),
}

impl<'a> DeviceTopic<'a> {
    /// The device the topic belongs to.
    pub fn device(&self) -> &'a str {
        match self {
            DeviceTopic::Status(d)
            | DeviceTopic::Presence(d)
            | DeviceTopic::Events(d)
            | DeviceTopic::Telemetry(d, _) => d,
        }
    }
}

/// Parses `wpm/v1/device/...` topics; `None` for anything else.
pub fn parse_device_topic(topic: &str) -> Option<DeviceTopic<'_>> {
    let rest = topic.strip_prefix(PREFIX)?.strip_prefix("/device/")?;
    let mut parts = rest.split('/');
    let device = parts.next()?;
    let kind = parts.next()?;
    let extra = parts.next();
    if parts.next().is_some() {
        return None;
    }
    match (kind, extra) {
        ("status", None) => Some(DeviceTopic::Status(device)),
        ("presence", None) => Some(DeviceTopic::Presence(device)),
        ("events", None) => Some(DeviceTopic::Events(device)),
        ("telemetry", Some(m)) => Some(DeviceTopic::Telemetry(device, m)),
        _ => None,
    }
}

/// Whether `device` may publish on `topic`: only its own reports (status, presence,
/// events, telemetry), never another device's, a deployment, a module or a command.
/// The one rule the embedded broker enforces and a Mosquitto ACL is written from.
pub fn device_may_publish(device: &str, topic: &str) -> bool {
    parse_device_topic(topic).is_some_and(|t| t.device() == device)
}

/// Whether `device` may subscribe to `filter`: deployments for the fleet, a group or
/// itself, its own command topic, the trust chain, and module manifests and chunks, each
/// by its exact name: no wildcards, no other device's topics.
pub fn device_may_subscribe(device: &str, filter: &str) -> bool {
    if filter.contains(['+', '#']) {
        return false;
    }
    if parse_module_topic(filter).is_some()
        || filter == Topic::Command(device).render()
        || filter == TRUST_TOPIC
    {
        return true;
    }
    let single = |s: &str| !s.is_empty() && !s.contains('/');
    match filter
        .strip_prefix(PREFIX)
        .and_then(|r| r.strip_prefix("/deploy/"))
    {
        Some("fleet") => true,
        Some(rest) => match rest.split_once('/') {
            Some(("group", g)) => single(g),
            Some(("device", d)) => d == device,
            _ => false,
        },
        None => false,
    }
}

/// What a device may publish, as topic patterns in which `%u` stands for its own id and
/// `+` for any one level: the rule of [`device_may_publish`], for brokers whose ACLs
/// take patterns (Mosquitto's `acl_file`). The tests keep the two in agreement.
pub const DEVICE_PUBLISHES: [&str; 4] = [
    "wpm/v1/device/%u/status",
    "wpm/v1/device/%u/presence",
    "wpm/v1/device/%u/events",
    "wpm/v1/device/%u/telemetry/+",
];

/// What a device may subscribe to and receive, as patterns like [`DEVICE_PUBLISHES`]:
/// the rule of [`device_may_subscribe`], which also checks module digests and chunk
/// numbers by name.
pub const DEVICE_RECEIVES: [&str; 7] = [
    "wpm/v1/deploy/fleet",
    TRUST_TOPIC,
    "wpm/v1/deploy/group/+",
    "wpm/v1/deploy/device/%u",
    "wpm/v1/device/%u/command",
    "wpm/v1/module/+/manifest",
    "wpm/v1/module/+/chunk/+",
];

/// Parses `wpm/v1/deploy/...` topics back into their target; `None` for anything else.
pub fn parse_deployment_topic(topic: &str) -> Option<Target> {
    let rest = topic.strip_prefix(PREFIX)?.strip_prefix("/deploy/")?;
    let single = |s: &str| (!s.is_empty() && !s.contains('/')).then(|| String::from(s));
    match rest.split_once('/') {
        None if rest == "fleet" => Some(Target::Fleet),
        Some(("group", g)) => single(g).map(Target::Group),
        Some(("device", d)) => single(d).map(Target::Device),
        _ => None,
    }
}

/// A module-side topic, parsed back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleTopic {
    Manifest([u8; 32]),
    Chunk([u8; 32], u32),
}

/// Parses `wpm/v1/module/...` topics; `None` for anything else.
pub fn parse_module_topic(topic: &str) -> Option<ModuleTopic> {
    let rest = topic.strip_prefix(PREFIX)?.strip_prefix("/module/")?;
    let mut parts = rest.split('/');
    let mut digest = [0u8; 32];
    hex::decode_to_slice(parts.next()?, &mut digest).ok()?;
    let t = match (parts.next()?, parts.next()) {
        ("manifest", None) => ModuleTopic::Manifest(digest),
        ("chunk", Some(i)) => ModuleTopic::Chunk(digest, i.parse().ok()?),
        _ => return None,
    };
    parts.next().is_none().then_some(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip() {
        let h = [0xab; 32];
        assert_eq!(
            parse_module_topic(&Topic::Chunk(&h, 17).render()),
            Some(ModuleTopic::Chunk(h, 17))
        );
        assert_eq!(
            parse_module_topic(&Topic::ModuleManifest(&h).render()),
            Some(ModuleTopic::Manifest(h))
        );
        assert_eq!(
            parse_device_topic(&Topic::Telemetry("d1", "hello").render()),
            Some(DeviceTopic::Telemetry("d1", "hello"))
        );
        assert_eq!(
            parse_device_topic(&Topic::Status("d1").render()),
            Some(DeviceTopic::Status("d1"))
        );
        assert_eq!(parse_device_topic("wpm/v1/device/d1/status/x"), None);
        assert_eq!(parse_module_topic("wpm/v1/module/zz/chunk/1"), None);
        assert_eq!(
            Topic::Deployment(&Target::Group("eu".into())).render(),
            "wpm/v1/deploy/group/eu"
        );
        for t in [
            Target::Fleet,
            Target::Group("eu".into()),
            Target::Device("d1".into()),
        ] {
            assert_eq!(
                parse_deployment_topic(&Topic::Deployment(&t).render()),
                Some(t)
            );
        }
        for t in [
            "wpm/v1/deploy/group/",
            "wpm/v1/deploy/group/a/b",
            "wpm/v1/deploy/x",
        ] {
            assert_eq!(parse_deployment_topic(t), None, "{t}");
        }
    }

    #[test]
    fn a_device_publishes_only_its_own_reports() {
        let h = [0xab; 32];
        for t in [
            Topic::Status("d1"),
            Topic::Presence("d1"),
            Topic::Events("d1"),
            Topic::Telemetry("d1", "m"),
        ] {
            assert!(device_may_publish("d1", &t.render()), "{t:?}");
            assert!(!device_may_publish("d2", &t.render()), "{t:?}");
            assert!(matches_any(&DEVICE_PUBLISHES, "d1", &t.render()), "{t:?}");
            assert!(!matches_any(&DEVICE_PUBLISHES, "d2", &t.render()), "{t:?}");
            assert!(!matches_any(&DEVICE_RECEIVES, "d1", &t.render()), "{t:?}");
        }
        for t in [
            Topic::Command("d1"),
            Topic::Deployment(&Target::Device("d1".into())),
            Topic::Deployment(&Target::Fleet),
            Topic::ModuleManifest(&h),
            Topic::Chunk(&h, 0),
        ] {
            assert!(!device_may_publish("d1", &t.render()), "{t:?}");
            assert!(!matches_any(&DEVICE_PUBLISHES, "d1", &t.render()), "{t:?}");
        }
        assert!(!device_may_publish("d1", "anything/else"));
    }

    /// Whether a pattern of [`DEVICE_PUBLISHES`] or [`DEVICE_RECEIVES`] matches a topic
    /// of `device`, as a broker applies it.
    fn matches_any(patterns: &[&str], device: &str, topic: &str) -> bool {
        patterns.iter().any(|p| {
            let p = p.replace("%u", device);
            let (mut p, mut t) = (p.split('/'), topic.split('/'));
            loop {
                match (p.next(), t.next()) {
                    (None, None) => return true,
                    (Some("+"), Some(_)) => {}
                    (Some(a), Some(b)) if a == b => {}
                    _ => return false,
                }
            }
        })
    }

    #[test]
    fn the_acl_patterns_are_under_the_prefix() {
        for p in DEVICE_PUBLISHES.iter().chain(&DEVICE_RECEIVES) {
            assert!(p.starts_with(PREFIX), "{p}");
        }
    }

    #[test]
    fn a_device_subscribes_only_to_what_it_needs_by_name() {
        let h = [0xab; 32];
        for t in [
            Topic::Deployment(&Target::Fleet),
            Topic::Deployment(&Target::Group("eu".into())),
            Topic::Deployment(&Target::Device("d1".into())),
            Topic::Command("d1"),
            Topic::Trust,
            Topic::ModuleManifest(&h),
            Topic::Chunk(&h, 7),
        ] {
            assert!(device_may_subscribe("d1", &t.render()), "{t:?}");
            assert!(matches_any(&DEVICE_RECEIVES, "d1", &t.render()), "{t:?}");
        }
        for f in [
            Topic::Deployment(&Target::Device("d2".into())).render(),
            Topic::Command("d2").render(),
            Topic::Status("d2").render(),
            Topic::Status("d1").render(),
            "#".into(),
            "wpm/v1/device/+/status".into(),
            "wpm/v1/module/+/chunk/+".into(),
            "wpm/v1/deploy/group/eu/x".into(),
        ] {
            assert!(!device_may_subscribe("d1", &f), "{f}");
            // A broker's ACL refuses the same, wildcards aside (it matches those itself).
            assert!(
                f.contains(['+', '#']) || !matches_any(&DEVICE_RECEIVES, "d1", &f),
                "{f}"
            );
        }
    }
}
