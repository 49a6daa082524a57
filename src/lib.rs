//! fluxrt: FLUX.1 text-to-image on ONNX Runtime.
//!
//! Pure stages (no ONNX Runtime): [`text`], [`schedule`], [`latents`], [`noise`], [`image_out`].
//! [`runtime`] is the only module that touches `ort`; [`model`] resolves a model folder into graphs and
//! settings; [`pipeline`] wires the stages together.

pub mod bench;
pub mod error;
pub mod image_out;
pub mod latents;
pub mod noise;
pub mod schedule;
pub mod text;

pub use error::{Error, ErrorKind, Result};
pub mod model;
pub mod pipeline;
pub mod runtime;
pub mod serve;
