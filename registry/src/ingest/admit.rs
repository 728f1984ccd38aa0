//! Which of a device's verified reports are new: the anti-replay rule.
//!
//! Pure. A device numbers its reports with a counter that only grows (see
//! `wpm_manifests::report`). The registry keeps, per device, the highest counter it
//! accepted and which of the [`WINDOW`] counters below it it has seen, as IPsec does
//! (RFC 4303 §3.4.3): a report is new if its counter is above the highest, or within the
//! window and not yet seen. So a report that arrives late (another replica of the
//! registry took its neighbour, or the broker redelivered) is still taken, and any
//! report seen before, however it comes back, is not.
//!
//! The one exception is the last will: the broker publishes it after the session it
//! ends, but the device sealed it before that session's reports, so its counter is low.
//! It is taken once, if it is the will the device's latest online presence announced.

/// Counters below the highest whose arrival is remembered.
pub const WINDOW: u64 = 64;

/// What the registry keeps per device to tell new reports from old ones.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// The highest counter accepted (0: none yet; a device's first counter is above 0
    /// since its first boot moves the epoch to 1).
    pub highest: u64,
    /// Bit `i` set: counter `highest - 1 - i` was accepted.
    pub window: u64,
    /// The will announced by the device's latest online presence (0: none).
    pub will: u64,
    /// That will has been taken.
    pub will_spent: bool,
}

/// What to do with one report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// New: ingest it.
    Fresh,
    /// The announced last will, taken once: the device is offline.
    Will,
    /// Accepted before (a retained copy or a redelivery): drop it.
    Duplicate,
    /// Older than the window, or a will that was not announced or was taken already:
    /// a replay, drop it.
    Replayed,
}

impl Counters {
    /// Decides on the report numbered `counter` and remembers it if it is taken.
    /// `offline_presence`: the report is a presence saying the device went offline
    /// (the only form a last will takes).
    pub fn admit(&mut self, counter: u64, offline_presence: bool) -> Verdict {
        if offline_presence && counter < self.highest {
            // A device says goodbye last, so a lower offline presence is either the
            // announced will or something past.
            if counter != self.will || self.will_spent {
                return Verdict::Replayed;
            }
            self.will_spent = true;
            return Verdict::Will;
        }
        if counter > self.highest {
            let shift = counter - self.highest;
            self.window = if shift > WINDOW {
                0
            } else {
                // The old highest becomes bit shift-1.
                self.window.checked_shl(shift as u32).unwrap_or(0) | (1 << (shift - 1))
            };
            self.highest = counter;
            return Verdict::Fresh;
        }
        if counter == self.highest {
            return Verdict::Duplicate;
        }
        let age = self.highest - 1 - counter;
        if age >= WINDOW {
            return Verdict::Replayed;
        }
        let bit = 1u64 << age;
        if self.window & bit != 0 {
            return Verdict::Duplicate;
        }
        self.window |= bit;
        Verdict::Fresh
    }

    /// An online presence numbered `counter` that was taken announces `will`: only the
    /// newest announcement counts, so a late presence of an earlier session cannot
    /// bring back a will that is past.
    pub fn announce(&mut self, will: u64) {
        if will > self.will {
            self.will = will;
            self.will_spent = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken(c: &mut Counters, counters: &[u64]) -> Vec<Verdict> {
        counters.iter().map(|n| c.admit(*n, false)).collect()
    }

    #[test]
    fn growing_counters_are_fresh_and_each_is_taken_once() {
        let mut c = Counters::default();
        use Verdict::*;
        assert_eq!(taken(&mut c, &[5, 6, 9]), [Fresh, Fresh, Fresh]);
        assert_eq!(taken(&mut c, &[9, 6, 5]), [Duplicate, Duplicate, Duplicate]);
    }

    #[test]
    fn a_late_report_within_the_window_is_taken_once() {
        let mut c = Counters::default();
        use Verdict::*;
        assert_eq!(
            taken(&mut c, &[10, 12, 11, 11]),
            [Fresh, Fresh, Fresh, Duplicate]
        );
        // 7, 8 and 9 were never seen: still new.
        assert_eq!(
            taken(&mut c, &[8, 7, 9, 8]),
            [Fresh, Fresh, Fresh, Duplicate]
        );
    }

    #[test]
    fn a_report_older_than_the_window_is_a_replay() {
        let mut c = Counters::default();
        c.admit(1000, false);
        assert_eq!(c.admit(1000 - WINDOW, false), Verdict::Fresh);
        assert_eq!(c.admit(1000 - WINDOW - 1, false), Verdict::Replayed);
        // A jump past the window forgets it: everything below is old.
        c.admit(5000, false);
        assert_eq!(c.admit(4999, false), Verdict::Fresh);
        assert_eq!(c.admit(1000, false), Verdict::Replayed);
    }

    #[test]
    fn a_new_boot_epoch_moves_past_everything_before() {
        let mut c = Counters::default();
        let epoch = |e: u64, n: u64| (e << 32) | n;
        assert_eq!(c.admit(epoch(1, 7), false), Verdict::Fresh);
        assert_eq!(c.admit(epoch(2, 0), false), Verdict::Fresh);
        assert_eq!(c.admit(epoch(1, 8), false), Verdict::Replayed);
    }

    #[test]
    fn the_announced_will_is_taken_once_and_no_other() {
        let mut c = Counters::default();
        // Will sealed at 20, the session's presence at 21 announces it, reports follow.
        taken(&mut c, &[21, 22, 23]);
        c.announce(20);
        assert_eq!(c.admit(20, true), Verdict::Will);
        assert_eq!(c.admit(20, true), Verdict::Replayed);
        // A will nobody announced, far back.
        for n in 100..200 {
            c.admit(n, false);
        }
        assert_eq!(c.admit(30, true), Verdict::Replayed);
    }

    #[test]
    fn a_late_announcement_does_not_bring_back_a_past_will() {
        let mut c = Counters::default();
        taken(&mut c, &[21, 22]);
        c.announce(20);
        taken(&mut c, &[41, 42]);
        c.announce(40);
        c.announce(20); // The first session's presence, redelivered late.
        assert_eq!(c.admit(20, true), Verdict::Replayed);
        assert_eq!(c.admit(40, true), Verdict::Will);
    }

    #[test]
    fn no_sequence_of_reports_takes_a_counter_twice() {
        // Every interleaving of a small set of counters, each sent twice.
        let counters: Vec<u64> = (1..=6).flat_map(|n| [n * 7, n * 7]).collect();
        for seed in 0..500u64 {
            let mut order = counters.clone();
            let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            for i in (1..order.len()).rev() {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                order.swap(i, (x >> 33) as usize % (i + 1));
            }
            let mut c = Counters::default();
            let mut taken = std::collections::HashSet::new();
            for n in order {
                if c.admit(n, false) == Verdict::Fresh {
                    assert!(taken.insert(n), "{n} taken twice (seed {seed})");
                }
            }
            assert_eq!(taken.len(), 6, "seed {seed}");
        }
    }
}
