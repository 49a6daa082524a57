//! fluxrt: FLUX.1 text-to-image on ONNX Runtime. The layers, bottom up (docs/architecture.md):
//!
//! - [`runtime`]: the only module that touches `ort`, and knows nothing of FLUX.
//! - [`model`]: layouts, the manifest, the graph contract and the shape ranges derived from it.
//! - Pure stages (no ONNX Runtime): [`text`], [`schedule`], [`latents`], [`noise`], [`image_out`], and the features'
//!   math: [`img2img`], true CFG ([`guidance`]), tiled VAE ([`vae_tiling`]), run-time LoRA ([`lora`]).
//! - [`engine`]: the loaded graphs and their calls; [`denoise`]: the one denoise driver and its strategies;
//!   [`conditioning`]: text-to-image and the parts that edit a batch before denoising.
//! - [`pipeline`] wires them per batch of [`request`]s into an [`output`]; the CLI, [`serve`] and [`mod@bench`] are
//!   shells over it.

pub mod bench;
pub mod conditioning;
pub mod config;
pub mod denoise;
pub mod embeddings;
pub mod engine;
pub mod error;
pub mod guidance;
pub mod image_out;
pub mod img2img;
pub mod init_image;
pub mod json;
pub mod latents;
pub mod lora;
pub mod noise;
pub mod output;
pub mod request;
pub mod schedule;
pub mod text;
pub mod vae_tiling;

pub use error::{Error, ErrorKind, Result};
pub mod model;
pub mod pipeline;
pub mod runtime;
pub mod serve;
