//! Startup and shutdown: bind, start the worker threads (each loads, warms up and reports its pipeline, then runs
//! batches), say when every worker is ready, and on shutdown stop accepting, let in-flight requests finish within
//! the deadline, cancel what is left and join the workers.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::{mpsc, watch, Notify};

use super::metrics::Metrics;
use super::router::router;
use super::scheduler::Scheduler;
use super::{api, App, Config, ModelInfo, Server, Startup};
use crate::pipeline::{EmbeddingCache, Pipeline, Quiet, Request};
use crate::runtime::Canceller;
use crate::{Error, Result};

/// Starts the server: binds `host:port`, starts the workers (which load and warm up the model in the
/// background: `GET /health` answers at once, `GET /ready` once they are done) and serves until `shutdown`
/// completes. Then it answers 503 to readiness and new requests for `drain_delay` (still accepting, so load
/// balancers see the 503 rather than a refused connection), stops accepting, lets queued and running requests
/// finish within `shutdown_timeout`, cancels what is left, and [`Server::wait`] returns.
pub async fn start(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Server> {
    check(&config)?;
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
    let app = Arc::new(new_app(config));
    let (workers, loaded) = spawn_workers(&app)?;
    let (startup_tx, startup_rx) = watch::channel(Startup::Loading);
    let failed = Arc::new(Notify::new());
    tokio::spawn(watch_loading(
        app.clone(),
        loaded,
        startup_tx,
        failed.clone(),
    ));
    let stop = async move {
        tokio::select! {
            _ = shutdown => true,
            _ = failed.notified() => false,
        }
    };
    let task = tokio::spawn(serve(
        app.clone(),
        listener,
        stop,
        workers,
        startup_rx.clone(),
    ));
    Ok(Server {
        addr,
        app,
        startup: startup_rx,
        task,
    })
}

/// The settings `start` refuses before binding anything.
fn check(config: &Config) -> Result<()> {
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
    Ok(())
}

fn new_app(config: Config) -> App {
    let metrics = Arc::new(Metrics::default());
    let sched = Arc::new(Scheduler::new(
        config.max_queue,
        config.max_batch,
        config.workers,
        metrics.clone(),
    ));
    let cache = (config.cache_bytes > 0).then(|| Arc::new(EmbeddingCache::new(config.cache_bytes)));
    App {
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
    }
}

/// What a worker reports once it has loaded and warmed up: the model and its graphs' providers, or why not.
type Loaded = Result<(ModelInfo, serde_json::Value)>;

/// Each worker loads its own pipeline on its own thread, warms it up, reports, then serves the queue.
fn spawn_workers(
    app: &Arc<App>,
) -> Result<(
    Vec<std::thread::JoinHandle<()>>,
    mpsc::UnboundedReceiver<Loaded>,
)> {
    let (tx, rx) = mpsc::unbounded_channel::<Loaded>();
    let mut workers = Vec::new();
    for i in 0..app.config.workers {
        let app = app.clone();
        let tx = tx.clone();
        let handle = std::thread::Builder::new()
            .name(format!("fluxrt-worker-{i}"))
            .spawn(move || worker(i, app, tx))
            .map_err(|e| Error::runtime(format!("cannot start a worker thread: {e}")))?;
        workers.push(handle);
    }
    Ok((workers, rx))
}

/// Marks the server ready once every worker has reported, or failed (and `failed` notified) at the first that
/// could not load.
async fn watch_loading(
    app: Arc<App>,
    mut loaded: mpsc::UnboundedReceiver<Loaded>,
    startup: watch::Sender<Startup>,
    failed: Arc<Notify>,
) {
    let mut ready = 0;
    while let Some(r) = loaded.recv().await {
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
                    let _ = startup.send(Startup::Ready);
                    return;
                }
            }
            Err(e) => {
                let msg = e.to_string();
                app.log(format_args!("cannot load the model: {msg}"));
                let _ = startup.send(Startup::Failed(msg));
                failed.notify_one();
                return;
            }
        }
    }
}

/// Serves until `stop` completes (true: the shutdown signal, false: startup failed), then shuts down: no new
/// connections, in-flight requests finish within the deadline, what is left is cancelled, the workers are joined.
async fn serve(
    app: Arc<App>,
    listener: tokio::net::TcpListener,
    stop: impl Future<Output = bool> + Send + 'static,
    workers: Vec<std::thread::JoinHandle<()>>,
    startup: watch::Receiver<Startup>,
) -> Result<()> {
    let (began_tx, began_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = {
        let app = app.clone();
        async move {
            let signalled = stop.await;
            app.shutting_down.store(true, Ordering::SeqCst);
            let drain = app.config.drain_delay;
            if signalled && !drain.is_zero() {
                app.log(format_args!(
                    "draining for {drain:?}: GET /ready and new requests get 503; queued and running requests go on"
                ));
                tokio::time::sleep(drain).await;
            }
            if signalled {
                app.log("shutting down: no new connections; finishing in-flight requests");
            }
            app.sched.close();
            let _ = began_tx.send(());
        }
    };
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let mut serving = tokio::spawn(
        axum::serve(listener, router(app.clone()))
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
fn worker(index: usize, app: Arc<App>, loaded: mpsc::UnboundedSender<Loaded>) {
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
        providers: pipe.engine().providers().active_names(),
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
