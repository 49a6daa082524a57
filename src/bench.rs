//! Benchmarks: every stage of the pipeline timed over repeated runs, per execution provider and image size.
//!
//! [`run`] loads the model once per provider (session creation is timed), then for each size runs `warmup`
//! untimed and `runs` timed generations with the same prompt and seed, encodes each image to PNG in memory, and
//! collects min/median/max per stage, the end-to-end time, images per minute, the time outside ONNX Runtime's
//! run calls, and the peak resident memory. [`Report`] serializes to the JSON described in `docs/bench.md`
//! (`schema_version` [`SCHEMA_VERSION`]) and renders as a terminal table ([`Report::table`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::image_out;
use crate::latents;
use crate::pipeline::{LoadOptions, Pipeline, Quiet, Request, DEFAULT_MAX_PIXELS, MAX_STEPS};
use crate::runtime::{self, Canceller, Provider};
use crate::{Error, Result};

/// Version of the JSON report layout; bumped on any incompatible change.
pub const SCHEMA_VERSION: u32 = 1;

/// What to benchmark.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// How each provider's pipeline is loaded: model, threads, session tuning, caches, denoising loop, provider
    /// settings. Its `providers` is replaced by each entry of [`BenchOptions::providers`] in turn.
    pub load: LoadOptions,
    /// Each provider is benchmarked in turn (CPU takes the nodes another provider cannot run).
    pub providers: Vec<Provider>,
    /// Image sizes (width, height); empty = the model's default size.
    pub sizes: Vec<(u32, u32)>,
    /// Denoising steps; `None` = the model's default.
    pub steps: Option<usize>,
    /// Images per generation (one batched call per graph).
    pub batch: usize,
    /// Untimed runs before the timed ones, per provider and size.
    pub warmup: usize,
    /// Timed runs per provider and size.
    pub runs: usize,
    pub prompt: String,
    pub seed: u64,
    pub max_pixels: u64,
    /// Write the images of the last timed run of each provider and size here as PNG files.
    pub save_images: Option<PathBuf>,
}

impl BenchOptions {
    pub fn new(model: impl Into<PathBuf>) -> BenchOptions {
        BenchOptions {
            load: LoadOptions::new(model),
            providers: vec![Provider::Cpu],
            sizes: Vec::new(),
            steps: None,
            batch: 1,
            warmup: 1,
            runs: 3,
            prompt: "a photo of a cat".into(),
            seed: 0,
            max_pixels: DEFAULT_MAX_PIXELS,
            save_images: None,
        }
    }

    /// Checks everything that needs no model: counts, sizes (multiples of 16 for FLUX.1's VAE), providers.
    pub fn validate(&self) -> Result<()> {
        if self.providers.is_empty() {
            return Err(Error::input("no execution provider to benchmark")
                .with_hint("pass --provider cpu (or a list such as cuda,cpu)"));
        }
        if self.runs == 0 {
            return Err(Error::input("runs must be at least 1")
                .with_hint("use --runs 3 or more for a median that means something"));
        }
        if self.batch == 0 {
            return Err(Error::input("batch must be at least 1"));
        }
        if let Some(s) = self.steps {
            crate::schedule::check_steps(s, MAX_STEPS)?;
        }
        for &(w, h) in &self.sizes {
            latents::validate_size(w, h, self.max_pixels, latents::FLUX_VAE_FACTOR)?;
        }
        Ok(())
    }
}

/// Parses `256x256,512x512` (also `512` for a square).
pub fn parse_sizes(s: &str) -> Result<Vec<(u32, u32)>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || {
            Error::input(format!("cannot read image size {part:?}"))
                .with_hint("write sizes as WIDTHxHEIGHT, comma-separated, e.g. 256x256,512x512")
        };
        let (w, h) = match part.split_once(['x', 'X']) {
            Some((w, h)) => (w.trim(), h.trim()),
            None => (part, part),
        };
        let w: u32 = w.parse().map_err(|_| bad())?;
        let h: u32 = h.parse().map_err(|_| bad())?;
        if !out.contains(&(w, h)) {
            out.push((w, h));
        }
    }
    if out.is_empty() {
        return Err(Error::input(format!("no image size in {s:?}"))
            .with_hint("e.g. --sizes 256x256,512x512"));
    }
    Ok(out)
}

/// min / median / max / mean of n samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stat {
    pub min: f64,
    pub median: f64,
    pub max: f64,
    pub mean: f64,
    pub n: usize,
}

impl Stat {
    /// Statistics of `values` (zeros for an empty slice). The median of an even count is the mean of the middle two.
    pub fn of(values: &[f64]) -> Stat {
        if values.is_empty() {
            return Stat {
                min: 0.0,
                median: 0.0,
                max: 0.0,
                mean: 0.0,
                n: 0,
            };
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Stat {
            min: v[0],
            median,
            max: v[n - 1],
            mean: v.iter().sum::<f64>() / n as f64,
            n,
        }
    }
}

/// The whole report (see `docs/bench.md`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema_version: u32,
    pub tool: String,
    pub fluxrt_version: String,
    pub machine: Machine,
    pub onnxruntime: OrtInfo,
    pub model: ModelInfo,
    pub settings: Settings,
    pub results: Vec<ProviderResult>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu_model: String,
    pub logical_cpus: usize,
    pub physical_cores: usize,
    pub os: String,
    pub arch: String,
    pub memory_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OrtInfo {
    pub version: String,
    pub path: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub path: String,
    pub name: String,
    pub variant: String,
    /// Each graph's precision as the manifest states it (`fp32`, `fp16`, `int8`, ...).
    pub precision: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub prompt: String,
    pub seed: u64,
    pub steps: usize,
    pub batch: usize,
    pub warmup: usize,
    pub runs: usize,
    pub threads: usize,
    pub optimization: String,
    pub memory_pattern: bool,
    pub cpu_arena: bool,
    pub io_binding: bool,
    /// `auto`, `on` or `off`.
    pub device_loop: String,
    pub optimized_cache: Option<String>,
    pub low_memory: bool,
}

/// One provider's results.
#[derive(Debug, Clone, Serialize)]
pub struct ProviderResult {
    /// The provider benchmarked, e.g. `cpu`, `cuda`.
    pub provider: String,
    /// `ok`, or `skipped` when the provider cannot be used here (`error` says why).
    pub status: String,
    pub error: Option<String>,
    /// Providers the sessions were built with, in priority order (CPU appended as the fallback).
    pub providers_active: Vec<String>,
    /// Graph role -> providers that really run it: those ONNX Runtime placed nodes on
    /// ([`Engine::graph_providers`](crate::engine::Engine::graph_providers)).
    pub graph_providers: BTreeMap<String, Vec<String>>,
    /// Graph role -> provider -> nodes ONNX Runtime placed on it, after its graph optimizations.
    pub graph_nodes: BTreeMap<String, BTreeMap<String, usize>>,
    /// `Pipeline::load`: every session, tokenizers, provider probing.
    pub session_creation_ms: f64,
    /// Graph role -> session creation time.
    pub graph_session_ms: BTreeMap<String, f64>,
    /// Graph role -> `off`, `cold` or `warm` (optimized-graph cache).
    pub optimized_cache: BTreeMap<String, String>,
    /// Peak resident memory (VmHWM) while this provider ran.
    pub peak_rss_bytes: Option<u64>,
    /// `provider` when the peak was reset before this provider (Linux `clear_refs`), else `process` (the peak
    /// of the whole process so far, earlier providers included).
    pub peak_rss_scope: String,
    pub sizes: Vec<SizeResult>,
}

/// One provider at one size.
#[derive(Debug, Clone, Serialize)]
pub struct SizeResult {
    pub width: u32,
    pub height: u32,
    pub steps: usize,
    pub batch: usize,
    /// The denoising loop that ran: `plain`, `host-bound` or `device`.
    pub denoise_loop: String,
    pub stages_ms: Stages,
    /// Generation (tokenize to RGB) plus PNG encoding of every image of the batch.
    pub end_to_end_ms: Stat,
    pub images_per_minute: f64,
    /// Time inside ONNX Runtime's run calls.
    pub in_ort_ms: Stat,
    /// (end-to-end - in ORT) / end-to-end, as a fraction.
    pub outside_ort_share: Stat,
    pub runs: Vec<RunRecord>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Stages {
    pub tokenize: Stat,
    pub clip: Stat,
    pub t5: Stat,
    /// One entry per denoising step.
    pub denoise_steps: Vec<Stat>,
    pub denoise_total: Stat,
    pub vae_decode: Stat,
    pub to_rgb: Stat,
    pub png_encode: Stat,
}

/// One timed run, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    pub tokenize: f64,
    pub clip: f64,
    pub t5: f64,
    pub denoise_steps: Vec<f64>,
    pub vae_decode: f64,
    pub to_rgb: f64,
    pub png_encode: f64,
    pub generate: f64,
    pub end_to_end: f64,
    pub in_ort: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Peak resident set size of this process (VmHWM), in bytes; `None` off Linux.
pub fn peak_rss_bytes() -> Option<u64> {
    status_kib("VmHWM:").map(|k| k * 1024)
}

/// Current resident set size (VmRSS), in bytes.
pub fn rss_bytes() -> Option<u64> {
    status_kib("VmRSS:").map(|k| k * 1024)
}

fn status_kib(key: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Resets the peak RSS to the current RSS (Linux >= 4.0, `echo 5 > /proc/self/clear_refs`). False when it
/// cannot be reset; the peak then stays process-wide.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// PSNR in dB between two images of the same size with values in [0, `peak`]; infinite for identical images.
pub fn psnr(a: &[f32], b: &[f32], peak: f32) -> f64 {
    assert_eq!(a.len(), b.len(), "psnr of images of different sizes");
    if a.is_empty() {
        return f64::INFINITY;
    }
    let mse = a
        .iter()
        .zip(b)
        .map(|(x, y)| {
            let d = (*x - *y) as f64;
            d * d
        })
        .sum::<f64>()
        / a.len() as f64;
    if mse == 0.0 {
        return f64::INFINITY;
    }
    10.0 * ((peak as f64).powi(2) / mse).log10()
}

/// PSNR of two 8-bit images.
pub fn psnr_u8(a: &[u8], b: &[u8]) -> f64 {
    let f = |v: &[u8]| v.iter().map(|&x| x as f32).collect::<Vec<_>>();
    psnr(&f(a), &f(b), 255.0)
}

/// The CPU's model name (Linux `/proc/cpuinfo`), or the architecture.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

fn machine() -> Machine {
    let mem = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("MemTotal:"))?
            .split_whitespace()
            .nth(1)?
            .parse::<u64>()
            .ok()
            .map(|k| k * 1024)
    });
    Machine {
        cpu_model: cpu_model(),
        logical_cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        physical_cores: runtime::physical_cores(),
        os: std::env::consts::OS.to_string(),
        arch: std::env::consts::ARCH.to_string(),
        memory_bytes: mem,
    }
}

/// Runs the benchmark. `log` gets one line per loaded provider and per run (for a progress display).
pub fn run(opts: &BenchOptions, log: &mut dyn FnMut(&str)) -> Result<Report> {
    opts.validate()?;
    let lib = runtime::init(opts.load.ort_lib.as_deref())?;
    let threads = runtime::intra_threads(opts.load.threads);
    let mut results = Vec::new();
    let mut model_info = None;
    let mut steps_used = opts.steps.unwrap_or(0);
    for &p in &opts.providers {
        // Is this provider usable at all? (CPU is always.)
        if let Err(e) = runtime::probe(&[p], true) {
            log(&format!("{p}: skipped: {e}"));
            results.push(ProviderResult {
                provider: p.name().into(),
                status: "skipped".into(),
                error: Some(e.to_string()),
                providers_active: Vec::new(),
                graph_providers: BTreeMap::new(),
                graph_nodes: BTreeMap::new(),
                session_creation_ms: 0.0,
                graph_session_ms: BTreeMap::new(),
                optimized_cache: BTreeMap::new(),
                peak_rss_bytes: None,
                peak_rss_scope: "process".into(),
                sizes: Vec::new(),
            });
            continue;
        }
        let scoped = reset_peak_rss();
        let mut lo = opts.load.clone();
        lo.providers = vec![p];
        let mut pipe = Pipeline::load(&lo)?;
        let cache: BTreeMap<String, String> = pipe
            .engine()
            .graph_cache_use()
            .into_iter()
            .map(|(k, v)| (k, v.name().to_string()))
            .collect();
        log(&format!(
            "{p}: sessions created in {:.0} ms (optimized-graph cache: {})",
            ms(pipe.engine().load_time()),
            cache
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        if model_info.is_none() {
            model_info = Some(ModelInfo {
                path: pipe.engine().spec.root.display().to_string(),
                name: pipe.engine().spec.name.clone(),
                variant: pipe.engine().variant().name().to_string(),
                precision: manifest_precisions(&pipe),
            });
        }
        let defaults = pipe.engine().spec.defaults();
        let sizes = if opts.sizes.is_empty() {
            vec![(defaults.width, defaults.height)]
        } else {
            opts.sizes.clone()
        };
        let mut size_results = Vec::new();
        for &(w, h) in &sizes {
            let mut req = Request::new(&pipe.engine().spec, opts.prompt.clone(), opts.seed);
            req.width = w;
            req.height = h;
            req.steps = opts.steps.unwrap_or(req.steps);
            req.num_images = opts.batch;
            req.max_pixels = opts.max_pixels;
            req.validate(pipe.engine().spec.vae.downsample_factor)?;
            steps_used = req.steps;
            let r = bench_size(&mut pipe, p, &req, opts, log)?;
            size_results.push(r);
        }
        results.push(ProviderResult {
            provider: p.name().into(),
            status: "ok".into(),
            error: None,
            providers_active: pipe.engine().providers().active_names(),
            graph_providers: pipe.engine().graph_providers(),
            graph_nodes: pipe.engine().graph_nodes(),
            session_creation_ms: ms(pipe.engine().load_time()),
            graph_session_ms: pipe
                .engine()
                .graph_load_times()
                .into_iter()
                .map(|(k, v)| (k, ms(v)))
                .collect(),
            optimized_cache: cache,
            peak_rss_bytes: peak_rss_bytes(),
            peak_rss_scope: if scoped { "provider" } else { "process" }.into(),
            sizes: size_results,
        });
    }
    let model = match model_info {
        Some(m) => m,
        None => {
            // No provider could run: describe the model from its folder alone.
            let spec = crate::model::ModelSpec::resolve_with(
                &opts.load.model,
                opts.load.tokenizers.as_deref(),
            )?;
            ModelInfo {
                path: spec.root.display().to_string(),
                name: spec.name.clone(),
                variant: spec.variant.map_or("unknown", |v| v.name()).to_string(),
                precision: BTreeMap::new(),
            }
        }
    };
    Ok(Report {
        schema_version: SCHEMA_VERSION,
        tool: "fluxrt bench".into(),
        fluxrt_version: env!("CARGO_PKG_VERSION").into(),
        machine: machine(),
        onnxruntime: OrtInfo {
            version: lib.version().to_string(),
            path: lib.path().display().to_string(),
        },
        model,
        settings: Settings {
            prompt: opts.prompt.clone(),
            seed: opts.seed,
            steps: steps_used,
            batch: opts.batch,
            warmup: opts.warmup,
            runs: opts.runs,
            threads,
            optimization: format!("{:?}", opts.load.optimization).to_lowercase(),
            memory_pattern: opts.load.memory_pattern,
            cpu_arena: opts.load.cpu_arena,
            io_binding: opts.load.io_binding,
            device_loop: opts.load.device_loop.name().to_string(),
            optimized_cache: opts
                .load
                .optimized_cache
                .as_ref()
                .map(|p| p.display().to_string()),
            low_memory: opts.load.low_memory,
        },
        results,
    })
}

fn manifest_precisions(pipe: &Pipeline) -> BTreeMap<String, String> {
    let path = pipe.engine().spec.root.join("manifest.json");
    let Ok(text) = std::fs::read_to_string(path) else {
        return BTreeMap::new();
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return BTreeMap::new();
    };
    v.get("graphs")
        .and_then(|g| g.as_object())
        .map(|g| {
            g.iter()
                .filter_map(|(k, e)| Some((k.clone(), e.get("precision")?.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

fn bench_size(
    pipe: &mut Pipeline,
    provider: Provider,
    req: &Request,
    opts: &BenchOptions,
    log: &mut dyn FnMut(&str),
) -> Result<SizeResult> {
    let params = image_out::GenerationParams {
        prompt: req.prompt.clone(),
        prompt_2: None,
        negative_prompt: None,
        steps: req.steps,
        seed: req.seed,
        width: req.width,
        height: req.height,
        guidance: req.guidance,
        model: pipe.engine().spec.name.clone(),
        provider: provider.name().into(),
        sampler: "Euler (flow match)".into(),
        version: format!("fluxrt {}", env!("CARGO_PKG_VERSION")),
        denoising_strength: None,
        loras: Vec::new(),
    };
    let text = image_out::a1111_parameters(&params);
    let cancel = Canceller::new();
    let mut records = Vec::with_capacity(opts.runs);
    let total = opts.warmup + opts.runs;
    for i in 0..total {
        let warm = i < opts.warmup;
        let t0 = Instant::now();
        let out = pipe.generate(req, &mut Quiet, &cancel, false)?;
        let gen = t0.elapsed();
        let t1 = Instant::now();
        let mut pngs = Vec::with_capacity(out.images.len());
        for img in &out.images {
            pngs.push(image_out::encode_png(&img.rgb, &text)?);
        }
        let png = t1.elapsed();
        let e2e = gen + png;
        log(&format!(
            "{provider} {}x{} {} {}/{}: {:.0} ms",
            req.width,
            req.height,
            if warm { "warmup" } else { "run" },
            if warm { i + 1 } else { i + 1 - opts.warmup },
            if warm { opts.warmup } else { opts.runs },
            ms(e2e)
        ));
        if warm {
            continue;
        }
        if i + 1 == total {
            if let Some(dir) = &opts.save_images {
                std::fs::create_dir_all(dir)
                    .map_err(|e| Error::io(format!("cannot create {}: {e}", dir.display())))?;
                for (k, png) in pngs.iter().enumerate() {
                    let path = dir.join(format!(
                        "{}-{}x{}-{k}.png",
                        provider.name(),
                        req.width,
                        req.height
                    ));
                    std::fs::write(&path, png)
                        .map_err(|e| Error::io(format!("cannot write {}: {e}", path.display())))?;
                }
            }
        }
        let t = &out.timings;
        records.push(RunRecord {
            tokenize: ms(t.tokenize),
            clip: ms(t.clip),
            t5: ms(t.t5),
            denoise_steps: t.denoise.iter().map(|d| ms(*d)).collect(),
            vae_decode: ms(t.vae_decode),
            to_rgb: ms(t.to_rgb),
            png_encode: ms(png),
            generate: ms(gen),
            end_to_end: ms(e2e),
            in_ort: ms(t.in_ort),
        });
    }
    let col = |f: &dyn Fn(&RunRecord) -> f64| Stat::of(&records.iter().map(f).collect::<Vec<_>>());
    let steps = records.first().map_or(0, |r| r.denoise_steps.len());
    let e2e = col(&|r| r.end_to_end);
    Ok(SizeResult {
        width: req.width,
        height: req.height,
        steps: req.steps,
        batch: req.num_images,
        denoise_loop: pipe.denoise_loop().name().to_string(),
        stages_ms: Stages {
            tokenize: col(&|r| r.tokenize),
            clip: col(&|r| r.clip),
            t5: col(&|r| r.t5),
            denoise_steps: (0..steps)
                .map(|s| col(&|r| r.denoise_steps.get(s).copied().unwrap_or(0.0)))
                .collect(),
            denoise_total: col(&|r| r.denoise_steps.iter().sum()),
            vae_decode: col(&|r| r.vae_decode),
            to_rgb: col(&|r| r.to_rgb),
            png_encode: col(&|r| r.png_encode),
        },
        images_per_minute: if e2e.median > 0.0 {
            req.num_images as f64 * 60_000.0 / e2e.median
        } else {
            0.0
        },
        end_to_end_ms: e2e,
        in_ort_ms: col(&|r| r.in_ort),
        outside_ort_share: col(&|r| {
            if r.end_to_end > 0.0 {
                ((r.end_to_end - r.in_ort) / r.end_to_end).max(0.0)
            } else {
                0.0
            }
        }),
        runs: records,
    })
}

impl Report {
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("the report serializes")
    }

    /// The report as a table for the terminal.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "fluxrt bench: {} ({}), ONNX Runtime {}, {} ({} logical CPUs, {} threads)",
            self.model.name,
            self.model.variant,
            self.onnxruntime.version,
            self.machine.cpu_model,
            self.machine.logical_cpus,
            self.settings.threads
        );
        let _ = writeln!(
            s,
            "prompt {:?}, seed {}, {} steps, batch {}, {} warmup + {} timed runs, optimization {}, io-binding {}",
            self.settings.prompt,
            self.settings.seed,
            self.settings.steps,
            self.settings.batch,
            self.settings.warmup,
            self.settings.runs,
            self.settings.optimization,
            if self.settings.io_binding { "on" } else { "off" }
        );
        for r in &self.results {
            let _ = writeln!(s);
            if r.status != "ok" {
                let _ = writeln!(
                    s,
                    "provider {}: skipped: {}",
                    r.provider,
                    r.error.as_deref().unwrap_or("")
                );
                continue;
            }
            let graphs = r
                .graph_providers
                .iter()
                .map(|(g, p)| {
                    // `transformer=cuda:812+cpu:6`: nodes per provider where ONNX Runtime reported them.
                    let nodes = r.graph_nodes.get(g);
                    let each = p.iter().map(|p| match nodes.and_then(|n| n.get(p)) {
                        Some(n) => format!("{p}:{n}"),
                        None => p.clone(),
                    });
                    format!("{g}={}", each.collect::<Vec<_>>().join("+"))
                })
                .collect::<Vec<_>>()
                .join(" ");
            let cache: Vec<&str> = r.optimized_cache.values().map(String::as_str).collect();
            let cache = if cache.iter().all(|c| *c == cache[0]) {
                cache.first().copied().unwrap_or("off").to_string()
            } else {
                r.optimized_cache
                    .iter()
                    .map(|(g, c)| format!("{g} {c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let _ = writeln!(s, "provider {} (graphs: {graphs})", r.provider);
            let _ =
                writeln!(
                s,
                "  session creation {:.0} ms (optimized-graph cache: {cache}); peak RSS {} ({})",
                r.session_creation_ms,
                r.peak_rss_bytes
                    .map_or("n/a".to_string(), |b| format!("{:.0} MiB", b as f64 / 1048576.0)),
                if r.peak_rss_scope == "provider" {
                    "this provider"
                } else {
                    "whole process"
                }
            );
            for z in &r.sizes {
                let _ = writeln!(
                    s,
                    "  {}x{}, {} steps, batch {}",
                    z.width, z.height, z.steps, z.batch
                );
                let _ = writeln!(
                    s,
                    "    {:<16} {:>10} {:>10} {:>10}",
                    "stage (ms)", "min", "median", "max"
                );
                let row = |s: &mut String, name: &str, st: &Stat| {
                    let _ = writeln!(
                        s,
                        "    {:<16} {:>10.1} {:>10.1} {:>10.1}",
                        name, st.min, st.median, st.max
                    );
                };
                let st = &z.stages_ms;
                row(&mut s, "tokenize", &st.tokenize);
                row(&mut s, "clip", &st.clip);
                row(&mut s, "t5", &st.t5);
                for (i, d) in st.denoise_steps.iter().enumerate() {
                    row(&mut s, &format!("step {}", i + 1), d);
                }
                row(&mut s, "denoise total", &st.denoise_total);
                row(&mut s, "vae decode", &st.vae_decode);
                row(&mut s, "to rgb", &st.to_rgb);
                row(&mut s, "png encode", &st.png_encode);
                row(&mut s, "end-to-end", &z.end_to_end_ms);
                row(&mut s, "in onnxruntime", &z.in_ort_ms);
                let o = &z.outside_ort_share;
                let _ = writeln!(
                    s,
                    "    {:<16} {:>9.2}% {:>9.2}% {:>9.2}%",
                    "outside ORT",
                    o.min * 100.0,
                    o.median * 100.0,
                    o.max * 100.0
                );
                let _ = writeln!(
                    s,
                    "    images/minute {:.2} (median end-to-end)",
                    z.images_per_minute
                );
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats() {
        let s = Stat::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.min, s.median, s.max, s.n), (1.0, 2.0, 3.0, 3));
        assert_eq!(Stat::of(&[4.0, 1.0, 2.0, 3.0]).median, 2.5);
        assert_eq!(Stat::of(&[]).n, 0);
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(
            parse_sizes("256x256, 512X768,256x256").unwrap(),
            vec![(256, 256), (512, 768)]
        );
        assert_eq!(parse_sizes("512").unwrap(), vec![(512, 512)]);
        for bad in ["", "axb", "256x", "256x256x3", "-16x16"] {
            let e = parse_sizes(bad).unwrap_err();
            assert_eq!(e.kind, crate::ErrorKind::InvalidInput, "{bad}");
        }
    }

    #[test]
    fn options_validate() {
        let mut o = BenchOptions::new("m");
        o.sizes = vec![(256, 256)];
        assert!(o.validate().is_ok());
        o.runs = 0;
        assert!(o.validate().unwrap_err().message.contains("runs"));
        o.runs = 1;
        o.sizes = vec![(250, 256)];
        let e = o.validate().unwrap_err();
        assert!(e.message.contains("not a multiple of 16"), "{e}");
        o.sizes = vec![(256, 256)];
        o.batch = 0;
        assert!(o.validate().is_err());
        o.batch = 1;
        o.steps = Some(0);
        assert!(o.validate().is_err());
    }

    #[test]
    fn psnr_values() {
        assert!(psnr(&[0.5, 0.5], &[0.5, 0.5], 1.0).is_infinite());
        // MSE 0.01 on peak 1 -> 20 dB.
        let p = psnr(&[0.0, 0.0], &[0.1, -0.1], 1.0);
        assert!((p - 20.0).abs() < 1e-6, "{p}");
        assert!((psnr_u8(&[0, 0], &[255, 255])).abs() < 1e-9);
    }

    #[test]
    fn peak_rss_reads_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(peak_rss_bytes().unwrap() > 0);
            assert!(rss_bytes().unwrap() > 0);
        }
    }
}
