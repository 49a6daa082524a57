//! `fluxrt generate`: prompt in, PNG files out.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args as ClapArgs;
use fluxrt::image_out::{self, GenerationParams};
use fluxrt::pipeline::{LoadOptions, Pipeline, Progress, Request, DEFAULT_MAX_PIXELS};
use fluxrt::runtime::Canceller;
use fluxrt::{Error, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::common::{model_path, print_json, RuntimeArgs};

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Model folder (fluxrt manifest, BFL ONNX or optimum layout). Default: the bundled tiny-flux-schnell.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The prompt (CLIP; also T5 unless --prompt-2). May be empty.
    #[arg(long)]
    prompt: String,
    /// A separate prompt for T5.
    #[arg(long)]
    prompt_2: Option<String>,
    /// Image width in pixels, a multiple of 16 (default: the model's).
    #[arg(long)]
    width: Option<u32>,
    /// Image height in pixels, a multiple of 16 (default: the model's).
    #[arg(long)]
    height: Option<u32>,
    /// Denoising steps (default: the model's, 4 for schnell, 28 for dev).
    #[arg(long)]
    steps: Option<usize>,
    /// Distilled guidance scale (dev models; default 3.5). Ignored by schnell, with a warning.
    #[arg(long)]
    guidance: Option<f32>,
    /// Seed; image i uses seed + i. Random when absent (and always reported).
    #[arg(long)]
    seed: Option<u64>,
    /// Number of images (batched into one call when the graphs allow).
    #[arg(long, default_value_t = 1)]
    num_images: usize,
    /// Output file or pattern: `{seed}` and `{i}` are replaced; several images without a placeholder get
    /// `-0`, `-1`, ... before the extension.
    #[arg(long, short, default_value = "fluxrt-{seed}.png")]
    output: String,
    /// Replace existing files.
    #[arg(long)]
    overwrite: bool,
    /// Load one graph at a time and free it after its stage (slower, less memory).
    #[arg(long)]
    low_memory: bool,
    /// Largest accepted image, in pixels.
    #[arg(long, default_value_t = DEFAULT_MAX_PIXELS)]
    max_pixels: u64,
    /// Print files, seeds, per-stage timings and providers as JSON on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

struct Bar(ProgressBar);

impl Progress for Bar {
    fn step(&mut self, done: usize, _total: usize) {
        self.0.set_position(done as u64);
    }
}

pub fn run(a: Args) -> Result<()> {
    let seed = match a.seed {
        Some(s) => s,
        None => random_seed()?,
    };
    if a.num_images == 0 {
        return Err(Error::input("--num-images must be at least 1"));
    }
    let seeds: Vec<u64> = (0..a.num_images as u64)
        .map(|i| seed.wrapping_add(i))
        .collect();
    // Refuse unwritable or existing outputs before any model is loaded.
    let paths = image_out::output_paths(&a.output, a.num_images, &seeds)?;
    image_out::check_writable(&paths, a.overwrite)?;
    let providers = a.runtime.providers()?;
    // Size checks that need no model: zero, not a multiple of 16, too large.
    if let (Some(w), Some(h)) = (a.width, a.height) {
        fluxrt::latents::validate_size(w, h, a.max_pixels, 8)?;
    }
    if a.steps == Some(0) {
        return Err(
            Error::input("--steps must be at least 1").with_hint("schnell uses 4 steps, dev 28-50")
        );
    }

    let mut opts = LoadOptions::new(model_path(a.model.clone()));
    opts.providers = providers;
    opts.no_fallback = a.runtime.no_fallback;
    opts.threads = a.runtime.threads;
    opts.low_memory = a.low_memory;
    opts.ort_lib = a.runtime.ort_lib.clone();
    a.runtime.apply_provider_settings(&mut opts)?;
    let mut pipe = Pipeline::load(&opts)?;
    for (p, why) in &pipe.providers().rejected {
        eprintln!("warning: provider {p} not used: {why}");
    }
    for w in opts.ep.warnings(&pipe.providers().active) {
        eprintln!("warning: {w}");
    }

    let mut req = Request::new(&pipe, a.prompt.clone(), seed);
    req.prompt_2 = a.prompt_2.clone();
    req.width = a.width.unwrap_or(req.width);
    req.height = a.height.unwrap_or(req.height);
    req.steps = a.steps.unwrap_or(req.steps);
    req.num_images = a.num_images;
    req.max_pixels = a.max_pixels;
    if a.guidance.is_some() {
        if pipe.variant() == fluxrt::model::Variant::Schnell {
            eprintln!(
                "warning: --guidance is ignored: {} is a schnell model without guidance embedding",
                pipe.spec.name
            );
        } else {
            req.guidance = a.guidance;
        }
    }

    let bar = ProgressBar::new(req.steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} denoising {bar:30} {pos}/{len} steps  {elapsed} (ETA {eta})",
        )
        .expect("valid template"),
    );
    let out = pipe.generate(&req, &mut Bar(bar.clone()), &Canceller::new(), false);
    bar.finish_and_clear();
    let out = out?;
    for w in &out.warnings {
        eprintln!("warning: {w}");
    }

    let provider = pipe
        .providers()
        .active
        .iter()
        .map(|p| p.name())
        .collect::<Vec<_>>()
        .join(",");
    let t0 = Instant::now();
    for (img, path) in out.images.iter().zip(&paths) {
        let params = GenerationParams {
            prompt: req.prompt.clone(),
            prompt_2: req.prompt_2.clone(),
            negative_prompt: None,
            steps: req.steps,
            seed: img.seed,
            width: req.width,
            height: req.height,
            guidance: if pipe.variant() == fluxrt::model::Variant::Dev {
                req.guidance
            } else {
                None
            },
            model: pipe.spec.name.clone(),
            provider: provider.clone(),
            sampler: "Euler (flow match)".into(),
            version: format!("fluxrt {}", env!("CARGO_PKG_VERSION")),
        };
        let png = image_out::encode_png(&img.rgb, &image_out::a1111_parameters(&params))?;
        image_out::write_atomically(path, &png, a.overwrite)?;
    }
    let png_time = t0.elapsed();

    let t = &out.timings;
    if a.json {
        print_json(&json!({
            "model": pipe.spec.name,
            "variant": pipe.variant().name(),
            "files": paths,
            "seeds": seeds,
            "width": req.width,
            "height": req.height,
            "steps": req.steps,
            "guidance": req.guidance,
            "providers": pipe.providers().active.iter().map(|p| p.name()).collect::<Vec<_>>(),
            "graph_providers": pipe.graph_providers(),
            "warnings": out.warnings,
            "timings_ms": {
                "load": ms(t.load),
                "tokenize": ms(t.tokenize),
                "clip": ms(t.clip),
                "t5": ms(t.t5),
                "denoise_steps": t.denoise.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
                "vae_decode": ms(t.vae_decode),
                "to_rgb": ms(t.to_rgb),
                "png_encode_write": ms(png_time),
                "generate_total": ms(t.total),
                "in_onnxruntime": ms(t.in_ort),
            },
        }));
    } else {
        for (path, s) in paths.iter().zip(&seeds) {
            eprintln!("wrote {} (seed {s})", path.display());
        }
        eprintln!(
            "{} image(s) {}x{}, {} steps in {:.2}s on {provider} (model load {:.2}s)",
            out.images.len(),
            req.width,
            req.height,
            req.steps,
            t.total.as_secs_f64(),
            t.load.as_secs_f64()
        );
    }
    Ok(())
}

fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn random_seed() -> Result<u64> {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).map_err(|e| {
        Error::io(format!("cannot draw a random seed: {e}")).with_hint("pass --seed")
    })?;
    Ok(u32::from_le_bytes(b) as u64)
}
