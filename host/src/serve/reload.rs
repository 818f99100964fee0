//! Plugin reloads, over HTTP (`POST /v1/admin/plugins/reload`) or SIGHUP:
//! one at a time, each audited, and over HTTP at most one per
//! `server.reload_min_interval_s`.
//!
//! - Serialised: a reload holds the gate's lock while it runs. An HTTP
//!   reload that finds it held gets 409 ([`Refusal::InProgress`]); SIGHUP
//!   waits its turn.
//! - Rate-limited: an HTTP reload sooner than `reload_min_interval_s` after
//!   the previous reload (HTTP or SIGHUP) began gets 429 with Retry-After
//!   ([`Refusal::TooSoon`]). SIGHUP is not rate-limited (sending it takes
//!   the server's own user or root).
//! - Audited: every reload that runs, successful or not, appends an
//!   `admin_events` row (who, when, outcome, the plugins before and after)
//!   to the audit database. Refused attempts are logged, not stored, so an
//!   unauthenticated client cannot grow the database.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::{Mutex, MutexGuard};

use super::AppState;
use crate::plugins::PluginSet;
use crate::store::AdminRecord;

/// Why an HTTP reload was not started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Another reload is running.
    InProgress,
    /// The previous reload began less than the minimum interval ago.
    TooSoon {
        /// Whole seconds until a reload is accepted again (at least 1).
        retry_after_s: u32,
    },
}

/// The one-at-a-time gate and the time of the last reload.
#[derive(Debug)]
pub struct ReloadGate {
    last: Mutex<Option<Instant>>,
    min_interval: Duration,
}

/// Permission to reload, held while the reload runs.
#[derive(Debug)]
pub struct ReloadTurn<'a> {
    last: MutexGuard<'a, Option<Instant>>,
}

impl ReloadGate {
    /// A gate allowing an HTTP reload every `min_interval`.
    pub fn new(min_interval: Duration) -> Self {
        Self {
            last: Mutex::new(None),
            min_interval,
        }
    }

    /// For HTTP: the turn now, or why not.
    ///
    /// # Errors
    /// [`Refusal`].
    pub fn try_begin(&self) -> Result<ReloadTurn<'_>, Refusal> {
        let mut last = self.last.try_lock().map_err(|_| Refusal::InProgress)?;
        let now = Instant::now();
        if let Some(previous) = *last {
            let since = now.duration_since(previous);
            if since < self.min_interval {
                let left = self.min_interval - since;
                let retry_after_s =
                    u32::try_from(left.as_millis().div_ceil(1000)).unwrap_or(u32::MAX);
                return Err(Refusal::TooSoon {
                    retry_after_s: retry_after_s.max(1),
                });
            }
        }
        *last = Some(now);
        Ok(ReloadTurn { last })
    }

    /// For SIGHUP: waits for the turn; no rate limit.
    pub async fn begin(&self) -> ReloadTurn<'_> {
        let mut last = self.last.lock().await;
        *last = Some(Instant::now());
        ReloadTurn { last }
    }
}

/// What a reload did.
#[derive(Debug)]
pub struct ReloadOutcome {
    /// Plugins loaded, or why the reload failed (the old set stays).
    pub result: Result<usize, String>,
    /// Why the audit row could not be written, if it could not.
    pub audit_error: Option<String>,
}

/// The plugins of a set as the audit records them.
fn identities(set: &PluginSet) -> serde_json::Value {
    set.plugins()
        .iter()
        .map(|p| json!({ "name": p.name(), "version": p.version(), "sha256": p.sha256() }))
        .collect()
}

/// Runs one reload in `turn`, on the blocking pool, and audits it as done
/// by `actor`.
pub async fn reload(state: &Arc<AppState>, turn: ReloadTurn<'_>, actor: String) -> ReloadOutcome {
    let before = identities(&state.plugins.current());
    let registry = Arc::clone(&state.plugins);
    let result = match tokio::task::spawn_blocking(move || registry.reload()).await {
        Ok(Ok(count)) => Ok(count),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(format!("reload task: {e}")),
    };
    let after = identities(&state.plugins.current());
    match &result {
        Ok(count) => tracing::info!("{actor}: reloaded {count} plugin(s)"),
        Err(e) => tracing::error!("{actor}: reload failed, keeping the running plugins: {e}"),
    }
    let record = AdminRecord {
        time: String::new(),
        actor,
        action: "plugins.reload".to_owned(),
        outcome: if result.is_ok() { "ok" } else { "failed" }.to_owned(),
        before,
        after,
        detail: result.as_ref().err().cloned().unwrap_or_default(),
    };
    let log = Arc::clone(&state.audit);
    let written = tokio::task::spawn_blocking(move || match log.lock() {
        Ok(log) => log.record_admin(&record).map_err(|e| e.to_string()),
        Err(_) => Err("audit log lock poisoned".to_owned()),
    })
    .await;
    drop(turn);
    let audit_error = match written {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(e) => Some(format!("audit task: {e}")),
    };
    if let Some(e) = &audit_error {
        tracing::error!("plugin reload not audited: {e}");
    }
    ReloadOutcome {
        result,
        audit_error,
    }
}

/// Reloads on every SIGHUP, through the same gate and audit, until the
/// runtime stops.
pub async fn on_sighup(state: Arc<AppState>, mut hangup: tokio::signal::unix::Signal) {
    while hangup.recv().await.is_some() {
        let turn = state.reloads.begin().await;
        let _ = reload(&state, turn, "SIGHUP".to_owned()).await;
    }
}

impl ReloadTurn<'_> {
    /// When this reload began.
    pub fn started(&self) -> Option<Instant> {
        *self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reloads_are_one_at_a_time_and_rate_limited() {
        let gate = ReloadGate::new(Duration::from_secs(10));
        let turn = gate.try_begin().expect("first");
        assert!(turn.started().is_some());
        assert_eq!(gate.try_begin().err(), Some(Refusal::InProgress));
        drop(turn);
        match gate.try_begin().err() {
            Some(Refusal::TooSoon { retry_after_s }) => {
                assert!((9..=10).contains(&retry_after_s), "{retry_after_s}");
            }
            other => panic!("expected TooSoon, got {other:?}"),
        }
        let open = ReloadGate::new(Duration::ZERO);
        drop(open.try_begin().expect("first"));
        drop(open.try_begin().expect("no interval: second at once"));
    }
}
