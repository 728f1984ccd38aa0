//! Device reports, authenticated end to end.
//!
//! A device seals everything it publishes (status, events, presence, telemetry) in a
//! [`Sealed`](crate::Sealed) envelope signed with its own ed25519 key: its identity,
//! created at provisioning and registered with the registry. The signed body is a
//! [`Report`]: the device's id, a counter that only grows, and what is reported. The
//! registry opens a report with the key registered for the device its topic names and
//! ingests it only if the counter is above the last one it accepted from that device, so
//! a forged, replayed or reordered report is dropped whatever broker carried it.
//!
//! # The last will
//!
//! A device's MQTT last will is sealed when it connects, before anything else of that
//! session, so its counter is below every report of the session. The device announces
//! it in its first [`Presence`] of the session ([`Presence::will`]); the registry accepts
//! an offline presence with a lower counter than the last report only if it is the will
//! the device announced last, and only once.

use crate::signing::SignedBody;
use crate::types::{DeviceStatus, Event, Presence};
use crate::KeyPair;
use alloc::string::String;
use minicbor::bytes::ByteVec;
use minicbor::{CborLen, Decode, Encode};

/// One authenticated device report (the signed body of a device's publish).
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, CborLen)]
pub struct Report {
    /// Who speaks; must match the topic it is published on and the key that signed it.
    #[n(0)]
    pub device: String,
    /// Grows with every report the device seals, across reboots (see the device's
    /// store): the registry's replay and order check.
    #[n(1)]
    pub counter: u64,
    #[n(2)]
    pub body: ReportBody,
}

/// What a report says; each kind goes on its own topic.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, CborLen)]
pub enum ReportBody {
    #[n(0)]
    Status(#[n(0)] DeviceStatus),
    #[n(1)]
    Event(#[n(0)] Event),
    #[n(2)]
    Presence(#[n(0)] Presence),
    /// A module's telemetry bytes, as the module gave them.
    #[n(3)]
    Telemetry(#[n(0)] ByteVec),
}

/// Signing context of a device's broker login.
const LOGIN_CONTEXT: &[u8] = b"wpm/v1/broker-login\0";

/// The MQTT password a device logs in to the broker with; its username and client id
/// are its id. The password is its key's signature over its id (128 hex digits), so the
/// broker checks it with the registered public key and no broker secret exists per
/// device. It is the same at every login: without TLS, whoever reads the device's
/// CONNECT can log in as it (and still cannot seal its reports).
pub fn login_password(key: &KeyPair, device: &str) -> String {
    hex::encode(key.sign_with_context(LOGIN_CONTEXT, device.as_bytes()))
}

/// Whether `password` is the login of `device`, whose registered key is `public`.
pub fn check_login_password(public: &[u8; 32], device: &str, password: &[u8]) -> bool {
    let mut signature = [0u8; 64];
    hex::decode_to_slice(password, &mut signature).is_ok()
        && crate::signing::verify_with_context(public, LOGIN_CONTEXT, device.as_bytes(), &signature)
}

impl Report {
    /// Reads a sealed report without checking who sealed it: for counting and display by
    /// tools that hold no device keys (the simulator's probe, the demo's telemetry
    /// view). Nothing may decide on what it returns; the registry opens reports with
    /// [`TrustedKeys::open`](crate::TrustedKeys::open) and the device's key.
    ///
    /// # Errors
    /// The envelope or the report is not valid CBOR of their shapes.
    pub fn read_unverified(payload: &[u8]) -> Result<Report, crate::DecodeError> {
        let sealed: crate::Sealed = crate::decode(payload)?;
        crate::decode(&sealed.body)
    }
}

impl SignedBody for Report {
    const CONTEXT: &'static [u8] = b"wpm/v1/report\0";
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{KeyPair, OpenError, Sealed, TrustedKeys};

    fn report(counter: u64) -> Report {
        Report {
            device: "d1".into(),
            counter,
            body: ReportBody::Presence(Presence {
                online: true,
                will: Some(counter - 1),
            }),
        }
    }

    #[test]
    fn a_report_opens_only_with_the_key_of_the_device_that_sealed_it() {
        let device = KeyPair::from_seed(&[1; 32]);
        let other = KeyPair::from_seed(&[2; 32]);
        let sealed = device.seal(&report(5));
        let opened: Report = TrustedKeys::new(&[device.public()]).open(&sealed).unwrap();
        assert_eq!(opened, report(5));
        assert!(matches!(
            TrustedKeys::new(&[other.public()]).open::<Report>(&sealed),
            Err(OpenError::UnknownKey)
        ));
    }

    #[test]
    fn a_report_altered_in_transit_does_not_verify() {
        let device = KeyPair::from_seed(&[1; 32]);
        let mut sealed: Sealed = crate::decode(&device.seal(&report(5))).unwrap();
        let mut body = sealed.body.to_vec();
        // Raise the counter: what a replay that tries to pass as new would do.
        let altered = crate::encode(&report(6));
        assert_eq!(altered.len(), body.len());
        body.copy_from_slice(&altered);
        sealed.body = body.into();
        let bytes = crate::encode(&sealed);
        assert!(matches!(
            TrustedKeys::new(&[device.public()]).open::<Report>(&bytes),
            Err(OpenError::BadSignature)
        ));
    }

    #[test]
    fn a_login_password_is_good_only_for_its_device_and_key() {
        let key = KeyPair::from_seed(&[1; 32]);
        let password = login_password(&key, "d1");
        assert!(check_login_password(
            &key.public(),
            "d1",
            password.as_bytes()
        ));
        assert!(!check_login_password(
            &key.public(),
            "d2",
            password.as_bytes()
        ));
        let other = KeyPair::from_seed(&[2; 32]).public();
        assert!(!check_login_password(&other, "d1", password.as_bytes()));
        assert!(!check_login_password(&key.public(), "d1", b"hunter2"));
    }

    #[test]
    fn a_registry_signature_is_never_taken_for_a_report() {
        // A statement sealed for another purpose fails as a report even with the right key.
        let key = KeyPair::from_seed(&[3; 32]);
        let sealed = key.seal(&crate::Command {
            device: "d1".into(),
            sequence: 1,
            issued_at: 1,
            expires_at: 9,
            action: crate::Action::Stop("m".into()),
        });
        assert!(matches!(
            TrustedKeys::new(&[key.public()]).open::<Report>(&sealed),
            Err(OpenError::BadSignature)
        ));
    }
}
