//! `fluxrt serve`: the HTTP API (see docs/serving.md), a thin layer over `fluxrt::serve`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args as ClapArgs;
use fluxrt::serve::{self, Config, Limits};
use fluxrt::{Error, Result};

use super::common::{model_path, RuntimeArgs};

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Model folder. Default: the bundled tiny-flux-schnell.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0 picks a free one; the address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Worker threads, each with its own copy of the model's sessions.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Requests that may wait for a worker; more are answered 429 with Retry-After.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Most images per run when compatible waiting requests (same size, steps, guidance) are batched;
    /// 1 disables batching.
    #[arg(long, default_value_t = 4)]
    max_batch: usize,
    /// Largest accepted image, width x height in pixels.
    #[arg(long, default_value_t = Limits::default().max_pixels)]
    max_pixels: u64,
    /// Most denoising steps per request.
    #[arg(long, default_value_t = Limits::default().max_steps)]
    max_steps: usize,
    /// Most images per request (`n`, `num_images`).
    #[arg(long, default_value_t = Limits::default().max_images)]
    max_images: usize,
    /// Seconds from arrival to answer; past it the client gets 504 and its run is cancelled.
    #[arg(long, default_value_t = 300.0, value_name = "SECONDS")]
    request_timeout: f64,
    /// Seconds that in-flight requests get to finish after SIGINT/SIGTERM.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    shutdown_timeout: f64,
    /// Seconds to keep answering after SIGINT/SIGTERM, with GET /ready and new requests at 503, before the port
    /// closes: load balancers and Kubernetes stop routing here first (set it to the readiness check's period
    /// times its failure threshold). In-flight work goes on meanwhile.
    #[arg(long, default_value_t = 0.0, value_name = "SECONDS")]
    drain_delay: f64,
    /// Seconds a request body may take to arrive.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    body_timeout: f64,
    /// Largest request body in bytes; a larger one gets 413. The default holds two 2048x2048 PNGs and a mask in
    /// base64 (what image edits send).
    #[arg(long, default_value_t = fluxrt::serve::DEFAULT_MAX_BODY_BYTES, value_name = "BYTES")]
    max_body: usize,
    /// Byte budget of the prompt-embedding cache (a repeated prompt skips CLIP and T5); 0 turns it off.
    #[arg(long, default_value_t = 256 * 1024 * 1024, value_name = "BYTES")]
    cache_bytes: usize,
    /// Skip the warm-up run at start (ready sooner; the first request pays for it, e.g. TensorRT engines).
    #[arg(long)]
    no_warmup: bool,
    /// Load one graph at a time for its stage (slower, less memory).
    #[arg(long)]
    low_memory: bool,
    /// A run-time LoRA clients may ask for by name: NAME=FILE (repeatable). Requests pick LoRAs with
    /// "loras": [{"name": "NAME", "scale": 0.8}] on POST /v1/generate. Every file is loaded and checked against
    /// the model at startup (a bad one stops the server); the model needs LoRA slots
    /// (python -m export CHECKPOINT OUT --lora-slots).
    #[arg(long = "lora", value_name = "NAME=FILE")]
    lora: Vec<String>,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

fn seconds(name: &str, v: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(v)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            Error::input(format!(
                "--{name} must be a positive number of seconds, got {v}"
            ))
        })
}

pub fn run(a: Args) -> Result<()> {
    let mut load = a.runtime.load_options(model_path(a.model.clone()))?;
    load.low_memory = a.low_memory;
    // A batch never exceeds the batch range TensorRT engines are built for (requests outside it are refused).
    let max_batch = match load.shapes.as_ref() {
        Some(s) => a.max_batch.min(s.batch.max as usize),
        None => a.max_batch,
    };
    let mut config = Config::new(load.model.clone());
    config.load = load;
    config.host = a.host;
    config.port = a.port;
    config.workers = a.workers;
    config.max_queue = a.max_queue;
    config.max_batch = max_batch;
    config.limits = Limits {
        max_pixels: a.max_pixels,
        max_steps: a.max_steps,
        max_images: a.max_images,
        ..Limits::default()
    };
    config.request_timeout = seconds("request-timeout", a.request_timeout)?;
    config.shutdown_timeout = seconds("shutdown-timeout", a.shutdown_timeout)?;
    config.drain_delay = match a.drain_delay {
        0.0 => Duration::ZERO,
        d => seconds("drain-delay", d)?,
    };
    config.body_timeout = seconds("body-timeout", a.body_timeout)?;
    if a.max_body < 1024 {
        return Err(Error::input(format!(
            "--max-body must be at least 1024 bytes, got {}",
            a.max_body
        )));
    }
    config.max_body_bytes = a.max_body;
    config.cache_bytes = a.cache_bytes;
    config.warmup = !a.no_warmup;
    config.loras = a
        .lora
        .iter()
        .map(|s| fluxrt::lora::parse_named(s))
        .collect::<Result<_>>()?;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fluxrt-http")
        .build()
        .map_err(|e| Error::runtime(format!("cannot start the async runtime: {e}")))?;
    rt.block_on(serve::run(config, shutdown_signal(), |addr| {
        eprintln!("fluxrt serve: listening on http://{addr}");
    }))
}

/// SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
