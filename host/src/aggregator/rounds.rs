//! The round state machine, as pure functions over the durable state: when
//! the open round closes, and what opens after it.
//!
//! ```text
//! statistics (round 0) ──close──▶ training 1 ──close──▶ … training R ──close──▶ finished
//!   (only with job.statistics)
//! ```
//!
//! A round closes when every enrolled site's contribution is complete, or
//! when at least `min_sites` are and `max_wait` has passed since it opened.
//! Closing is two steps, each one SQLite transaction: first the set of
//! contributions is frozen (`closing`), then the new global model is
//! committed together with the next round. Aggregation in between is a
//! pure function of the frozen set, so a crash during it is repaired by
//! doing it again.

use std::time::Duration;

use crate::federation::protocol::Phase;

/// The durable state of the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundState {
    /// What sites do now.
    pub phase: Phase,
    /// The open round (0: statistics; after the last round closed, the
    /// last round).
    pub round: u64,
    /// When the open round opened, seconds since the Unix epoch.
    pub opened_at: u64,
    /// The sites whose contributions were frozen for aggregation (sorted);
    /// `None` while the round is open for uploads.
    pub closing: Option<Vec<String>>,
    /// Digest of the current global model.
    pub global_model: String,
    /// The round the current global model came from (0: the start model
    /// or its statistics-normalised version).
    pub global_round: u64,
}

impl RoundState {
    /// The state a job starts in: the statistics round when the job has
    /// one, else training round 1, from the start model.
    pub fn start(statistics: bool, start_model: &str, now: u64) -> Self {
        Self {
            phase: if statistics {
                Phase::Statistics
            } else {
                Phase::Training
            },
            round: u64::from(!statistics),
            opened_at: now,
            closing: None,
            global_model: start_model.to_owned(),
            global_round: 0,
        }
    }

    /// Whether uploads for `phase` and `round` are taken now (the round is
    /// open and not frozen for aggregation).
    pub fn accepts(&self, phase: Phase, round: u64) -> bool {
        self.closing.is_none()
            && self.phase == phase
            && phase != Phase::Finished
            && self.round == round
    }

    /// The state after the open round closed with the new global model
    /// `digest`, at `now`: the next training round, or finished after
    /// `rounds`.
    pub fn after_close(&self, digest: &str, rounds: u64, now: u64) -> Self {
        let produced = self.round;
        let (phase, round) = if produced >= rounds {
            (Phase::Finished, produced)
        } else {
            (Phase::Training, produced + 1)
        };
        Self {
            phase,
            round,
            opened_at: now,
            closing: None,
            global_model: digest.to_owned(),
            global_round: produced,
        }
    }
}

/// Whether the open round closes now: every one of `enrolled` sites is
/// `complete`, or at least `min_sites` are and `max_wait` passed since
/// `opened_at` (all times in seconds since the Unix epoch).
pub fn should_close(
    enrolled: usize,
    complete: usize,
    min_sites: usize,
    max_wait: Duration,
    opened_at: u64,
    now: u64,
) -> bool {
    if complete == 0 {
        return false;
    }
    if complete >= enrolled {
        return true;
    }
    complete >= min_sites && now.saturating_sub(opened_at) >= max_wait.as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_with_statistics_starts_in_round_zero() {
        let s = RoundState::start(true, "d0", 100);
        assert_eq!(
            (s.phase, s.round, s.global_round),
            (Phase::Statistics, 0, 0)
        );
        assert!(s.accepts(Phase::Statistics, 0));
        assert!(!s.accepts(Phase::Training, 0));
        assert!(!s.accepts(Phase::Training, 1));
        let s = RoundState::start(false, "d0", 100);
        assert_eq!((s.phase, s.round), (Phase::Training, 1));
        assert!(s.accepts(Phase::Training, 1));
    }

    #[test]
    fn rounds_advance_to_finished_and_replays_of_old_rounds_are_not_accepted() {
        let s = RoundState::start(true, "d0", 0);
        let s = s.after_close("d1", 2, 10);
        assert_eq!((s.phase, s.round, s.global_round), (Phase::Training, 1, 0));
        assert_eq!(s.global_model, "d1");
        assert_eq!(s.opened_at, 10);
        let s = s.after_close("d2", 2, 20);
        assert_eq!((s.phase, s.round, s.global_round), (Phase::Training, 2, 1));
        assert!(
            !s.accepts(Phase::Training, 1),
            "last round's upload is a replay"
        );
        assert!(!s.accepts(Phase::Statistics, 0));
        let s = s.after_close("d3", 2, 30);
        assert_eq!((s.phase, s.round, s.global_round), (Phase::Finished, 2, 2));
        assert!(!s.accepts(Phase::Training, 2));
        assert!(!s.accepts(Phase::Finished, 2));
    }

    #[test]
    fn a_frozen_round_takes_no_more_uploads() {
        let mut s = RoundState::start(false, "d0", 0);
        s.closing = Some(vec!["site-1".to_owned()]);
        assert!(!s.accepts(Phase::Training, 1));
    }

    #[test]
    fn a_round_closes_when_all_sent_or_min_sites_after_max_wait() {
        let wait = Duration::from_secs(60);
        assert!(should_close(3, 3, 2, wait, 100, 100), "everyone sent");
        assert!(
            !should_close(3, 2, 2, wait, 100, 159),
            "min_sites, wait not over"
        );
        assert!(
            should_close(3, 2, 2, wait, 100, 160),
            "min_sites after max_wait"
        );
        assert!(
            !should_close(3, 1, 2, wait, 100, 10_000),
            "under min_sites: wait on"
        );
        assert!(
            !should_close(3, 0, 0, wait, 0, 10_000),
            "never with nothing"
        );
    }
}
