//! What a generation gives back: the images, the wall time of each stage, warnings and (on request) a trace of
//! every intermediate. Plain data, filled by [`crate::pipeline`] and the conditioning parts.

use std::time::Duration;

use ndarray::{Array3, Array4, ArrayD};

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
    /// Unpacked initial noise `[B,C,h,w]`.
    pub noise: Option<Array4<f32>>,
    /// Packed latents after each step `[B,S,64]`.
    pub latents: Vec<Array3<f32>>,
    /// Decoded images as floats in `[0, 1]`, `[B,3,H,W]`.
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

/// One request's result.
#[derive(Debug, Clone)]
pub struct Output {
    pub images: Vec<Image>,
    pub timings: Timings,
    pub warnings: Vec<String>,
    pub trace: Option<Trace>,
}
