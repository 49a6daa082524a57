//! `fluxrt generate`: prompt in, PNG files out.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args as ClapArgs;
use fluxrt::image_out::{self, GenerationParams};
use fluxrt::img2img::InitImage;
use fluxrt::json::ms;
use fluxrt::pipeline::{Output, Pipeline, Progress, Request, DEFAULT_MAX_PIXELS};
use fluxrt::runtime::Canceller;
use fluxrt::vae_tiling::VaeTiling;
use fluxrt::{Error, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::common::{model_path, print_json, PromptArgs, RuntimeArgs};

#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(flatten)]
    input: PromptArgs,
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
    /// img2img: start from this PNG or JPEG instead of pure noise (needs the model's vae_encoder graph). An
    /// image already at the output size is used as is; any other size is scaled (aspect ratio kept, Lanczos3)
    /// to cover the output size and center-cropped. Without --width/--height the output takes the image's
    /// size, each side floored to a multiple of 16. Grayscale is expanded to RGB, alpha is dropped.
    #[arg(long, value_name = "PATH")]
    init_image: Option<PathBuf>,
    /// img2img strength in (0, 1]: the share of the schedule that runs, from the noised init image (1.0
    /// ignores the image). Default 0.6, as diffusers.
    #[arg(long, value_name = "S")]
    strength: Option<f64>,
    /// Negative prompt for true CFG; used with --true-cfg above 1 (two transformer evaluations per step).
    #[arg(long, value_name = "TEXT")]
    negative_prompt: Option<String>,
    /// True CFG scale S: above 1 with --negative-prompt each step uses v = v_neg + S * (v_pos - v_neg), as
    /// diffusers' true_cfg_scale. Default 1 (off).
    #[arg(long, value_name = "S")]
    true_cfg: Option<f32>,
    /// Tiled VAE decode (and encode): auto tiles images above 2 MP (2048x1024), on tiles anything larger
    /// than one tile, off never tiles. Tiles overlap by a quarter and are blended linearly (diffusers').
    #[arg(long, value_name = "MODE", default_value = "auto", value_parser = ["auto", "on", "off"])]
    vae_tiling: String,
    /// VAE tile side in pixels (a multiple of 8; default 1024, diffusers').
    #[arg(long, value_name = "PX", default_value_t = fluxrt::vae_tiling::DEFAULT_TILE_SIZE)]
    vae_tile_size: u32,
    /// Apply a LoRA at run time: a .safetensors file, optionally with its scale (FILE or FILE:SCALE, default
    /// 1.0, negative allowed; the export's --lora syntax). Repeat to stack LoRAs (applied together, in order).
    /// Loads diffusers/PEFT names (transformer.<module>.lora_A/lora_B, optional .alpha) and kohya / sd-scripts
    /// names (lora_unet_double_blocks_0_img_attn_qkv.lora_down/lora_up/alpha). Needs a model exported with
    /// LoRA slots (python -m export CHECKPOINT OUT --lora-slots); transformer layers only: a LoRA with
    /// CLIP/T5 text-encoder layers must be fused at export (python -m export ... --lora FILE:SCALE).
    #[arg(long = "lora", value_name = "FILE[:SCALE]")]
    lora: Vec<String>,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

struct Bar(ProgressBar);

impl Progress for Bar {
    fn step(&mut self, done: usize, total: usize) {
        // img2img runs fewer steps than --steps.
        self.0.set_length(total as u64);
        self.0.set_position(done as u64);
    }
}

pub fn run(a: Args) -> Result<()> {
    let inputs = check_before_loading(&a)?;
    let mut pipe = load(&a)?;
    let (req, mut warnings) = request(
        &a,
        &pipe,
        inputs.init,
        inputs.tiling,
        &inputs.loras,
        inputs.seed,
    )?;
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    let out = generate(&mut pipe, &req)?;
    for w in &out.warnings {
        eprintln!("warning: {w}");
    }
    warnings.extend(out.warnings.iter().cloned());
    let t0 = Instant::now();
    write_images(&a, &pipe, &req, &out, &inputs.paths)?;
    let run = Run {
        pipe: &pipe,
        req: &req,
        out: &out,
        paths: &inputs.paths,
        seeds: &inputs.seeds,
        warnings: &warnings,
        png_time: t0.elapsed(),
    };
    if a.json {
        print_json(&run.json(&a))
    } else {
        run.say();
        Ok(())
    }
}

/// What is read and checked before any model is loaded.
struct Inputs {
    seed: u64,
    seeds: Vec<u64>,
    paths: Vec<PathBuf>,
    init: Option<InitImage>,
    tiling: VaeTiling,
    loras: Vec<(PathBuf, f32)>,
}

/// Every check that needs no model, so a bad flag fails in milliseconds: outputs (unwritable or existing), provider
/// names, sizes, steps, strength, the init image, tiling and LoRA specs (their syntax and files; the weights are
/// checked against the model after it loads).
fn check_before_loading(a: &Args) -> Result<Inputs> {
    let seed = match a.seed {
        Some(s) => s,
        None => random_seed()?,
    };
    fluxrt::request::check_num_images(a.num_images)?;
    let seeds: Vec<u64> = (0..a.num_images as u64)
        .map(|i| seed.wrapping_add(i))
        .collect();
    let paths = image_out::output_paths(&a.output, a.num_images, &seeds)?;
    image_out::check_writable(&paths, a.overwrite)?;
    a.runtime.providers()?;
    let factor = fluxrt::latents::FLUX_VAE_FACTOR;
    if let (Some(w), Some(h)) = (a.width, a.height) {
        fluxrt::latents::validate_size(w, h, a.max_pixels, factor)?;
    }
    if let Some(steps) = a.steps {
        fluxrt::schedule::check_steps(steps, fluxrt::schedule::MAX_STEPS)?;
    }
    if let Some(s) = a.strength {
        if a.init_image.is_none() {
            return Err(Error::input("--strength needs --init-image")
                .with_hint("strength sets how much of an init image img2img keeps"));
        }
        fluxrt::schedule::check_strength(s)?;
    }
    let init = match &a.init_image {
        Some(path) => Some(InitImage::open(path)?),
        None => None,
    };
    let tiling = VaeTiling {
        mode: a.vae_tiling.parse()?,
        tile_size: a.vae_tile_size,
        ..VaeTiling::default()
    };
    tiling.validate(factor)?;
    let loras = a
        .lora
        .iter()
        .map(|s| fluxrt::lora::parse_spec(s))
        .collect::<Result<Vec<_>>>()?;
    Ok(Inputs {
        seed,
        seeds,
        paths,
        init,
        tiling,
        loras,
    })
}

/// Loads the pipeline, and says which providers were not used and what to know about the model on them.
fn load(a: &Args) -> Result<Pipeline> {
    let mut opts = a.runtime.load_options(model_path(a.input.model.clone()))?;
    opts.low_memory = a.low_memory;
    // CUDA graphs need one static shape; with --width and --height it is this request's (no --trt-sizes needed).
    if let (Some(w), Some(h)) = (a.width, a.height) {
        let true_cfg = a.true_cfg.unwrap_or(fluxrt::guidance::DEFAULT_TRUE_CFG);
        let shape = fluxrt::model::shapes::RequestShape {
            true_cfg: fluxrt::request::true_cfg_on(true_cfg, a.negative_prompt.is_some()),
            ..fluxrt::model::shapes::RequestShape::new(w, h, a.num_images)
        };
        fluxrt::model::shapes::pin_request_shape(&mut opts.shapes, &opts.ep, &shape)?;
    }
    let pipe = Pipeline::load(&opts)?;
    for (p, why) in &pipe.engine().providers().rejected {
        eprintln!("warning: provider {p} not used: {why}");
    }
    for w in pipe.engine().load_warnings() {
        eprintln!("warning: {w}");
    }
    Ok(pipe)
}

/// The request: the model's defaults, the init image's size for img2img, then the flags; with the warnings to say
/// before the run (and in --json's warnings).
fn request(
    a: &Args,
    pipe: &Pipeline,
    init: Option<InitImage>,
    tiling: VaeTiling,
    loras: &[(PathBuf, f32)],
    seed: u64,
) -> Result<(Request, Vec<String>)> {
    let spec = &pipe.engine().spec;
    let mut req = Request::new(spec, a.input.prompt.clone(), seed);
    req.prompt_2 = a.input.prompt_2.clone();
    let mut warnings = Vec::new();
    if let Some(init) = &init {
        // diffusers' default size for img2img: the init image's, floored to the size multiple.
        let vae_factor = spec.vae.downsample_factor;
        (req.width, req.height) = init.default_size(vae_factor)?;
        if a.width.is_none() && a.height.is_none() {
            warnings.extend(init.floor_warning(vae_factor));
        }
    }
    req.width = a.width.unwrap_or(req.width);
    req.height = a.height.unwrap_or(req.height);
    req.init_image = init;
    req.strength = a.strength.unwrap_or(req.strength);
    req.negative_prompt = a.negative_prompt.clone();
    req.true_cfg = a.true_cfg.unwrap_or(req.true_cfg);
    req.vae_tiling = tiling;
    req.steps = a.steps.unwrap_or(req.steps);
    req.num_images = a.num_images;
    req.max_pixels = a.max_pixels;
    for (path, scale) in loras {
        req.loras
            .push(fluxrt::lora::LoraChoice::new(pipe.load_lora(path)?, *scale));
    }
    if a.guidance.is_some() {
        if pipe.engine().variant() == fluxrt::model::Variant::Schnell {
            warnings.push(format!(
                "--guidance is ignored: {} is a schnell model without guidance embedding",
                spec.name
            ));
        } else {
            req.guidance = a.guidance;
        }
    }
    Ok((req, warnings))
}

/// Runs the request with a progress bar on stderr.
fn generate(pipe: &mut Pipeline, req: &Request) -> Result<Output> {
    let bar = ProgressBar::new(req.steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} denoising {bar:30} {pos}/{len} steps  {elapsed} (ETA {eta})",
        )
        .expect("valid template"),
    );
    let out = pipe.generate(req, &mut Bar(bar.clone()), &Canceller::new(), false);
    bar.finish_and_clear();
    out
}

/// The active providers, as the PNG parameters and the summary name them.
fn provider_names(pipe: &Pipeline) -> String {
    pipe.engine().providers().active_names().join(",")
}

/// Each image as a PNG with its generation parameters (A1111's `parameters` text), written atomically.
fn write_images(
    a: &Args,
    pipe: &Pipeline,
    req: &Request,
    out: &Output,
    paths: &[PathBuf],
) -> Result<()> {
    let engine = pipe.engine();
    let dev = engine.variant() == fluxrt::model::Variant::Dev;
    let guidance = if dev { req.guidance } else { None };
    let request =
        GenerationParams::of_request(req, guidance, &engine.spec.name, provider_names(pipe));
    for (img, path) in out.images.iter().zip(paths) {
        let params = GenerationParams {
            seed: img.seed,
            ..request.clone()
        };
        let png = image_out::encode_png(&img.rgb, &image_out::a1111_parameters(&params))?;
        image_out::write_atomically(path, &png, a.overwrite)?;
    }
    Ok(())
}

/// A finished run, for its report.
struct Run<'a> {
    pipe: &'a Pipeline,
    req: &'a Request,
    out: &'a Output,
    paths: &'a [PathBuf],
    seeds: &'a [u64],
    warnings: &'a [String],
    png_time: std::time::Duration,
}

impl Run<'_> {
    /// --json: everything about the run, one object on stdout.
    fn json(&self, a: &Args) -> serde_json::Value {
        let (pipe, req, t) = (self.pipe, self.req, &self.out.timings);
        let engine = pipe.engine();
        json!({
            "model": engine.spec.name,
            "variant": engine.variant().name(),
            "files": self.paths,
            "seeds": self.seeds,
            "width": req.width,
            "height": req.height,
            "steps": req.steps,
            "guidance": fluxrt::json::opt_f32_number(req.guidance),
            "providers": engine.providers().active_names(),
            "graph_providers": engine.graph_providers(),
            "graph_nodes": engine.graph_nodes(),
            "device_loop": pipe.device_loop().name(),
            "denoise_loop": pipe.denoise_loop().name(),
            "device_loop_fallback": pipe.device_loop_fallback(),
            "warnings": self.warnings,
            "init_image": a.init_image,
            "strength": req.init_image.is_some().then_some(req.strength),
            "steps_run": t.denoise.len(),
            "negative_prompt": req.negative_prompt,
            "true_cfg": fluxrt::json::opt_f32_number(req.true_cfg_active().then_some(req.true_cfg)),
            "loras": req.loras.iter().map(|c| {
                let mut d = c.lora.describe();
                d["scale"] = fluxrt::json::f32_number(c.scale);
                d
            }).collect::<Vec<_>>(),
            "vae_tiling": {
                "mode": req.vae_tiling.mode.name(),
                "tile_size": req.vae_tiling.tile_size,
                "tiled": req.vae_tiling.applies(req.width, req.height),
            },
            "peak_memory_bytes": peak_memory_bytes(),
            "timings_ms": {
                "load": ms(t.load),
                "tokenize": ms(t.tokenize),
                "clip": ms(t.clip),
                "t5": ms(t.t5),
                "denoise_steps": t.denoise.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
                "vae_encode": ms(t.vae_encode),
                "vae_decode": ms(t.vae_decode),
                "to_rgb": ms(t.to_rgb),
                "png_encode_write": ms(self.png_time),
                "generate_total": ms(t.total),
                "in_onnxruntime": ms(t.in_ort),
            },
        })
    }

    /// The files written and a one-line summary, on stderr.
    fn say(&self) {
        let (req, t) = (self.req, &self.out.timings);
        for (path, s) in self.paths.iter().zip(self.seeds) {
            eprintln!("wrote {} (seed {s})", path.display());
        }
        // img2img runs the tail of the schedule: say how many steps really ran.
        let steps_run = t.denoise.len();
        let steps = if steps_run == req.steps {
            format!("{steps_run} steps")
        } else {
            format!(
                "{steps_run} of {} steps (strength {})",
                req.steps, req.strength
            )
        };
        eprintln!(
            "{} image(s) {}x{}, {steps} in {:.2}s on {} (model load {:.2}s)",
            self.out.images.len(),
            req.width,
            req.height,
            t.total.as_secs_f64(),
            provider_names(self.pipe),
            t.load.as_secs_f64()
        );
    }
}

/// The process's peak resident memory (`VmHWM` in /proc/self/status), where the OS reports it.
fn peak_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn random_seed() -> Result<u64> {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).map_err(|e| {
        Error::io(format!("cannot draw a random seed: {e}")).with_hint("pass --seed")
    })?;
    Ok(u32::from_le_bytes(b) as u64)
}
