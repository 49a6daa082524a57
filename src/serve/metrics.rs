//! Prometheus metrics through `prometheus-client`: the counters and histograms live in one registry per server, the
//! scrape-time values (queue depth, readiness, the embedding cache) are read when `/metrics` is scraped, and the
//! crate writes the text exposition format (version 0.0.4).

use std::time::Duration;

use prometheus_client::encoding::prometheus_text;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The `Content-Type` of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Bucket bounds in seconds, from a fast tiny-model stage to a slow large image.
const SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];
const SIZES: &[f64] = &[1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0];

fn seconds() -> Histogram {
    Histogram::new(SECONDS.iter().copied())
}

fn sizes() -> Histogram {
    Histogram::new(SIZES.iter().copied())
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Response {
    endpoint: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Endpoint {
    endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Stage {
    stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientState {
    state: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Everything the server counts. Values that others know (queue depth, running requests, readiness, the cache) are
/// passed to [`Metrics::render`] as [`Gauges`] instead of being kept here.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<Response, Counter>,
    in_flight: Gauge,
    request_seconds: Histograms<Endpoint>,
    stage_seconds: Histograms<Stage>,
    queue_wait: Histogram,
    batch_requests: Histogram,
    batch_images: Histogram,
    images: Counter,
    runs: Family<Outcome, Counter>,
    disconnects: Family<ClientState, Counter>,
    timeouts: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let m = Metrics {
            registry: Registry::default(),
            requests: Family::default(),
            in_flight: Gauge::default(),
            request_seconds: Family::new_with_constructor(seconds),
            stage_seconds: Family::new_with_constructor(seconds),
            queue_wait: seconds(),
            batch_requests: sizes(),
            batch_images: sizes(),
            images: Counter::default(),
            runs: Family::default(),
            disconnects: Family::default(),
            timeouts: Counter::default(),
        };
        // The registry holds clones: every metric is a shared handle on the same values.
        let mut r = Registry::default();
        r.register(
            "fluxrt_http_requests",
            "HTTP responses by endpoint and status (499: the client went away first)",
            m.requests.clone(),
        );
        r.register(
            "fluxrt_http_request_duration_seconds",
            "Time from request to response, by endpoint",
            m.request_seconds.clone(),
        );
        r.register(
            "fluxrt_http_requests_in_flight",
            "HTTP requests being handled",
            m.in_flight.clone(),
        );
        r.register(
            "fluxrt_stage_duration_seconds",
            "Time per pipeline stage and run (denoise: all steps; generate: the whole run; png_encode: per image)",
            m.stage_seconds.clone(),
        );
        r.register(
            "fluxrt_queue_wait_seconds",
            "Time a request waited in the queue before its run started",
            m.queue_wait.clone(),
        );
        r.register(
            "fluxrt_batch_requests",
            "Requests per run (batching)",
            m.batch_requests.clone(),
        );
        r.register(
            "fluxrt_batch_images",
            "Images per run (batching)",
            m.batch_images.clone(),
        );
        r.register(
            "fluxrt_images_generated",
            "Images generated (counted when their run ends)",
            m.images.clone(),
        );
        r.register(
            "fluxrt_runs",
            "Pipeline runs by outcome (ok, error, cancelled)",
            m.runs.clone(),
        );
        r.register(
            "fluxrt_client_disconnects",
            "Clients that went away before their answer, by where their request was",
            m.disconnects.clone(),
        );
        r.register(
            "fluxrt_request_timeouts",
            "Requests answered 504 after --request-timeout",
            m.timeouts.clone(),
        );
        Metrics { registry: r, ..m }
    }
}

/// Point-in-time values read when metrics are scraped.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    pub queue_depth: usize,
    pub running_requests: usize,
    pub workers_ready: usize,
    pub workers: usize,
    pub ready: bool,
    pub cache: Option<crate::pipeline::EmbeddingCacheStats>,
}

impl Gauges {
    /// The scrape-time values as their own registry, written after the counters.
    fn registry(&self) -> Registry {
        let mut r = Registry::default();
        let mut gauge = |name: &str, help: &str, v: usize| {
            r.register(name, help, ConstGauge::new(v as i64));
        };
        gauge(
            "fluxrt_queue_depth",
            "Generation requests waiting for a worker",
            self.queue_depth,
        );
        gauge(
            "fluxrt_running_requests",
            "Generation requests in a run on a worker",
            self.running_requests,
        );
        gauge(
            "fluxrt_workers",
            "Worker threads, each with its own pipeline",
            self.workers,
        );
        gauge(
            "fluxrt_workers_ready",
            "Workers with a loaded and warmed-up model",
            self.workers_ready,
        );
        gauge(
            "fluxrt_ready",
            "1 when the server accepts generation requests",
            self.ready as usize,
        );
        if let Some(c) = self.cache {
            gauge(
                "fluxrt_embedding_cache_entries",
                "Prompts in the cache",
                c.entries,
            );
            gauge(
                "fluxrt_embedding_cache_bytes",
                "Bytes held by the cache",
                c.bytes,
            );
            gauge(
                "fluxrt_embedding_cache_budget_bytes",
                "The cache's byte budget",
                c.budget,
            );
            for (name, help, v) in [
                (
                    "fluxrt_embedding_cache_hits",
                    "Prompts whose embeddings came from the cache",
                    c.hits,
                ),
                (
                    "fluxrt_embedding_cache_misses",
                    "Prompts encoded by CLIP and T5",
                    c.misses,
                ),
                (
                    "fluxrt_embedding_cache_evictions",
                    "Entries evicted to stay within the byte budget",
                    c.evictions,
                ),
            ] {
                r.register(name, help, ConstCounter::new(v));
            }
        }
        r
    }
}

impl Metrics {
    /// An HTTP request began; [`Metrics::record_request`] ends it.
    pub fn request_started(&self) {
        self.in_flight.inc();
    }

    /// An HTTP request ended with `status` after `elapsed`.
    pub fn record_request(&self, endpoint: &str, status: u16, elapsed: Duration) {
        self.in_flight.dec();
        self.requests
            .get_or_create(&Response {
                endpoint: endpoint.to_string(),
                status,
            })
            .inc();
        self.request_seconds
            .get_or_create(&Endpoint {
                endpoint: endpoint.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }

    pub fn stage(&self, stage: &str, d: Duration) {
        self.stage_seconds
            .get_or_create(&Stage {
                stage: stage.to_string(),
            })
            .observe(d.as_secs_f64());
    }

    pub fn queue_wait(&self, d: Duration) {
        self.queue_wait.observe(d.as_secs_f64());
    }

    pub fn batch(&self, requests: usize, images: usize) {
        self.batch_requests.observe(requests as f64);
        self.batch_images.observe(images as f64);
    }

    /// A run ended with `outcome` (ok, error, cancelled) after generating `images`.
    pub fn run(&self, outcome: &'static str, images: usize) {
        self.runs.get_or_create(&Outcome { outcome }).inc();
        self.images.inc_by(images as u64);
    }

    pub fn disconnect(&self, state: &'static str) {
        self.disconnects.get_or_create(&ClientState { state }).inc();
    }

    pub fn timeout(&self) {
        self.timeouts.inc();
    }

    /// The text exposition of every metric, with the scrape-time values `g`.
    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::with_capacity(8192);
        prometheus_text::encode(&mut out, &self.registry)
            .and_then(|()| prometheus_text::encode(&mut out, &g.registry()))
            .expect("writing to a String does not fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.stage("clip", Duration::from_millis(3));
        m.stage("clip", Duration::from_millis(300));
        m.request_started();
        m.request_started();
        m.record_request("/v1/generate", 200, Duration::from_millis(10));
        m.record_request("/v1/generate", 429, Duration::from_millis(1));
        let text = m.render(&Gauges::default());
        assert!(
            text.contains("fluxrt_stage_duration_seconds_bucket{stage=\"clip\",le=\"0.005\"} 1")
        );
        assert!(text.contains("fluxrt_stage_duration_seconds_bucket{stage=\"clip\",le=\"0.5\"} 2"));
        assert!(text.contains("fluxrt_stage_duration_seconds_bucket{stage=\"clip\",le=\"+Inf\"} 2"));
        assert!(text.contains("fluxrt_stage_duration_seconds_count{stage=\"clip\"} 2"));
        assert!(
            text.contains("fluxrt_http_requests_total{endpoint=\"/v1/generate\",status=\"429\"} 1")
        );
        assert!(
            text.contains("# TYPE fluxrt_http_requests_total counter"),
            "{text}"
        );
        assert!(text.contains("fluxrt_ready 0"), "{text}");
        assert!(
            text.contains("fluxrt_http_requests_in_flight 0\n"),
            "{text}"
        );
        // Every sample line is `name{labels} value` or `name value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, v) = line.rsplit_once(' ').unwrap();
            assert!(v.parse::<f64>().is_ok(), "{line}");
        }
    }
}
