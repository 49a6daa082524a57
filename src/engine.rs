//! The engine: a model's graphs loaded on their providers, and their calls: encode text (CLIP, T5), encode an
//! image (VAE encoder), decode latents (VAE decoder), and the transformer for the denoising strategies
//! ([`Engine::transformer`]). It owns low-memory loading (a graph loaded for its call and freed after) and the
//! accounting of the time spent inside ONNX Runtime. It knows nothing of requests or features: callers hand it
//! arrays in the contract's names (the model's own names are mapped here).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use ndarray::{s, Array4, ArrayD, Axis};

use crate::error::ensure_finite;
use crate::model::shapes::{RequestShape, ShapePlan};
use crate::model::{contract, GraphSpec, ModelSpec, Role, Variant};
use crate::runtime::{
    self, CacheUse, Canceller, Dim, Graph, IoInfo, Provider, ProviderPlan, SessionConfig, TensorIn,
};
use crate::text::PromptTokenizer;
use crate::{Error, Result};

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub model: std::path::PathBuf,
    /// Requested execution providers in priority order (CPU appended unless `no_fallback`).
    pub providers: Vec<Provider>,
    pub no_fallback: bool,
    pub threads: Option<usize>,
    /// Load one graph at a time for its stage and free it afterwards.
    pub low_memory: bool,
    /// An explicit ONNX Runtime library (file or folder).
    pub ort_lib: Option<std::path::PathBuf>,
    /// Graph optimization level (default: all).
    pub optimization: runtime::Optimization,
    /// ONNX Runtime's memory pattern planning (default off, see `runtime::SessionConfig::memory_pattern`).
    pub memory_pattern: bool,
    /// The CPU provider's arena allocator (default on).
    pub cpu_arena: bool,
    /// The optimized-graph cache folder for CPU sessions; `None` turns it off. Default:
    /// [`runtime::optimized_cache_dir`] (`FLUXRT_OPTIMIZED_CACHE=off` turns it off).
    pub optimized_cache: Option<std::path::PathBuf>,
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
    /// The BFL transformer folder to use (`fp32`, `fp16`, `int8`, `int4`, `bf16`, `fp8`, `fp4`, `fp4_svd32`); `None`
    /// picks one for the provider. ModelOpt's fp8 and fp4 need NV TensorRT RTX.
    pub transformer_precision: Option<String>,
    /// Where the tokenizers are when the model folder has none (`--tokenizers`: a folder with `tokenizer/` and
    /// `tokenizer_2/`, or a repo id in the Hugging Face cache); `None` searches (model::tokenizer_search).
    pub tokenizers: Option<std::path::PathBuf>,
}

impl LoadOptions {
    pub fn new(model: impl Into<std::path::PathBuf>) -> Self {
        LoadOptions {
            model: model.into(),
            providers: vec![Provider::Cpu],
            no_fallback: false,
            threads: None,
            low_memory: false,
            ort_lib: None,
            optimization: runtime::Optimization::default(),
            memory_pattern: false,
            cpu_arena: true,
            optimized_cache: runtime::optimized_cache_dir(),
            io_binding: true,
            device_loop: runtime::DeviceLoop::Auto,
            ep: runtime::EpSettings::default(),
            shapes: None,
            transformer_precision: None,
            tokenizers: None,
        }
    }
}

/// A loaded graph (none in low-memory mode: loaded for each call) and what its load reported.
struct Slot {
    graph: Option<Graph>,
    providers: Vec<Provider>,
    /// ONNX Runtime's node placement report ([`Graph::placement`]).
    placement: Vec<(String, usize)>,
    load_time: Duration,
    cache: CacheUse,
}

impl Slot {
    /// A slot for `graph`, which is kept unless in low-memory mode.
    fn new(graph: Graph, low_memory: bool) -> Slot {
        Slot {
            providers: graph.providers().to_vec(),
            placement: graph.placement().to_vec(),
            load_time: graph.load_time(),
            cache: graph.cache_use(),
            graph: if low_memory { None } else { Some(graph) },
        }
    }

    /// The kept graph, or in low-memory mode `gspec`'s graph loaded into `transient`, to drop after its use.
    fn graph_or_load<'a>(
        &'a mut self,
        transient: &'a mut Option<Graph>,
        gspec: &GraphSpec,
        session: &SessionConfig,
    ) -> Result<&'a mut Graph> {
        match self.graph.as_mut() {
            Some(g) => Ok(g),
            None => Ok(transient.insert(Graph::load(&gspec.path, gspec.role.name(), session)?)),
        }
    }
}

/// Whether one call of a graph declaring `inputs` may take `batch` rows: the call has one row, or no input fixes
/// its batch dimension at 1.
pub(crate) fn batchable(inputs: &[IoInfo], batch: usize) -> bool {
    batch == 1
        || inputs
            .iter()
            .all(|io| !matches!(io.shape.first(), Some(Dim::Fixed(1))))
}

/// The transformer, lent to a denoising strategy for one loop ([`Engine::transformer`]).
pub struct Transformer<'a> {
    pub graph: &'a mut Graph,
    /// Its contract-to-graph names.
    pub spec: &'a GraphSpec,
    pub session: &'a SessionConfig,
    /// Loaded for this loop only (low-memory mode): a new session each time.
    pub transient: bool,
    /// Its session captures CUDA graphs: only the device loop's fixed buffers may drive it.
    pub cuda_graphs: bool,
}

impl Transformer<'_> {
    /// The graph's own name of contract input or output `name`.
    pub fn name(&self, contract_name: &str) -> String {
        self.spec.actual_name(contract_name)
    }
}

pub struct Engine {
    pub spec: ModelSpec,
    clip_tok: PromptTokenizer,
    t5_tok: PromptTokenizer,
    session: SessionConfig,
    slots: BTreeMap<Role, Slot>,
    /// The transformer loaded for one loop in low-memory mode ([`Engine::release_transformer`] frees it).
    transient: Option<Graph>,
    shapes: ShapePlan,
    load_time: Duration,
    /// Time inside ONNX Runtime's run calls, summed over every graph and run.
    ort_busy: Duration,
    /// The transformer's run-time LoRA slots (crate::lora); empty for graphs exported without them.
    lora_slots: Vec<crate::lora::Slot>,
    /// Warnings about the loaded model on these providers, for the caller to show once.
    load_warnings: Vec<String>,
}

/// The error of a graph whose I/O departs from the contract: every mismatch, one per line.
fn contract_error(spec: &ModelSpec, problems: &[String]) -> Error {
    Error::model(format!(
        "model {} does not match the Flux ONNX contract:\n  {}",
        spec.root.display(),
        problems.join("\n  ")
    ))
    .with_hint(
        "re-export the model with `python -m export`, or check that it is a FLUX.1 ONNX export",
    )
}

impl Engine {
    /// Loads ONNX Runtime, probes providers, resolves the model folder, loads and checks every graph the
    /// text-to-image path needs. All contract mismatches are reported together, before any inference.
    pub fn load(opts: &LoadOptions) -> Result<Engine> {
        let start = Instant::now();
        let mut spec = ModelSpec::resolve_with(&opts.model, opts.tokenizers.as_deref())?;
        runtime::init(opts.ort_lib.as_deref())?;
        let plan: ProviderPlan = runtime::probe(&opts.providers, opts.no_fallback)?;
        // The transformer precision for the providers (BFL layout); ModelOpt's fp8/fp4 only with NV TensorRT RTX.
        spec.select_transformer_precision_for(&plan.active, opts.transformer_precision.as_deref())?;
        let shapes = ShapePlan::new(&spec, opts.shapes)?;
        // Complete downloads, and nothing the first provider cannot run (bf16, ModelOpt's ops), before any session.
        spec.check_runnable(&plan.active)?;
        // Said once by the CLI and the server: settings without effect here.
        let load_warnings = shapes.warnings(&opts.ep, &plan.active);
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
            return Err(contract_error(&spec, &problems));
        }
        let clip_tok = PromptTokenizer::from_file(
            &spec.clip_tokenizer.path,
            spec.clip_tokenizer.settings.clone(),
        )?;
        let t5_tok = PromptTokenizer::from_file(
            &spec.t5_tokenizer.path,
            spec.t5_tokenizer.settings.clone(),
        )?;
        Ok(Engine {
            spec,
            clip_tok,
            t5_tok,
            session,
            slots,
            transient: None,
            shapes,
            load_time: start.elapsed(),
            ort_busy: Duration::ZERO,
            lora_slots,
            load_warnings,
        })
    }

    /// Time [`Engine::load`] took, all graphs and tokenizers included.
    pub fn load_time(&self) -> Duration {
        self.load_time
    }

    /// Time inside ONNX Runtime's run calls so far, every graph and run (and what strategies report, see
    /// [`Engine::add_ort_time`]).
    pub fn ort_time(&self) -> Duration {
        self.ort_busy
    }

    /// Adds time a caller spent in ONNX Runtime with a graph it was lent ([`Engine::transformer`]) or its own
    /// sessions (the device loop's step graph).
    pub fn add_ort_time(&mut self, d: Duration) {
        self.ort_busy += d;
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

    pub fn session(&self) -> &SessionConfig {
        &self.session
    }

    pub fn tokenizers(&self) -> (&PromptTokenizer, &PromptTokenizer) {
        (&self.clip_tok, &self.t5_tok)
    }

    /// The transformer's run-time LoRA slots; empty when the graph was exported without them.
    pub fn lora_slots(&self) -> &[crate::lora::Slot] {
        &self.lora_slots
    }

    /// Whether the transformer's session captures CUDA graphs (then only the device loop may run it).
    pub fn transformer_cuda_graphs(&self) -> bool {
        self.shapes.captures_cuda_graphs(
            &self.session.ep,
            &self.session.providers.active,
            Role::Transformer,
        )
    }

    /// Refuses a request whose graph calls fall outside the built TensorRT profile or the CUDA graphs' shape,
    /// instead of a silent engine rebuild.
    pub fn check_request_shape(&self, shape: &RequestShape) -> Result<()> {
        self.shapes
            .check_request_shape(&self.session.ep, &self.session.providers.active, shape)
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

    /// The transformer for one denoising loop: the kept session, or in low-memory mode one loaded for the loop
    /// (freed by [`Engine::release_transformer`]). The caller accounts the time it spends in its runs
    /// ([`Engine::add_ort_time`]).
    pub fn transformer(&mut self) -> Result<Transformer<'_>> {
        let cuda_graphs = self.transformer_cuda_graphs();
        let spec = self.spec.graph(Role::Transformer)?;
        let slot = self
            .slots
            .get_mut(&Role::Transformer)
            .expect("every engine loads the transformer");
        let transient = slot.graph.is_none();
        let graph = slot.graph_or_load(&mut self.transient, spec, &self.session)?;
        Ok(Transformer {
            graph,
            spec,
            session: &self.session,
            transient,
            cuda_graphs,
        })
    }

    /// Frees a transformer loaded for one loop (low-memory mode); nothing otherwise.
    pub fn release_transformer(&mut self) {
        self.transient = None;
    }

    /// Runs a text encoder on [B, L] token ids; returns its embedding and the run time.
    pub fn encode_text(
        &mut self,
        role: Role,
        ids: &[Vec<i64>],
        cancel: &Canceller,
    ) -> Result<(ArrayD<f32>, Duration)> {
        let len = ids.first().map_or(0, Vec::len);
        let ids = ndarray::Array2::from_shape_fn((ids.len(), len), |(i, j)| ids[i][j]).into_dyn();
        let out_name = contract::outputs(role)[0].name;
        let t0 = Instant::now();
        let emb = self.run(
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

    /// Runs the VAE decoder on latents `[B, C, h, w]` (already `z / scale + shift`): images `[B, 3, H, W]` in
    /// [-1, 1].
    pub fn decode(&mut self, z: Array4<f32>, cancel: &Canceller) -> Result<Array4<f32>> {
        let z = z.into_dyn();
        let img = self.run(
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
    /// (`posterior` reads every export's layout). Text-to-image never needs the encoder, so it is loaded (and
    /// checked against the contract) on first use; in low-memory mode it lives for each call only.
    pub fn encode_image(
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
                return Err(contract_error(&self.spec, &problems));
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
        posterior(
            outs?,
            &gspec.actual_name("latent"),
            self.spec.latent_channels,
        )
    }

    /// Runs one graph with contract names (mapped to the graph's own), batching only when the graph's batch dim
    /// is dynamic; returns the named output. In low-memory mode the graph lives for this call only.
    fn run(
        &mut self,
        role: Role,
        inputs: &[(&str, TensorIn)],
        output: &str,
        cancel: &Canceller,
    ) -> Result<ArrayD<f32>> {
        let gspec = self.spec.graph(role)?;
        let slot = self
            .slots
            .get_mut(&role)
            .expect("every loaded graph has a slot");
        let mut transient = None;
        let graph = slot.graph_or_load(&mut transient, gspec, &self.session)?;
        let ort_before = graph.ort_time();
        let out = run_graph(graph, gspec, inputs, output, cancel);
        self.ort_busy += graph.ort_time() - ort_before;
        out
    }
}

/// Runs `graph` with contract names (mapped by `gspec`), batching only when the graph's batch dim is dynamic: a
/// graph exported with batch 1 gets one call per row, batched inputs sliced, shared ones (ids, LoRA factors) whole.
/// Returns the named output; the batch is read from the first input.
pub(crate) fn run_graph(
    graph: &mut Graph,
    gspec: &GraphSpec,
    inputs: &[(&str, TensorIn)],
    output: &str,
    cancel: &Canceller,
) -> Result<ArrayD<f32>> {
    let role = gspec.role;
    let batch = inputs.first().map_or(1, |(_, t)| tensor_batch(t));
    let names: Vec<String> = inputs.iter().map(|(n, _)| gspec.actual_name(n)).collect();
    let out_name = gspec.actual_name(output);
    let one_call = batchable(graph.inputs(), batch);
    let mut run_one = |feed: Vec<(&str, TensorIn)>| -> Result<ArrayD<f32>> {
        let outs = graph.run_with(&feed, cancel)?;
        outs.into_iter()
            .find(|(n, _)| *n == out_name)
            .map(|(_, a)| a)
            .ok_or_else(|| Error::model(format!("{role} graph produced no output `{out_name}`")))
    };
    if one_call {
        let feed = names
            .iter()
            .zip(inputs)
            .map(|(n, (_, t))| (n.as_str(), t.clone()))
            .collect();
        return run_one(feed);
    }
    let mut parts = Vec::with_capacity(batch);
    for i in 0..batch {
        let feed = names
            .iter()
            .zip(inputs)
            .map(|(n, (_, t))| (n.as_str(), slice_input(n, t, i, batch)))
            .collect();
        parts.push(run_one(feed)?);
    }
    let views: Vec<_> = parts.iter().map(|a| a.view()).collect();
    ndarray::concatenate(Axis(0), &views)
        .map_err(|e| Error::runtime(format!("cannot join batch outputs: {e}")))
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
    if contract::is_lora_slot_input(name) {
        t.clone()
    } else {
        slice_batch(t, i, batch)
    }
}

/// Row i of a batched input; inputs without the batch dim (ids) pass unchanged.
fn slice_batch<'a>(t: &TensorIn<'a>, i: usize, batch: usize) -> TensorIn<'a> {
    match t {
        TensorIn::F32(a) if a.ndim() >= 1 && a.shape()[0] == batch => {
            TensorIn::F32(a.clone().slice_axis_move(Axis(0), (i..i + 1).into()))
        }
        TensorIn::I64(a) if a.shape().first() == Some(&batch) => {
            TensorIn::I64(a.clone().slice_axis_move(Axis(0), (i..i + 1).into()))
        }
        other => other.clone(),
    }
}

/// The VAE encoder's outputs as (mean, std), `[B, C, h, w]` each, from any of the layouts fluxrt reads:
/// fluxrt exports give `latent` (the mean) and `latent_std`; optimum's `latent_parameters` hold mean and logvar
/// (2C channels, diffusers' `DiagonalGaussianDistribution`: logvar clamped to [-30, 20], std = exp(logvar / 2));
/// a graph with the mean only gives std 0 (the posterior's mode; the draw order, hence the noise, is kept).
pub(crate) fn posterior(
    outs: Vec<(String, ArrayD<f32>)>,
    latent_name: &str,
    channels: usize,
) -> Result<(Array4<f32>, Array4<f32>)> {
    let as4 = |a: ArrayD<f32>, what: &str| -> Result<Array4<f32>> {
        a.into_dimensionality()
            .map_err(|e| Error::model(format!("the VAE encoder's {what} has the wrong rank: {e}")))
    };
    let mut latent = None;
    let mut std = None;
    for (name, a) in outs {
        if name == latent_name {
            latent = Some(as4(a, &name)?);
        } else if name == "latent_std" {
            std = Some(as4(a, &name)?);
        }
    }
    let latent = latent.ok_or_else(|| {
        Error::model(format!(
            "the VAE encoder produced no output `{latent_name}`"
        ))
    })?;
    let c = latent.shape()[1];
    let (mean, std) = if c == 2 * channels && std.is_none() {
        let mean = latent.slice(s![.., ..channels, .., ..]).to_owned();
        let std = latent
            .slice(s![.., channels.., .., ..])
            .mapv(|lv| (0.5 * lv.clamp(-30.0, 20.0)).exp());
        (mean, std)
    } else if c == channels {
        let std = std.unwrap_or_else(|| Array4::zeros(latent.raw_dim()));
        (latent, std)
    } else {
        return Err(Error::model(format!(
            "the VAE encoder's `{latent_name}` has {c} channels, expected {channels} (mean) or {} (mean and logvar)",
            2 * channels
        )));
    };
    if std.shape() != mean.shape() {
        return Err(Error::model(format!(
            "the VAE encoder's latent_std has shape {:?}, its latent {:?}",
            std.shape(),
            mean.shape()
        )));
    }
    ensure_finite("VAE encode", mean.as_slice().unwrap_or(&[]))?;
    ensure_finite("VAE encode (std)", std.as_slice().unwrap_or(&[]))?;
    Ok((mean.as_standard_layout().to_owned(), std))
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
    use crate::ErrorKind;

    #[test]
    fn posterior_reads_every_layout() {
        let mean = ArrayD::from_elem(ndarray::IxDyn(&[1, 2, 1, 1]), 0.5f32);
        let std = ArrayD::from_elem(ndarray::IxDyn(&[1, 2, 1, 1]), 0.25f32);
        // fluxrt: latent + latent_std.
        let (m, s) = posterior(
            vec![
                ("latent".into(), mean.clone()),
                ("latent_std".into(), std.clone()),
            ],
            "latent",
            2,
        )
        .unwrap();
        assert_eq!((m[[0, 1, 0, 0]], s[[0, 1, 0, 0]]), (0.5, 0.25));
        // optimum: mean and logvar in one 2C tensor; logvar clamped as diffusers does.
        let params =
            ArrayD::from_shape_vec(ndarray::IxDyn(&[1, 4, 1, 1]), vec![0.5, 0.1, 0.0, 50.0])
                .unwrap();
        let (m, s) = posterior(
            vec![("latent_parameters".into(), params)],
            "latent_parameters",
            2,
        )
        .unwrap();
        assert_eq!(m.shape(), [1, 2, 1, 1]);
        assert_eq!((s[[0, 0, 0, 0]], s[[0, 1, 0, 0]]), (1.0, 10f32.exp()));
        // mean only: the mode.
        let (_, s) = posterior(vec![("latent".into(), mean)], "latent", 2).unwrap();
        assert!(s.iter().all(|&v| v == 0.0));
        let e = posterior(vec![("other".into(), std)], "latent", 2).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Model);
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
