//! fluxrt: FLUX.1 text-to-image on ONNX Runtime.
//!
//! Pure stages (no ONNX Runtime): [`text`], [`schedule`], [`latents`], [`noise`], [`image_out`].
//! [`runtime`] is the only module that touches `ort`; [`model`] resolves a model folder into graphs and
//! settings; [`pipeline`] wires the stages together. Features on top of text-to-image: [`img2img`], true CFG with a
//! negative prompt ([`guidance`]), tiled VAE decode/encode ([`vae_tiling`]) and run-time LoRA ([`lora`]).

pub mod bench;
pub mod config;
pub mod error;
pub mod guidance;
pub mod image_out;
pub mod img2img;
pub mod json;
pub mod latents;
pub mod lora;
pub mod noise;
pub mod schedule;
pub mod text;
pub mod vae_tiling;

pub use error::{Error, ErrorKind, Result};
pub mod model;
pub mod pipeline;
pub mod runtime;
pub mod serve;
