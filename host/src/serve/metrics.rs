//! What `GET /metrics` reports, in the Prometheus/OpenMetrics text format:
//! requests by route and status, per-stage latency histograms, batch sizes
//! and plugin faults.

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
    /// decode, plugins, queue, inference or total.
    pub stage: &'static str,
}

/// Labels of the plugin fault counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    /// "name version" of the plugin.
    pub plugin: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// The server's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    stage_seconds: HistogramFamily<StageLabels>,
    batch_size: Histogram,
    plugin_faults: Family<PluginLabels, Counter>,
    in_flight: Gauge,
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
            "Time per prediction stage (decode, plugins, queue, inference, total)",
            stage_seconds.clone(),
        );
        let batch_size = Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0]);
        registry.register(
            "inference_batch_size",
            "Cases per model forward pass",
            batch_size.clone(),
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
        Self {
            registry,
            requests,
            stage_seconds,
            batch_size,
            plugin_faults,
            in_flight,
        }
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

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}
