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
//! Layout: [`api`] parses and checks requests (pure), [`scheduler`] queues, batches and cancels,
//! [`metrics`] counts and renders Prometheus text; this module wires them to axum and the worker threads.

pub mod api;
pub mod metrics;
pub mod scheduler;

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Request as HttpRequest, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use futures_util::FutureExt as _;
use serde_json::json;
use tokio::sync::{mpsc, watch, Notify};

use crate::image_out::{self, GenerationParams};
use crate::pipeline::{EmbeddingCache, LoadOptions, Output, Pipeline, Quiet, Request};
use crate::runtime::Canceller;
use crate::{Error, Result};

pub use api::{ApiError, Limits, ModelInfo};
use metrics::{Gauges, Metrics};
use scheduler::{Refused, Scheduler};

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
    pub max_body_bytes: usize,
    /// After SIGINT/SIGTERM: how long in-flight and queued requests may take before they are cancelled.
    pub shutdown_timeout: Duration,
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
            max_body_bytes: 1024 * 1024,
            shutdown_timeout: Duration::from_secs(30),
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

/// Starts the server: binds `host:port`, starts the workers (which load and warm up the model in the
/// background: `GET /health` answers at once, `GET /ready` once they are done) and serves until `shutdown`
/// completes. Then it stops accepting, lets queued and running requests finish within
/// `shutdown_timeout`, cancels what is left, and [`Server::wait`] returns.
pub async fn start(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Server> {
    if config.workers == 0 || config.max_queue == 0 || config.max_batch == 0 {
        return Err(Error::input(
            "--workers, --max-queue and --max-batch must be at least 1",
        ));
    }
    for (i, (name, _)) in config.loras.iter().enumerate() {
        if config.loras[..i].iter().any(|(n, _)| n == name) {
            return Err(Error::input(format!("--lora {name} is given twice"))
                .with_hint("give each LoRA its own NAME"));
        }
    }
    let listener = tokio::net::TcpListener::bind((config.host.as_str(), config.port))
        .await
        .map_err(|e| {
            Error::io(format!(
                "cannot listen on {}:{}: {e}",
                config.host, config.port
            ))
            .with_hint("pick another --port, or stop the process that uses it")
        })?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io(format!("cannot read the bound address: {e}")))?;

    let metrics = Arc::new(Metrics::default());
    let sched = Arc::new(Scheduler::new(
        config.max_queue,
        config.max_batch,
        config.workers,
        metrics.clone(),
    ));
    let cache = (config.cache_bytes > 0).then(|| Arc::new(EmbeddingCache::new(config.cache_bytes)));
    let app = Arc::new(App {
        config,
        sched,
        metrics,
        model: OnceLock::new(),
        graph_providers: OnceLock::new(),
        ready: AtomicBool::new(false),
        workers_ready: AtomicUsize::new(0),
        shutting_down: AtomicBool::new(false),
        cache,
        loras: OnceLock::new(),
    });

    // Workers: each loads its own pipeline on its own thread, warms it up, reports, then serves the queue.
    let (loaded_tx, mut loaded_rx) =
        mpsc::unbounded_channel::<Result<(ModelInfo, serde_json::Value)>>();
    let mut workers = Vec::new();
    for i in 0..app.config.workers {
        let app = app.clone();
        let tx = loaded_tx.clone();
        let handle = std::thread::Builder::new()
            .name(format!("fluxrt-worker-{i}"))
            .spawn(move || worker(i, app, tx))
            .map_err(|e| Error::runtime(format!("cannot start a worker thread: {e}")))?;
        workers.push(handle);
    }
    drop(loaded_tx);

    let (startup_tx, startup_rx) = watch::channel(Startup::Loading);
    let failed = Arc::new(Notify::new());
    {
        let app = app.clone();
        let failed = failed.clone();
        tokio::spawn(async move {
            let mut ready = 0;
            while let Some(r) = loaded_rx.recv().await {
                match r {
                    Ok((info, graphs)) => {
                        ready += 1;
                        app.workers_ready.store(ready, Ordering::SeqCst);
                        let _ = app.model.set(info);
                        let _ = app.graph_providers.set(graphs);
                        if ready == app.config.workers {
                            app.ready.store(true, Ordering::SeqCst);
                            let m = app.model.get().expect("set above");
                            app.log(format_args!(
                                "ready: {} ({}) on {} with {} worker(s)",
                                m.name,
                                m.variant.name(),
                                m.providers.join(","),
                                app.config.workers
                            ));
                            let _ = startup_tx.send(Startup::Ready);
                            return;
                        }
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        app.log(format_args!("cannot load the model: {msg}"));
                        let _ = startup_tx.send(Startup::Failed(msg));
                        failed.notify_one();
                        return;
                    }
                }
            }
        });
    }

    let router = router(app.clone());
    let task = {
        let app = app.clone();
        let startup = startup_rx.clone();
        tokio::spawn(async move {
            let (began_tx, began_rx) = tokio::sync::oneshot::channel::<()>();
            let signal = {
                let app = app.clone();
                async move {
                    tokio::select! {
                        _ = shutdown => app.log("shutting down: no new connections; finishing in-flight requests"),
                        _ = failed.notified() => {}
                    }
                    app.shutting_down.store(true, Ordering::SeqCst);
                    app.sched.close();
                    let _ = began_tx.send(());
                }
            };
            use axum::serve::ListenerExt;
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let mut serving = tokio::spawn(
                axum::serve(listener, router)
                    .with_graceful_shutdown(signal)
                    .into_future(),
            );
            let early = tokio::select! {
                r = &mut serving => Some(r),
                _ = began_rx => None,
            };
            if early.is_none() {
                let deadline = app.config.shutdown_timeout;
                if tokio::time::timeout(deadline, &mut serving).await.is_err() {
                    app.log(format_args!(
                        "shutdown deadline of {:?} passed: cancelling what is left",
                        deadline
                    ));
                    app.sched.abort_all();
                    if tokio::time::timeout(Duration::from_secs(2), &mut serving)
                        .await
                        .is_err()
                    {
                        serving.abort();
                    }
                }
            }
            // Workers exit once the queue is empty; a cancelled run stops between kernels.
            app.sched.close();
            let joined = tokio::task::spawn_blocking(move || {
                for w in workers {
                    let _ = w.join();
                }
            });
            let _ = tokio::time::timeout(
                app.config.shutdown_timeout.max(Duration::from_secs(5)),
                joined,
            )
            .await;
            if let Startup::Failed(msg) = startup.borrow().clone() {
                return Err(Error::runtime(msg));
            }
            app.log("stopped");
            Ok(())
        })
    };
    Ok(Server {
        addr,
        app,
        startup: startup_rx,
        task,
    })
}

/// [`start`], then [`Server::wait`]; `on_bound` is told the address first.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_bound: impl FnOnce(SocketAddr),
) -> Result<()> {
    let server = start(config, shutdown).await?;
    on_bound(server.addr());
    server.wait().await
}

/// A worker thread: load, warm up, report, then run batches until the scheduler closes.
fn worker(
    index: usize,
    app: Arc<App>,
    loaded: mpsc::UnboundedSender<Result<(ModelInfo, serde_json::Value)>>,
) {
    let mut pipe = match load_and_warm(index, &app) {
        Ok(p) => p,
        Err(e) => {
            let _ = loaded.send(Err(e));
            return;
        }
    };
    pipe.set_embedding_cache(app.cache.clone());
    let d = pipe.engine().spec.defaults();
    let info = ModelInfo {
        name: pipe.engine().spec.name.clone(),
        variant: pipe.engine().variant(),
        width: d.width,
        height: d.height,
        steps: d.steps,
        guidance: d.guidance,
        vae_factor: pipe.engine().spec.vae.downsample_factor,
        providers: pipe
            .engine()
            .providers()
            .active
            .iter()
            .map(|p| p.name().to_string())
            .collect(),
    };
    let graphs = json!(pipe.engine().graph_providers());
    let _ = loaded.send(Ok((info, graphs)));
    drop(loaded);
    while let Some(run) = app.sched.next_batch() {
        app.sched.execute(&mut pipe, run);
    }
}

fn load_and_warm(index: usize, app: &App) -> Result<Pipeline> {
    let t0 = Instant::now();
    let mut pipe = Pipeline::load(&app.config.load)?;
    if index == 0 {
        for (p, why) in &pipe.engine().providers().rejected {
            app.log(format_args!("provider {p} not used: {why}"));
        }
        for w in pipe.engine().load_warnings() {
            app.log(format_args!("warning: {w}"));
        }
    }
    // The LoRA catalog is the model's, not a worker's: the first worker loads it (before the warm-up, to fail
    // fast); the factors are shared by every request and worker.
    if app.loras.get().is_none() {
        let mut catalog = Vec::new();
        for (name, path) in &app.config.loras {
            let lora = pipe.load_lora(path).map_err(|e| Error {
                message: format!("--lora {name}: {}", e.message),
                ..e
            })?;
            app.log(format_args!(
                "LoRA {name}: {} ({} naming, {} layers)",
                lora.name,
                lora.naming.name(),
                lora.modules.len()
            ));
            catalog.push((name.clone(), lora));
        }
        let _ = app.loras.set(api::LoraCatalog(catalog));
    }
    if app.config.warmup {
        let d = pipe.engine().spec.defaults();
        let req = Request {
            prompt: "warm-up".into(),
            prompt_2: None,
            width: d.width,
            height: d.height,
            steps: 1,
            guidance: d.guidance,
            seed: 0,
            num_images: 1,
            max_pixels: u64::MAX,
            ..Default::default()
        };
        pipe.generate(&req, &mut Quiet, &Canceller::new(), false)?;
    }
    app.log(format_args!(
        "worker {index}: {} loaded{} in {:.1}s",
        pipe.engine().spec.name,
        if app.config.warmup {
            " and warmed up"
        } else {
            ""
        },
        t0.elapsed().as_secs_f64()
    ));
    Ok(pipe)
}

const ENDPOINTS: [&str; 7] = [
    "/v1/images/generations",
    "/v1/generate",
    "/v1/models",
    "/health",
    "/ready",
    "/metrics",
    "/",
];

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/images/generations", post(openai_generate))
        .route("/v1/generate", post(native_generate))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .route("/", get(index))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(app.clone(), track))
        .with_state(app)
}

/// Counts every response by endpoint and status, and the duration; a request whose client went away
/// before the answer is counted with status 499 (the future is dropped, so the guard records it).
async fn track(State(app): State<Arc<App>>, req: HttpRequest, next: Next) -> Response {
    struct Guard {
        app: Arc<App>,
        endpoint: &'static str,
        start: Instant,
        status: Option<u16>,
    }
    impl Drop for Guard {
        fn drop(&mut self) {
            self.app
                .metrics
                .http_in_flight
                .fetch_sub(1, Ordering::SeqCst);
            self.app.metrics.record_request(
                self.endpoint,
                self.status.unwrap_or(499),
                self.start.elapsed(),
            );
        }
    }
    let path = req.uri().path();
    let endpoint = ENDPOINTS
        .iter()
        .find(|e| **e == path)
        .copied()
        .unwrap_or("other");
    app.metrics.http_in_flight.fetch_add(1, Ordering::SeqCst);
    let mut guard = Guard {
        app,
        endpoint,
        start: Instant::now(),
        status: None,
    };
    // A panic in a handler becomes a 500 for this request; the server goes on.
    let resp = match AssertUnwindSafe(next.run(req)).catch_unwind().await {
        Ok(resp) => resp,
        Err(_) => {
            guard.app.log("a request handler panicked");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal server error",
            )
            .into_response()
        }
    };
    guard.status = Some(resp.status().as_u16());
    resp
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "no such endpoint; see GET / for the list",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "this endpoint does not take that method",
    )
}

async fn index() -> Json<serde_json::Value> {
    Json(json!({
        "service": "fluxrt",
        "version": env!("CARGO_PKG_VERSION"),
        "endpoints": {
            "POST /v1/images/generations": "OpenAI Images API (b64_json)",
            "POST /v1/generate": "native generation: JSON, or one PNG with Accept: image/png",
            "GET /v1/models": "the loaded model",
            "GET /health": "alive",
            "GET /ready": "model loaded and warmed up",
            "GET /metrics": "Prometheus metrics",
        }
    }))
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn ready(State(app): State<Arc<App>>) -> Response {
    let cfg = &app.config;
    let status = if app.shutting_down.load(Ordering::SeqCst) {
        "shutting_down"
    } else if app.ready.load(Ordering::SeqCst) {
        "ready"
    } else {
        "loading"
    };
    let body = json!({
        "status": status,
        "model": app.model.get().map(|m| m.name.clone()),
        "variant": app.model.get().map(|m| m.variant.name()),
        "providers": app.model.get().map(|m| m.providers.clone()),
        "graph_providers": app.graph_providers.get(),
        "workers": cfg.workers,
        "workers_ready": app.workers_ready.load(Ordering::SeqCst),
        "max_batch": cfg.max_batch,
        "max_queue": cfg.max_queue,
        "queue_depth": app.sched.queue_depth(),
        "loras": app.loras.get().map(|c| c.describe()),
    });
    let code = if status == "ready" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

async fn models(State(app): State<Arc<App>>) -> Response {
    let Some(m) = app.model.get() else {
        return unavailable("the model is still loading", 2).into_response();
    };
    Json(json!({
        "object": "list",
        "data": [{
            "id": m.name,
            "object": "model",
            "created": 0,
            "owned_by": "fluxrt",
            "variant": m.variant.name(),
            "default_size": format!("{}x{}", m.width, m.height),
            "default_steps": m.steps,
            "providers": m.providers,
            "loras": app.loras.get().map(|c| c.describe()).unwrap_or_default(),
        }]
    }))
    .into_response()
}

async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    let text = app.metrics.render(&app.gauges());
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

/// Reads the whole body: 413 past the size cap (at once when Content-Length says so), 408 when it does not
/// arrive within the body timeout, 400 when the connection breaks.
async fn read_body(
    app: &App,
    headers: &HeaderMap,
    body: Body,
) -> std::result::Result<Vec<u8>, ApiError> {
    let limit = app.config.max_body_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body is larger than {limit} bytes"),
        )
        .code("body_too_large")
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(too_large());
        }
    }
    match tokio::time::timeout(app.config.body_timeout, axum::body::to_bytes(body, limit)).await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!(
                "the request body did not arrive within {}s",
                app.config.body_timeout.as_secs_f64()
            ),
        )
        .code("body_timeout")),
        Ok(Ok(b)) => Ok(b.to_vec()),
        Ok(Err(e)) => {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(s) = source {
                if s.is::<http_body_util::LengthLimitError>() {
                    return Err(too_large());
                }
                source = s.source();
            }
            Err(
                ApiError::bad_request("the request body could not be read to its end")
                    .code("body_incomplete"),
            )
        }
    }
}

fn random_seed() -> u64 {
    let mut b = [0u8; 4];
    if getrandom::fill(&mut b).is_err() {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        return t.subsec_nanos() as u64;
    }
    u32::from_le_bytes(b) as u64
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// A finished generation: the run's output and how it went.
struct Done {
    output: Output,
    queue_wait: Duration,
    batch_requests: usize,
    batch_images: usize,
    pngs: Vec<Vec<u8>>,
    png_time: Duration,
}

/// Queues `req`, waits for its run (up to the request timeout) and encodes the PNGs off the async threads.
async fn generate(
    app: &Arc<App>,
    model: &ModelInfo,
    req: Request,
) -> std::result::Result<Done, ApiError> {
    let (mut ticket, rx) = app.sched.submit(req.clone()).map_err(|r| match r {
        Refused::Full { retry_after } => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!(
                "the queue is full ({} requests waiting); retry after {retry_after}s",
                app.config.max_queue
            ),
        )
        .code("queue_full")
        .retry_after(retry_after),
        Refused::Closing => unavailable("the server is shutting down", 5),
    })?;
    let res = match tokio::time::timeout(app.config.request_timeout, rx).await {
        Err(_) => {
            ticket.timed_out = true;
            drop(ticket);
            app.metrics.timeouts.fetch_add(1, Ordering::Relaxed);
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "server_error",
                format!(
                    "the request did not finish within the server's {}s timeout",
                    app.config.request_timeout.as_secs_f64()
                ),
            )
            .code("timeout"));
        }
        Ok(Err(_)) => return Err(unavailable("the server is shutting down", 5)),
        Ok(Ok(r)) => r,
    };
    drop(ticket);
    let output = res.result.map_err(|e| ApiError::from_error(&e))?;
    let params = GenerationParams {
        prompt: req.prompt.clone(),
        prompt_2: req.prompt_2.clone(),
        negative_prompt: req
            .true_cfg_active()
            .then(|| req.negative_prompt.clone())
            .flatten(),
        steps: req.steps,
        seed: 0,
        width: req.width,
        height: req.height,
        guidance: req.guidance,
        model: model.name.clone(),
        provider: model.providers.join(","),
        sampler: "Euler (flow match)".into(),
        version: format!("fluxrt {}", env!("CARGO_PKG_VERSION")),
        denoising_strength: req.init_image.is_some().then_some(req.strength),
        loras: image_out::LoraParam::from_choices(&req.loras),
    };
    let metrics = app.metrics.clone();
    let encoded = tokio::task::spawn_blocking(move || {
        let t0 = Instant::now();
        let mut pngs = Vec::with_capacity(output.images.len());
        for img in &output.images {
            let t = Instant::now();
            let p = GenerationParams {
                seed: img.seed,
                ..params.clone()
            };
            pngs.push(image_out::encode_png(
                &img.rgb,
                &image_out::a1111_parameters(&p),
            )?);
            metrics.stage("png_encode", t.elapsed());
        }
        Ok::<_, Error>((output, pngs, t0.elapsed()))
    })
    .await
    .map_err(|_| ApiError::from_error(&Error::runtime("PNG encoding panicked")))?;
    let (output, pngs, png_time) = encoded.map_err(|e| ApiError::from_error(&e))?;
    Ok(Done {
        output,
        queue_wait: res.queue_wait,
        batch_requests: res.batch_requests,
        batch_images: res.batch_images,
        pngs,
        png_time,
    })
}

async fn openai_generate(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    match openai_inner(&app, &headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn openai_inner(
    app: &Arc<App>,
    headers: &HeaderMap,
    body: Body,
) -> std::result::Result<Response, ApiError> {
    let model = app.serving_model()?.clone();
    let bytes = read_body(app, headers, body).await?;
    let parsed = api::parse_openai(&bytes, &app.config.limits, &model, random_seed())?;
    let done = generate(app, &model, parsed.request).await?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let data: Vec<_> = done
        .output
        .images
        .iter()
        .zip(&done.pngs)
        .map(|(img, png)| json!({"b64_json": b64.encode(png), "seed": img.seed}))
        .collect();
    Ok(Json(json!({"created": unix_now(), "data": data})).into_response())
}

async fn native_generate(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    match native_inner(&app, &headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// Whether the client asked for a PNG rather than JSON.
fn wants_png(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("image/png"))
}

async fn native_inner(
    app: &Arc<App>,
    headers: &HeaderMap,
    body: Body,
) -> std::result::Result<Response, ApiError> {
    let arrived = Instant::now();
    let model = app.serving_model()?.clone();
    let bytes = read_body(app, headers, body).await?;
    let empty = api::LoraCatalog::default();
    let loras = app.loras.get().unwrap_or(&empty);
    let parsed = api::parse_native_with(&bytes, &app.config.limits, &model, random_seed(), loras)?;
    let png = wants_png(headers);
    if png && parsed.request.num_images != 1 {
        return Err(ApiError::bad_request(
            "Accept: image/png returns one image; ask for num_images 1, or accept application/json",
        )
        .param("num_images"));
    }
    let req = parsed.request.clone();
    let mut done = generate(app, &model, parsed.request).await?;
    let mut warnings = parsed.warnings;
    warnings.append(&mut done.output.warnings);
    if png {
        let seed = done.output.images[0].seed;
        let mut resp = done.pngs.swap_remove(0).into_response();
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
        h.insert("x-fluxrt-seed", HeaderValue::from(seed));
        if let Ok(v) = HeaderValue::from_str(&warnings.join("; ")) {
            if !warnings.is_empty() {
                h.insert("x-fluxrt-warnings", v);
            }
        }
        return Ok(resp);
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let t = &done.output.timings;
    let seeds: Vec<u64> = done.output.images.iter().map(|i| i.seed).collect();
    Ok(Json(json!({
        "created": unix_now(),
        "model": model.name,
        "images": done.output.images.iter().zip(&done.pngs).map(|(img, png)| json!({
            "seed": img.seed,
            "png_base64": b64.encode(png),
        })).collect::<Vec<_>>(),
        "seeds": seeds,
        "prompt": req.prompt,
        "prompt_2": req.prompt_2,
        "width": req.width,
        "height": req.height,
        "steps": req.steps,
        "guidance": crate::json::opt_f32_number(req.guidance),
        "loras": req.loras.iter().map(|c| json!({
            "name": loras.name_of(&c.lora),
            "scale": crate::json::f32_number(c.scale),
        })).collect::<Vec<_>>(),
        "providers": model.providers,
        "batch": {"requests": done.batch_requests, "images": done.batch_images},
        "warnings": warnings,
        "timings_ms": {
            "queue_wait": ms(done.queue_wait),
            "tokenize": ms(t.tokenize),
            "clip": ms(t.clip),
            "t5": ms(t.t5),
            "denoise_steps": t.denoise.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
            "denoise": ms(t.denoise.iter().sum()),
            "vae_decode": ms(t.vae_decode),
            "to_rgb": ms(t.to_rgb),
            "generate_total": ms(t.total),
            "in_onnxruntime": ms(t.in_ort),
            "png_encode": ms(done.png_time),
            "request_total": ms(arrived.elapsed()),
        },
    }))
    .into_response())
}
