//! The retry policy: which failures re-run a job, how attempts are counted, and which workers
//! are left out of the next run.
//!
//! A run that fails with a [retryable](JobError::retryable) error is followed by a probe of its
//! workers (`ReportLoad` with a 2 s deadline). If every worker answers, the failure is the job's
//! own and re-running it would fail again: the job fails. If some are dead, the job re-runs on
//! the rest (attempt n + 1, persisted as `Retrying`), at most `max_retries` times; the dead
//! workers stay excluded until membership next mentions them (they re-registered, or were
//! removed) or for [`EXCLUSION`].
//!
//! A run whose failure is a [broken data link](JobError::Link) between two workers that both
//! still answer the probe re-runs without the end the failing worker blamed (either end mends a
//! cut between two): that worker is excluded like a dead one, though it stays registered.
//!
//! Four failures are the network's or the membership store's, not the job's, and re-run even
//! when every worker answers (within the same `max_retries`): a
//! [broken connection](JobError::Connection) to a worker (a reset or dropped control link), a
//! [membership](JobError::Membership) error (etcd unreachable for longer than its client
//! retries), a worker that
//! [left while loading](JobError::LeftWhileLoading) yet answers (its lease lapsed and it
//! registered again), and a worker that [left during the run](JobError::LeftDuringRun) (the
//! run was aborted for it, and it counts as dead without a probe: cut off from etcd, it may
//! still answer the coordinator; cut off from everyone, a probe would only time out).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::error::JobError;

/// How long a worker found dead stays excluded when membership says nothing more of it.
pub const EXCLUSION: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Re-runs after lost workers before the job fails.
    pub max_retries: u32,
}

/// What to do after the probe of a failed run's workers.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Run again as attempt `attempt`, without the dead workers.
    Retry {
        attempt: u32,
        reason: String,
    },
    Fail(JobError),
}

impl RetryPolicy {
    /// `attempt` is the failed run's attempt number (0 for the first run); `dead` the workers
    /// that did not answer the probe.
    pub fn after_probe(&self, attempt: u32, failure: JobError, dead: &[String]) -> Verdict {
        let store = matches!(
            failure,
            JobError::Membership(_)
                | JobError::LeftWhileLoading { .. }
                | JobError::LeftDuringRun { .. }
                | JobError::Connection { .. }
        );
        if dead.is_empty() && !store {
            return Verdict::Fail(failure);
        }
        if attempt >= self.max_retries {
            return Verdict::Fail(JobError::GaveUp {
                source: Box::new(failure),
                retries: attempt,
            });
        }
        let reason = if dead.is_empty() {
            failure.to_string()
        } else if matches!(failure, JobError::Link { .. }) {
            format!("left out worker(s) {}: {failure}", dead.join(", "))
        } else {
            format!("lost worker(s) {}: {failure}", dead.join(", "))
        };
        Verdict::Retry {
            attempt: attempt + 1,
            reason,
        }
    }
}

/// Workers left out of runs after a probe found them dead.
#[derive(Debug, Default)]
pub struct Exclusions {
    since: HashMap<String, Instant>,
}

impl Exclusions {
    pub fn exclude(&mut self, ids: &[String], now: Instant) {
        for id in ids {
            self.since.insert(id.clone(), now);
        }
    }

    /// Membership said something of `id`: it is a candidate again.
    pub fn clear(&mut self, id: &str) {
        self.since.remove(id);
    }

    pub fn is_excluded(&self, id: &str, now: Instant) -> bool {
        self.since
            .get(id)
            .is_some_and(|t| now.saturating_duration_since(*t) <= EXCLUSION)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lost() -> JobError {
        JobError::Worker {
            rank: 1,
            step: crate::error::WorkerStep::Run,
            message: "peer closed".into(),
        }
    }

    #[test]
    fn retries_only_for_dead_workers_and_only_so_often() {
        let p = RetryPolicy { max_retries: 2 };
        assert_eq!(p.after_probe(0, lost(), &[]), Verdict::Fail(lost()));
        let dead = vec!["w1".to_string()];
        assert_eq!(
            p.after_probe(0, lost(), &dead),
            Verdict::Retry {
                attempt: 1,
                reason: "lost worker(s) w1: worker 1: peer closed".into()
            }
        );
        let Verdict::Fail(e) = p.after_probe(2, lost(), &dead) else {
            panic!("a third retry with max_retries 2")
        };
        assert!(e.to_string().ends_with("(gave up after 2 retries)"), "{e}");
    }

    /// A control connection broken under a call re-runs the job even when every worker answers
    /// the probe (the network failed, not the job), within the same limit.
    #[test]
    fn a_broken_connection_reruns_even_when_every_worker_answers() {
        let p = RetryPolicy { max_retries: 1 };
        let broken = JobError::Connection {
            rank: 0,
            step: crate::error::WorkerStep::Run,
            message: "h2 protocol error: error reading a body from connection".into(),
        };
        assert!(matches!(
            p.after_probe(0, broken.clone(), &[]),
            Verdict::Retry { attempt: 1, .. }
        ));
        assert!(matches!(
            p.after_probe(1, broken, &[]),
            Verdict::Fail(JobError::GaveUp { .. })
        ));
    }

    #[test]
    fn a_membership_failure_retries_with_every_worker_alive() {
        let p = RetryPolicy { max_retries: 1 };
        let store = JobError::Membership("etcd at e:2379: unavailable".into());
        assert_eq!(
            p.after_probe(0, store.clone(), &[]),
            Verdict::Retry {
                attempt: 1,
                reason: "membership: etcd at e:2379: unavailable".into()
            }
        );
        assert!(matches!(
            p.after_probe(1, store, &[]),
            Verdict::Fail(JobError::GaveUp { retries: 1, .. })
        ));
        let flapped = JobError::LeftWhileLoading {
            worker: "w0".into(),
            model: "m".into(),
            version: 1,
        };
        assert!(matches!(
            p.after_probe(0, flapped, &[]),
            Verdict::Retry { attempt: 1, .. }
        ));
    }

    #[test]
    fn exclusions_end_when_membership_speaks_or_time_passes() {
        let t = Instant::now();
        let mut x = Exclusions::default();
        x.exclude(&["a".into(), "b".into()], t);
        assert!(x.is_excluded("a", t + Duration::from_secs(1)));
        assert!(!x.is_excluded("a", t + EXCLUSION + Duration::from_secs(1)));
        x.clear("b");
        assert!(!x.is_excluded("b", t));
    }
}
