//! Case preparation, the stage evaluation and training share: a site
//! folder's plugin found and loaded ([`site_plugins`]), then every case
//! through the inference path up to the model ([`prepare_cases`]: DICOM
//! ingest, canonical preprocessing, the plugin's EMR mapping and image
//! decision — `Pipeline::prepare`), in parallel within the plugins'
//! sandbox slots ([`with_plugin_parallelism`]).

use std::sync::Arc;

use crate::config::{Config, PluginEntry};
use crate::dataset::{self, Site};
use crate::dicom::DicomFile;
use crate::model::ModelInput;
use crate::pipeline::{Pipeline, PipelineError};
use crate::plugins::{PluginEngine, PluginSet};

/// Why a site's cases cannot be prepared.
#[derive(Debug, thiserror::Error)]
pub enum CasesError {
    /// The site's plugin is nowhere to be found.
    #[error(transparent)]
    Dataset(#[from] dataset::DatasetError),
    /// A site's plugin (or the plugin engine) could not be loaded.
    #[error("site {site}: {source}")]
    Plugin {
        /// The site (`-` for the engine).
        site: String,
        /// Why.
        #[source]
        source: crate::plugins::PluginError,
    },
}

/// The plugin engine, with `config`'s sandbox limits.
///
/// # Errors
/// [`CasesError::Plugin`].
pub fn plugin_engine(config: &Config) -> Result<Arc<PluginEngine>, CasesError> {
    PluginEngine::new(&config.sandbox.limits())
        .map(Arc::new)
        .map_err(|source| CasesError::Plugin {
            site: "-".to_owned(),
            source,
        })
}

/// The plugin a site's folder names, found by `lookup` (among `config`'s
/// plugins, …) and loaded with `config`'s sandbox.
///
/// # Errors
/// [`CasesError::Dataset`] when it is nowhere, [`CasesError::Plugin`]
/// when it does not load.
pub fn site_plugins(
    site: &Site,
    config: &Config,
    lookup: &dataset::PluginLookup,
    engine: &Arc<PluginEngine>,
) -> Result<Arc<PluginSet>, CasesError> {
    let path = lookup.resolve(site, &config.plugins)?;
    let mut config = config.clone();
    config.plugins = vec![PluginEntry { path }];
    PluginSet::load(&config, engine, None)
        .map(Arc::new)
        .map_err(|source| CasesError::Plugin {
            site: site.id.clone(),
            source,
        })
}

/// Every case of `site` through the pipeline up to the model (read,
/// ingest, its plugins), in parallel, results in file order; a refused
/// case as `case id: reason`, the reason redacted
/// ([`PipelineError::redacted`]: category and field, never a value). `progress` is called once per case. What
/// evaluation and training both start from.
///
/// At most as many cases run at once as the plugins have sandbox slots
/// ([`with_plugin_parallelism`]): on a machine with more cores than slots,
/// a case would otherwise wait for a slot, time out `Busy` and be refused —
/// load, not a fault of the case.
pub fn prepare_cases(
    site: &Site,
    pipeline: &Pipeline,
    plugins: &Arc<PluginSet>,
    limits: &crate::config::LimitsConfig,
    progress: &(dyn Fn() + Sync),
) -> Vec<Result<ModelInput, String>> {
    use rayon::prelude::*;
    let uses_image = pipeline.model().uses_image();
    let prepare = |case: &dataset::Case| {
        // An EMR-only model reads no radiograph; an image model refuses a
        // case without one (`Pipeline::prepare`).
        let file = match (&case.image, uses_image) {
            (Some(path), true) => DicomFile::open(path, limits)
                .map(Some)
                .map_err(PipelineError::from),
            _ => Ok(None),
        };
        let prepared = file
            .and_then(|file| {
                pipeline
                    .prepare(file.as_ref(), &case.emr, plugins)
                    .map(|p| p.input)
            })
            .map_err(|e| format!("{}: {}", case.case_id, e.redacted()));
        progress();
        prepared
    };
    with_plugin_parallelism(plugins.sandboxes(), |parallel| {
        if parallel {
            site.cases.par_iter().map(prepare).collect()
        } else {
            site.cases.iter().map(prepare).collect()
        }
    })
}

/// Runs `work` with its rayon parallelism capped at `sandboxes` threads
/// (`None`: no cap): in the current pool when that is no larger, else in a
/// pool of `sandboxes` threads. `work` is told whether it may run in
/// parallel: not when that pool cannot be built (then one case at a time,
/// slower but never refused).
pub fn with_plugin_parallelism<R: Send>(
    sandboxes: Option<u32>,
    work: impl FnOnce(bool) -> R + Send,
) -> R {
    let threads = rayon::current_num_threads();
    let cap = sandboxes.map_or(threads, |s| (s.max(1) as usize).min(threads));
    if cap == threads {
        return work(true);
    }
    match rayon::ThreadPoolBuilder::new().num_threads(cap).build() {
        Ok(pool) => pool.install(|| work(true)),
        Err(e) => {
            tracing::warn!(
                "no pool of {cap} threads for the plugin stage ({e}): one case at a time"
            );
            work(false)
        }
    }
}

/// Whether a case is held out of training for testing: the federation's
/// promotion gate and `oxbox simulate`'s test sets (a stable hash of site
/// and case id, independent of any training seed, so every model of a
/// comparison is tested on the same cases and trained on none of them).
pub fn is_held_out(site: &str, case_id: &str, fraction: f64) -> bool {
    crate::train::data::in_validation(HOLD_OUT_SEED, site, case_id, fraction)
}

/// The split seed of [`is_held_out`], apart from any training seed.
const HOLD_OUT_SEED: u64 = 0x0a_b0_c5_7e_57;

/// Which of a site's cases a run uses, by the held-out split
/// ([`is_held_out`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HeldOut {
    /// Every case.
    All,
    /// Only the cases not held out at this fraction (training).
    Exclude(f64),
    /// Only the cases held out at this fraction (testing).
    Only(f64),
}

impl HeldOut {
    /// `site` with only the cases this selection keeps (file order kept).
    pub fn select(self, site: &Site) -> Site {
        let keep = |case: &dataset::Case| match self {
            HeldOut::All => true,
            HeldOut::Exclude(f) => !is_held_out(&site.id, &case.case_id, f),
            HeldOut::Only(f) => is_held_out(&site.id, &case.case_id, f),
        };
        Site {
            cases: site.cases.iter().filter(|c| keep(c)).cloned().collect(),
            ..site.clone()
        }
    }

    /// Whether the fraction (if any) is a share strictly between 0 and 1.
    pub fn is_valid(self) -> bool {
        match self {
            HeldOut::All => true,
            HeldOut::Exclude(f) | HeldOut::Only(f) => f > 0.0 && f < 1.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` in a rayon pool of `threads` threads.
    fn in_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("test pool")
            .install(f)
    }

    #[test]
    fn the_plugin_stage_runs_on_no_more_threads_than_sandbox_slots() {
        // A 64-core machine, 32 sandbox slots: 32 cases at a time.
        let seen = in_pool(64, || {
            with_plugin_parallelism(Some(32), |parallel| {
                (parallel, rayon::current_num_threads())
            })
        });
        assert_eq!(seen, (true, 32));
        // Fewer cores than slots, or no plugins: the pool as it is.
        let seen = in_pool(3, || {
            with_plugin_parallelism(Some(32), |_| rayon::current_num_threads())
        });
        assert_eq!(seen, 3);
        let seen = in_pool(5, || {
            with_plugin_parallelism(None, |_| rayon::current_num_threads())
        });
        assert_eq!(seen, 5);
        // And the work really runs at most that wide.
        let widest = in_pool(16, || {
            with_plugin_parallelism(Some(2), |_| {
                use rayon::prelude::*;
                let running = std::sync::atomic::AtomicUsize::new(0);
                (0..64)
                    .into_par_iter()
                    .map(|_| {
                        let now = running.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                        std::thread::sleep(std::time::Duration::from_millis(2));
                        running.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                        now
                    })
                    .max()
            })
        });
        assert!(widest.is_some_and(|w| w <= 2), "{widest:?} cases at once");
    }
}
