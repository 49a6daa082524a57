//! The pipeline: a batch of requests from prompts to RGB, as BFL's `sampling.py` lays it out, one short function a
//! stage: check the batch, prepare it (text-to-image, then each conditioning part), denoise, decode, convert. The
//! graphs and their calls are the [`Engine`]'s, the loop is the denoise driver's ([`crate::denoise`]), the features
//! are parts ([`crate::conditioning`]); the pipeline only wires them and keeps what outlives one generation (the
//! embedding cache, the device loop's buffers, the last LoRA set).

use std::sync::Arc;
use std::time::Instant;

use ndarray::{Array4, Axis};

pub use crate::conditioning::text::draw_noise;
use crate::conditioning::{
    self, img2img::Img2Img, lora::RuntimeLoras, true_cfg::TrueCfg, Batch, Context, Part,
};
use crate::denoise::Denoiser;
pub use crate::denoise::{Progress, Quiet};
pub use crate::embeddings::{EmbeddingCache, EmbeddingCacheStats, EmbeddingKey, PromptEmbedding};
pub use crate::engine::{Engine, LoadOptions};
pub use crate::error::ensure_finite;
use crate::model::shapes::RequestShape;
pub use crate::output::{Image, Output, Timings, Trace};
pub use crate::request::{Request, DEFAULT_MAX_PIXELS};
use crate::runtime::{Canceller, DeviceLoop, LoopKind};
pub use crate::schedule::MAX_STEPS;
use crate::{image_out, latents, vae_tiling, Error, Result};

pub struct Pipeline {
    engine: Engine,
    denoiser: Denoiser,
    /// Prompt embeddings kept between runs (see [`Pipeline::set_embedding_cache`]).
    embed_cache: Option<Arc<EmbeddingCache>>,
    loras: RuntimeLoras,
}

impl Pipeline {
    /// Loads the model's graphs ([`Engine::load`]) with the loop settings of `opts`.
    pub fn load(opts: &LoadOptions) -> Result<Pipeline> {
        Ok(Pipeline {
            engine: Engine::load(opts)?,
            denoiser: Denoiser::new(opts.device_loop, opts.io_binding),
            embed_cache: None,
            loras: RuntimeLoras::default(),
        })
    }

    /// The loaded graphs: the model spec, providers, load times and placements.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
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

    /// Turns the I/O-binding denoising loop on or off (see [`LoadOptions::io_binding`]).
    pub fn set_io_binding(&mut self, on: bool) {
        self.denoiser.io_binding = on;
    }

    /// Whether the last generation's denoising loop ran through the host I/O binding.
    pub fn io_binding_used(&self) -> bool {
        self.denoiser.last_kind() == LoopKind::HostBound
    }

    /// Turns the device-resident denoising loop on, off or automatic (see [`LoadOptions::device_loop`]).
    pub fn set_device_loop(&mut self, mode: DeviceLoop) {
        self.denoiser.device_loop = mode;
    }

    pub fn device_loop(&self) -> DeviceLoop {
        self.denoiser.device_loop
    }

    /// Which denoising loop the last generation ran: plain runs, the host I/O binding, or the device loop.
    pub fn denoise_loop(&self) -> LoopKind {
        self.denoiser.last_kind()
    }

    /// Why the last generation did not run the device loop although it was wanted (`None` when it ran or was off).
    pub fn device_loop_fallback(&self) -> Option<&str> {
        self.denoiser.fallback()
    }

    /// The device addresses the transformer reads and writes in the kept device loop, by graph input/output name
    /// (`None` when no device loop is kept). They stay the same over steps and over generations that reuse it.
    pub fn device_loop_buffers(&self) -> Option<Vec<(String, usize)>> {
        self.denoiser.device_buffers()
    }

    /// Reads a LoRA file and checks it against this model's slots (an error for a model without slots, a LoRA
    /// for another model, text-encoder layers, a malformed file). The result can be shared by any number of
    /// requests (and by pipelines of the same model).
    pub fn load_lora(&self, path: &std::path::Path) -> Result<Arc<crate::lora::Lora>> {
        crate::lora::Lora::load(path, self.engine.lora_slots()).map(Arc::new)
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
        let start = Instant::now();
        self.check_batch(reqs)?;
        let ort_start = self.engine.ort_time();
        let mut t = Timings {
            load: self.engine.load_time(),
            ..Timings::default()
        };
        let mut warnings = vec![Vec::new(); reqs.len()];
        let mut tr = trace.then(Trace::default);
        let seeds = reqs
            .iter()
            .flat_map(|r| (0..r.num_images).map(|i| r.seed.wrapping_add(i as u64)))
            .collect();
        let mut cx = Context {
            engine: &mut self.engine,
            reqs,
            seeds,
            embeddings: self.embed_cache.as_deref(),
            cancel,
            timings: &mut t,
            warnings: &mut warnings,
            trace: tr.as_mut(),
        };
        let mut batch = prepare(&mut cx, &mut [&mut Img2Img, &mut TrueCfg, &mut self.loras])?;
        let seeds = cx.seeds;
        if let Some(tr) = tr.as_mut() {
            tr.noise = Some(batch.noise.clone());
            tr.sigmas = batch.sigmas.clone();
            tr.timesteps = batch.timesteps.clone();
        }
        // The latents out of the batch while the driver updates them beside the batch's other inputs.
        let mut x = std::mem::take(&mut batch.x);
        t.denoise = self.denoiser.run(
            &mut self.engine,
            &mut x,
            &batch.model_inputs(),
            (&batch.sigmas, &batch.timesteps),
            progress,
            cancel,
            tr.as_mut().map(|tr| &mut tr.latents),
        )?;
        batch.x = x;
        let t0 = Instant::now();
        let images = self.decode(&batch, &reqs[0], cancel)?;
        t.vae_decode = t0.elapsed();
        let t0 = Instant::now();
        let rgb = to_rgb(&images, &seeds)?;
        if let Some(tr) = tr.as_mut() {
            tr.images = Some(images.mapv(|v| (v / 2.0 + 0.5).clamp(0.0, 1.0)));
        }
        t.to_rgb = t0.elapsed();
        t.in_ort = self.engine.ort_time() - ort_start;
        t.total = start.elapsed();
        Ok(hand_out(reqs, rgb, warnings, &t, tr))
    }

    /// Every request valid and batchable with the first, and every graph call of the batch inside the built TensorRT
    /// profile or the CUDA graphs' shape (refused, instead of a silent engine rebuild).
    fn check_batch(&self, reqs: &[Request]) -> Result<()> {
        let vae_factor = self.engine.spec.vae.downsample_factor;
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
        // Every graph call counts: true CFG's 2B transformer rows, the VAE's tiles when tiling applies.
        let shape = RequestShape {
            true_cfg: first.true_cfg_active(),
            vae_tiles: first
                .vae_tiling
                .tile_sizes(first.width, first.height, vae_factor),
            encodes: first.init_image.is_some(),
            ..RequestShape::new(
                first.width,
                first.height,
                reqs.iter().map(|r| r.num_images).sum(),
            )
        };
        self.engine.check_request_shape(&shape)
    }

    /// Unpacks the final latents, undoes the VAE normalisation and runs the decoder (tiled when the request asks).
    fn decode(
        &mut self,
        batch: &Batch,
        first: &Request,
        cancel: &Canceller,
    ) -> Result<Array4<f32>> {
        let vae = &self.engine.spec.vae;
        let (_, channels, h, w) = batch.noise.dim();
        let mut z = latents::unpack(&batch.x.view(), h, w, channels);
        latents::vae_decode_input(
            z.as_slice_mut().expect("contiguous"),
            vae.scaling_factor,
            vae.shift_factor,
        );
        let f = vae.downsample_factor;
        let engine = &mut self.engine;
        vae_tiling::decode(z, &first.vae_tiling, f, |z| engine.decode(z, cancel))
    }
}

/// Text-to-image's batch, edited by each part in turn.
fn prepare(cx: &mut Context, parts: &mut [&mut dyn Part]) -> Result<Batch> {
    let mut batch = conditioning::text::prepare(cx)?;
    for part in parts {
        part.prepare(cx, &mut batch)?;
    }
    Ok(batch)
}

/// To 8-bit RGB, as diffusers' image processor does; image i gets `seeds[i]`.
fn to_rgb(images: &Array4<f32>, seeds: &[u64]) -> Result<Vec<Image>> {
    images
        .axis_iter(Axis(0))
        .zip(seeds)
        .map(|(img, &seed)| {
            Ok(Image {
                seed,
                rgb: image_out::to_rgb8(img)?,
            })
        })
        .collect()
}

/// Hands each request its images, warnings, the batch's timings and trace.
fn hand_out(
    reqs: &[Request],
    rgb: Vec<Image>,
    warnings: Vec<Vec<String>>,
    t: &Timings,
    tr: Option<Trace>,
) -> Vec<Output> {
    let mut rgb = rgb.into_iter();
    reqs.iter()
        .zip(warnings)
        .map(|(r, warnings)| Output {
            images: rgb.by_ref().take(r.num_images).collect(),
            timings: t.clone(),
            warnings,
            trace: tr.clone(),
        })
        .collect()
}
