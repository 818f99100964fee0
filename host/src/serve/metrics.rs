//! What `GET /metrics` reports, in the Prometheus/OpenMetrics text format:
//! requests by route and status, per-stage latency histograms, batch sizes,
//! plugin faults, inference panics, admission and reload refusals, the memory budget's
//! use and open connections.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of the request counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route (a fixed set: unknown paths count as "other").
    pub route: &'static str,
    /// The HTTP status.
    pub status: u16,
}

/// Labels of the stage histograms.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    /// receive, parse, decode, preprocess, plugins, queue, inference, audit
    /// or total.
    pub stage: &'static str,
}

/// Labels of the plugin fault counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    /// "name version" of the plugin.
    pub plugin: String,
}

/// Labels of the admission refusal counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    /// `requests` (server.max_concurrent_requests), `memory` (the budget is
    /// in use) or `too_large` (one case larger than the whole budget).
    pub reason: &'static str,
}

/// Labels of the refused-reload counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadRefusalLabels {
    /// `no_token` (403), `in_progress` (409) or `rate_limited` (429).
    pub reason: &'static str,
}

/// Labels of the model reload counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelReloadLabels {
    /// `changed`, `unchanged` or `failed`.
    pub outcome: &'static str,
}

/// Labels of the DICOM counters: an association's or an instance's
/// outcome, a study's inference mode.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// The outcome (a fixed set per counter, see its help text).
    pub outcome: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// The server's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    stage_seconds: HistogramFamily<StageLabels>,
    batch_size: Histogram,
    batch_limit: Gauge,
    plugin_faults: Family<PluginLabels, Counter>,
    in_flight: Gauge,
    inference_panics: Counter,
    inference_restarts: Counter,
    admission_refusals: Family<AdmissionLabels, Counter>,
    reload_refusals: Family<ReloadRefusalLabels, Counter>,
    model_reload_refusals: Family<ReloadRefusalLabels, Counter>,
    model_reloads: Family<ModelReloadLabels, Counter>,
    memory_budget: Gauge,
    memory_in_use: Gauge,
    memory_peak: Gauge,
    connections: Gauge,
    dicom_associations: Family<OutcomeLabels, Counter>,
    dicom_instances: Family<OutcomeLabels, Counter>,
    studies_matched: Counter,
    studies_waiting: Gauge,
    studies_expired: Counter,
    studies_inferred: Family<OutcomeLabels, Counter>,
    studies_failed: Counter,
    emr_records: Counter,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms … ~16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric under the `oxbox_` prefix.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("oxbox");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        let stage_seconds: HistogramFamily<StageLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "prediction_stage_seconds",
            "Time per prediction stage (receive, parse, decode, preprocess, plugins, queue, inference, audit, total)",
            stage_seconds.clone(),
        );
        let batch_size = Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]);
        registry.register(
            "inference_batch_size",
            "Cases per model forward pass",
            batch_size.clone(),
        );
        let batch_limit = Gauge::default();
        registry.register(
            "inference_batch_limit",
            "Most cases per forward pass (server.batch_max, or less where calibration found that larger batches do not pay)",
            batch_limit.clone(),
        );
        let plugin_faults = Family::<PluginLabels, Counter>::default();
        registry.register(
            "plugin_faults",
            "Site plugin faults (traps, timeouts, limits, malformed output, quarantine)",
            plugin_faults.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "predictions_in_flight",
            "Predictions in progress",
            in_flight.clone(),
        );
        let inference_panics = Counter::default();
        registry.register(
            "inference_panics",
            "Model forward passes that panicked (their cases got 500; the thread carried on)",
            inference_panics.clone(),
        );
        let inference_restarts = Counter::default();
        registry.register(
            "inference_restarts",
            "Restarts of the inference loop after a panic outside the forward pass",
            inference_restarts.clone(),
        );
        let admission_refusals = Family::<AdmissionLabels, Counter>::default();
        registry.register(
            "admission_refusals",
            "Predictions refused before decoding: requests (503), memory (503), too_large (413)",
            admission_refusals.clone(),
        );
        let reload_refusals = Family::<ReloadRefusalLabels, Counter>::default();
        registry.register(
            "reload_refusals",
            "Plugin reload requests refused: no_token (403), in_progress (409), rate_limited (429)",
            reload_refusals.clone(),
        );
        let model_reload_refusals = Family::<ReloadRefusalLabels, Counter>::default();
        registry.register(
            "model_reload_refusals",
            "Model reload requests refused: no_token (403), in_progress (409), rate_limited (429)",
            model_reload_refusals.clone(),
        );
        let model_reloads = Family::<ModelReloadLabels, Counter>::default();
        registry.register(
            "model_reloads",
            "Model reloads that ran: changed (another model is served), unchanged, failed (the running model stayed)",
            model_reloads.clone(),
        );
        let memory_budget = Gauge::default();
        registry.register(
            "memory_budget_bytes",
            "The admission memory budget (server.memory_budget_mib)",
            memory_budget.clone(),
        );
        let memory_in_use = Gauge::default();
        registry.register(
            "memory_budget_in_use_bytes",
            "Bytes of the memory budget reserved by requests in progress",
            memory_in_use.clone(),
        );
        let memory_peak = Gauge::default();
        registry.register(
            "memory_budget_peak_bytes",
            "Most bytes of the memory budget reserved at once since start",
            memory_peak.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "open_connections",
            "Client connections open now (server.max_connections)",
            connections.clone(),
        );
        let dicom_associations = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "dicom_associations",
            "DICOM associations by outcome: accepted, rejected (AE title), limit (dicom.max_associations), congestion (disk reserve), failed (before acceptance), aborted (after)",
            dicom_associations.clone(),
        );
        let dicom_instances = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "dicom_instances",
            "Instances received by C-STORE: stored, ignored (not a frontal chest film), duplicate (study already has one), invalid, mismatch, memory, too_large, disk, storage, shutdown, sop_class",
            dicom_instances.clone(),
        );
        let studies_matched = Counter::default();
        registry.register(
            "studies_matched",
            "Received studies matched to their EMR record",
            studies_matched.clone(),
        );
        let studies_waiting = Gauge::default();
        registry.register(
            "studies_waiting",
            "Received studies waiting for their EMR record",
            studies_waiting.clone(),
        );
        let studies_expired = Counter::default();
        registry.register(
            "studies_expired",
            "Received studies whose EMR record did not come within dicom.emr_wait_s",
            studies_expired.clone(),
        );
        let studies_inferred = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "studies_inferred",
            "Received studies inferred: with_emr, image_only",
            studies_inferred.clone(),
        );
        let studies_failed = Counter::default();
        registry.register(
            "studies_failed",
            "Received studies refused by the ingest, a plugin or the model",
            studies_failed.clone(),
        );
        let emr_records = Counter::default();
        registry.register(
            "emr_records",
            "EMR records received (POST /v1/emr)",
            emr_records.clone(),
        );
        Self {
            registry,
            requests,
            stage_seconds,
            batch_size,
            batch_limit,
            plugin_faults,
            in_flight,
            inference_panics,
            inference_restarts,
            admission_refusals,
            reload_refusals,
            model_reload_refusals,
            model_reloads,
            memory_budget,
            memory_in_use,
            memory_peak,
            connections,
            dicom_associations,
            dicom_instances,
            studies_matched,
            studies_waiting,
            studies_expired,
            studies_inferred,
            studies_failed,
            emr_records,
        }
    }

    /// Counts a DICOM association by outcome.
    pub fn dicom_association(&self, outcome: &'static str) {
        self.dicom_associations
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Counts a received instance by outcome.
    pub fn dicom_instance(&self, outcome: &'static str) {
        self.dicom_instances
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Counts a study matched to its record.
    pub fn study_matched(&self) {
        self.studies_matched.inc();
    }

    /// Sets the number of studies waiting.
    pub fn studies_waiting(&self, waiting: u64) {
        self.studies_waiting
            .set(i64::try_from(waiting).unwrap_or(i64::MAX));
    }

    /// Counts an expired study.
    pub fn study_expired(&self) {
        self.studies_expired.inc();
    }

    /// Counts an inferred study (`with_emr` or `image_only`).
    pub fn study_inferred(&self, outcome: &'static str) {
        self.studies_inferred
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// Counts a study the pipeline refused.
    pub fn study_failed(&self) {
        self.studies_failed.inc();
    }

    /// Counts an EMR record received.
    pub fn emr_record(&self) {
        self.emr_records.inc();
    }

    /// Counts a request.
    pub fn request(&self, route: &'static str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels { route, status })
            .inc();
    }

    /// Records a stage's time, milliseconds.
    pub fn stage(&self, stage: &'static str, ms: f64) {
        self.stage_seconds
            .get_or_create(&StageLabels { stage })
            .observe(ms / 1e3);
    }

    /// Records the batch limit the inference thread serves with.
    pub fn batch_limit(&self, limit: usize) {
        self.batch_limit
            .set(i64::try_from(limit).unwrap_or(i64::MAX));
    }

    /// Records a forward pass's batch size.
    pub fn batch(&self, size: usize) {
        self.batch_size.observe(size as f64);
    }

    /// Counts a plugin fault.
    pub fn plugin_fault(&self, plugin: &str) {
        self.plugin_faults
            .get_or_create(&PluginLabels {
                plugin: plugin.to_owned(),
            })
            .inc();
    }

    /// The in-flight gauge.
    pub fn in_flight(&self) -> &Gauge {
        &self.in_flight
    }

    /// Counts a forward pass that panicked.
    pub fn inference_panic(&self) {
        self.inference_panics.inc();
    }

    /// Counts a restart of the inference loop.
    pub fn inference_restart(&self) {
        self.inference_restarts.inc();
    }

    /// Counts a prediction refused at admission, by `reason`.
    pub fn admission_refused(&self, reason: &'static str) {
        self.admission_refusals
            .get_or_create(&AdmissionLabels { reason })
            .inc();
    }

    /// Counts a refused plugin reload request, by `reason`.
    pub fn reload_refused(&self, reason: &'static str) {
        self.reload_refusals
            .get_or_create(&ReloadRefusalLabels { reason })
            .inc();
    }

    /// Counts a refused model reload request, by `reason`.
    pub fn model_reload_refused(&self, reason: &'static str) {
        self.model_reload_refusals
            .get_or_create(&ReloadRefusalLabels { reason })
            .inc();
    }

    /// Counts a model reload that ran, by `outcome`.
    pub fn model_reload(&self, outcome: &'static str) {
        self.model_reloads
            .get_or_create(&ModelReloadLabels { outcome })
            .inc();
    }

    /// Sets the memory budget gauges: the budget, what is reserved now and
    /// the most ever reserved, bytes.
    pub fn memory(&self, capacity: u64, in_use: u64, peak: u64) {
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.memory_budget.set(gauge(capacity));
        self.memory_in_use.set(gauge(in_use));
        self.memory_peak.set(gauge(peak));
    }

    /// The open-connections gauge.
    pub fn connections(&self) -> &Gauge {
        &self.connections
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}
