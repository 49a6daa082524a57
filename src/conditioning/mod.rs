//! Conditioning as parts. Text-to-image ([`text::prepare`]) makes a [`Batch`]: the prompts' embeddings, the
//! noise as start latents, the schedule, the ids and the distilled guidance. Each [`Part`] then edits it before the
//! denoise driver runs: img2img's start latents and sigma offset ([`img2img::Img2Img`]), true CFG's negative rows and
//! scale ([`true_cfg::TrueCfg`], combined by every strategy as a velocity wrapper), run-time LoRA factors as extra
//! inputs ([`lora::RuntimeLoras`]). A new part (reference-image tokens, extra input channels, extra text tokens)
//! edits the same fields and needs no change to the driver or to the other parts.

pub mod img2img;
pub mod lora;
pub mod text;
pub mod true_cfg;

use std::sync::Arc;

use ndarray::{Array3, Array4, ArrayD};

use crate::denoise::ModelInputs;
use crate::embeddings::EmbeddingCache;
use crate::engine::Engine;
use crate::output::{Timings, Trace};
use crate::request::Request;
use crate::runtime::Canceller;
use crate::Result;

/// One batch, set up for the denoise driver.
pub struct Batch {
    /// The packed latents to start from, `[B, S, 64]`.
    pub x: Array3<f32>,
    /// The unpacked noise drawn for them, `[B, C, h, w]`.
    pub noise: Array4<f32>,
    /// The schedule still to run: `sigmas` has one more entry (the terminal 0) than `timesteps`.
    pub sigmas: Vec<f32>,
    pub timesteps: Vec<f32>,
    /// Text rows for the transformer (B, or 2B with true CFG).
    pub txt: ArrayD<f32>,
    pub pooled: ArrayD<f32>,
    pub img_ids: ArrayD<f32>,
    pub txt_ids: ArrayD<f32>,
    pub guidance: Option<f32>,
    /// More transformer inputs by graph name, shared with the part that made them (LoRA factors).
    pub extra: Arc<Vec<(String, ArrayD<f32>)>>,
    pub cfg_scale: Option<f32>,
}

impl Batch {
    /// What the transformer reads besides the latents and timestep.
    pub fn model_inputs(&self) -> ModelInputs<'_> {
        ModelInputs {
            txt: &self.txt,
            pooled: &self.pooled,
            img_ids: &self.img_ids,
            txt_ids: &self.txt_ids,
            guidance: self.guidance,
            extra: &self.extra,
            cfg_scale: self.cfg_scale,
        }
    }
}

/// What the parts of one batch may use.
pub struct Context<'a> {
    pub engine: &'a mut Engine,
    /// The batch's requests (they share size, steps, guidance, strength, true CFG and LoRAs: [`Request::batches_with`]).
    pub reqs: &'a [Request],
    /// One seed per image, requests in order.
    pub seeds: Vec<u64>,
    pub embeddings: Option<&'a EmbeddingCache>,
    pub cancel: &'a Canceller,
    pub timings: &'a mut Timings,
    /// One list per request.
    pub warnings: &'a mut [Vec<String>],
    pub trace: Option<&'a mut Trace>,
}

impl Context<'_> {
    /// The first request, which speaks for the batch's shared settings.
    pub fn first(&self) -> &Request {
        &self.reqs[0]
    }

    /// Images in the batch.
    pub fn images(&self) -> usize {
        self.seeds.len()
    }
}

/// One conditioning feature: edits the batch before denoising, and does nothing for requests that do not use it.
pub trait Part {
    fn prepare(&mut self, cx: &mut Context, batch: &mut Batch) -> Result<()>;
}
