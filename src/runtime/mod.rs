//! The only module that touches `ort`: library discovery, providers, sessions, tensors. It knows nothing of FLUX:
//! graph names, shapes and profiles come from [`crate::model`].
//!
//! - [`types`]: the leaf of plain types ([`Provider`], [`ElemType`], [`Dim`], [`IoInfo`], [`TensorIn`]);
//!   [`cancel`]: [`Canceller`] stops runs from another thread.
//! - [`library`]: finds and loads ONNX Runtime once per process ([`init`]); the `ort` environment lives here.
//! - [`providers`]: what this build and the loaded library support, and [`probe`], which tries each requested
//!   provider once and returns a [`ProviderPlan`].
//! - [`ep`]: provider settings ([`EpSettings`]: `ep::tensorrt`, `ep::cuda`, `ep::directml`, `ep::coreml`) and the
//!   options each provider receives per graph ([`GraphOptions`]); [`profile`]: TensorRT shape profiles.
//! - [`onnx_io`]: a graph's declared inputs, read from the ONNX file's header without a session.
//! - [`optimized_cache`]: CPU sessions' optimized graphs, cached on disk within a size budget.
//! - [`session`]: [`Graph`], one loaded ONNX graph, run with f32/i64 arrays that are converted to the graph's
//!   declared element types (f16, bf16, i32, ...) and back to f32.
//! - [`placement`]: which provider ONNX Runtime really placed each graph's nodes on (from its session log).
//! - [`step_graph`]: the device-resident denoising loop (the Euler step as a run-time ONNX graph on the
//!   transformer's provider; [`DeviceLoop`], [`LoopKind`]).
//!
//! Typical use:
//! ```no_run
//! use fluxrt::runtime::{self, Graph, Provider, SessionConfig, TensorIn};
//! # fn main() -> fluxrt::Result<()> {
//! runtime::init(None)?;
//! let plan = runtime::probe(&runtime::parse_list("cuda,cpu")?, false)?;
//! let cfg = SessionConfig { providers: plan, ..Default::default() };
//! let mut clip = Graph::load("model/clip.opt/model.onnx".as_ref(), "clip", &cfg)?;
//! let ids = ndarray::Array2::<i64>::zeros((1, 77)).into_dyn();
//! let outs = clip.run(&[("input_ids", TensorIn::I64(ids.view()))])?;
//! # Ok(()) }
//! ```

pub mod cancel;
mod convert;
pub mod ep;
pub mod library;
pub mod onnx_io;
pub mod optimized_cache;
pub mod placement;
pub mod profile;
pub mod providers;
pub mod session;
pub mod step_graph;
pub mod types;

pub use cancel::Canceller;
pub use ep::{EpSettings, GraphOptions};
pub use library::{init, OrtLibrary};
pub use optimized_cache::{optimized_cache_dir, optimized_cache_key, CacheUse};
pub use providers::{available_in_library, compiled_in, probe, ProviderPlan};
pub use session::{intra_threads, physical_cores, Binding, Graph, Outputs, SessionConfig};
pub use step_graph::{DeviceLoop, LoopKind};
pub use types::{parse_list, Dim, ElemType, IoInfo, Optimization, Provider, TensorIn};
