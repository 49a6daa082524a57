//! The text-to-image pipeline: tokenize -> encode (CLIP, T5) -> noise -> denoise loop -> VAE decode -> RGB.
//!
//! Each stage is one short method named after what it does in BFL's `sampling.py`; the math lives in the pure
//! modules ([`crate::schedule`], [`crate::latents`], [`crate::noise`]) and every ONNX call goes through
//! [`crate::runtime::Graph`].

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ndarray::{Array3, Array4, ArrayD, Axis};

use crate::image_out;
use crate::latents;
use crate::model::shapes::ShapePlan;
use crate::model::{contract, ModelSpec, Role, Variant};
use crate::noise;
use crate::runtime::{
    self, CacheUse, Canceller, Dim, ElemType, Graph, IoInfo, Optimization, Provider, ProviderPlan,
    SessionConfig, TensorIn,
};
use crate::schedule;
use crate::text::{truncation_warning, PromptTokenizer};
use crate::{Error, Result};

/// Largest image fluxrt accepts by default (pixels): 4096x4096. Checked before anything is allocated.
pub const DEFAULT_MAX_PIXELS: u64 = 4096 * 4096;
/// Most denoising steps a request may ask for.
pub const MAX_STEPS: usize = 1000;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub model: PathBuf,
    /// Requested execution providers in priority order (CPU appended unless `no_fallback`).
    pub providers: Vec<Provider>,
    pub no_fallback: bool,
    pub threads: Option<usize>,
    /// Load one graph at a time for its stage and free it afterwards.
    pub low_memory: bool,
    /// An explicit ONNX Runtime library (file or folder).
    pub ort_lib: Option<PathBuf>,
    /// Graph optimization level (default: all).
    pub optimization: Optimization,
    /// ONNX Runtime's memory pattern planning (default off, see `runtime::SessionConfig::memory_pattern`).
    pub memory_pattern: bool,
    /// The CPU provider's arena allocator (default on).
    pub cpu_arena: bool,
    /// The optimized-graph cache folder for CPU sessions; `None` turns it off. Default:
    /// [`runtime::optimized_cache_dir`] (`FLUXRT_OPTIMIZED_CACHE=off` turns it off).
    pub optimized_cache: Option<PathBuf>,
    /// Run the denoising loop through an I/O binding (inputs bound once, latents updated in place). Falls back
    /// to plain runs where the transformer's inputs are not f32. Default on.
    pub io_binding: bool,
    /// The device-resident denoising loop (latents, embeddings and ids stay in device memory, the Euler step runs
    /// there too): `Auto` turns it on for GPU providers. See docs/providers.md.
    pub device_loop: runtime::DeviceLoop,
    /// GPU provider settings: TensorRT, CUDA, DirectML, CoreML (docs/providers.md).
    pub ep: runtime::EpSettings,
    /// The declared image size and batch range (`--trt-sizes`, `--trt-batch`): TensorRT profiles, and the one static
    /// shape of CUDA graphs.
    pub shapes: Option<crate::model::shapes::ShapeRange>,
    /// The BFL transformer folder to use (`fp32`, `fp16`, `bf16`, `fp8`, `fp4`); `None` picks one for the
    /// provider. fp8 and fp4 need TensorRT.
    pub transformer_precision: Option<String>,
}

impl LoadOptions {
    pub fn new(model: impl Into<PathBuf>) -> Self {
        LoadOptions {
            model: model.into(),
            providers: vec![Provider::Cpu],
            no_fallback: false,
            threads: None,
            low_memory: false,
            ort_lib: None,
            optimization: Optimization::default(),
            memory_pattern: false,
            cpu_arena: true,
            optimized_cache: runtime::optimized_cache_dir(),
            io_binding: true,
            device_loop: runtime::DeviceLoop::Auto,
            ep: runtime::EpSettings::default(),
            shapes: None,
            transformer_precision: None,
        }
    }
}

/// One text-to-image request.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: String,
    /// The T5 prompt; `None` uses `prompt` (as diffusers does).
    pub prompt_2: Option<String>,
    pub width: u32,
    pub height: u32,
    pub steps: usize,
    /// Distilled guidance for dev models; ignored by schnell.
    pub guidance: Option<f32>,
    /// Image i uses seed + i.
    pub seed: u64,
    pub num_images: usize,
    pub max_pixels: u64,
    /// img2img (crate::img2img): start from this image instead of pure noise.
    pub init_image: Option<crate::img2img::InitImage>,
    /// img2img strength in (0, 1]: the share of the schedule that runs (default 0.6, diffusers').
    pub strength: f64,
    /// True CFG (crate::guidance): the negative prompt, used when `true_cfg > 1`.
    pub negative_prompt: Option<String>,
    /// True CFG scale; above 1 with a negative prompt it runs two evaluations per step (default 1.0: off).
    pub true_cfg: f32,
    /// Tiled VAE decode/encode (crate::vae_tiling), default automatic above 2 MP.
    pub vae_tiling: crate::vae_tiling::VaeTiling,
    /// Run-time LoRAs (crate::lora), stacked in order; each loaded with [`Pipeline::load_lora`]. Empty: none.
    pub loras: Vec<crate::lora::LoraChoice>,
}

impl Default for Request {
    /// An empty prompt with FLUX.1-schnell's settings at 1024x1024, seed 0 (for struct-update syntax).
    fn default() -> Self {
        Request {
            prompt: String::new(),
            prompt_2: None,
            width: 1024,
            height: 1024,
            steps: 4,
            guidance: None,
            seed: 0,
            num_images: 1,
            max_pixels: DEFAULT_MAX_PIXELS,
            init_image: None,
            strength: crate::img2img::DEFAULT_STRENGTH,
            negative_prompt: None,
            true_cfg: crate::guidance::DEFAULT_TRUE_CFG,
            vae_tiling: crate::vae_tiling::VaeTiling::default(),
            loras: Vec::new(),
        }
    }
}

impl Request {
    /// A request with the model's defaults.
    pub fn new(pipeline: &Pipeline, prompt: impl Into<String>, seed: u64) -> Self {
        let d = pipeline.spec.defaults();
        Request {
            prompt: prompt.into(),
            prompt_2: None,
            width: d.width,
            height: d.height,
            steps: d.steps,
            guidance: d.guidance,
            seed,
            num_images: 1,
            max_pixels: DEFAULT_MAX_PIXELS,
            ..Request::default()
        }
    }

    /// Checks sizes and counts before any allocation.
    pub fn validate(&self, vae_factor: usize) -> Result<()> {
        latents::validate_size(self.width, self.height, self.max_pixels, vae_factor)?;
        if self.steps == 0 || self.steps > MAX_STEPS {
            return Err(Error::input(format!(
                "steps must be between 1 and {MAX_STEPS}, got {}",
                self.steps
            ))
            .with_hint("schnell uses 4 steps, dev 28-50"));
        }
        if self.num_images == 0 {
            return Err(Error::input("num-images must be at least 1"));
        }
        if let Some(g) = self.guidance {
            if !g.is_finite() || g < 0.0 {
                return Err(Error::input(format!(
                    "guidance must be a finite number >= 0, got {g}"
                )));
            }
        }
        crate::img2img::validate(self)?;
        crate::guidance::validate(self)?;
        self.vae_tiling.validate(vae_factor)?;
        for c in &self.loras {
            crate::lora::check_scale(c.scale, &c.lora.name)?;
        }
        Ok(())
    }

    /// Whether two requests can share one batch (one schedule, one image size, one guidance).
    pub fn batches_with(&self, other: &Request) -> bool {
        self.width == other.width
            && self.height == other.height
            && self.steps == other.steps
            && self.guidance == other.guidance
            && crate::img2img::batches_with(self, other)
            && crate::guidance::batches_with(self, other)
            && self.vae_tiling == other.vae_tiling
            && crate::lora::same_set(&self.loras, &other.loras)
    }

    pub fn t5_prompt(&self) -> &str {
        self.prompt_2.as_deref().unwrap_or(&self.prompt)
    }
}

/// Wall time per stage. `denoise` has one entry per step.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    pub load: Duration,
    pub tokenize: Duration,
    pub clip: Duration,
    pub t5: Duration,
    pub denoise: Vec<Duration>,
    /// img2img: VAE encode of the init images (with the posterior and noise draws).
    pub vae_encode: Duration,
    pub vae_decode: Duration,
    pub to_rgb: Duration,
    /// Time inside ONNX Runtime calls, for the share of time spent outside them.
    pub in_ort: Duration,
    pub total: Duration,
}

/// Intermediates for parity tests and debugging.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    pub clip_ids: Vec<Vec<i64>>,
    pub t5_ids: Vec<Vec<i64>>,
    pub prompt_embeds: Option<ArrayD<f32>>,
    pub pooled_embeds: Option<ArrayD<f32>>,
    pub sigmas: Vec<f32>,
    pub timesteps: Vec<f32>,
    /// Unpacked initial noise [B,C,h,w].
    pub noise: Option<Array4<f32>>,
    /// Packed latents after each step [B,S,64].
    pub latents: Vec<Array3<f32>>,
    /// Decoded images as floats in [0,1], [B,3,H,W].
    pub images: Option<Array4<f32>>,
    /// img2img: the init images' normalised latents `x0` `[B,C,h,w]` and the starting latents `x_t` `[B,S,64]`.
    pub init_latents: Option<Array4<f32>>,
    pub start_latents: Option<Array3<f32>>,
    /// True CFG: the negative prompt's ids and embeddings (one row per image).
    pub negative_clip_ids: Vec<Vec<i64>>,
    pub negative_t5_ids: Vec<Vec<i64>>,
    pub negative_prompt_embeds: Option<ArrayD<f32>>,
    pub negative_pooled_embeds: Option<ArrayD<f32>>,
}

/// One generated image.
#[derive(Debug, Clone)]
pub struct Image {
    pub seed: u64,
    pub rgb: image::RgbImage,
}

#[derive(Debug, Clone)]
pub struct Output {
    pub images: Vec<Image>,
    pub timings: Timings,
    pub warnings: Vec<String>,
    pub trace: Option<Trace>,
}

/// Called after each denoising step (for progress bars and servers).
pub trait Progress {
    fn step(&mut self, _done: usize, _total: usize) {}
}

/// No progress reporting.
pub struct Quiet;
impl Progress for Quiet {}

/// Loaded graphs, or in low-memory mode their declared I/O only.
struct Slot {
    graph: Option<Graph>,
    inputs: Vec<IoInfo>,
    outputs: Vec<IoInfo>,
    providers: Vec<Provider>,
    /// ONNX Runtime's node placement report ([`Graph::placement`]).
    placement: Vec<(String, usize)>,
    load_time: Duration,
    cache: CacheUse,
}

impl Slot {
    /// A slot for `graph`, which is kept unless in low-memory mode (then only its declared I/O is).
    fn new(graph: Graph, low_memory: bool) -> Slot {
        Slot {
            inputs: graph.inputs().to_vec(),
            outputs: graph.outputs().to_vec(),
            providers: graph.providers().to_vec(),
            placement: graph.placement().to_vec(),
            load_time: graph.load_time(),
            cache: graph.cache_use(),
            graph: if low_memory { None } else { Some(graph) },
        }
    }

    /// Whether one call may take `batch` rows: the call has one row, or no input fixes its batch dim at 1.
    fn batchable(&self, batch: usize) -> bool {
        batch == 1
            || self
                .inputs
                .iter()
                .all(|io| !matches!(io.shape.first(), Some(Dim::Fixed(1))))
    }

    /// The kept graph, or in low-memory mode `gspec`'s graph loaded into `transient`, to drop after this call.
    fn graph_or_load<'a>(
        &'a mut self,
        transient: &'a mut Option<Graph>,
        gspec: &crate::model::GraphSpec,
        session: &SessionConfig,
    ) -> Result<&'a mut Graph> {
        match self.graph.as_mut() {
            Some(g) => Ok(g),
            None => Ok(transient.insert(Graph::load(&gspec.path, gspec.role.name(), session)?)),
        }
    }
}

pub struct Pipeline {
    pub spec: ModelSpec,
    clip_tok: PromptTokenizer,
    t5_tok: PromptTokenizer,
    session: SessionConfig,
    slots: BTreeMap<Role, Slot>,
    load_time: Duration,
    io_binding: bool,
    device_loop: runtime::DeviceLoop,
    /// Which loop the last generation ran, and why the device loop did not run when it was wanted.
    last_loop: (runtime::LoopKind, Option<String>),
    /// Step graphs built for the device loop, kept between generations.
    step_graphs: Vec<runtime::step_graph::StepGraph>,
    /// The device loop's buffers and bindings, kept between generations so the transformer keeps reading and
    /// writing the same device addresses (what a session with CUDA graphs replays).
    device_state: Option<runtime::step_graph::DeviceDenoise>,
    /// Time inside ONNX Runtime's run calls, summed over every graph and run.
    ort_busy: Duration,
    /// Prompt embeddings kept between runs (see [`Pipeline::set_embedding_cache`]).
    embed_cache: Option<Arc<EmbeddingCache>>,
    /// Extra named inputs fed to every transformer call of the current generation, by graph input name
    /// (the run-time LoRA slots' A/B factors); empty when none are active.
    transformer_extra: Vec<(String, ArrayD<f32>)>,
    /// The transformer's run-time LoRA slots (crate::lora); empty for graphs exported without them.
    lora_slots: Vec<crate::lora::Slot>,
    /// The stacked factors of the last LoRA set, kept so a server repeating one set does not rebuild them.
    lora_cache: Option<(Vec<crate::lora::LoraChoice>, crate::lora::Feeds)>,
    /// Warnings about the loaded model on these providers (e.g. a bf16 transformer on the CUDA EP); the CLI and
    /// the server print them once, after loading.
    load_warnings: Vec<String>,
    /// The declared shape range and the model's shapes (TensorRT profiles, CUDA graphs, request checks).
    shapes: ShapePlan,
}

impl Pipeline {
    /// Loads ONNX Runtime, probes providers, resolves the model folder, loads and checks every graph the
    /// text-to-image path needs. All contract mismatches are reported together, before any inference.
    pub fn load(opts: &LoadOptions) -> Result<Pipeline> {
        let start = Instant::now();
        let mut spec = ModelSpec::resolve(&opts.model)?;
        runtime::init(opts.ort_lib.as_deref())?;
        let plan: ProviderPlan = runtime::probe(&opts.providers, opts.no_fallback)?;
        // The transformer precision for the providers (BFL layout); fp8/fp4 only with TensorRT.
        spec.select_transformer_precision_for(&plan.active, opts.transformer_precision.as_deref())?;
        let shapes = ShapePlan::new(&spec, opts.shapes)?;
        // Said once by the CLI and the server: settings without effect here, and a bf16 transformer on CUDA.
        let mut load_warnings = shapes.warnings(&opts.ep, &plan.active);
        load_warnings.extend(crate::model::precision_warning(
            &plan.active,
            spec.transformer_precision(),
        ));
        let mut graphs = BTreeMap::new();
        for (role, g) in &spec.graphs {
            graphs.insert(
                role.name().to_string(),
                shapes.graph_options_of(*role, &g.path)?,
            );
        }
        let session = SessionConfig {
            ep: opts.ep.clone(),
            graphs,
            threads: opts.threads,
            providers: plan,
            optimization: opts.optimization,
            memory_pattern: opts.memory_pattern,
            cpu_arena: opts.cpu_arena,
            optimized_cache: opts.optimized_cache.clone(),
        };

        let mut slots = BTreeMap::new();
        let mut problems = Vec::new();
        let mut lora_slots = Vec::new();
        for role in [Role::Transformer, Role::Clip, Role::T5, Role::VaeDecoder] {
            let gspec = spec.graph(role)?.clone();
            let graph = Graph::load(&gspec.path, role.name(), &session)?;
            if role == Role::Transformer {
                let has_guidance = graph.input(&gspec.actual_name("guidance")).is_some();
                spec.set_variant(if has_guidance {
                    Variant::Dev
                } else {
                    Variant::Schnell
                });
                let declared: Vec<IoInfo> = graph
                    .inputs()
                    .iter()
                    .chain(graph.optional_inputs())
                    .cloned()
                    .collect();
                lora_slots = crate::lora::discover_slots(&declared);
            }
            let guidance = spec.variant == Some(Variant::Dev);
            problems.extend(contract::check(
                role,
                guidance,
                graph.inputs(),
                graph.outputs(),
                &|n| gspec.actual_name(n),
            ));
            slots.insert(role, Slot::new(graph, opts.low_memory));
        }
        if !problems.is_empty() {
            return Err(Error::model(format!(
                "model {} does not match the Flux ONNX contract:\n  {}",
                spec.root.display(),
                problems.join("\n  ")
            ))
            .with_hint("re-export the model with `python -m export`, or check that it is a FLUX.1 ONNX export"));
        }
        let clip_tok = PromptTokenizer::from_file(
            &spec.clip_tokenizer.path,
            spec.clip_tokenizer.settings.clone(),
        )?;
        let t5_tok = PromptTokenizer::from_file(
            &spec.t5_tokenizer.path,
            spec.t5_tokenizer.settings.clone(),
        )?;
        Ok(Pipeline {
            spec,
            clip_tok,
            t5_tok,
            session,
            slots,
            load_time: start.elapsed(),
            io_binding: opts.io_binding,
            device_loop: opts.device_loop,
            last_loop: (runtime::LoopKind::Plain, None),
            step_graphs: Vec::new(),
            device_state: None,
            ort_busy: Duration::ZERO,
            embed_cache: None,
            transformer_extra: Vec::new(),
            lora_slots,
            lora_cache: None,
            load_warnings,
            shapes,
        })
    }

    /// Keeps prompt embeddings in `cache` so a repeated prompt skips CLIP and T5 (`None` turns it off).
    /// One cache may be shared by several pipelines: entries are keyed by model as well as by prompt.
    /// Cached runs give the same pixels: the same rows are fed to the transformer.
    pub fn set_embedding_cache(&mut self, cache: Option<Arc<EmbeddingCache>>) {
        self.embed_cache = cache;
    }

    pub fn embedding_cache(&self) -> Option<&Arc<EmbeddingCache>> {
        self.embed_cache.as_ref()
    }

    /// Time [`Pipeline::load`] took, all graphs and tokenizers included.
    pub fn load_time(&self) -> Duration {
        self.load_time
    }

    /// Session creation time of each graph (the first load in low-memory mode).
    pub fn graph_load_times(&self) -> BTreeMap<String, Duration> {
        self.slots
            .iter()
            .map(|(r, s)| (r.name().to_string(), s.load_time))
            .collect()
    }

    /// Whether each graph's session came from the optimized-graph cache.
    pub fn graph_cache_use(&self) -> BTreeMap<String, CacheUse> {
        self.slots
            .iter()
            .map(|(r, s)| (r.name().to_string(), s.cache))
            .collect()
    }

    /// Turns the I/O-binding denoising loop on or off (see [`LoadOptions::io_binding`]).
    pub fn set_io_binding(&mut self, on: bool) {
        self.io_binding = on;
    }

    /// Whether the last generation's denoising loop ran through the I/O binding (it falls back to plain runs
    /// when turned off or when the transformer's latents are not f32).
    pub fn io_binding_used(&self) -> bool {
        self.last_loop.0 == runtime::LoopKind::HostBound
    }

    /// Turns the device-resident denoising loop on, off or automatic (see [`LoadOptions::device_loop`]).
    pub fn set_device_loop(&mut self, mode: runtime::DeviceLoop) {
        self.device_loop = mode;
    }

    pub fn device_loop(&self) -> runtime::DeviceLoop {
        self.device_loop
    }

    /// Which denoising loop the last generation ran: plain runs, the host I/O binding, or the device loop.
    pub fn denoise_loop(&self) -> runtime::LoopKind {
        self.last_loop.0
    }

    /// Why the last generation did not run the device loop although it was wanted (`None` when it ran or was off).
    pub fn device_loop_fallback(&self) -> Option<&str> {
        self.last_loop.1.as_deref()
    }

    /// The device addresses the transformer reads and writes in the kept device loop, by graph input/output name
    /// (`None` when no device loop is kept). They stay the same over steps and over generations that reuse it.
    pub fn device_loop_buffers(&self) -> Option<Vec<(String, usize)>> {
        self.device_state.as_ref().map(|d| d.transformer_buffers())
    }

    /// Whether the transformer's session captures CUDA graphs (then only the device loop may run it).
    pub fn transformer_cuda_graphs(&self) -> bool {
        self.shapes.captures_cuda_graphs(
            &self.session.ep,
            &self.session.providers.active,
            Role::Transformer,
        )
    }

    /// Warnings about the loaded model on these providers, for the caller to show once.
    pub fn load_warnings(&self) -> &[String] {
        &self.load_warnings
    }

    pub fn variant(&self) -> Variant {
        self.spec.variant.unwrap_or(Variant::Schnell)
    }

    pub fn providers(&self) -> &ProviderPlan {
        &self.session.providers
    }

    /// Which providers really run each graph: those ONNX Runtime placed at least one of its nodes on (it puts
    /// on the CPU whatever the others cannot run, and shape arithmetic), in its report's order; the providers
    /// the session was built with if it gave no report.
    pub fn graph_providers(&self) -> BTreeMap<String, Vec<String>> {
        self.slots
            .iter()
            .map(|(r, s)| {
                let placed: Vec<String> = s
                    .placement
                    .iter()
                    .filter(|(_, n)| *n > 0)
                    .map(|(ep, _)| provider_name(ep))
                    .collect();
                let built = || s.providers.iter().map(|p| p.name().to_string()).collect();
                let names = if placed.is_empty() { built() } else { placed };
                (r.name().to_string(), names)
            })
            .collect()
    }

    /// How many nodes of each graph ONNX Runtime placed on each provider (after its graph optimizations); empty
    /// for a graph whose session gave no report.
    pub fn graph_nodes(&self) -> BTreeMap<String, BTreeMap<String, usize>> {
        self.slots
            .iter()
            .map(|(r, s)| {
                let nodes = s.placement.iter().map(|(ep, n)| (provider_name(ep), *n));
                (r.name().to_string(), nodes.collect())
            })
            .collect()
    }

    pub fn tokenizers(&self) -> (&PromptTokenizer, &PromptTokenizer) {
        (&self.clip_tok, &self.t5_tok)
    }

    /// Runs one request; `trace` keeps every intermediate.
    pub fn generate(
        &mut self,
        req: &Request,
        progress: &mut dyn Progress,
        cancel: &Canceller,
        trace: bool,
    ) -> Result<Output> {
        let mut outs = self.generate_batch(std::slice::from_ref(req), progress, cancel, trace)?;
        Ok(outs.remove(0))
    }

    /// Runs several compatible requests (same size, steps, guidance and LoRAs; any prompts and seeds) as one
    /// batch: every graph call covers all their images. Returns one output per request, in order.
    pub fn generate_batch(
        &mut self,
        reqs: &[Request],
        progress: &mut dyn Progress,
        cancel: &Canceller,
        trace: bool,
    ) -> Result<Vec<Output>> {
        // The batch's LoRA factors are fed to every transformer call, and always taken away again (also on error).
        let loras = reqs.first().map_or(&[][..], |r| &r.loras[..]);
        self.activate_loras(loras)?;
        let out = self.generate_batch_inner(reqs, progress, cancel, trace);
        self.deactivate_loras(loras);
        out
    }

    /// Puts the stacked factors of `loras` into `transformer_extra` (from the cache when the set repeats).
    fn activate_loras(&mut self, loras: &[crate::lora::LoraChoice]) -> Result<()> {
        self.transformer_extra.clear();
        if loras.is_empty() {
            return Ok(());
        }
        // TensorRT builds its engine with the slots' zero-rank defaults as weights; fed factors could be
        // ignored without a word, so refuse rather than risk a silently un-adapted image.
        if self.session.providers.active.contains(&Provider::TensorRt) {
            return Err(Error::input(
                "run-time LoRAs are not supported with the TensorRT provider",
            )
            .with_hint(
                "fuse the LoRA at export (`python -m export CHECKPOINT OUT --lora FILE:SCALE`) for TensorRT, \
                 or run this request on --provider cuda",
            ));
        }
        for c in loras {
            crate::lora::check_scale(c.scale, &c.lora.name)?;
            c.lora.check_fits(&self.lora_slots)?;
        }
        self.transformer_extra = match self.lora_cache.take() {
            Some((set, feeds)) if crate::lora::same_set(&set, loras) => feeds,
            _ => crate::lora::feeds(crate::lora::stack(loras)),
        };
        Ok(())
    }

    /// Takes the factors back out of `transformer_extra` into the cache of the last set.
    fn deactivate_loras(&mut self, loras: &[crate::lora::LoraChoice]) {
        let feeds = std::mem::take(&mut self.transformer_extra);
        if !loras.is_empty() {
            self.lora_cache = Some((loras.to_vec(), feeds));
        }
    }

    /// The transformer's run-time LoRA slots; empty when the graph was exported without them.
    pub fn lora_slots(&self) -> &[crate::lora::Slot] {
        &self.lora_slots
    }

    /// Reads a LoRA file and checks it against this model's slots (an error for a model without slots, a LoRA
    /// for another model, text-encoder layers, a malformed file). The result can be shared by any number of
    /// requests (and by pipelines of the same model).
    pub fn load_lora(&self, path: &std::path::Path) -> Result<Arc<crate::lora::Lora>> {
        crate::lora::Lora::load(path, &self.lora_slots).map(Arc::new)
    }

    fn generate_batch_inner(
        &mut self,
        reqs: &[Request],
        progress: &mut dyn Progress,
        cancel: &Canceller,
        trace: bool,
    ) -> Result<Vec<Output>> {
        let start = Instant::now();
        let vae_factor = self.spec.vae.downsample_factor;
        let first = reqs
            .first()
            .ok_or_else(|| Error::input("no request to run"))?;
        for r in reqs {
            r.validate(vae_factor)?;
            if !first.batches_with(r) {
                return Err(Error::input(
                    "requests in one batch must share width, height, steps, guidance and LoRAs",
                ));
            }
        }
        // Outside the built TensorRT profile: refuse, instead of a silent engine rebuild.
        let images: usize = reqs.iter().map(|r| r.num_images).sum();
        let active = &self.session.providers.active;
        // Every graph call counts: true CFG's 2B transformer rows, the VAE's tiles when tiling applies.
        let shape = crate::model::shapes::RequestShape {
            true_cfg: crate::guidance::active(first),
            vae_tiles: first
                .vae_tiling
                .tile_sizes(first.width, first.height, vae_factor),
            encodes: first.init_image.is_some(),
            ..crate::model::shapes::RequestShape::new(first.width, first.height, images)
        };
        self.shapes
            .check_request_shape(&self.session.ep, active, &shape)?;
        let mut t = Timings {
            load: self.load_time,
            ..Default::default()
        };
        let ort_start = self.ort_busy;
        let mut warnings: Vec<Vec<String>> = vec![Vec::new(); reqs.len()];
        for (r, w) in reqs.iter().zip(warnings.iter_mut()) {
            w.extend(crate::guidance::warnings(
                r,
                self.variant(),
                &self.spec.name,
            ));
        }

        // 1. Tokenize each request's prompts; every image of a request shares them.
        let t0 = Instant::now();
        let (mut clip_ids, mut t5_ids, mut seeds) = (Vec::new(), Vec::new(), Vec::new());
        let mut per_request_ids = Vec::with_capacity(reqs.len());
        for (r, warn) in reqs.iter().zip(warnings.iter_mut()) {
            let clip = self.clip_tok.encode(&r.prompt)?;
            let t5 = self.t5_tok.encode(r.t5_prompt())?;
            warn.extend(truncation_warning(
                "CLIP",
                &clip,
                self.clip_tok.max_length(),
            ));
            warn.extend(truncation_warning("T5", &t5, self.t5_tok.max_length()));
            for i in 0..r.num_images {
                clip_ids.push(clip.ids.clone());
                t5_ids.push(t5.ids.clone());
                seeds.push(r.seed.wrapping_add(i as u64));
            }
            per_request_ids.push((clip.ids, t5.ids));
        }
        t.tokenize = t0.elapsed();

        // 2. Encode the prompts: pooled CLIP vectors and T5 sequences, [B, ...].
        let (pooled, txt) = match self.embed_cache.clone() {
            Some(cache) => self.encode_cached(&cache, reqs, &per_request_ids, cancel, &mut t)?,
            None => {
                let (pooled, dt) = self.encode(Role::Clip, &clip_ids, cancel)?;
                t.clip = dt;
                let (txt, dt) = self.encode(Role::T5, &t5_ids, cancel)?;
                t.t5 = dt;
                (pooled, txt)
            }
        };
        let mut tr = trace.then(|| Trace {
            clip_ids: clip_ids.clone(),
            t5_ids: t5_ids.clone(),
            pooled_embeds: Some(pooled.clone()),
            prompt_embeds: Some(txt.clone()),
            ..Default::default()
        });
        // 2b. True CFG (crate::guidance): the negative prompts' embeddings beside the prompts'.
        let cfg =
            crate::guidance::prepare(self, reqs, &txt, &pooled, cancel, &mut t, &mut warnings)?;
        if let (Some(tr), Some(c)) = (tr.as_mut(), cfg.as_ref()) {
            c.trace(tr);
        }

        // 3. Noise: each image from its own seed, exactly as torch.randn with a CPU generator.
        let channels = self.spec.latent_channels;
        let (h, w) = latents::latent_hw(first.width, first.height, vae_factor);
        // img2img (crate::img2img): the init latents; the noise is each generator's draw after the posterior's.
        let t0 = Instant::now();
        let init = crate::img2img::prepare(self, reqs, &seeds, (channels, h, w), cancel)?;
        t.vae_encode = t0.elapsed();
        let noise = match init.as_ref() {
            Some(i) => i.noise.clone(),
            None => draw_noise(&seeds, channels, h, w),
        };
        let mut x = latents::pack(&noise.view());
        if let Some(tr) = tr.as_mut() {
            tr.noise = Some(noise);
        }

        // 4. Denoise: Euler steps along the rectified-flow schedule.
        let steps = first.steps;
        let sigmas = schedule::sigmas(steps, x.shape()[1], &self.spec.scheduler())?;
        let timesteps = schedule::timesteps(&sigmas);
        // img2img: from x_t at the sigma the strength picks, over the rest of the schedule.
        let (sigmas, timesteps) = match init.as_ref() {
            Some(i) => i.start(&mut x, &sigmas, &timesteps)?,
            None => (sigmas, timesteps),
        };
        let steps = timesteps.len();
        if let (Some(tr), Some(i)) = (tr.as_mut(), init.as_ref()) {
            tr.init_latents = Some(i.image_latents.clone());
            tr.start_latents = Some(x.clone());
        }
        let img_ids = latents::img_ids(h, w).into_dyn();
        let txt_ids = latents::txt_ids(txt.shape()[1]).into_dyn();
        let guidance = match self.variant() {
            Variant::Dev => Some(
                first
                    .guidance
                    .or(self.spec.defaults().guidance)
                    .unwrap_or(3.5),
            ),
            Variant::Schnell => None,
        };
        // The device loop first (GPU providers by default; required with CUDA graphs, which only its fixed buffers
        // can drive), then the host I/O binding, then plain runs.
        self.last_loop.1 = None;
        let plan = runtime::step_graph::loop_plan(
            self.device_loop,
            &self.session.providers.active,
            self.transformer_cuda_graphs(),
        )?;
        let inputs = LoopInputs {
            txt: &txt,
            pooled: &pooled,
            sigmas: &sigmas,
            timesteps: &timesteps,
            guidance,
            img_ids: &img_ids,
            txt_ids: &txt_ids,
            cfg: cfg.as_ref().map(|c| c.batch_inputs()),
        };
        let device = plan.device
            && self.denoise_device(plan, &mut x, &inputs, cancel, progress, (&mut t, &mut tr))?;
        let bound = !device
            && self.io_binding
            && self.denoise_bound(&mut x, &inputs, cancel, progress, (&mut t, &mut tr))?;
        self.last_loop.0 = match (device, bound) {
            (true, _) => runtime::LoopKind::Device,
            (false, true) => runtime::LoopKind::HostBound,
            (false, false) => runtime::LoopKind::Plain,
        };
        for i in (0..steps).filter(|_| !bound && !device) {
            let t0 = Instant::now();
            let v = match cfg.as_ref() {
                Some(c) => {
                    c.velocity(self, &x, timesteps[i], guidance, &img_ids, &txt_ids, cancel)?
                }
                None => self.velocity(
                    &x,
                    &txt,
                    &pooled,
                    timesteps[i],
                    guidance,
                    &img_ids,
                    &txt_ids,
                    cancel,
                )?,
            };
            ensure_finite("transformer output (velocity)", v.as_slice().unwrap_or(&[]))?;
            schedule::euler_step(
                x.as_slice_mut().expect("packed latents are contiguous"),
                v.as_slice().expect("ORT outputs are contiguous"),
                sigmas[i],
                sigmas[i + 1],
            );
            ensure_finite(
                &format!("latents after step {}", i + 1),
                x.as_slice().unwrap_or(&[]),
            )?;
            if let Some(tr) = tr.as_mut() {
                tr.latents.push(x.clone());
            }
            t.denoise.push(t0.elapsed());
            progress.step(i + 1, steps);
        }
        if let Some(tr) = tr.as_mut() {
            tr.sigmas = sigmas.clone();
            tr.timesteps = timesteps.clone();
        }

        // 5. Decode: unpack, undo the VAE normalisation, run the decoder.
        let t0 = Instant::now();
        let mut z = latents::unpack(&x.view(), h, w, channels);
        latents::vae_decode_input(
            z.as_slice_mut().expect("contiguous"),
            self.spec.vae.scaling_factor,
            self.spec.vae.shift_factor,
        );
        let images = crate::vae_tiling::decode(self, z, &first.vae_tiling, cancel)?;
        t.vae_decode = t0.elapsed();

        // 6. To 8-bit RGB, as diffusers' image processor does.
        let t0 = Instant::now();
        let mut rgb = Vec::with_capacity(seeds.len());
        for (img, &seed) in images.axis_iter(Axis(0)).zip(&seeds) {
            rgb.push(Image {
                seed,
                rgb: image_out::to_rgb8(img)?,
            });
        }
        if let Some(tr) = tr.as_mut() {
            tr.images = Some(images.mapv(|v| (v / 2.0 + 0.5).clamp(0.0, 1.0)));
        }
        t.to_rgb = t0.elapsed();
        t.in_ort = self.ort_busy - ort_start;
        t.total = start.elapsed();

        // Hand each request its images.
        let mut rgb = rgb.into_iter();
        Ok(reqs
            .iter()
            .zip(warnings)
            .map(|(r, warnings)| Output {
                images: rgb.by_ref().take(r.num_images).collect(),
                timings: t.clone(),
                warnings,
                trace: tr.clone(),
            })
            .collect())
    }

    /// Step 2 through the embedding cache: looks up each distinct (prompt, prompt_2) of the batch, encodes
    /// only the missing ones (one row each, CLIP and T5 in one call per encoder), stores them, and returns
    /// the rows repeated per image. `t.clip` and `t.t5` stay zero when every prompt was cached.
    pub(crate) fn encode_cached(
        &mut self,
        cache: &EmbeddingCache,
        reqs: &[Request],
        ids: &[(Vec<i64>, Vec<i64>)],
        cancel: &Canceller,
        t: &mut Timings,
    ) -> Result<(ArrayD<f32>, ArrayD<f32>)> {
        let model = self.spec.root.display().to_string();
        let keys: Vec<EmbeddingKey> = reqs
            .iter()
            .map(|r| EmbeddingKey {
                model: model.clone(),
                prompt: r.prompt.clone(),
                prompt_2: r.t5_prompt().to_string(),
            })
            .collect();
        let mut found: HashMap<&EmbeddingKey, Arc<PromptEmbedding>> = HashMap::new();
        let mut missing: Vec<usize> = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            if found.contains_key(k) || missing.iter().any(|&j| keys[j] == *k) {
                continue;
            }
            match cache.get(k) {
                Some(e) => {
                    found.insert(k, e);
                }
                None => missing.push(i),
            }
        }
        if !missing.is_empty() {
            let clip_rows: Vec<Vec<i64>> = missing.iter().map(|&i| ids[i].0.clone()).collect();
            let t5_rows: Vec<Vec<i64>> = missing.iter().map(|&i| ids[i].1.clone()).collect();
            let (pooled, dt) = self.encode(Role::Clip, &clip_rows, cancel)?;
            t.clip = dt;
            let (txt, dt) = self.encode(Role::T5, &t5_rows, cancel)?;
            t.t5 = dt;
            for (row, &i) in missing.iter().enumerate() {
                let emb = Arc::new(PromptEmbedding {
                    pooled: pooled.slice_axis(Axis(0), (row..row + 1).into()).to_owned(),
                    txt: txt.slice_axis(Axis(0), (row..row + 1).into()).to_owned(),
                });
                cache.insert(keys[i].clone(), emb.clone());
                found.insert(&keys[i], emb);
            }
        }
        let (mut p_rows, mut t_rows) = (Vec::new(), Vec::new());
        for (r, k) in reqs.iter().zip(&keys) {
            let e = &found[k];
            for _ in 0..r.num_images {
                p_rows.push(e.pooled.view());
                t_rows.push(e.txt.view());
            }
        }
        let join = |rows: &[ndarray::ArrayViewD<f32>]| {
            ndarray::concatenate(Axis(0), rows)
                .map_err(|e| Error::runtime(format!("cannot join cached embeddings: {e}")))
        };
        Ok((join(&p_rows)?, join(&t_rows)?))
    }

    /// The denoising loop through an I/O binding: text embeddings, pooled vector, ids and guidance bound once,
    /// the latents and timestep updated in place, the velocity written into one preallocated buffer; nothing is
    /// allocated per step (except with a trace). Returns `Ok(false)`, having done nothing, when the transformer
    /// cannot be driven this way (true CFG, latents, timestep or velocity not f32, or a batch-1 graph given a
    /// batch), so the caller runs the plain loop. On the same graph it gives bit-identical latents to the plain loop.
    fn denoise_bound(
        &mut self,
        x: &mut Array3<f32>,
        inputs: &LoopInputs,
        cancel: &Canceller,
        progress: &mut dyn Progress,
        (t, tr): (&mut Timings, &mut Option<Trace>),
    ) -> Result<bool> {
        let LoopInputs {
            txt,
            pooled,
            sigmas,
            timesteps,
            guidance,
            img_ids,
            txt_ids,
            cfg,
        } = *inputs;
        if cfg.is_some() {
            return Ok(false);
        }
        let gspec = self.spec.graph(Role::Transformer)?.clone();
        let n = |c: &str| gspec.actual_name(c);
        let (n_x, n_t, n_v) = (n("hidden_states"), n("timestep"), n("latent"));
        let slot = self
            .slots
            .get_mut(&Role::Transformer)
            .expect("every pipeline graph has a slot");
        let b = x.shape()[0];
        let f32_in = |name: &str| {
            slot.inputs
                .iter()
                .any(|i| i.name == name && i.dtype == ElemType::F32)
        };
        let f32_out = slot
            .outputs
            .iter()
            .any(|o| o.name == n_v && o.dtype == ElemType::F32);
        if !(f32_in(&n_x) && f32_in(&n_t) && f32_out && slot.batchable(b)) {
            return Ok(false);
        }
        let mut transient = None;
        let graph = slot.graph_or_load(&mut transient, &gspec, &self.session)?;
        let ort_before = graph.ort_time();
        let shape = x.shape().to_vec();
        let timestep = ndarray::Array1::from_elem(b, 0.0f32).into_dyn();
        let guidance = guidance.map(|g| ndarray::Array1::from_elem(b, g).into_dyn());
        let mut bind = graph.binding()?;
        graph.bind_input(&mut bind, &n_x, TensorIn::F32(x.view().into_dyn()))?;
        graph.bind_input(&mut bind, &n_t, TensorIn::F32(timestep.view()))?;
        for (name, value) in transformer_constants(
            (txt, pooled),
            (img_ids, txt_ids),
            guidance.as_ref(),
            &self.transformer_extra,
        ) {
            graph.bind_input(&mut bind, &n(name), value)?;
        }
        graph.bind_output(&mut bind, &n_v, &shape)?;
        let steps = timesteps.len();
        let mut run = || -> Result<()> {
            for i in 0..steps {
                let t0 = Instant::now();
                bind.input_mut(&n_t)
                    .expect("timestep is a bound f32 input")
                    .fill(schedule::model_timestep(timesteps[i]));
                graph.run_binding(&mut bind, cancel)?;
                let (xs, v) = bind
                    .input_mut_and_output(&n_x, &n_v)
                    .expect("latents and velocity are bound f32 buffers");
                if v.len() != xs.len() {
                    return Err(Error::model(format!(
                        "transformer output has {} values for {} latents",
                        v.len(),
                        xs.len()
                    )));
                }
                ensure_finite("transformer output (velocity)", v)?;
                schedule::euler_step(xs, v, sigmas[i], sigmas[i + 1]);
                ensure_finite(&format!("latents after step {}", i + 1), xs)?;
                if let Some(tr) = tr.as_mut() {
                    tr.latents.push(
                        Array3::from_shape_vec((shape[0], shape[1], shape[2]), xs.to_vec())
                            .expect("latents keep their shape"),
                    );
                }
                t.denoise.push(t0.elapsed());
                progress.step(i + 1, steps);
            }
            Ok(())
        };
        let result = run();
        self.ort_busy += graph.ort_time() - ort_before;
        result?;
        // The latents come back to the host array once, at the end.
        x.as_slice_mut()
            .expect("packed latents are contiguous")
            .copy_from_slice(bind.input_mut(&n_x).expect("latents are bound"));
        Ok(true)
    }

    /// The denoising loop in device memory ([`runtime::step_graph`]): the transformer reads its latents, timestep,
    /// text embeddings, pooled vector, ids, guidance and extra inputs from fixed device buffers and writes the
    /// velocity into a fixed device buffer, for every step and every later generation that fits the same buffers
    /// (they are kept in `device_state`); the Euler step (and the true-CFG combination, when `inputs.cfg` gives the joined
    /// 2B prompt/negative rows and the scale) runs in a step graph on the same provider, which also refreshes the
    /// transformer's latents and timestep in place. Per step only `dt` and the next timestep go to the device and two
    /// NaN/Inf counts come back; the latents come back once at the end (every step with a trace). Returns
    /// `Ok(false)`, having done nothing, when the transformer cannot be driven this way (or, with `DeviceLoop::Auto`,
    /// the step graph or device buffers cannot be set up: the reason is kept for [`Pipeline::device_loop_fallback`]);
    /// when `plan.required` (`DeviceLoop::On`, or CUDA graphs) every such reason is an error instead.
    fn denoise_device(
        &mut self,
        plan: runtime::step_graph::LoopPlan,
        x: &mut Array3<f32>,
        inputs: &LoopInputs,
        cancel: &Canceller,
        progress: &mut dyn Progress,
        (t, tr): (&mut Timings, &mut Option<Trace>),
    ) -> Result<bool> {
        let LoopInputs {
            txt,
            pooled,
            sigmas,
            timesteps,
            guidance,
            img_ids,
            txt_ids,
            cfg,
        } = *inputs;
        use runtime::step_graph::{DeviceDenoise, LoopNames, StepGraph, StepSpec};
        let strict = plan.required;
        // Why the device loop cannot run, as the error when it is required.
        let required_error = |why: &str| {
            if plan.cuda_graphs {
                Error::model(format!(
                    "the transformer's session captures CUDA graphs, which only the device loop can drive, and \
                     the device loop cannot run: {why}"
                ))
                .with_hint(runtime::step_graph::CUDA_GRAPH_HINT)
            } else {
                Error::model(format!("--device-loop on: {why}"))
                    .with_hint("use --device-loop auto or off with this transformer graph")
            }
        };
        let gspec = self.spec.graph(Role::Transformer)?.clone();
        let n = |c: &str| gspec.actual_name(c);
        let names = LoopNames {
            latents: n("hidden_states"),
            timestep: n("timestep"),
            velocity: n("latent"),
        };
        let (txt, pooled, scale) = match cfg {
            Some((txt, pooled, scale)) => (txt, pooled, Some(scale)),
            None => (txt, pooled, None),
        };
        let slot = self
            .slots
            .get(&Role::Transformer)
            .expect("every pipeline graph has a slot");
        let dtype = |list: &[IoInfo], name: &str| {
            list.iter()
                .find(|i| i.name == name)
                .map(|i| i.dtype.clone())
        };
        let rows = x.shape()[0] * if scale.is_some() { 2 } else { 1 };
        let batchable = slot.batchable(rows);
        let spec = match (
            dtype(&slot.inputs, &names.latents),
            dtype(&slot.outputs, &names.velocity),
            dtype(&slot.inputs, &names.timestep),
        ) {
            (Some(model_in), Some(velocity), Some(timestep)) => StepSpec {
                model_in,
                velocity,
                timestep,
                cfg: scale.is_some(),
            },
            _ if strict => {
                return Err(required_error(&format!(
                    "the transformer has no input {} or {}, or no output {}",
                    names.latents, names.timestep, names.velocity
                )))
            }
            _ => return Ok(false),
        };
        let why_not = runtime::step_graph::unsupported(&spec).or_else(|| {
            (!batchable)
                .then(|| format!("the transformer graph takes batch 1, this call has {rows} rows"))
        });
        if let Some(why) = why_not {
            if strict {
                return Err(required_error(&why));
            }
            self.last_loop.1 = Some(why);
            return Ok(false);
        }
        if timesteps.is_empty() {
            // Nothing to run: no loop touches the transformer.
            return Ok(false);
        }
        let slot = self
            .slots
            .get_mut(&Role::Transformer)
            .expect("every pipeline graph has a slot");
        let is_transient = slot.graph.is_none();
        let mut transient = None;
        let graph = slot.graph_or_load(&mut transient, &gspec, &self.session)?;
        let guidance = guidance.map(|g| ndarray::Array1::from_elem(rows, g).into_dyn());
        let constants = transformer_constants(
            (txt, pooled),
            (img_ids, txt_ids),
            guidance.as_ref(),
            &self.transformer_extra,
        );
        let graph_names: Vec<String> = constants.iter().map(|(c, _)| n(c)).collect();
        let constants: Vec<(&str, TensorIn)> = graph_names
            .iter()
            .map(String::as_str)
            .zip(constants.into_iter().map(|(_, t)| t))
            .collect();
        let constants = match DeviceDenoise::constants(graph, &constants) {
            Ok(c) => c,
            Err(e) if !strict && e.kind != crate::ErrorKind::Cancelled => {
                self.last_loop.1 = Some(e.to_string());
                return Ok(false);
            }
            Err(e) if plan.cuda_graphs => return Err(required_error(&e.to_string())),
            Err(e) => return Err(e),
        };
        // The kept loop when its buffers fit (the same addresses as before); a transient transformer (low-memory
        // mode) is a new session, which captures anew.
        let kept = if is_transient {
            None
        } else {
            self.device_state.take()
        };
        let (reuse, old) = match kept {
            Some(d) if d.fits(graph, &spec, x.shape(), &constants) => (Some(d), None),
            other => (None, other),
        };
        let setup = match reuse {
            Some(mut dd) => dd
                .restart(graph, x.view().into_dyn(), &constants, scale)
                .map(|()| dd),
            None => {
                if let Some(old) = old {
                    // A session that captured CUDA graphs replays the old buffers' addresses: new ones would be
                    // read stale. (Static shapes make this rare: a different batch, CFG or LoRA set.) The old loop
                    // stays, for the requests that fit it.
                    if graph.cuda_graphs() && old.transformer_runs() > 0 {
                        self.device_state = Some(old);
                        return Err(Error::input(
                            "this request needs other device buffers than the transformer's captured CUDA graphs \
                             (another batch size, true CFG or LoRA set than the first request of this pipeline)",
                        )
                        .with_hint(format!(
                            "keep those the same for every request of a pipeline, load a new pipeline, or {}",
                            runtime::step_graph::CUDA_GRAPH_HINT
                        )));
                    }
                    self.step_graphs.push(old.into_step_graph());
                }
                let step = match self.step_graphs.iter().position(|g| *g.spec() == spec) {
                    Some(i) => Ok(self.step_graphs.swap_remove(i)),
                    None => StepGraph::build(&spec, &self.session),
                };
                let device_id = self.session.ep.gpu_id();
                step.and_then(|step| {
                    DeviceDenoise::new(
                        graph,
                        step,
                        names,
                        x.view().into_dyn(),
                        &constants,
                        scale,
                        device_id,
                    )
                })
            }
        };
        let mut dd = match setup {
            Ok(dd) => dd,
            Err(e) if !strict && e.kind != crate::ErrorKind::Cancelled => {
                self.last_loop.1 = Some(e.to_string());
                return Ok(false);
            }
            Err(e) if plan.cuda_graphs && e.kind != crate::ErrorKind::Cancelled => {
                return Err(required_error(&e.to_string()))
            }
            Err(e) => return Err(e),
        };
        // Set now so a failed step (the NaN guard) still reports which loop ran.
        self.last_loop.0 = runtime::LoopKind::Device;
        let ort_before = graph.ort_time();
        let mut step_time = Duration::ZERO;
        let steps = timesteps.len();
        let shape = x.raw_dim();
        let mut last = None;
        let mut run = || -> Result<()> {
            for i in 0..steps {
                let t0 = Instant::now();
                let want = i + 1 == steps || tr.is_some();
                let r = dd.step(
                    graph,
                    schedule::model_timestep(timesteps[i]),
                    timesteps.get(i + 1).map(|&t| schedule::model_timestep(t)),
                    sigmas[i + 1] - sigmas[i],
                    want,
                    cancel,
                )?;
                step_time += r.ort_time;
                if r.bad_velocity > 0 {
                    return Err(non_finite(
                        &format!("transformer output (velocity) at step {}", i + 1),
                        r.bad_velocity as usize,
                        r.latents_len,
                    ));
                }
                if r.bad_latents > 0 {
                    return Err(non_finite(
                        &format!("latents after step {}", i + 1),
                        r.bad_latents as usize,
                        r.latents_len,
                    ));
                }
                if let (Some(tr), Some(l)) = (tr.as_mut(), r.latents.as_ref()) {
                    tr.latents.push(
                        Array3::from_shape_vec(shape, l.clone()).expect("latents keep their shape"),
                    );
                }
                last = r.latents;
                t.denoise.push(t0.elapsed());
                progress.step(i + 1, steps);
            }
            Ok(())
        };
        let result = run();
        self.ort_busy += graph.ort_time() - ort_before + step_time;
        // Kept for the next generation (same addresses); a transient transformer's loop goes with it.
        if !is_transient {
            self.device_state = Some(dd);
        } else {
            self.step_graphs.push(dd.into_step_graph());
        }
        result?;
        // The latents come back to the host once, from the last step.
        let last = last.ok_or_else(|| Error::runtime("the device loop returned no latents"))?;
        x.as_slice_mut()
            .expect("packed latents are contiguous")
            .copy_from_slice(&last);
        self.last_loop.1 = None;
        Ok(true)
    }

    /// Runs a text encoder on [B, L] token ids; returns its embedding and the run time.
    pub(crate) fn encode(
        &mut self,
        role: Role,
        ids: &[Vec<i64>],
        cancel: &Canceller,
    ) -> Result<(ArrayD<f32>, Duration)> {
        let len = ids.first().map_or(0, Vec::len);
        let ids = ndarray::Array2::from_shape_fn((ids.len(), len), |(i, j)| ids[i][j]).into_dyn();
        let out_name = contract::outputs(role)[0].name;
        let t0 = Instant::now();
        let emb = self.run_graph(
            role,
            &[("input_ids", TensorIn::I64(ids.view()))],
            out_name,
            cancel,
        )?;
        let dt = t0.elapsed();
        ensure_finite(
            &format!("{} embeddings", role.name()),
            emb.as_slice().unwrap_or(&[]),
        )?;
        Ok((emb, dt))
    }

    /// One transformer evaluation: the velocity v(x, t) for the packed latents.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn velocity(
        &mut self,
        x: &Array3<f32>,
        txt: &ArrayD<f32>,
        pooled: &ArrayD<f32>,
        t: f32,
        guidance: Option<f32>,
        img_ids: &ArrayD<f32>,
        txt_ids: &ArrayD<f32>,
        cancel: &Canceller,
    ) -> Result<Array3<f32>> {
        let b = x.shape()[0];
        let timestep = ndarray::Array1::from_elem(b, schedule::model_timestep(t)).into_dyn();
        let guidance = guidance.map(|g| ndarray::Array1::from_elem(b, g).into_dyn());
        let x = x.view().into_dyn();
        // Taken out for the call: `run_graph` needs the whole pipeline.
        let extra = std::mem::take(&mut self.transformer_extra);
        // The latents first: `run_graph` reads the batch from the first input.
        let mut inputs: Vec<(&str, TensorIn)> = vec![
            ("hidden_states", TensorIn::F32(x)),
            ("timestep", TensorIn::F32(timestep.view())),
        ];
        inputs.extend(transformer_constants(
            (txt, pooled),
            (img_ids, txt_ids),
            guidance.as_ref(),
            &extra,
        ));
        let v = self.run_graph(Role::Transformer, &inputs, "latent", cancel);
        self.transformer_extra = extra;
        let v = v?;
        v.into_dimensionality()
            .map_err(|e| Error::model(format!("transformer output has the wrong rank: {e}")))
    }

    pub(crate) fn decode(&mut self, z: Array4<f32>, cancel: &Canceller) -> Result<Array4<f32>> {
        let z = z.into_dyn();
        let img = self.run_graph(
            Role::VaeDecoder,
            &[("latent", TensorIn::F32(z.view()))],
            "images",
            cancel,
        )?;
        ensure_finite("VAE decode", img.as_slice().unwrap_or(&[]))?;
        img.into_dimensionality()
            .map_err(|e| Error::model(format!("VAE output has the wrong rank: {e}")))
    }

    /// Runs the VAE encoder on images `[1, 3, H, W]` in [-1, 1]: the posterior's (mean, std), `[1, C, h, w]`
    /// (crate::img2img). Text-to-image never needs the encoder, so it is loaded (and checked against the
    /// contract) on first use; in low-memory mode it lives for each call only.
    pub(crate) fn encode_image(
        &mut self,
        images: &Array4<f32>,
        cancel: &Canceller,
    ) -> Result<(Array4<f32>, Array4<f32>)> {
        let role = Role::VaeEncoder;
        let gspec = self.spec.graph(role)?.clone();
        if !self.slots.contains_key(&role) {
            let graph = Graph::load(&gspec.path, role.name(), &self.session)?;
            let problems = contract::check(role, false, graph.inputs(), graph.outputs(), &|n| {
                gspec.actual_name(n)
            });
            if !problems.is_empty() {
                return Err(Error::model(format!(
                    "model {} does not match the Flux ONNX contract:\n  {}",
                    self.spec.root.display(),
                    problems.join("\n  ")
                ))
                .with_hint("re-export the model with `python -m export`"));
            }
            let low_memory = self.slots.values().any(|s| s.graph.is_none());
            self.slots.insert(role, Slot::new(graph, low_memory));
        }
        let slot = self
            .slots
            .get_mut(&role)
            .expect("the encoder slot was just made");
        let mut transient = None;
        let graph = slot.graph_or_load(&mut transient, &gspec, &self.session)?;
        let ort_before = graph.ort_time();
        let name = gspec.actual_name("images");
        let outs = graph.run_with(
            &[(name.as_str(), TensorIn::F32(images.view().into_dyn()))],
            cancel,
        );
        self.ort_busy += graph.ort_time() - ort_before;
        crate::img2img::posterior(
            outs?,
            &gspec.actual_name("latent"),
            self.spec.latent_channels,
        )
    }

    /// Runs one graph with contract names (mapped to the graph's own), batching only when the graph's
    /// batch dim is dynamic; returns the named output. In low-memory mode the graph lives for this call only.
    fn run_graph(
        &mut self,
        role: Role,
        inputs: &[(&str, TensorIn)],
        output: &str,
        cancel: &Canceller,
    ) -> Result<ArrayD<f32>> {
        let gspec = self.spec.graph(role)?.clone();
        let slot = self
            .slots
            .get_mut(&role)
            .expect("every pipeline graph has a slot");
        let batch = inputs.first().map_or(1, |(_, t)| tensor_batch(t));
        let batchable = slot.batchable(batch);
        let mut transient = None;
        let graph = slot.graph_or_load(&mut transient, &gspec, &self.session)?;
        let ort_before = graph.ort_time();
        let names: Vec<String> = inputs.iter().map(|(n, _)| gspec.actual_name(n)).collect();
        let out_name = gspec.actual_name(output);
        let run_one = |graph: &mut Graph, feed: Vec<(&str, TensorIn)>| -> Result<ArrayD<f32>> {
            let outs = graph.run_with(&feed, cancel)?;
            outs.into_iter()
                .find(|(n, _)| *n == out_name)
                .map(|(_, a)| a)
                .ok_or_else(|| {
                    Error::model(format!("{role} graph produced no output `{out_name}`"))
                })
        };
        if batchable {
            let feed = names
                .iter()
                .zip(inputs)
                .map(|(n, (_, t))| (n.as_str(), t.clone()))
                .collect();
            let out = run_one(graph, feed);
            self.ort_busy += graph.ort_time() - ort_before;
            return out;
        }
        // A graph exported with batch 1: one call per image, batched inputs sliced, shared ones passed whole.
        let mut parts = Vec::with_capacity(batch);
        for i in 0..batch {
            let feed = names
                .iter()
                .zip(inputs)
                .map(|(n, (_, t))| (n.as_str(), slice_input(n, t, i, batch)))
                .collect();
            let part = run_one(graph, feed);
            if part.is_err() {
                self.ort_busy += graph.ort_time() - ort_before;
            }
            parts.push(part?);
        }
        self.ort_busy += graph.ort_time() - ort_before;
        let views: Vec<_> = parts.iter().map(|a| a.view()).collect();
        ndarray::concatenate(Axis(0), &views)
            .map_err(|e| Error::runtime(format!("cannot join batch outputs: {e}")))
    }
}

/// The transformer inputs that stay the same for every step of one generation, by contract name (the run-time LoRA
/// factors `extra` by their graph names, which no rename touches): text embeddings, pooled vectors, ids, the guidance
/// (one value per row, dev only) and `extra`. Every denoising loop feeds this one list.
fn transformer_constants<'a>(
    (txt, pooled): (&'a ArrayD<f32>, &'a ArrayD<f32>),
    (img_ids, txt_ids): (&'a ArrayD<f32>, &'a ArrayD<f32>),
    guidance: Option<&'a ArrayD<f32>>,
    extra: &'a [(String, ArrayD<f32>)],
) -> Vec<(&'a str, TensorIn<'a>)> {
    let mut inputs = vec![
        ("encoder_hidden_states", TensorIn::F32(txt.view())),
        ("pooled_projections", TensorIn::F32(pooled.view())),
        ("img_ids", TensorIn::F32(img_ids.view())),
        ("txt_ids", TensorIn::F32(txt_ids.view())),
    ];
    inputs.extend(guidance.map(|g| ("guidance", TensorIn::F32(g.view()))));
    inputs.extend(
        extra
            .iter()
            .map(|(n, v)| (n.as_str(), TensorIn::F32(v.view()))),
    );
    inputs
}

fn tensor_batch(t: &TensorIn) -> usize {
    match t {
        TensorIn::F32(a) => a.shape().first().copied().unwrap_or(1),
        TensorIn::I64(a) => a.shape().first().copied().unwrap_or(1),
    }
}

/// Image i's part of a graph input: [`slice_batch`], except LoRA factors (the model's, not an image's: an `[in, r]`
/// factor whose `in` happens to equal the batch must not be cut).
fn slice_input<'a>(name: &str, t: &TensorIn<'a>, i: usize, batch: usize) -> TensorIn<'a> {
    if crate::lora::is_slot_input(name) {
        t.clone()
    } else {
        slice_batch(t, i, batch)
    }
}

/// Row i of a batched input; inputs without the batch dim (ids) pass unchanged.
fn slice_batch<'a>(t: &TensorIn<'a>, i: usize, batch: usize) -> TensorIn<'a> {
    match t {
        TensorIn::F32(a) if a.ndim() > 1 && a.shape()[0] == batch => {
            TensorIn::F32(a.clone().slice_axis_move(Axis(0), (i..i + 1).into()))
        }
        TensorIn::F32(a) if a.ndim() == 1 && a.shape()[0] == batch => {
            TensorIn::F32(a.clone().slice_axis_move(Axis(0), (i..i + 1).into()))
        }
        TensorIn::I64(a) if a.shape().first() == Some(&batch) => {
            TensorIn::I64(a.clone().slice_axis_move(Axis(0), (i..i + 1).into()))
        }
        other => other.clone(),
    }
}

/// What identifies a prompt's embeddings: the model folder, the CLIP prompt and the T5 prompt.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EmbeddingKey {
    pub model: String,
    pub prompt: String,
    pub prompt_2: String,
}

/// One prompt's encoder outputs: the pooled CLIP row [1, D] and the T5 sequence [1, L, D].
#[derive(Debug, Clone)]
pub struct PromptEmbedding {
    pub pooled: ArrayD<f32>,
    pub txt: ArrayD<f32>,
}

impl PromptEmbedding {
    fn bytes(&self) -> usize {
        (self.pooled.len() + self.txt.len()) * std::mem::size_of::<f32>()
    }
}

/// Counters of an [`EmbeddingCache`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct EmbeddingCacheStats {
    pub entries: usize,
    pub bytes: usize,
    pub budget: usize,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
}

/// A least-recently-used cache of prompt embeddings, bounded in bytes (tensors plus key text). Thread-safe,
/// so several pipelines (one per worker thread) can share one. An entry larger than the whole budget is
/// not kept.
#[derive(Debug)]
pub struct EmbeddingCache {
    budget: usize,
    inner: Mutex<CacheInner>,
}

#[derive(Debug, Default)]
struct CacheInner {
    map: HashMap<EmbeddingKey, (Arc<PromptEmbedding>, u64, usize)>,
    /// Use tick -> key, oldest first.
    order: BTreeMap<u64, EmbeddingKey>,
    tick: u64,
    stats: EmbeddingCacheStats,
}

impl EmbeddingCache {
    pub fn new(budget_bytes: usize) -> EmbeddingCache {
        EmbeddingCache {
            budget: budget_bytes,
            inner: Mutex::new(CacheInner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The embedding of `key`, marking it most recently used; counts a hit or a miss.
    pub fn get(&self, key: &EmbeddingKey) -> Option<Arc<PromptEmbedding>> {
        let mut guard = self.lock();
        let c = &mut *guard;
        c.tick += 1;
        let Some(entry) = c.map.get_mut(key) else {
            c.stats.misses += 1;
            return None;
        };
        let old = std::mem::replace(&mut entry.1, c.tick);
        c.order.remove(&old);
        c.order.insert(c.tick, key.clone());
        c.stats.hits += 1;
        Some(entry.0.clone())
    }

    /// Stores `emb` under `key`, evicting the least recently used entries until it fits the budget.
    pub fn insert(&self, key: EmbeddingKey, emb: Arc<PromptEmbedding>) {
        let size = emb.bytes() + key.model.len() + key.prompt.len() + key.prompt_2.len();
        if size > self.budget {
            return;
        }
        let mut c = self.lock();
        if let Some((_, old, old_size)) = c.map.remove(&key) {
            c.order.remove(&old);
            c.stats.bytes -= old_size;
        }
        while c.stats.bytes + size > self.budget {
            let Some((_, victim)) = c.order.pop_first() else {
                break;
            };
            if let Some((_, _, vsize)) = c.map.remove(&victim) {
                c.stats.bytes -= vsize;
                c.stats.evictions += 1;
            }
        }
        c.tick += 1;
        let tick = c.tick;
        c.order.insert(tick, key.clone());
        c.map.insert(key, (emb, tick, size));
        c.stats.bytes += size;
    }

    pub fn stats(&self) -> EmbeddingCacheStats {
        let c = self.lock();
        EmbeddingCacheStats {
            entries: c.map.len(),
            budget: self.budget,
            ..c.stats
        }
    }

    pub fn clear(&self) {
        let mut c = self.lock();
        c.map.clear();
        c.order.clear();
        c.stats.bytes = 0;
    }
}

/// Initial noise [B,C,h,w]: image i is `torch.randn` of one image with `seeds[i]`.
pub fn draw_noise(seeds: &[u64], channels: usize, h: usize, w: usize) -> Array4<f32> {
    let per = channels * h * w;
    let mut all = Vec::with_capacity(seeds.len() * per);
    for &seed in seeds {
        all.extend(noise::randn(seed, per));
    }
    Array4::from_shape_vec((seeds.len(), channels, h, w), all)
        .expect("noise length matches its shape")
}

/// Stops the run when a stage produced NaN or Inf, naming the stage.
pub fn ensure_finite(stage: &str, data: &[f32]) -> Result<()> {
    let bad = data.iter().filter(|v| !v.is_finite()).count();
    if bad == 0 {
        return Ok(());
    }
    Err(non_finite(stage, bad, data.len()))
}

/// The error of [`ensure_finite`], from a count (the device loop counts on the device).
fn non_finite(stage: &str, bad: usize, len: usize) -> Error {
    Error::numerics(format!("{stage} contains {bad} NaN/Inf values of {len}")).with_hint(
        "fp16 overflow is the usual cause: use a graph exported with fp32 islands (python -m export --precision fp16 \
         keeps them), an fp32 or bf16 export, or another execution provider",
    )
}

/// What the device and host-bound denoising loops read (the plain loop takes the same values one by one): the text
/// conditioning, the schedule, the distilled guidance and the position ids of one generation.
#[derive(Clone, Copy)]
struct LoopInputs<'a> {
    txt: &'a ArrayD<f32>,
    pooled: &'a ArrayD<f32>,
    sigmas: &'a [f32],
    timesteps: &'a [f32],
    guidance: Option<f32>,
    img_ids: &'a ArrayD<f32>,
    txt_ids: &'a ArrayD<f32>,
    /// True CFG: the joined prompt and negative rows (text embeddings, pooled vectors; 2B rows) and the scale. The
    /// host-bound loop cannot run it; the device loop combines the rows in its step graph.
    cfg: Option<(&'a ArrayD<f32>, &'a ArrayD<f32>, f32)>,
}

/// fluxrt's name of an ONNX Runtime provider (`CUDAExecutionProvider` -> `cuda`); other names as they are.
fn provider_name(ort_name: &str) -> String {
    ort_name
        .parse::<Provider>()
        .map(|p| p.name().to_string())
        .unwrap_or_else(|_| ort_name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensure_finite_names_the_stage() {
        assert!(ensure_finite("x", &[0.0, 1.0]).is_ok());
        let e = ensure_finite("latents after step 2", &[0.0, f32::NAN, f32::INFINITY]).unwrap_err();
        assert_eq!(e.kind, crate::ErrorKind::Numerics);
        assert!(
            e.message
                .contains("latents after step 2 contains 2 NaN/Inf"),
            "{e}"
        );
        assert!(e.hint.unwrap().contains("fp32 islands"));
    }

    #[test]
    fn noise_of_image_i_uses_seed_plus_i() {
        let both = draw_noise(&[7, 8], 16, 4, 4);
        let second = draw_noise(&[8], 16, 4, 4);
        assert_eq!(both.index_axis(Axis(0), 1), second.index_axis(Axis(0), 0));
        assert_ne!(both.index_axis(Axis(0), 0), both.index_axis(Axis(0), 1));
    }

    fn emb(n: usize) -> Arc<PromptEmbedding> {
        Arc::new(PromptEmbedding {
            pooled: ArrayD::zeros(ndarray::IxDyn(&[1, n])),
            txt: ArrayD::zeros(ndarray::IxDyn(&[1, 1, n])),
        })
    }

    fn key(p: &str) -> EmbeddingKey {
        EmbeddingKey {
            model: "m".into(),
            prompt: p.into(),
            prompt_2: p.into(),
        }
    }

    #[test]
    fn embedding_cache_evicts_least_recently_used_within_its_budget() {
        // Each entry: 2 * 10 floats = 80 bytes + 3 bytes of key text.
        let cache = EmbeddingCache::new(200);
        cache.insert(key("a"), emb(10));
        cache.insert(key("b"), emb(10));
        assert_eq!(cache.stats().bytes, 166);
        assert!(cache.get(&key("a")).is_some()); // a is now the most recent
        cache.insert(key("c"), emb(10)); // evicts b
        assert!(cache.get(&key("b")).is_none());
        assert!(cache.get(&key("a")).is_some());
        assert!(cache.get(&key("c")).is_some());
        let s = cache.stats();
        assert_eq!((s.entries, s.bytes, s.evictions), (2, 166, 1));
        assert_eq!((s.hits, s.misses), (3, 1));
        // Too large for the whole budget: not kept, nothing evicted.
        cache.insert(key("big"), emb(1000));
        assert!(cache.get(&key("big")).is_none());
        assert_eq!(cache.stats().entries, 2);
        // Re-inserting a key replaces it without double counting.
        cache.insert(key("a"), emb(10));
        assert_eq!(cache.stats().bytes, 166);
        cache.clear();
        assert_eq!(cache.stats().entries, 0);
        assert_eq!(cache.stats().bytes, 0);
    }

    #[test]
    fn slicing_keeps_shared_inputs_whole() {
        let batched = ndarray::Array3::<f32>::zeros((2, 3, 4)).into_dyn();
        let ids = ndarray::Array2::<f32>::zeros((3, 3)).into_dyn();
        let s = slice_batch(&TensorIn::F32(batched.view()), 1, 2);
        assert_eq!(tensor_batch(&s), 1);
        let s = slice_batch(&TensorIn::F32(ids.view()), 1, 2);
        assert_eq!(tensor_batch(&s), 3);
        // A LoRA factor [in, r] with in == batch stays whole; a same-shaped ordinary input is cut.
        let factor = ndarray::Array2::<f32>::zeros((2, 4)).into_dyn();
        let s = slice_input("x_embedder.lora_A", &TensorIn::F32(factor.view()), 1, 2);
        assert_eq!(tensor_batch(&s), 2);
        let s = slice_input("pooled_projections", &TensorIn::F32(factor.view()), 1, 2);
        assert_eq!(tensor_batch(&s), 1);
    }
}
