//! Model reloads, over HTTP (`POST /v1/admin/model/reload`) or SIGHUP:
//! the served model is replaced without a restart, one reload at a time,
//! each audited, and over HTTP at most one per
//! `server.reload_min_interval_s` (a gate of its own, apart from the plugin
//! reloads', with the same rules: see [`super::reload`]).
//!
//! A reload resolves the package as the server did at start (`--model`,
//! `[model] package`, a promoted model under `storage.data_dir`, the demo
//! model), following a promotion layout's `CURRENT`
//! ([`crate::model::promote`]). The same digest as the served model: nothing
//! changes. Another one: it is loaded on the blocking pool, and only when it
//! loaded completely does it replace the served model ([`AppState::swap_model`]);
//! requests in progress finish on the old one. A package that does not load
//! (a corrupted version, weights that do not fit, a digest that is not the
//! one `CURRENT` names) is refused and the running model stays.

use std::sync::Arc;

use serde_json::json;

use super::AppState;
use super::reload::ReloadTurn;
use crate::model::{Model, ModelError};
use crate::store::AdminRecord;

/// What a model reload did.
#[derive(Debug)]
pub struct ModelReloadOutcome {
    /// Whether another model is served now, or why the reload failed (the
    /// running model stays).
    pub result: Result<bool, String>,
    /// Why the audit row could not be written, if it could not.
    pub audit_error: Option<String>,
}

/// The served model as reloads log and audit it.
fn identity(model: &Model) -> serde_json::Value {
    let package = model.package();
    let manifest = &package.manifest;
    json!({
        "name": manifest.name,
        "version": manifest.version,
        "digest": package.digest,
        "federation": manifest.federation,
    })
}

/// Runs one model reload in `turn` (in a task of its own, see
/// [`super::reload::spawn`]) and audits it as done by `actor`.
///
/// # Errors
/// The task's own failure (a panic in the reload or the audit), as text.
pub async fn reload(
    state: &Arc<AppState>,
    turn: ReloadTurn,
    actor: String,
) -> Result<ModelReloadOutcome, String> {
    let state = Arc::clone(state);
    super::reload::spawn(turn, async move { reload_and_audit(&state, actor).await })
        .await
        .map_err(|e| format!("model reload task: {e}"))
}

/// Reads the package to serve and loads it unless it is the served one.
fn load_if_changed(
    source: &super::ModelSource,
    current: &str,
) -> Result<Option<Model>, ModelError> {
    let package = source.package()?;
    if package.digest == current {
        return Ok(None);
    }
    Model::load(package, &source.device).map(Some)
}

async fn reload_and_audit(state: &Arc<AppState>, actor: String) -> ModelReloadOutcome {
    let (before, current) = {
        let served = state.served();
        let model = served.pipeline.model();
        (identity(model), model.package().digest.clone())
    };
    let source = state.model_source.clone();
    let loaded = tokio::task::spawn_blocking(move || load_if_changed(&source, &current)).await;
    let result = match loaded {
        Ok(Ok(None)) => Ok(false),
        Ok(Ok(Some(model))) => state
            .swap_model(model)
            .map(|()| true)
            .map_err(|e| format!("starting the inference thread: {e}")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(format!("model reload task: {e}")),
    };
    let after = identity(state.served().pipeline.model());
    match &result {
        Ok(true) => {
            tracing::info!("{actor}: model reloaded: {before} -> {after}");
            state.metrics.model_reload("changed");
        }
        Ok(false) => {
            tracing::info!("{actor}: model reload: the served model is unchanged, {after}");
            state.metrics.model_reload("unchanged");
        }
        Err(e) => {
            tracing::error!("{actor}: model reload failed, keeping the running model: {e}");
            state.metrics.model_reload("failed");
        }
    }
    let record = AdminRecord {
        time: String::new(),
        actor,
        action: "model.reload".to_owned(),
        outcome: match &result {
            Ok(true) => "ok",
            Ok(false) => "unchanged",
            Err(_) => "failed",
        }
        .to_owned(),
        before,
        after,
        detail: result.as_ref().err().cloned().unwrap_or_default(),
    };
    let audit_error = super::reload::audit_admin(state, record, "model reload").await;
    ModelReloadOutcome {
        result,
        audit_error,
    }
}
