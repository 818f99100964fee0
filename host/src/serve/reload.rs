//! Plugin reloads, over HTTP (`POST /v1/admin/plugins/reload`) or SIGHUP:
//! one at a time, each audited, and over HTTP at most one per
//! `server.reload_min_interval_s`.
//!
//! - Serialised: a reload holds the gate's lock while it runs. An HTTP
//!   reload that finds it held gets 409 ([`Refusal::InProgress`]); SIGHUP
//!   waits its turn. The turn is owned ([`ReloadTurn`] holds an owned
//!   guard) and moved, with the reload and its audit, into a task of its own
//!   ([`spawn`]): a client that disconnects mid-reload drops only its wait
//!   for the answer, never the turn, so the reload runs to its audit row and
//!   no second reload starts before it ends.
//! - Rate-limited: an HTTP reload sooner than `reload_min_interval_s` after
//!   the previous reload (HTTP or SIGHUP) began gets 429 with Retry-After
//!   ([`Refusal::TooSoon`]). SIGHUP is not rate-limited (sending it takes
//!   the server's own user or root).
//! - Audited: every reload that runs, successful or not, appends an
//!   `admin_events` row (who, when, outcome, the plugins before and after)
//!   to the audit database. Refused attempts are counted
//!   (`oxbox_reload_refusals_total`) and logged at debug level only, so a
//!   local client can grow neither the database nor the log.
//! - Logged: a successful reload logs one `info` line per plugin, old → new
//!   with name, version and sha256 (changed, added, removed or unchanged),
//!   and says when nothing changed; a failed one logs why at `error`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::{Mutex, OwnedMutexGuard};
use tokio::task::JoinHandle;

use super::AppState;
use crate::plugins::set::ReloadError;
use crate::plugins::{PluginError, PluginSet};
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
    last: Arc<Mutex<Option<Instant>>>,
    min_interval: Duration,
}

/// Permission to reload, held while the reload runs; owned, so that it can
/// move into the task that runs the reload.
#[derive(Debug)]
pub struct ReloadTurn {
    last: OwnedMutexGuard<Option<Instant>>,
}

impl ReloadGate {
    /// A gate allowing an HTTP reload every `min_interval`.
    pub fn new(min_interval: Duration) -> Self {
        Self {
            last: Arc::new(Mutex::new(None)),
            min_interval,
        }
    }

    /// For HTTP: the turn now, or why not.
    ///
    /// # Errors
    /// [`Refusal`].
    pub fn try_begin(&self) -> Result<ReloadTurn, Refusal> {
        let mut last = Arc::clone(&self.last)
            .try_lock_owned()
            .map_err(|_| Refusal::InProgress)?;
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
    pub async fn begin(&self) -> ReloadTurn {
        let mut last = Arc::clone(&self.last).lock_owned().await;
        *last = Some(Instant::now());
        ReloadTurn { last }
    }
}

/// Why a reload loaded no new set (the running one stays).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReloadFailure {
    /// Every sandbox stayed busy while the new set was being described:
    /// load, not a fault of the plugins (HTTP 503 with Retry-After).
    #[error("{0}")]
    Busy(String),
    /// The configuration or a plugin failed to load (HTTP 422).
    #[error("{0}")]
    Failed(String),
}

/// What a reload did.
#[derive(Debug)]
pub struct ReloadOutcome {
    /// Plugins loaded, or why the reload failed (the old set stays).
    pub result: Result<usize, ReloadFailure>,
    /// Why the audit row could not be written, if it could not.
    pub audit_error: Option<String>,
}

/// A loaded plugin as reloads log and audit it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Identity {
    name: String,
    version: String,
    sha256: String,
}

impl Identity {
    fn json(&self) -> serde_json::Value {
        json!({ "name": self.name, "version": self.version, "sha256": self.sha256 })
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (sha256 {})", self.version, self.sha256)
    }
}

/// The plugins of a set, in run order.
fn identities(set: &PluginSet) -> Vec<Identity> {
    set.plugins()
        .iter()
        .map(|p| Identity {
            name: p.name().to_owned(),
            version: p.version().to_owned(),
            sha256: p.sha256().to_owned(),
        })
        .collect()
}

/// One line per plugin of a reload, old → new by name: changed, added,
/// removed or unchanged, each with version and sha256; and whether anything
/// changed at all.
fn changes(before: &[Identity], after: &[Identity]) -> (Vec<String>, bool) {
    let mut lines = Vec::new();
    let mut changed = false;
    for new in after {
        match before.iter().find(|old| old.name == new.name) {
            Some(old) if old == new => lines.push(format!("plugin {}: unchanged, {new}", new.name)),
            Some(old) => {
                changed = true;
                lines.push(format!("plugin {}: {old} -> {new}", new.name));
            }
            None => {
                changed = true;
                lines.push(format!("plugin {}: added, {new}", new.name));
            }
        }
    }
    for old in before {
        if !after.iter().any(|new| new.name == old.name) {
            changed = true;
            lines.push(format!("plugin {}: removed, was {old}", old.name));
        }
    }
    if before
        .iter()
        .map(|i| &i.name)
        .ne(after.iter().map(|i| &i.name))
    {
        changed = true;
    }
    (lines, changed)
}

/// Runs `work` in a task of its own that holds `turn` until `work` has
/// finished: awaiting the handle is optional, dropping it (a client that
/// went away) leaves the work and the turn to finish together.
pub fn spawn<F>(turn: ReloadTurn, work: F) -> JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(async move {
        let output = work.await;
        drop(turn);
        output
    })
}

/// Runs one reload in `turn` (in a task of its own, see [`spawn`]), on the
/// blocking pool, and audits it as done by `actor`.
///
/// # Errors
/// The task's own failure (a panic in the reload or the audit), as text.
pub async fn reload(
    state: &Arc<AppState>,
    turn: ReloadTurn,
    actor: String,
) -> Result<ReloadOutcome, String> {
    let state = Arc::clone(state);
    spawn(turn, async move { reload_and_audit(&state, actor).await })
        .await
        .map_err(|e| format!("reload task: {e}"))
}

/// One reload, on the blocking pool, and its audit row.
async fn reload_and_audit(state: &Arc<AppState>, actor: String) -> ReloadOutcome {
    let before = identities(&state.plugins.current());
    let registry = Arc::clone(&state.plugins);
    let result = match tokio::task::spawn_blocking(move || registry.reload()).await {
        Ok(Ok(count)) => Ok(count),
        Ok(Err(e @ ReloadError::Plugin(PluginError::Busy { .. }))) => {
            Err(ReloadFailure::Busy(e.to_string()))
        }
        Ok(Err(e)) => Err(ReloadFailure::Failed(e.to_string())),
        Err(e) => Err(ReloadFailure::Failed(format!("reload task: {e}"))),
    };
    let after = identities(&state.plugins.current());
    match &result {
        Ok(count) => {
            let (lines, changed) = changes(&before, &after);
            for line in &lines {
                tracing::info!("{actor}: reload: {line}");
            }
            if changed {
                tracing::info!("{actor}: reloaded {count} plugin(s)");
            } else {
                tracing::info!("{actor}: reloaded {count} plugin(s): nothing changed");
            }
        }
        Err(e) => tracing::error!("{actor}: reload failed, keeping the running plugins: {e}"),
    }
    let record = AdminRecord {
        time: String::new(),
        actor,
        action: "plugins.reload".to_owned(),
        outcome: if result.is_ok() { "ok" } else { "failed" }.to_owned(),
        before: before.iter().map(Identity::json).collect(),
        after: after.iter().map(Identity::json).collect(),
        detail: result
            .as_ref()
            .err()
            .map(ToString::to_string)
            .unwrap_or_default(),
    };
    let audit_error = audit_admin(state, record, "plugin reload").await;
    ReloadOutcome {
        result,
        audit_error,
    }
}

/// Reloads the plugins, then the model ([`super::model_reload`]), on every
/// SIGHUP, each through its own gate and audit, until the runtime stops.
pub async fn on_sighup(state: Arc<AppState>, mut hangup: tokio::signal::unix::Signal) {
    while hangup.recv().await.is_some() {
        let turn = state.reloads.begin().await;
        if let Err(e) = reload(&state, turn, "SIGHUP".to_owned()).await {
            tracing::error!("SIGHUP: {e}");
        }
        let turn = state.model_reloads.begin().await;
        if let Err(e) = super::model_reload::reload(&state, turn, "SIGHUP".to_owned()).await {
            tracing::error!("SIGHUP: {e}");
        }
    }
}

impl ReloadTurn {
    /// When this reload began.
    pub fn started(&self) -> Option<Instant> {
        *self.last
    }
}

/// Writes an admin action's audit row off the async threads; the error,
/// also logged, when it could not be written (`what` names the action).
pub(super) async fn audit_admin(
    state: &AppState,
    record: AdminRecord,
    what: &str,
) -> Option<String> {
    let log = Arc::clone(&state.audit);
    let written = tokio::task::spawn_blocking(move || match log.lock() {
        Ok(log) => log.record_admin(&record).map_err(|e| e.to_string()),
        Err(_) => Err("audit log lock poisoned".to_owned()),
    })
    .await;
    let audit_error = match written {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(e) => Some(format!("audit task: {e}")),
    };
    if let Some(e) = &audit_error {
        tracing::error!("{what} not audited: {e}");
    }
    audit_error
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_logs_each_plugin_old_to_new_and_says_when_nothing_changed() {
        let id = |name: &str, version: &str, sha: &str| Identity {
            name: name.to_owned(),
            version: version.to_owned(),
            sha256: sha.to_owned(),
        };
        let before = vec![id("site", "0.1.0", "aa"), id("canonical", "0.1.0", "cc")];
        let (lines, changed) = changes(&before, &before);
        assert!(!changed);
        assert_eq!(
            lines,
            [
                "plugin site: unchanged, 0.1.0 (sha256 aa)",
                "plugin canonical: unchanged, 0.1.0 (sha256 cc)"
            ]
        );
        let after = vec![id("site", "0.2.0", "bb"), id("extra", "1.0.0", "ee")];
        let (lines, changed) = changes(&before, &after);
        assert!(changed);
        assert_eq!(
            lines,
            [
                "plugin site: 0.1.0 (sha256 aa) -> 0.2.0 (sha256 bb)",
                "plugin extra: added, 1.0.0 (sha256 ee)",
                "plugin canonical: removed, was 0.1.0 (sha256 cc)"
            ]
        );
        // The same plugins in another order: the chain changed.
        let swapped = vec![before[1].clone(), before[0].clone()];
        assert!(changes(&before, &swapped).1);
    }

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

    #[test]
    fn a_reload_whose_requester_goes_away_keeps_its_turn_and_finishes() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let gate = ReloadGate::new(Duration::ZERO);
            let (release, released) = tokio::sync::oneshot::channel::<()>();
            let audited = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let written = Arc::clone(&audited);
            let turn = gate.try_begin().expect("first");
            // The reload waits until released, then writes its "audit row".
            let handle = spawn(turn, async move {
                let _ = released.await;
                written.store(true, std::sync::atomic::Ordering::SeqCst);
            });
            // The requester waits a little and goes away (hyper drops the
            // request's future when the client disconnects).
            let waited = tokio::time::timeout(Duration::from_millis(20), handle).await;
            assert!(waited.is_err(), "the reload cannot have finished yet");
            // The turn is still held: a second reload is refused.
            assert_eq!(gate.try_begin().err(), Some(Refusal::InProgress));
            release.send(()).expect("release");
            // The reload runs to its audit and then gives the turn back.
            let deadline = Instant::now() + Duration::from_secs(5);
            let turn = loop {
                match gate.try_begin() {
                    Ok(turn) => break turn,
                    Err(Refusal::InProgress) => {
                        assert!(Instant::now() < deadline, "the turn was never given back");
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err(other) => panic!("{other:?}"),
                }
            };
            assert!(audited.load(std::sync::atomic::Ordering::SeqCst));
            drop(turn);
        });
    }
}
