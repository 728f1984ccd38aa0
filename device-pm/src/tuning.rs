//! How a device talks to the broker and paces itself: one set of numbers that the
//! firmware and the PC simulator both read, so that a simulated fleet speaks exactly what
//! the real one speaks (QoS, keep-alive, chunk window, intervals, reconnect back-off).

/// QoS 1 publishes a device keeps in flight (unacknowledged) at once: the firmware's MQTT
/// client (rust-mqtt) holds that many in a fixed array, the simulator's the same.
pub const PUBLISH_WINDOW: u16 = 16;

/// MQTT quality of service, as the transports map it onto their client's own type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    AtMostOnce,
    AtLeastOnce,
}

/// Link and scheduling settings of a device. [`Tuning::NRF9160`] is the field profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    /// MQTT keep-alive. The device pings after half of it without traffic; the broker
    /// drops a device silent for 1.5 times it and publishes its last will.
    pub keep_alive_s: u16,
    /// QoS of everything the device publishes (status, presence, events, telemetry).
    /// At least once: a report is in the broker before the device forgets it, and the
    /// broker queues it for the registry's persistent session.
    pub publish_qos: Qos,
    /// QoS of the device's subscriptions (deployments, module manifests, chunks,
    /// commands). At most once: every one of them is retained or re-requested after a
    /// timeout, and sessions are clean, so an acknowledgement per chunk would only cost
    /// air time.
    pub subscribe_qos: Qos,
    /// Chunk requests (subscriptions) in flight at once.
    pub chunk_window: usize,
    /// Scheduler period.
    pub turn_interval_ms: u64,
    /// Periodic status republish.
    pub status_interval_ms: u64,
    /// First wait before reconnecting; doubles after each failure up to the maximum and
    /// starts over after a connection that lasted.
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    /// Most runtime slots (the RAM budget may allow fewer).
    pub slots: usize,
}

impl Tuning {
    /// The nRF9160 in the field: LTE-M, 2 KiB chunks, two of them in flight (a cellular
    /// round trip is long, the modem's buffers are small).
    pub const NRF9160: Tuning = Tuning {
        keep_alive_s: 60,
        publish_qos: Qos::AtLeastOnce,
        subscribe_qos: Qos::AtMostOnce,
        chunk_window: 2,
        turn_interval_ms: 1000,
        status_interval_ms: 15 * 60 * 1000,
        reconnect_min_ms: 1000,
        reconnect_max_ms: 60_000,
        slots: 2,
    };

    /// The next reconnect wait after `previous_ms` (0: the first attempt).
    pub fn next_backoff_ms(&self, previous_ms: u64) -> u64 {
        if previous_ms == 0 {
            self.reconnect_min_ms
        } else {
            previous_ms.saturating_mul(2).min(self.reconnect_max_ms)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let t = Tuning::NRF9160;
        let mut b = 0;
        let waits: alloc::vec::Vec<u64> = (0..8)
            .map(|_| {
                b = t.next_backoff_ms(b);
                b
            })
            .collect();
        assert_eq!(waits, [1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000]);
    }
}
