//! The text-to-image pipeline: tokenize -> encode (CLIP, T5) -> noise -> denoise loop -> VAE decode -> RGB.
//!
//! Each stage is one short method named after what it does in BFL's `sampling.py`; the math lives in the pure
//! modules ([`crate::schedule`], [`crate::latents`], [`crate::noise`]) and every ONNX call goes through
//! [`crate::runtime::Graph`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ndarray::{Array3, Array4, ArrayD, Axis};

use crate::image_out;
use crate::latents;
use crate::model::{contract, ModelSpec, Role, Variant};
use crate::noise;
use crate::runtime::{
    self, Canceller, Dim, Graph, IoInfo, Provider, ProviderPlan, SessionConfig, TensorIn,
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
        Ok(())
    }

    /// Whether two requests can share one batch (one schedule, one image size, one guidance).
    pub fn batches_with(&self, other: &Request) -> bool {
        self.width == other.width
            && self.height == other.height
            && self.steps == other.steps
            && self.guidance == other.guidance
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
    providers: Vec<Provider>,
}

pub struct Pipeline {
    pub spec: ModelSpec,
    clip_tok: PromptTokenizer,
    t5_tok: PromptTokenizer,
    session: SessionConfig,
    slots: BTreeMap<Role, Slot>,
    load_time: Duration,
}

impl Pipeline {
    /// Loads ONNX Runtime, probes providers, resolves the model folder, loads and checks every graph the
    /// text-to-image path needs. All contract mismatches are reported together, before any inference.
    pub fn load(opts: &LoadOptions) -> Result<Pipeline> {
        let start = Instant::now();
        let mut spec = ModelSpec::resolve(&opts.model)?;
        runtime::init(opts.ort_lib.as_deref())?;
        let plan: ProviderPlan = runtime::probe(&opts.providers, opts.no_fallback)?;
        let session = SessionConfig {
            threads: opts.threads,
            providers: plan,
            ..Default::default()
        };

        let mut slots = BTreeMap::new();
        let mut problems = Vec::new();
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
            }
            let guidance = spec.variant == Some(Variant::Dev);
            problems.extend(contract::check(
                role,
                guidance,
                graph.inputs(),
                graph.outputs(),
                &|n| gspec.actual_name(n),
            ));
            let slot = Slot {
                inputs: graph.inputs().to_vec(),
                providers: graph.providers().to_vec(),
                graph: if opts.low_memory { None } else { Some(graph) },
            };
            slots.insert(role, slot);
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
        })
    }

    pub fn variant(&self) -> Variant {
        self.spec.variant.unwrap_or(Variant::Schnell)
    }

    pub fn providers(&self) -> &ProviderPlan {
        &self.session.providers
    }

    /// Which providers each graph's session was built with (CPU runs any node the others cannot).
    pub fn graph_providers(&self) -> BTreeMap<String, Vec<String>> {
        self.slots
            .iter()
            .map(|(r, s)| {
                (
                    r.name().to_string(),
                    s.providers.iter().map(|p| p.name().to_string()).collect(),
                )
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

    /// Runs several compatible requests (same size, steps and guidance; any prompts and seeds) as one batch:
    /// every graph call covers all their images. Returns one output per request, in order.
    pub fn generate_batch(
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
                    "requests in one batch must share width, height, steps and guidance",
                ));
            }
        }
        let mut t = Timings {
            load: self.load_time,
            ..Default::default()
        };
        let mut warnings: Vec<Vec<String>> = vec![Vec::new(); reqs.len()];

        // 1. Tokenize each request's prompts; every image of a request shares them.
        let t0 = Instant::now();
        let (mut clip_ids, mut t5_ids, mut seeds) = (Vec::new(), Vec::new(), Vec::new());
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
        }
        t.tokenize = t0.elapsed();

        // 2. Encode the prompts: pooled CLIP vectors and T5 sequences, [B, ...].
        let (pooled, dt) = self.encode(Role::Clip, &clip_ids, cancel)?;
        t.clip = dt;
        let (txt, dt) = self.encode(Role::T5, &t5_ids, cancel)?;
        t.t5 = dt;
        t.in_ort += t.clip + t.t5;
        let mut tr = trace.then(|| Trace {
            clip_ids: clip_ids.clone(),
            t5_ids: t5_ids.clone(),
            pooled_embeds: Some(pooled.clone()),
            prompt_embeds: Some(txt.clone()),
            ..Default::default()
        });

        // 3. Noise: each image from its own seed, exactly as torch.randn with a CPU generator.
        let channels = self.spec.latent_channels;
        let (h, w) = latents::latent_hw(first.width, first.height, vae_factor);
        let noise = draw_noise(&seeds, channels, h, w);
        let mut x = latents::pack(&noise.view());
        if let Some(tr) = tr.as_mut() {
            tr.noise = Some(noise);
        }

        // 4. Denoise: Euler steps along the rectified-flow schedule.
        let steps = first.steps;
        let sigmas = schedule::sigmas(steps, x.shape()[1], &self.spec.scheduler())?;
        let timesteps = schedule::timesteps(&sigmas);
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
        for i in 0..steps {
            let t0 = Instant::now();
            let v = self.velocity(
                &x,
                &txt,
                &pooled,
                timesteps[i],
                guidance,
                &img_ids,
                &txt_ids,
                cancel,
            )?;
            t.in_ort += t0.elapsed();
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
        let images = self.decode(z, cancel)?;
        t.vae_decode = t0.elapsed();
        t.in_ort += t.vae_decode;

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

    /// Runs a text encoder on [B, L] token ids; returns its embedding and the run time.
    fn encode(
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
    fn velocity(
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
        let mut inputs: Vec<(&str, TensorIn)> = vec![
            ("hidden_states", TensorIn::F32(x)),
            ("encoder_hidden_states", TensorIn::F32(txt.view())),
            ("pooled_projections", TensorIn::F32(pooled.view())),
            ("timestep", TensorIn::F32(timestep.view())),
            ("img_ids", TensorIn::F32(img_ids.view())),
            ("txt_ids", TensorIn::F32(txt_ids.view())),
        ];
        if let Some(g) = guidance.as_ref() {
            inputs.push(("guidance", TensorIn::F32(g.view())));
        }
        let v = self.run_graph(Role::Transformer, &inputs, "latent", cancel)?;
        v.into_dimensionality()
            .map_err(|e| Error::model(format!("transformer output has the wrong rank: {e}")))
    }

    fn decode(&mut self, z: Array4<f32>, cancel: &Canceller) -> Result<Array4<f32>> {
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
        let mut transient = None;
        let graph = match slot.graph.as_mut() {
            Some(g) => g,
            None => transient.insert(Graph::load(&gspec.path, role.name(), &self.session)?),
        };
        let names: Vec<String> = inputs.iter().map(|(n, _)| gspec.actual_name(n)).collect();
        let out_name = gspec.actual_name(output);
        let batch = inputs.first().map_or(1, |(_, t)| tensor_batch(t));
        let batchable = slot
            .inputs
            .iter()
            .all(|io| !matches!(io.shape.first(), Some(Dim::Fixed(1))))
            || batch == 1;
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
            return run_one(graph, feed);
        }
        // A graph exported with batch 1: one call per image, batched inputs sliced, shared ones passed whole.
        let mut parts = Vec::with_capacity(batch);
        for i in 0..batch {
            let feed = names
                .iter()
                .zip(inputs)
                .map(|(n, (_, t))| (n.as_str(), slice_batch(t, i, batch)))
                .collect();
            parts.push(run_one(graph, feed)?);
        }
        let views: Vec<_> = parts.iter().map(|a| a.view()).collect();
        ndarray::concatenate(Axis(0), &views)
            .map_err(|e| Error::runtime(format!("cannot join batch outputs: {e}")))
    }
}

fn tensor_batch(t: &TensorIn) -> usize {
    match t {
        TensorIn::F32(a) => a.shape().first().copied().unwrap_or(1),
        TensorIn::I64(a) => a.shape().first().copied().unwrap_or(1),
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
    Err(Error::numerics(format!("{stage} contains {bad} NaN/Inf values of {}", data.len())).with_hint(
        "fp16 overflow is the usual cause: use a graph exported with fp32 islands (python -m export --precision fp16 \
         keeps them), an fp32 or bf16 export, or another execution provider",
    ))
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

    #[test]
    fn slicing_keeps_shared_inputs_whole() {
        let batched = ndarray::Array3::<f32>::zeros((2, 3, 4)).into_dyn();
        let ids = ndarray::Array2::<f32>::zeros((3, 3)).into_dyn();
        let s = slice_batch(&TensorIn::F32(batched.view()), 1, 2);
        assert_eq!(tensor_batch(&s), 1);
        let s = slice_batch(&TensorIn::F32(ids.view()), 1, 2);
        assert_eq!(tensor_batch(&s), 3);
    }
}
