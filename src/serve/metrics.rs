//! Prometheus metrics, written in the text exposition format (version 0.0.4) by hand: a few counters,
//! gauges and histograms need no registry crate.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Bucket bounds in seconds, from a fast tiny-model stage to a slow large image.
const SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
];
const SIZES: &[f64] = &[1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0];

#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        for (b, c) in self.bounds.iter().zip(self.counts.iter_mut()) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {c}");
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

/// A histogram family keyed by one label's value.
#[derive(Debug)]
struct Family {
    label: &'static str,
    bounds: &'static [f64],
    by: Mutex<BTreeMap<String, Histogram>>,
}

impl Family {
    fn new(label: &'static str, bounds: &'static [f64]) -> Self {
        Family {
            label,
            bounds,
            by: Mutex::new(BTreeMap::new()),
        }
    }

    fn observe(&self, value: &str, v: f64) {
        let mut by = self.by.lock().unwrap_or_else(|e| e.into_inner());
        by.entry(value.to_string())
            .or_insert_with(|| Histogram::new(self.bounds))
            .observe(v);
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        header(out, name, help, "histogram");
        let by = self.by.lock().unwrap_or_else(|e| e.into_inner());
        for (value, h) in by.iter() {
            h.write(out, name, &format!("{}=\"{}\"", self.label, escape(value)));
        }
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Everything the server counts. Gauges that the scheduler knows (queue depth, running requests) are
/// passed to [`Metrics::render`] instead of being kept here.
#[derive(Debug)]
pub struct Metrics {
    /// (endpoint, status) -> responses.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    pub http_in_flight: AtomicU64,
    request_seconds: Family,
    stage_seconds: Family,
    queue_wait: Mutex<Histogram>,
    batch_requests: Mutex<Histogram>,
    batch_images: Mutex<Histogram>,
    pub images_generated: AtomicU64,
    /// outcome -> runs.
    runs: Mutex<BTreeMap<&'static str, u64>>,
    /// where the client was when it went away (queued, running) -> count.
    disconnects: Mutex<BTreeMap<&'static str, u64>>,
    pub timeouts: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::new(BTreeMap::new()),
            http_in_flight: AtomicU64::new(0),
            request_seconds: Family::new("endpoint", SECONDS),
            stage_seconds: Family::new("stage", SECONDS),
            queue_wait: Mutex::new(Histogram::new(SECONDS)),
            batch_requests: Mutex::new(Histogram::new(SIZES)),
            batch_images: Mutex::new(Histogram::new(SIZES)),
            images_generated: AtomicU64::new(0),
            runs: Mutex::new(BTreeMap::new()),
            disconnects: Mutex::new(BTreeMap::new()),
            timeouts: AtomicU64::new(0),
        }
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

fn bump<K: Ord>(m: &Mutex<BTreeMap<K, u64>>, k: K) {
    *m.lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(k)
        .or_insert(0) += 1;
}

impl Metrics {
    pub fn record_request(&self, endpoint: &str, status: u16, elapsed: Duration) {
        bump(&self.requests, (endpoint.to_string(), status));
        self.request_seconds
            .observe(endpoint, elapsed.as_secs_f64());
    }

    pub fn stage(&self, stage: &str, d: Duration) {
        self.stage_seconds.observe(stage, d.as_secs_f64());
    }

    pub fn queue_wait(&self, d: Duration) {
        self.queue_wait
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(d.as_secs_f64());
    }

    pub fn batch(&self, requests: usize, images: usize) {
        self.batch_requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(requests as f64);
        self.batch_images
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .observe(images as f64);
    }

    pub fn run(&self, outcome: &'static str) {
        bump(&self.runs, outcome);
    }

    pub fn disconnect(&self, state: &'static str) {
        bump(&self.disconnects, state);
    }

    /// Responses so far for `endpoint` by status (for tests and logs).
    pub fn requests_for(&self, endpoint: &str) -> BTreeMap<u16, u64> {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|((e, _), _)| e == endpoint)
            .map(|((_, s), n)| (*s, *n))
            .collect()
    }

    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::with_capacity(8192);
        header(
            &mut out,
            "fluxrt_http_requests_total",
            "HTTP responses by endpoint and status (499: the client went away first).",
            "counter",
        );
        for ((endpoint, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "fluxrt_http_requests_total{{endpoint=\"{}\",status=\"{status}\"}} {n}",
                escape(endpoint)
            );
        }
        self.request_seconds.write(
            &mut out,
            "fluxrt_http_request_duration_seconds",
            "Time from request to response, by endpoint.",
        );
        let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
            header(out, name, help, "gauge");
            let _ = writeln!(out, "{name} {v}");
        };
        gauge(
            &mut out,
            "fluxrt_http_requests_in_flight",
            "HTTP requests being handled.",
            self.http_in_flight.load(Ordering::Relaxed) as f64,
        );
        gauge(
            &mut out,
            "fluxrt_queue_depth",
            "Generation requests waiting for a worker.",
            g.queue_depth as f64,
        );
        gauge(
            &mut out,
            "fluxrt_running_requests",
            "Generation requests in a run on a worker.",
            g.running_requests as f64,
        );
        gauge(
            &mut out,
            "fluxrt_workers",
            "Worker threads, each with its own pipeline.",
            g.workers as f64,
        );
        gauge(
            &mut out,
            "fluxrt_workers_ready",
            "Workers with a loaded and warmed-up model.",
            g.workers_ready as f64,
        );
        gauge(
            &mut out,
            "fluxrt_ready",
            "1 when the server accepts generation requests.",
            if g.ready { 1.0 } else { 0.0 },
        );
        self.stage_seconds.write(
            &mut out,
            "fluxrt_stage_duration_seconds",
            "Time per pipeline stage and run (denoise: all steps; generate: the whole run; png_encode: per image).",
        );
        header(
            &mut out,
            "fluxrt_queue_wait_seconds",
            "Time a request waited in the queue before its run started.",
            "histogram",
        );
        self.queue_wait
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(&mut out, "fluxrt_queue_wait_seconds", "");
        header(
            &mut out,
            "fluxrt_batch_requests",
            "Requests per run (batching).",
            "histogram",
        );
        self.batch_requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(&mut out, "fluxrt_batch_requests", "");
        header(
            &mut out,
            "fluxrt_batch_images",
            "Images per run (batching).",
            "histogram",
        );
        self.batch_images
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write(&mut out, "fluxrt_batch_images", "");
        header(
            &mut out,
            "fluxrt_images_generated_total",
            "Images generated (counted when their run ends).",
            "counter",
        );
        let _ = writeln!(
            out,
            "fluxrt_images_generated_total {}",
            self.images_generated.load(Ordering::Relaxed)
        );
        header(
            &mut out,
            "fluxrt_runs_total",
            "Pipeline runs by outcome (ok, error, cancelled).",
            "counter",
        );
        for (outcome, n) in self.runs.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "fluxrt_runs_total{{outcome=\"{outcome}\"}} {n}");
        }
        header(
            &mut out,
            "fluxrt_client_disconnects_total",
            "Clients that went away before their answer, by where their request was.",
            "counter",
        );
        for (state, n) in self
            .disconnects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "fluxrt_client_disconnects_total{{state=\"{state}\"}} {n}"
            );
        }
        header(
            &mut out,
            "fluxrt_request_timeouts_total",
            "Requests answered 504 after --request-timeout.",
            "counter",
        );
        let _ = writeln!(
            out,
            "fluxrt_request_timeouts_total {}",
            self.timeouts.load(Ordering::Relaxed)
        );
        if let Some(c) = g.cache {
            for (name, help, kind, v) in [
                (
                    "fluxrt_embedding_cache_hits_total",
                    "Prompts whose embeddings came from the cache.",
                    "counter",
                    c.hits as f64,
                ),
                (
                    "fluxrt_embedding_cache_misses_total",
                    "Prompts encoded by CLIP and T5.",
                    "counter",
                    c.misses as f64,
                ),
                (
                    "fluxrt_embedding_cache_evictions_total",
                    "Entries evicted to stay within the byte budget.",
                    "counter",
                    c.evictions as f64,
                ),
                (
                    "fluxrt_embedding_cache_entries",
                    "Prompts in the cache.",
                    "gauge",
                    c.entries as f64,
                ),
                (
                    "fluxrt_embedding_cache_bytes",
                    "Bytes held by the cache.",
                    "gauge",
                    c.bytes as f64,
                ),
                (
                    "fluxrt_embedding_cache_budget_bytes",
                    "The cache's byte budget.",
                    "gauge",
                    c.budget as f64,
                ),
            ] {
                header(&mut out, name, help, kind);
                let _ = writeln!(out, "{name} {v}");
            }
        }
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
        assert_eq!(m.requests_for("/v1/generate").values().sum::<u64>(), 2);
        // Every sample line is `name{labels} value` or `name value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, v) = line.rsplit_once(' ').unwrap();
            assert!(v.parse::<f64>().is_ok(), "{line}");
        }
    }
}
