//! `fluxrt serve`: an HTTP API over the pipeline, with a bounded queue, batching, cancellation, metrics
//! and graceful shutdown. See `docs/serving.md` for the API.
//!
//! Start it in-process (tests do this on port 0):
//! ```no_run
//! # async fn demo() -> fluxrt::Result<()> {
//! use fluxrt::serve::{start, Config};
//! let mut config = Config::new("models/tiny-flux-schnell");
//! config.port = 0;
//! let server = start(config, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! println!("listening on {}", server.addr());
//! server.ready().await?;
//! server.wait().await
//! # }
//! ```
//!
//! Layout: [`api`] parses and checks requests (pure), [`scheduler`] queues, batches and cancels, [`metrics`] counts
//! and renders Prometheus text; `router` and `handlers` are the HTTP side, `startup` starts the workers and shuts
//! down; this module holds the shared state ([`Config`], the app, [`Server`]).

pub mod api;
mod handlers;
pub mod metrics;
mod router;
pub mod scheduler;
mod startup;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::http::StatusCode;
use tokio::sync::watch;

use crate::pipeline::{EmbeddingCache, LoadOptions};
use crate::{Error, Result};

pub use api::{ApiError, Limits, ModelInfo};
use metrics::{Gauges, Metrics};
use scheduler::Scheduler;

/// Two 2048x2048 RGBA PNGs at their worst (no compression) and a mask, base64-encoded: 64 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// Everything `fluxrt serve` can be told.
#[derive(Debug, Clone)]
pub struct Config {
    /// The model and the runtime options each worker loads it with.
    pub load: LoadOptions,
    pub host: String,
    /// 0 picks a free port (see [`Server::addr`]).
    pub port: u16,
    /// Worker threads, each with its own pipeline (ONNX Runtime sessions are not shared between threads).
    pub workers: usize,
    /// Requests that may wait for a worker; one more is answered 429 at once.
    pub max_queue: usize,
    /// Most images per run when compatible requests are batched; 1 turns batching off.
    pub max_batch: usize,
    pub limits: Limits,
    /// From arrival to answer; past it the client gets 504 and its run is cancelled.
    pub request_timeout: Duration,
    /// How long a request body may take to arrive (a client that stops half-way gets 408).
    pub body_timeout: Duration,
    /// Largest request body (`--max-body`); past it, 413.
    pub max_body_bytes: usize,
    /// After SIGINT/SIGTERM: how long in-flight and queued requests may take before they are cancelled.
    pub shutdown_timeout: Duration,
    /// After SIGINT/SIGTERM and before the port closes: how long the server keeps answering, `GET /ready` and new
    /// generations with 503, so load balancers and Kubernetes take the replica out before connections are refused.
    /// Queued and running requests go on meanwhile.
    pub drain_delay: Duration,
    /// Byte budget of the prompt-embedding cache shared by the workers; 0 turns it off.
    pub cache_bytes: usize,
    /// Run one small generation per worker before reporting ready (builds TensorRT engines, warms caches).
    pub warmup: bool,
    /// Print startup, shutdown and server-error lines to stderr.
    pub log: bool,
    /// Run-time LoRAs clients may ask for by name (`--lora NAME=FILE`): loaded and checked against the model at
    /// startup (a bad one stops the server), never read from a client-given path.
    pub loras: Vec<(String, std::path::PathBuf)>,
}

impl Config {
    pub fn new(model: impl Into<std::path::PathBuf>) -> Config {
        Config {
            load: LoadOptions::new(model),
            host: "127.0.0.1".into(),
            port: 8080,
            workers: 1,
            max_queue: 64,
            max_batch: 4,
            limits: Limits::default(),
            request_timeout: Duration::from_secs(300),
            body_timeout: Duration::from_secs(10),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            shutdown_timeout: Duration::from_secs(30),
            drain_delay: Duration::ZERO,
            cache_bytes: 256 * 1024 * 1024,
            warmup: true,
            log: true,
            loras: Vec::new(),
        }
    }
}

/// Where startup stands.
#[derive(Debug, Clone, PartialEq)]
enum Startup {
    Loading,
    Ready,
    Failed(String),
}

struct App {
    config: Config,
    sched: Arc<Scheduler>,
    metrics: Arc<Metrics>,
    model: OnceLock<ModelInfo>,
    graph_providers: OnceLock<serde_json::Value>,
    ready: AtomicBool,
    workers_ready: AtomicUsize,
    shutting_down: AtomicBool,
    cache: Option<Arc<EmbeddingCache>>,
    /// The `--lora` catalog, loaded by the first worker that has the model.
    loras: OnceLock<api::LoraCatalog>,
}

impl App {
    fn log(&self, msg: impl std::fmt::Display) {
        if self.config.log {
            eprintln!("fluxrt serve: {msg}");
        }
    }

    fn gauges(&self) -> Gauges {
        Gauges {
            queue_depth: self.sched.queue_depth(),
            running_requests: self.sched.running_requests(),
            workers_ready: self.workers_ready.load(Ordering::SeqCst),
            workers: self.config.workers,
            ready: self.is_ready(),
            cache: self.cache.as_ref().map(|c| c.stats()),
        }
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && !self.shutting_down.load(Ordering::SeqCst)
    }

    /// The model, once every worker is ready; 503 before that and while shutting down.
    fn serving_model(&self) -> std::result::Result<&ModelInfo, ApiError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(unavailable("the server is shutting down", 5));
        }
        match (self.ready.load(Ordering::SeqCst), self.model.get()) {
            (true, Some(m)) => Ok(m),
            _ => Err(unavailable(
                "the model is still loading and warming up; retry shortly (GET /ready says when)",
                2,
            )),
        }
    }
}

fn unavailable(message: &str, retry_after: u64) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
        .code("unavailable")
        .retry_after(retry_after)
}

/// A running server: its address, readiness and completion.
pub struct Server {
    addr: SocketAddr,
    app: Arc<App>,
    startup: watch::Receiver<Startup>,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl Server {
    /// The bound address (with the real port when the config asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits until every worker has loaded and warmed up its model; the error if one could not.
    pub async fn ready(&self) -> Result<()> {
        let mut rx = self.startup.clone();
        loop {
            match rx.borrow_and_update().clone() {
                Startup::Ready => return Ok(()),
                Startup::Failed(msg) => return Err(Error::runtime(msg)),
                Startup::Loading => {}
            }
            if rx.changed().await.is_err() {
                return Err(Error::runtime("the server stopped before it was ready"));
            }
        }
    }

    /// The server's counters (the same numbers as `GET /metrics`).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.app.metrics.clone()
    }

    /// Runs until the shutdown future completes and the shutdown is over: `Ok` after a clean shutdown,
    /// the error when the model could not be loaded.
    pub async fn wait(self) -> Result<()> {
        self.task
            .await
            .map_err(|e| Error::runtime(format!("the server task failed: {e}")))?
    }
}

pub use startup::{run, start};
