//! The device-resident denoising loop: the Euler update `x + dt * v` as a tiny ONNX graph (built at run time
//! with ONNX Runtime's Model Editor API) on the transformer's execution provider, so latents, embeddings and ids
//! stay in device memory for the whole loop and only a NaN/Inf count comes back per step.
//!
//! - [`StepGraph`]: the update graph. Inputs `x` f32 `[B, S, C]`, `v` (the transformer output's element type),
//!   `dt` f32 `[1]`, `t` f32 `[R]` (the next model timestep, one per transformer row), and with true CFG `scale`
//!   f32 `[1]`. Outputs `x_next = x + dt * v` (f32, Mul then Add, the order of [`crate::schedule::euler_step`], so
//!   CPU results are bit-identical), `x_model` (`x_next` in the transformer's `hidden_states` type, doubled to
//!   `[x; x]` with CFG; an Identity copy for f32), `t_model` (`t` in the transformer's `timestep` type: fp16
//!   exports take an fp16 timestep), `bad_v` / `bad_x` (int64 counts of
//!   NaN/Inf in the velocity and the new latents) and `x_host` (a copy of `x_next`, bound to host memory only when
//!   the latents must come back).
//! - [`DeviceDenoise`]: the I/O bindings of the transformer and the step graph. The transformer only ever reads
//!   fixed device buffers (latents `x_model`, timestep, text embeddings, pooled vector, ids, guidance, LoRA
//!   factors) and writes one fixed velocity buffer, for every step and every later generation that reuses the
//!   loop, because a session with CUDA graphs replays the device addresses of its capture run. The step graph
//!   (its own session, never with CUDA graphs) ping-pongs the f32 latents and refreshes `x_model` and the timestep
//!   in place for the next transformer run.
//! - [`DeviceLoop`] (`--device-loop auto|on|off`), [`loop_plan`] (which loop a generation must run; CUDA graphs
//!   require the device loop) and [`LoopKind`] (which loop ran, for reports).

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use ndarray::ArrayViewD;
use ort::editor::{Graph as EditorGraph, Model, Node, Opset, ONNX_DOMAIN};
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::operator::Attribute;
use ort::session::{IoBinding, Session};
use ort::value::{
    DynTensor, DynValue, Outlet, Shape, SymbolicDimensions, Tensor, TensorElementType, ValueType,
};

use super::library;
use super::providers;
use super::session::{Graph, SessionConfig};
use super::types::{ElemType, Provider, TensorIn};
use crate::{Error, Result};

/// `--device-loop`: whether the denoising loop keeps its tensors in device memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceLoop {
    /// On for GPU providers (CUDA, TensorRT, DirectML, ROCm, MIGraphX, CoreML), off on CPU, where the host I/O
    /// binding loop already allocates nothing per step.
    #[default]
    Auto,
    On,
    Off,
}

impl DeviceLoop {
    pub fn name(self) -> &'static str {
        match self {
            DeviceLoop::Auto => "auto",
            DeviceLoop::On => "on",
            DeviceLoop::Off => "off",
        }
    }

    /// Whether the device loop should run with these active providers (in priority order).
    pub fn wanted(self, active: &[Provider]) -> bool {
        match self {
            DeviceLoop::On => true,
            DeviceLoop::Off => false,
            DeviceLoop::Auto => gpu_provider(active).is_some(),
        }
    }
}

impl FromStr for DeviceLoop {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(DeviceLoop::Auto),
            "on" | "true" | "1" => Ok(DeviceLoop::On),
            "off" | "false" | "0" => Ok(DeviceLoop::Off),
            other => Err(Error::input(format!(
                "device loop must be auto, on or off, got {other:?}"
            ))),
        }
    }
}

impl fmt::Display for DeviceLoop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which denoising loop a generation ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoopKind {
    /// One plain run per step, latents and velocity through host arrays.
    #[default]
    Plain,
    /// Host I/O binding: inputs bound once, the Euler step on the host.
    HostBound,
    /// Device I/O binding: tensors stay on the device, the Euler step in [`StepGraph`].
    Device,
}

impl LoopKind {
    pub fn name(self) -> &'static str {
        match self {
            LoopKind::Plain => "plain",
            LoopKind::HostBound => "host-bound",
            LoopKind::Device => "device",
        }
    }
}

/// What a generation's denoising loop must be, from [`loop_plan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopPlan {
    /// Try the device loop first.
    pub device: bool,
    /// The device loop must run: whatever keeps it from running is an error, never a fallback to another loop.
    pub required: bool,
    /// It is required because the transformer's session captures CUDA graphs.
    pub cuda_graphs: bool,
}

/// The hint of every error caused by CUDA graphs needing the device loop.
pub const CUDA_GRAPH_HINT: &str =
    "turn CUDA graphs off (--cuda-graph false, --trt-cuda-graph false, or cuda_graph = \
     false in the config file), or use --device-loop on or auto";

/// Which loop to run with `mode` on `active` providers, when the transformer session captures CUDA graphs
/// (`cuda_graphs`, [`super::ep::EpSettings::cuda_graphs`]) or not. A captured graph replays the device
/// addresses of its capture run, and only the device loop keeps every transformer input and output in fixed
/// buffers: with CUDA graphs the device loop is required (`auto` takes it on any provider) and `off` is an error.
pub fn loop_plan(mode: DeviceLoop, active: &[Provider], cuda_graphs: bool) -> Result<LoopPlan> {
    if cuda_graphs {
        if mode == DeviceLoop::Off {
            return Err(Error::input(
                "--device-loop off cannot drive this transformer: its session captures CUDA graphs, which replay \
                 the device addresses of their capture run, and only the device loop keeps the transformer's inputs \
                 and outputs in fixed device buffers",
            )
            .with_hint(CUDA_GRAPH_HINT));
        }
        return Ok(LoopPlan {
            device: true,
            required: true,
            cuda_graphs: true,
        });
    }
    Ok(LoopPlan {
        device: mode.wanted(active),
        required: mode == DeviceLoop::On,
        cuda_graphs: false,
    })
}

/// The first active provider with its own device memory or accelerator, which [`DeviceLoop::Auto`] turns on for.
pub fn gpu_provider(active: &[Provider]) -> Option<Provider> {
    active.iter().copied().find(|p| {
        matches!(
            p,
            Provider::Cuda
                | Provider::TensorRt
                | Provider::DirectMl
                | Provider::Rocm
                | Provider::MiGraphX
                | Provider::CoreMl
        )
    })
}

/// Where the loop's buffers live, by ONNX Runtime allocator name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceMemory {
    /// Host memory: the CPU provider, and CoreML / OpenVINO, whose tensors ONNX Runtime keeps on the host.
    Host,
    /// CUDA device memory (CUDA and TensorRT).
    Cuda,
    /// DirectML device memory.
    DirectMl,
    /// HIP device memory (ROCm and MIGraphX).
    Hip,
}

impl DeviceMemory {
    /// The memory of the first provider that has its own, else host memory.
    pub fn of(active: &[Provider]) -> DeviceMemory {
        for p in active {
            match p {
                Provider::Cuda | Provider::TensorRt => return DeviceMemory::Cuda,
                Provider::DirectMl => return DeviceMemory::DirectMl,
                Provider::Rocm | Provider::MiGraphX => return DeviceMemory::Hip,
                _ => {}
            }
        }
        DeviceMemory::Host
    }

    pub fn name(self) -> &'static str {
        match self {
            DeviceMemory::Host => "host",
            DeviceMemory::Cuda => "cuda",
            DeviceMemory::DirectMl => "directml",
            DeviceMemory::Hip => "hip",
        }
    }

    fn memory_info(self, device_id: i32) -> ort::Result<MemoryInfo<'static>> {
        let device = match self {
            DeviceMemory::Host => AllocationDevice::CPU,
            DeviceMemory::Cuda => AllocationDevice::CUDA,
            DeviceMemory::DirectMl => AllocationDevice::DIRECTML,
            DeviceMemory::Hip => AllocationDevice::HIP,
        };
        let id = if self == DeviceMemory::Host {
            0
        } else {
            device_id
        };
        MemoryInfo::new(device, id, AllocatorType::Device, MemoryType::Default)
    }
}

/// The providers the step graph is built with: the transformer's, with TensorRT replaced by CUDA where this build
/// has it (same device memory; a TensorRT engine for four element-wise nodes is not worth building).
pub fn step_providers(active: &[Provider]) -> Vec<Provider> {
    let mut out = Vec::new();
    for &p in active {
        let p = if p == Provider::TensorRt && providers::compiled_in(Provider::Cuda) {
            Provider::Cuda
        } else {
            p
        };
        if !out.contains(&p) {
            out.push(p);
        }
    }
    if out.is_empty() {
        out.push(Provider::Cpu);
    }
    out
}

/// What a step graph is built for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepSpec {
    /// The transformer's `hidden_states` element type (`x_model`'s type).
    pub model_in: ElemType,
    /// The transformer's velocity output element type (`v`'s type).
    pub velocity: ElemType,
    /// The transformer's `timestep` element type (`t_model`'s type).
    pub timestep: ElemType,
    /// True CFG: `v` is `[2B, S, C]` (prompt rows, then negative rows), combined as `v_neg + scale * (v_pos - v_neg)`
    /// before the step, and `x_model` is `[x; x]`.
    pub cfg: bool,
}

/// The ONNX `TensorProto.DataType` of a float element type the step graph supports.
fn onnx_type(t: &ElemType) -> Option<(i64, TensorElementType)> {
    match t {
        ElemType::F32 => Some((1, TensorElementType::Float32)),
        ElemType::F16 => Some((10, TensorElementType::Float16)),
        ElemType::BF16 => Some((16, TensorElementType::Bfloat16)),
        _ => None,
    }
}

/// Why a transformer cannot run the device loop (`None`: it can): latents, velocity and timestep must be f32,
/// f16 or bf16.
pub fn unsupported(spec: &StepSpec) -> Option<String> {
    for (what, t) in [
        ("hidden_states", &spec.model_in),
        ("velocity output", &spec.velocity),
        ("timestep", &spec.timestep),
    ] {
        if onnx_type(t).is_none() {
            return Some(format!(
                "the transformer's {what} is {t}; the device loop needs f32, f16 or bf16"
            ));
        }
    }
    None
}

fn tensor_type<S: AsRef<str>>(ty: TensorElementType, dims: &[S]) -> ValueType {
    ValueType::Tensor {
        ty,
        shape: Shape::new(dims.iter().map(|_| -1i64)),
        dimension_symbols: SymbolicDimensions::new(dims.iter().map(|s| s.as_ref().to_string())),
    }
}

fn scalar_i64() -> ValueType {
    ValueType::Tensor {
        ty: TensorElementType::Int64,
        shape: Shape::new([]),
        dimension_symbols: SymbolicDimensions::empty(0),
    }
}

/// A model of `g` in ONNX opset 18 (the step and upload graphs share it).
fn opset18_model(g: EditorGraph) -> ort::Result<Model> {
    let mut model = Model::new([Opset::new(ONNX_DOMAIN, 18)?])?;
    model.set_graph(g)?;
    Ok(model)
}

/// The step graph's model, node by node.
fn build_model(spec: &StepSpec) -> ort::Result<Model> {
    let (_, vty) = onnx_type(&spec.velocity).ok_or_else(|| ort::Error::new("velocity type"))?;
    let (mto, mty) = onnx_type(&spec.model_in).ok_or_else(|| ort::Error::new("latent type"))?;
    let (tto, tty) = onnx_type(&spec.timestep).ok_or_else(|| ort::Error::new("timestep type"))?;
    let f32_t = TensorElementType::Float32;
    let mut g = EditorGraph::new()?;
    let mut inputs = vec![
        Outlet::new("x", tensor_type(f32_t, &["B", "S", "C"])),
        Outlet::new(
            "v",
            tensor_type(vty, &[if spec.cfg { "B2" } else { "B" }, "S", "C"]),
        ),
        Outlet::new("dt", tensor_type(f32_t, &["one"])),
        Outlet::new("t", tensor_type(f32_t, &["R"])),
    ];
    if spec.cfg {
        inputs.push(Outlet::new("scale", tensor_type(f32_t, &["one"])));
    }
    g.set_inputs(inputs)?;
    // x_model and t_model are written into the transformer's fixed input buffers for its next run.
    let mut outputs = vec![
        Outlet::new("x_next", tensor_type(f32_t, &["B", "S", "C"])),
        Outlet::new(
            "x_model",
            tensor_type(mty, &[if spec.cfg { "B2" } else { "B" }, "S", "C"]),
        ),
        Outlet::new("t_model", tensor_type(tty, &["R"])),
    ];
    outputs.push(Outlet::new("bad_v", scalar_i64()));
    outputs.push(Outlet::new("bad_x", scalar_i64()));
    outputs.push(Outlet::new("x_host", tensor_type(f32_t, &["B", "S", "C"])));
    g.set_outputs(outputs)?;

    let node = |op: &str, name: &str, ins: &[&str], outs: &[&str], attrs: Vec<Attribute>| {
        Node::new(op, ONNX_DOMAIN, name, ins, outs, attrs)
    };
    let int = |k: &str, v: i64| Attribute::new(k, v);
    // The velocity in f32, as the plain loop converts it on the host.
    let v32 = if spec.velocity == ElemType::F32 {
        "v"
    } else {
        g.add_node(node(
            "Cast",
            "cast_v",
            &["v"],
            &["v32"],
            vec![int("to", 1)?],
        )?)?;
        "v32"
    };
    // True CFG: v_neg + scale * (v_pos - v_neg), crate::guidance::combine's order.
    let v = if spec.cfg {
        g.add_node(node(
            "Split",
            "split_cfg",
            &[v32],
            &["v_pos", "v_neg"],
            vec![int("axis", 0)?, int("num_outputs", 2)?],
        )?)?;
        g.add_node(node(
            "Sub",
            "cfg_diff",
            &["v_pos", "v_neg"],
            &["v_diff"],
            vec![],
        )?)?;
        g.add_node(node(
            "Mul",
            "cfg_scale",
            &["scale", "v_diff"],
            &["v_scaled"],
            vec![],
        )?)?;
        g.add_node(node(
            "Add",
            "cfg_add",
            &["v_neg", "v_scaled"],
            &["v_cfg"],
            vec![],
        )?)?;
        "v_cfg"
    } else {
        v32
    };
    // x + dt * v: Mul, then Add, as schedule::euler_step.
    g.add_node(node("Mul", "dt_v", &["dt", v], &["dv"], vec![])?)?;
    g.add_node(node("Add", "step", &["x", "dv"], &["x_next"], vec![])?)?;
    let both = if spec.cfg {
        g.add_node(node(
            "Concat",
            "cfg_both",
            &["x_next", "x_next"],
            &["x_both"],
            vec![int("axis", 0)?],
        )?)?;
        "x_both"
    } else {
        "x_next"
    };
    // Into the transformer's input types (the host loop's conversion: round to nearest even). A copy even for f32:
    // x_next ping-pongs, the transformer's input buffers stay put.
    for (from, to, elem, onnx) in [
        (both, "x_model", &spec.model_in, mto),
        ("t", "t_model", &spec.timestep, tto),
    ] {
        g.add_node(if *elem == ElemType::F32 {
            node("Identity", &format!("{to}_id"), &[from], &[to], vec![])?
        } else {
            node(
                "Cast",
                &format!("{to}_cast"),
                &[from],
                &[to],
                vec![int("to", onnx)?],
            )?
        })?;
    }
    // NaN/Inf counts, the only values read back every step.
    for (t, out) in [(v, "bad_v"), ("x_next", "bad_x")] {
        let p = |s: &str| format!("{out}_{s}");
        g.add_node(node("IsNaN", &p("nan"), &[t], &[&p("nan")], vec![])?)?;
        g.add_node(node("IsInf", &p("inf"), &[t], &[&p("inf")], vec![])?)?;
        g.add_node(node(
            "Or",
            &p("or"),
            &[&p("nan"), &p("inf")],
            &[&p("or")],
            vec![],
        )?)?;
        g.add_node(node(
            "Cast",
            &p("cast"),
            &[&p("or")],
            &[&p("i64")],
            vec![int("to", 7)?],
        )?)?;
        g.add_node(node(
            "ReduceSum",
            &p("sum"),
            &[&p("i64")],
            &[out],
            vec![int("keepdims", 0)?],
        )?)?;
    }
    g.add_node(node(
        "Identity",
        "x_host_id",
        &["x_next"],
        &["x_host"],
        vec![],
    )?)?;
    opset18_model(g)
}

/// The Euler update as an ONNX Runtime session on the transformer's providers.
pub struct StepGraph {
    session: Session,
    spec: StepSpec,
    providers: Vec<Provider>,
    /// What it was built with (providers, GPU, threads), for the loop's upload session.
    cfg: SessionConfig,
}

impl fmt::Debug for StepGraph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepGraph")
            .field("spec", &self.spec)
            .field("providers", &self.providers)
            .finish()
    }
}

/// One host run of a step graph (tests and diagnostics).
#[derive(Debug, Clone)]
pub struct StepOut {
    pub x_next: Vec<f32>,
    /// `x_model` as f32.
    pub x_model: Vec<f32>,
    pub bad_v: i64,
    pub bad_x: i64,
}

impl StepGraph {
    /// Builds the step graph for `spec` on `cfg`'s providers ([`step_providers`]).
    pub fn build(spec: &StepSpec, cfg: &SessionConfig) -> Result<StepGraph> {
        if let Some(why) = unsupported(spec) {
            return Err(Error::model(why));
        }
        let (session, providers) = editor_session(
            &format!("the denoising step graph ({spec:?})"),
            cfg,
            &|| build_model(spec),
        )?;
        Ok(StepGraph {
            session,
            spec: spec.clone(),
            providers,
            cfg: cfg.clone(),
        })
    }

    pub fn spec(&self) -> &StepSpec {
        &self.spec
    }

    pub fn providers(&self) -> &[Provider] {
        &self.providers
    }

    /// One plain run on host arrays: `x` `[B, S, C]`, `v` (f32 values, converted to the velocity type) `[B or 2B,
    /// S, C]`, `dt`, and the CFG `scale` (ignored without CFG).
    pub fn run_host(
        &mut self,
        x: ArrayViewD<f32>,
        v: ArrayViewD<f32>,
        dt: f32,
        scale: f32,
    ) -> Result<StepOut> {
        let fail =
            |e: ort::Error| Error::runtime(format!("running the denoising step graph failed: {e}"));
        let mut feed: Vec<(&str, DynValue)> = vec![
            (
                "x",
                Tensor::from_array(x.to_owned()).map_err(fail)?.into_dyn(),
            ),
            ("v", host_value(&self.spec.velocity, v).map_err(fail)?),
            (
                "dt",
                Tensor::from_array(([1usize], vec![dt]))
                    .map_err(fail)?
                    .into_dyn(),
            ),
            (
                "t",
                Tensor::from_array(([1usize], vec![0.0f32]))
                    .map_err(fail)?
                    .into_dyn(),
            ),
        ];
        if self.spec.cfg {
            feed.push((
                "scale",
                Tensor::from_array(([1usize], vec![scale]))
                    .map_err(fail)?
                    .into_dyn(),
            ));
        }
        let outs = self.session.run(feed).map_err(fail)?;
        let f32s = |name: &str| -> Result<Vec<f32>> {
            let Some(v) = outs.get(name) else {
                return Ok(Vec::new());
            };
            let ty = match v.dtype() {
                ValueType::Tensor { ty, .. } => *ty,
                _ => TensorElementType::Float32,
            };
            Ok(match ty {
                TensorElementType::Float16 => v
                    .try_extract_tensor::<half::f16>()
                    .map_err(fail)?
                    .1
                    .iter()
                    .map(|h| h.to_f32())
                    .collect(),
                TensorElementType::Bfloat16 => v
                    .try_extract_tensor::<half::bf16>()
                    .map_err(fail)?
                    .1
                    .iter()
                    .map(|h| h.to_f32())
                    .collect(),
                _ => v.try_extract_tensor::<f32>().map_err(fail)?.1.to_vec(),
            })
        };
        let count = |name: &str| -> Result<i64> {
            Ok(outs[name].try_extract_tensor::<i64>().map_err(fail)?.1[0])
        };
        Ok(StepOut {
            x_next: f32s("x_next")?,
            x_model: f32s("x_model")?,
            bad_v: count("bad_v")?,
            bad_x: count("bad_x")?,
        })
    }
}

/// A session of a model built with the Model Editor (`what` names it in errors) on `cfg`'s providers
/// ([`step_providers`]). Never with CUDA graphs: the provider options come without a graph role, which keeps them
/// off (their sessions get no [`super::ep::GraphOptions`]); these graphs read host scalars and ping-pong buffers.
fn editor_session(
    what: &str,
    cfg: &SessionConfig,
    model: &dyn Fn() -> ort::Result<Model>,
) -> Result<(Session, Vec<Provider>)> {
    let lib = library::init(None)?;
    let active = step_providers(&cfg.providers.active);
    let mut eps = Vec::new();
    for p in active.iter().copied().filter(|p| *p != Provider::Cpu) {
        match providers::dispatch(p, &cfg.ep, None)? {
            Some(d) => eps.push(d),
            None => {
                return Err(Error::provider(format!(
                    "{what}: execution provider {p} is not compiled into this fluxrt binary"
                ))
                .with_hint("rebuild with the provider's feature, or run with --device-loop off"))
            }
        }
    }
    let needs = super::ep::session_overrides(&active);
    let threads = super::session::intra_threads(cfg.threads);
    let make = || -> ort::Result<Session> {
        let mut b = Session::builder(lib.env())?.with_intra_threads(threads)?;
        if needs.no_memory_pattern {
            b = b.with_memory_pattern(false)?;
        }
        if needs.sequential_execution {
            b = b.with_parallel_execution(false)?;
        }
        if !eps.is_empty() {
            b = b.with_execution_providers(eps.clone())?;
        }
        model()?.into_session(&b)
    };
    let session = make().map_err(|e| {
        Error::runtime(format!(
            "cannot build {what} with ONNX Runtime's model editor on {}: {e}",
            active
                .iter()
                .map(|p| p.name())
                .collect::<Vec<_>>()
                .join(", ")
        ))
        .with_hint("run with --device-loop off to use the host loop")
    })?;
    Ok((session, active))
}

fn host_value(t: &ElemType, a: ArrayViewD<f32>) -> ort::Result<DynValue> {
    Ok(match t {
        ElemType::F16 => Tensor::from_array(a.mapv(half::f16::from_f32))?.into_dyn(),
        ElemType::BF16 => Tensor::from_array(a.mapv(half::bf16::from_f32))?.into_dyn(),
        _ => Tensor::from_array(a.as_standard_layout().into_owned())?.into_dyn(),
    })
}

/// A host tensor of `shape` (the last values of the loop's bound outputs land here).
fn host_tensor<T>(shape: &[usize]) -> ort::Result<Tensor<T>>
where
    T: ort::value::PrimitiveTensorElementType + fmt::Debug,
{
    Tensor::<T>::new(&Allocator::default(), shape.to_vec())
}

/// Names of the transformer's inputs and output the device loop drives (the graph's own names).
#[derive(Debug, Clone)]
pub struct LoopNames {
    pub latents: String,
    pub timestep: String,
    pub velocity: String,
}

/// What one device step reports.
#[derive(Debug, Clone, Default)]
pub struct StepReport {
    /// NaN/Inf values in the (combined) velocity and in the new latents.
    pub bad_velocity: u64,
    pub bad_latents: u64,
    /// Values in the latents (for messages).
    pub latents_len: usize,
    /// The new latents, when they were asked for (trace or last step).
    pub latents: Option<Vec<f32>>,
    /// Time inside the step graph's run (the transformer's is counted by its [`Graph`]).
    pub ort_time: Duration,
}

/// The transformer's inputs other than the latents and the timestep (text embeddings, pooled vector, ids,
/// guidance, LoRA factors), checked and converted to their declared types on the host, ready to be written into
/// the loop's fixed device buffers ([`DeviceDenoise::constants`]).
pub struct LoopConstants {
    values: Vec<(String, DynValue)>,
    layout: Vec<(String, TensorElementType, Vec<i64>)>,
}

impl fmt::Debug for LoopConstants {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoopConstants")
            .field("layout", &self.layout)
            .finish()
    }
}

/// The identity copies that write host values into the loop's fixed device buffers (one input `in{i}` and output
/// `out{i}` per buffer), on the step graph's providers: the constants of each generation go into the same buffers.
fn build_upload_model(layout: &[(String, TensorElementType, Vec<i64>)]) -> ort::Result<Model> {
    let mut g = EditorGraph::new()?;
    let outlets = |prefix: &str| -> Vec<Outlet> {
        layout
            .iter()
            .enumerate()
            .map(|(i, (_, ty, shape))| {
                let dims: Vec<String> = (0..shape.len()).map(|d| format!("d{i}_{d}")).collect();
                Outlet::new(format!("{prefix}{i}"), tensor_type(*ty, &dims))
            })
            .collect()
    };
    g.set_inputs(outlets("in"))?;
    g.set_outputs(outlets("out"))?;
    for i in 0..layout.len() {
        let (a, b) = (format!("in{i}"), format!("out{i}"));
        g.add_node(Node::new(
            "Identity",
            ONNX_DOMAIN,
            format!("copy{i}"),
            [a.as_str()],
            [b.as_str()],
            vec![],
        )?)?;
    }
    opset18_model(g)
}

/// The device loop's I/O bindings. The transformer's binding only ever sees fixed buffers: `xm` (its latents, in
/// its own type, `[2B, S, C]` with CFG), `tm` (its timestep), `consts` (every other input) and `v` (its velocity
/// output). They keep their device addresses for the whole loop and for every later generation that reuses this
/// loop ([`DeviceDenoise::fits`], [`DeviceDenoise::restart`]): with CUDA graphs, ONNX Runtime captures the
/// transformer's kernels with the addresses of an early run and replays them, so any other address would be read
/// stale or written past. The step graph (its own session, without CUDA graphs) ping-pongs the f32 latents between
/// `x[0]` and `x[1]`, reads the velocity, and writes the next `xm` and `tm` in place. Host scalars (`dt`, the next
/// timestep, the CFG scale) go to the step graph only. The buffers come from the step graph session's allocator,
/// so they never share the transformer's arena (whose chunks a captured graph may reuse for its intermediates).
/// On the CPU provider the "device" is host memory and the same code runs.
pub struct DeviceDenoise {
    step: StepGraph,
    upload: Session,
    names: LoopNames,
    memory: DeviceMemory,
    /// The transformer session the binding belongs to (its address).
    session: usize,
    tio: IoBinding,
    sio: IoBinding,
    /// f32 latents `[B, S, C]`, ping-pong (step graph only).
    x: [DynTensor; 2],
    /// The transformer's latents, fixed.
    xm: DynTensor,
    /// The transformer's timestep `[R]`, fixed.
    tm: DynTensor,
    /// The transformer's velocity output, fixed.
    v: DynTensor,
    /// The transformer's other inputs, fixed, by input name.
    consts: Vec<(String, DynTensor)>,
    layout: Vec<(String, TensorElementType, Vec<i64>)>,
    shape: Vec<usize>,
    /// Host: the starting latents, the zero velocity of the first update, and the step graph's scalars.
    x0: Tensor<f32>,
    zero_v: DynValue,
    t_next: Tensor<f32>,
    dt: Tensor<f32>,
    scale: Option<Tensor<f32>>,
    bad_v: Tensor<i64>,
    bad_x: Tensor<i64>,
    x_host: Tensor<f32>,
    /// Which `x` buffer holds the current latents.
    cur: usize,
    /// The timestep `tm` holds; `None` until the first update of a generation has filled `xm` and `tm`.
    t_model: Option<f32>,
    /// Transformer runs through this binding.
    runs: u64,
    latents_len: usize,
}

impl fmt::Debug for DeviceDenoise {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceDenoise")
            .field("step", &self.step)
            .field("memory", &self.memory)
            .field("names", &self.names)
            .field("shape", &self.shape)
            .field("runs", &self.runs)
            .finish()
    }
}

fn loop_error(mem: &'static str, what: &str) -> impl Fn(ort::Error) -> Error {
    let what = what.to_string();
    move |e: ort::Error| {
        Error::runtime(format!("device loop ({mem} memory): {what}: {e}"))
            .with_hint(
                "run with --device-loop off to use the host loop (with CUDA graphs off: they need the device loop)",
            )
    }
}

fn session_id(graph: &Graph) -> usize {
    use ort::AsPointer;
    graph.session().ptr() as usize
}

impl DeviceDenoise {
    /// Checks and converts the transformer's other inputs (`constants`: graph names) for [`DeviceDenoise::new`],
    /// [`DeviceDenoise::fits`] and [`DeviceDenoise::restart`].
    pub fn constants(transformer: &Graph, constants: &[(&str, TensorIn)]) -> Result<LoopConstants> {
        let mut values = Vec::with_capacity(constants.len());
        let mut layout = Vec::with_capacity(constants.len());
        for (name, t) in constants {
            let value = transformer.input_value(name, t)?;
            let (ty, shape) = match value.dtype() {
                ValueType::Tensor { ty, shape, .. } => (*ty, shape.to_vec()),
                other => {
                    return Err(Error::runtime(format!(
                        "device loop: input {name} is not a tensor ({other:?})"
                    )))
                }
            };
            layout.push((name.to_string(), ty, shape));
            values.push((name.to_string(), value));
        }
        Ok(LoopConstants { values, layout })
    }

    /// Allocates the loop's fixed device buffers, writes the constants into them and binds the transformer's
    /// inputs and output once. `x0` is the starting latents `[B, S, C]`; `cfg_scale` turns on true CFG (the step
    /// graph must be built for it); `device_id` is the GPU.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        transformer: &Graph,
        step: StepGraph,
        names: LoopNames,
        x0: ArrayViewD<f32>,
        constants: &LoopConstants,
        cfg_scale: Option<f32>,
        device_id: i32,
    ) -> Result<DeviceDenoise> {
        let spec = step.spec.clone();
        if spec.cfg != cfg_scale.is_some() {
            return Err(Error::runtime(
                "the step graph and the loop disagree about true CFG",
            ));
        }
        let shape = x0.shape().to_vec();
        if shape.len() != 3 {
            return Err(Error::runtime(format!(
                "the device loop needs latents [B, S, C], got {shape:?}"
            )));
        }
        let rows = if spec.cfg { 2 * shape[0] } else { shape[0] };
        let model_shape = [rows, shape[1], shape[2]];
        let memory = DeviceMemory::of(&step.providers);
        let mem = memory.name();
        let err = |what: &str| loop_error(mem, what);
        let info = memory
            .memory_info(device_id)
            .map_err(err("cannot describe device memory"))?;
        // The step graph's allocator: the buffers stay out of the transformer's arena.
        let alloc = Allocator::new(&step.session, info)
            .map_err(err("cannot get the step graph's device allocator"))?;
        let (_, mty) = onnx_type(&spec.model_in).expect("checked by StepGraph::build");
        let (_, vty) = onnx_type(&spec.velocity).expect("checked by StepGraph::build");
        let (_, tty) = onnx_type(&spec.timestep).expect("checked by StepGraph::build");
        let new = |ty: TensorElementType, s: &[usize]| {
            DynTensor::new(&alloc, ty, s.to_vec()).map_err(err("cannot allocate a device buffer"))
        };
        let x = [
            new(TensorElementType::Float32, &shape)?,
            new(TensorElementType::Float32, &shape)?,
        ];
        let xm = new(mty, &model_shape)?;
        let tm = new(tty, &[rows])?;
        let v = new(vty, &model_shape)?;
        let mut consts = Vec::with_capacity(constants.layout.len());
        for (name, ty, dims) in &constants.layout {
            let dims: Vec<usize> = dims.iter().map(|&d| d.max(0) as usize).collect();
            consts.push((name.clone(), new(*ty, &dims)?));
        }
        // On the step graph's providers and GPU (the same device memory as the buffers).
        let (upload, _) = editor_session("the device loop's input upload", &step.cfg, &|| {
            build_upload_model(&constants.layout)
        })?;
        let zeros = ndarray::ArrayD::<f32>::zeros(ndarray::IxDyn(&model_shape));
        let zero_v = host_value(&spec.velocity, zeros.view())
            .map_err(err("cannot allocate a host buffer"))?;
        let host =
            |s: &[usize]| host_tensor::<f32>(s).map_err(err("cannot allocate a host buffer"));
        let tio = transformer
            .session()
            .create_binding()
            .map_err(err("cannot create the transformer's binding"))?;
        let sio = step
            .session
            .create_binding()
            .map_err(err("cannot create the step graph's binding"))?;
        let mut dd = DeviceDenoise {
            x0: host(&shape)?,
            zero_v,
            t_next: host(&[rows])?,
            dt: host(&[1])?,
            scale: None,
            bad_v: host_tensor::<i64>(&[]).map_err(err("cannot allocate a host buffer"))?,
            bad_x: host_tensor::<i64>(&[]).map_err(err("cannot allocate a host buffer"))?,
            x_host: host(&shape)?,
            session: session_id(transformer),
            step,
            upload,
            names,
            memory,
            tio,
            sio,
            x,
            xm,
            tm,
            v,
            consts,
            layout: constants.layout.clone(),
            shape: shape.clone(),
            cur: 0,
            t_model: None,
            runs: 0,
            latents_len: shape.iter().product(),
        };
        // The transformer's binding: its latents, timestep and velocity buffers, the same ones for every run.
        let names = dd.names.clone();
        dd.tio
            .bind_input(names.latents.as_str(), &dd.xm)
            .map_err(err("cannot bind the latents"))?;
        dd.tio
            .bind_input(names.timestep.as_str(), &dd.tm)
            .map_err(err("cannot bind the timestep"))?;
        dd.tio
            .bind_output(names.velocity.as_str(), &mut dd.v)
            .map_err(err("cannot bind the velocity output"))?;
        dd.restart(transformer, x0, constants, cfg_scale)?;
        Ok(dd)
    }

    /// Whether this loop's buffers fit a new generation on `transformer` (the same session, step graph, latent
    /// shape and constant shapes), so [`DeviceDenoise::restart`] can reuse them at the same addresses.
    pub fn fits(
        &self,
        transformer: &Graph,
        spec: &StepSpec,
        x0_shape: &[usize],
        constants: &LoopConstants,
    ) -> bool {
        self.session == session_id(transformer)
            && self.step.spec == *spec
            && self.shape == x0_shape
            && self.layout == constants.layout
    }

    /// Starts a generation in this loop's buffers: writes the constants into their fixed buffers (the same
    /// addresses), takes the starting latents and the CFG scale. The first [`DeviceDenoise::step`] fills the
    /// transformer's latents and timestep. The caller checks [`DeviceDenoise::fits`] first.
    pub fn restart(
        &mut self,
        transformer: &Graph,
        x0: ArrayViewD<f32>,
        constants: &LoopConstants,
        cfg_scale: Option<f32>,
    ) -> Result<()> {
        let mem = self.memory.name();
        let err = |what: &str| loop_error(mem, what);
        if self.session != session_id(transformer)
            || self.layout != constants.layout
            || self.shape != x0.shape()
            || self.step.spec.cfg != cfg_scale.is_some()
        {
            return Err(Error::runtime(
                "device loop: the new generation does not fit the loop's buffers",
            ));
        }
        // Upload: host values into the fixed buffers.
        let mut up = self
            .upload
            .create_binding()
            .map_err(err("cannot create the upload binding"))?;
        for (i, ((_, value), (_, buf))) in constants.values.iter().zip(&mut self.consts).enumerate()
        {
            up.bind_input(format!("in{i}"), value)
                .map_err(err("cannot bind an input to upload"))?;
            up.bind_output(format!("out{i}"), buf)
                .map_err(err("cannot bind a device buffer"))?;
        }
        self.upload
            .run_binding(&up)
            .map(drop)
            .map_err(err("copying the transformer's inputs to the device failed"))?;
        drop(up);
        // Bound again each generation, the same buffers at the same addresses: an input the transformer reads on
        // another device (a host node) is copied at bind time and would otherwise keep the last generation's values.
        for (name, buf) in &self.consts {
            self.tio
                .bind_input(name.as_str(), buf)
                .map_err(err(&format!("cannot bind input {name}")))?;
        }
        self.x0
            .extract_tensor_mut()
            .1
            .iter_mut()
            .zip(x0.iter())
            .for_each(|(d, &s)| *d = s);
        if let Some(s) = cfg_scale {
            let mut scale =
                host_tensor::<f32>(&[1]).map_err(err("cannot allocate a host buffer"))?;
            scale.extract_tensor_mut().1[0] = s;
            self.sio
                .bind_input("scale", &scale)
                .map_err(err("cannot bind the CFG scale"))?;
            self.scale = Some(scale);
        }
        self.t_model = None;
        self.cur = 0;
        Ok(())
    }

    /// Gives the step graph back (to keep for the next generation), dropping the buffers and bindings.
    pub fn into_step_graph(self) -> StepGraph {
        self.step
    }

    /// Where the loop's buffers live.
    pub fn memory(&self) -> DeviceMemory {
        self.memory
    }

    /// The step graph's providers.
    pub fn step_providers(&self) -> &[Provider] {
        &self.step.providers
    }

    /// Transformer runs through this binding, over every generation.
    pub fn transformer_runs(&self) -> u64 {
        self.runs
    }

    /// The device addresses of the transformer's bound inputs and output, by graph name: the same for every step
    /// and every generation of this loop (what CUDA graphs need). For diagnostics and tests.
    pub fn transformer_buffers(&self) -> Vec<(String, usize)> {
        let mut out = vec![
            (self.names.latents.clone(), self.xm.data_ptr() as usize),
            (self.names.timestep.clone(), self.tm.data_ptr() as usize),
            (self.names.velocity.clone(), self.v.data_ptr() as usize),
        ];
        out.extend(
            self.consts
                .iter()
                .map(|(n, t)| (n.clone(), t.data_ptr() as usize)),
        );
        out
    }

    /// One run of the step graph. `first`: from the host starting latents with a zero velocity and `dt` = -0.0,
    /// so `x_next` is `x0` bit for bit (`x + -0.0 == x` for every x, and the zero velocity keeps NaN out of the
    /// product) and `xm` gets the transformer's first latents; otherwise `x[cur] + dt * v`. Either way `tm` gets
    /// `t`. Returns the step graph's run time.
    fn update(&mut self, first: bool, dt: f32, t: f32, want_latents: bool) -> Result<Duration> {
        let mem = self.memory.name();
        let err = |what: &str| loop_error(mem, what);
        let next = if first { 0 } else { 1 - self.cur };
        if first {
            self.sio.bind_input("x", &self.x0)
        } else {
            self.sio.bind_input("x", &self.x[self.cur])
        }
        .map_err(err("cannot bind the latents to the step"))?;
        if first {
            self.sio.bind_input("v", &self.zero_v)
        } else {
            self.sio.bind_input("v", &self.v)
        }
        .map_err(err("cannot bind the velocity to the step"))?;
        self.dt.extract_tensor_mut().1[0] = if first { -0.0 } else { dt };
        self.sio
            .bind_input("dt", &self.dt)
            .map_err(err("cannot bind dt"))?;
        self.t_next.extract_tensor_mut().1.fill(t);
        self.sio
            .bind_input("t", &self.t_next)
            .map_err(err("cannot bind the timestep"))?;
        self.sio.clear_outputs();
        self.sio
            .bind_output("x_next", &mut self.x[next])
            .map_err(err("cannot bind the new latents"))?;
        self.sio
            .bind_output("x_model", &mut self.xm)
            .map_err(err("cannot bind the model latents"))?;
        self.sio
            .bind_output("t_model", &mut self.tm)
            .map_err(err("cannot bind the model timestep"))?;
        self.sio
            .bind_output("bad_v", &mut self.bad_v)
            .map_err(err("cannot bind the NaN count"))?;
        self.sio
            .bind_output("bad_x", &mut self.bad_x)
            .map_err(err("cannot bind the NaN count"))?;
        if want_latents {
            self.sio
                .bind_output("x_host", &mut self.x_host)
                .map_err(err("cannot bind the host latents"))?;
        }
        let t0 = Instant::now();
        let run = self
            .step
            .session
            .run_binding(&self.sio)
            .map(drop)
            .map_err(err("running the denoising step graph failed"));
        let time = t0.elapsed();
        run?;
        self.cur = next;
        self.t_model = Some(t);
        Ok(time)
    }

    /// One denoising step: the transformer at `timestep` (already in the model's scale) on its fixed buffers, then
    /// `x + dt * v` on the device, which also writes `next_timestep` (`None` on the last step) into the
    /// transformer's timestep buffer. `want_latents` copies the new latents to the host (trace, last step).
    pub fn step(
        &mut self,
        transformer: &mut Graph,
        timestep: f32,
        next_timestep: Option<f32>,
        dt: f32,
        want_latents: bool,
        cancel: &super::Canceller,
    ) -> Result<StepReport> {
        if self.session != session_id(transformer) {
            return Err(Error::runtime(
                "device loop: the binding belongs to another transformer session",
            ));
        }
        let mut ort_time = Duration::ZERO;
        if self.t_model.is_none() {
            ort_time += self.update(true, 0.0, timestep, false)?;
        }
        if self.t_model.map(f32::to_bits) != Some(timestep.to_bits()) {
            return Err(Error::runtime(format!(
                "device loop: the transformer's timestep buffer holds {:?}, the step is at {timestep}",
                self.t_model
            )));
        }
        // The same buffers every run; re-binding them changes no address, and makes ONNX Runtime copy again where
        // the transformer reads an input on another device (where binding copies).
        let mem = self.memory.name();
        let err = |what: &str| loop_error(mem, what);
        self.tio
            .bind_input(self.names.latents.as_str(), &self.xm)
            .map_err(err("cannot bind the latents"))?;
        self.tio
            .bind_input(self.names.timestep.as_str(), &self.tm)
            .map_err(err("cannot bind the timestep"))?;
        transformer.run_io(&self.tio, cancel)?;
        self.runs += 1;
        ort_time += self.update(false, dt, next_timestep.unwrap_or(timestep), want_latents)?;
        Ok(StepReport {
            bad_velocity: self.bad_v.extract_tensor().1[0].max(0) as u64,
            bad_latents: self.bad_x.extract_tensor().1[0].max(0) as u64,
            latents_len: self.latents_len,
            latents: want_latents.then(|| self.x_host.extract_tensor().1.to_vec()),
            ort_time,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::library::tests::test_library;
    use crate::schedule;
    use ndarray::{Array3, ArrayD, IxDyn};

    fn cpu() -> SessionConfig {
        SessionConfig {
            threads: Some(1),
            ..Default::default()
        }
    }

    fn spec(model_in: ElemType, velocity: ElemType, cfg: bool) -> StepSpec {
        StepSpec {
            model_in,
            velocity,
            timestep: ElemType::F32,
            cfg,
        }
    }

    /// Deterministic values with a wide spread of magnitudes and signs.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(12345);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32 - 0.5) * 7.0
            })
            .collect()
    }

    #[test]
    fn step_is_bit_identical_to_euler_step() {
        test_library();
        let mut g = StepGraph::build(&spec(ElemType::F32, ElemType::F32, false), &cpu()).unwrap();
        let (b, s, c) = (2, 5, 8);
        let x = values(b * s * c, 1);
        let v = values(b * s * c, 2);
        for (sigma, sigma_next) in [(1.0f32, 0.75), (0.9884086, 0.97622246), (0.1047209, 0.0)] {
            let xa = ArrayD::from_shape_vec(IxDyn(&[b, s, c]), x.clone()).unwrap();
            let va = ArrayD::from_shape_vec(IxDyn(&[b, s, c]), v.clone()).unwrap();
            let out = g
                .run_host(xa.view(), va.view(), sigma_next - sigma, 0.0)
                .unwrap();
            let mut want = x.clone();
            schedule::euler_step(&mut want, &v, sigma, sigma_next);
            assert_eq!(out.x_next, want, "sigma {sigma} -> {sigma_next}");
            assert_eq!((out.bad_v, out.bad_x), (0, 0));
            // f32 model latents: an exact copy (into the transformer's fixed buffer).
            assert_eq!(out.x_model, want);
        }
    }

    #[test]
    fn f16_velocity_and_latents_are_cast_like_the_host_loop() {
        test_library();
        let mut g = StepGraph::build(&spec(ElemType::F16, ElemType::F16, false), &cpu()).unwrap();
        let x = values(24, 3);
        let v = values(24, 4);
        let xa = ArrayD::from_shape_vec(IxDyn(&[1, 3, 8]), x.clone()).unwrap();
        let va = ArrayD::from_shape_vec(IxDyn(&[1, 3, 8]), v.clone()).unwrap();
        let out = g.run_host(xa.view(), va.view(), -0.25, 0.0).unwrap();
        // The host loop: the f16 velocity read back as f32, the f32 step, then the latents fed as f16.
        let v16: Vec<f32> = v.iter().map(|&a| half::f16::from_f32(a).to_f32()).collect();
        let mut want = x.clone();
        schedule::euler_step(&mut want, &v16, 1.0, 0.75);
        assert_eq!(out.x_next, want);
        let want_model: Vec<f32> = want
            .iter()
            .map(|&a| half::f16::from_f32(a).to_f32())
            .collect();
        assert_eq!(out.x_model, want_model);
    }

    #[test]
    fn cfg_combines_like_guidance_then_steps() {
        test_library();
        let mut g = StepGraph::build(&spec(ElemType::BF16, ElemType::F32, true), &cpu()).unwrap();
        let (b, s, c) = (2, 3, 4);
        let x = values(b * s * c, 5);
        let v = values(2 * b * s * c, 6);
        let xa = ArrayD::from_shape_vec(IxDyn(&[b, s, c]), x.clone()).unwrap();
        let va = ArrayD::from_shape_vec(IxDyn(&[2 * b, s, c]), v.clone()).unwrap();
        let half_len = v.len() / 2;
        let guided = crate::guidance::combine(&v[..half_len], &v[half_len..], 4.0);
        // dt as the caller computes it (sigma_next - sigma), then the host loop's x += dt * v.
        let mut want2 = x.clone();
        schedule::euler_step(&mut want2, &guided, 0.6, 0.5);
        let dt = 0.5f32 - 0.6f32;
        let out = g.run_host(xa.view(), va.view(), dt, 4.0).unwrap();
        assert_eq!(out.x_next, want2);
        // x_model is [x; x] in bf16.
        assert_eq!(out.x_model.len(), 2 * want2.len());
        let as_bf16: Vec<f32> = want2
            .iter()
            .map(|&a| half::bf16::from_f32(a).to_f32())
            .collect();
        assert_eq!(&out.x_model[..want2.len()], &as_bf16[..]);
        assert_eq!(&out.x_model[want2.len()..], &as_bf16[..]);
    }

    #[test]
    fn nan_and_inf_are_counted() {
        test_library();
        let mut g = StepGraph::build(&spec(ElemType::F32, ElemType::F32, false), &cpu()).unwrap();
        let x = Array3::<f32>::from_shape_vec((1, 2, 2), vec![0.0, f32::NAN, 1.0, 2.0])
            .unwrap()
            .into_dyn();
        let v = Array3::<f32>::from_shape_vec((1, 2, 2), vec![f32::INFINITY, 0.0, 1.0, 2.0])
            .unwrap()
            .into_dyn();
        let out = g.run_host(x.view(), v.view(), -0.5, 0.0).unwrap();
        assert_eq!(out.bad_v, 1);
        assert_eq!(out.bad_x, 2, "{:?}", out.x_next);
    }

    #[test]
    fn loop_choice_per_provider() {
        use Provider::*;
        for (active, auto) in [
            (vec![Cpu], false),
            (vec![OpenVino, Cpu], false),
            (vec![Cuda, Cpu], true),
            (vec![TensorRt, Cuda, Cpu], true),
            (vec![DirectMl, Cpu], true),
            (vec![CoreMl, Cpu], true),
            (vec![Rocm, Cpu], true),
            (vec![MiGraphX, Cpu], true),
        ] {
            assert_eq!(DeviceLoop::Auto.wanted(&active), auto, "{active:?}");
            assert!(DeviceLoop::On.wanted(&active));
            assert!(!DeviceLoop::Off.wanted(&active));
        }
        assert_eq!(DeviceMemory::of(&[Cpu]), DeviceMemory::Host);
        assert_eq!(DeviceMemory::of(&[CoreMl, Cpu]), DeviceMemory::Host);
        assert_eq!(DeviceMemory::of(&[TensorRt, Cuda, Cpu]), DeviceMemory::Cuda);
        assert_eq!(DeviceMemory::of(&[DirectMl, Cpu]), DeviceMemory::DirectMl);
        assert_eq!(DeviceMemory::of(&[MiGraphX, Cpu]), DeviceMemory::Hip);
        assert_eq!(step_providers(&[Cpu]), vec![Cpu]);
        let trt = step_providers(&[TensorRt, Cuda, Cpu]);
        if providers::compiled_in(Cuda) {
            assert_eq!(trt, vec![Cuda, Cpu]);
        } else {
            assert_eq!(trt, vec![TensorRt, Cuda, Cpu]);
        }
        assert_eq!("ON".parse::<DeviceLoop>().unwrap(), DeviceLoop::On);
        assert!("sometimes".parse::<DeviceLoop>().is_err());
        assert_eq!(LoopKind::HostBound.name(), "host-bound");
        assert_eq!(
            serde_json::to_string(&LoopKind::HostBound).unwrap(),
            "\"host-bound\""
        );
        assert!(unsupported(&spec(ElemType::I64, ElemType::F32, false)).is_some());
        assert!(unsupported(&spec(ElemType::BF16, ElemType::F16, true)).is_none());
    }

    #[test]
    fn cuda_graphs_require_the_device_loop() {
        use Provider::*;
        for active in [vec![Cuda, Cpu], vec![TensorRt, Cuda, Cpu]] {
            // CUDA graphs: auto and on take the device loop and must not fall back; off is an error.
            for mode in [DeviceLoop::Auto, DeviceLoop::On] {
                let p = loop_plan(mode, &active, true).unwrap();
                assert_eq!(
                    p,
                    LoopPlan {
                        device: true,
                        required: true,
                        cuda_graphs: true
                    },
                    "{mode:?}"
                );
            }
            let e = loop_plan(DeviceLoop::Off, &active, true).unwrap_err();
            assert_eq!(e.kind, crate::ErrorKind::InvalidInput);
            assert!(e.message.contains("CUDA graphs"), "{e}");
            let hint = e.hint.as_deref().unwrap_or_default();
            assert!(
                hint.contains("--cuda-graph false") && hint.contains("--device-loop on or auto"),
                "{hint}"
            );
            // Without CUDA graphs: as before, only `on` is strict.
            let p = loop_plan(DeviceLoop::Auto, &active, false).unwrap();
            assert!(p.device && !p.required && !p.cuda_graphs);
            assert!(!loop_plan(DeviceLoop::Off, &active, false).unwrap().device);
            assert!(loop_plan(DeviceLoop::On, &active, false).unwrap().required);
        }
        let p = loop_plan(DeviceLoop::Auto, &[Cpu], false).unwrap();
        assert!(!p.device && !p.required);
    }

    /// Inputs for the tiny schnell transformer: latents [1, 16, 64], text [1, 256, 16], pooled [1, 8], ids.
    fn tiny_inputs(seed: u32) -> (ArrayD<f32>, Vec<(String, ArrayD<f32>)>) {
        let arr = |shape: &[usize], seed: u32| {
            let n = shape.iter().product();
            ArrayD::from_shape_vec(IxDyn(shape), values(n, seed)).unwrap()
        };
        let x0 = arr(&[1, 16, 64], seed);
        let consts = vec![
            (
                "encoder_hidden_states".to_string(),
                arr(&[1, 256, 16], seed + 1),
            ),
            ("pooled_projections".to_string(), arr(&[1, 8], seed + 2)),
            ("img_ids".to_string(), arr(&[16, 3], seed + 3)),
            ("txt_ids".to_string(), arr(&[256, 3], seed + 4)),
        ];
        (x0, consts)
    }

    #[test]
    fn transformer_buffers_stay_fixed_and_match_plain_runs() {
        test_library();
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models/tiny-flux-schnell/transformer.onnx");
        let mut g = Graph::load(&path, "transformer", &cpu()).unwrap();
        assert!(!g.cuda_graphs());
        let names = LoopNames {
            latents: "hidden_states".into(),
            timestep: "timestep".into(),
            velocity: g.outputs()[0].name.clone(),
        };
        let spec = spec(ElemType::F32, ElemType::F32, false);
        let step = StepGraph::build(&spec, &cpu()).unwrap();
        let sigmas = [1.0f32, 0.7, 0.35, 0.0];
        let cancel = crate::runtime::Canceller::new();
        let mut dd: Option<DeviceDenoise> = None;
        let mut first_fingerprint = None;
        for seed in [10u32, 20] {
            let (x0, consts) = tiny_inputs(seed);
            let feeds: Vec<(&str, TensorIn)> = consts
                .iter()
                .map(|(n, a)| (n.as_str(), TensorIn::F32(a.view())))
                .collect();
            let lc = DeviceDenoise::constants(&g, &feeds).unwrap();
            let d = match dd.take() {
                None => DeviceDenoise::new(
                    &g,
                    StepGraph::build(&spec, &cpu()).unwrap(),
                    names.clone(),
                    x0.view(),
                    &lc,
                    None,
                    0,
                )
                .unwrap(),
                Some(mut d) => {
                    // The second generation reuses the same buffers.
                    assert!(d.fits(&g, &spec, x0.shape(), &lc));
                    d.restart(&g, x0.view(), &lc, None).unwrap();
                    d
                }
            };
            let d = dd.insert(d);
            let fp = first_fingerprint
                .get_or_insert_with(|| d.transformer_buffers())
                .clone();
            assert_eq!(fp.len(), 3 + consts.len());
            // The plain loop: one run per step on host arrays, the Euler step on the host.
            let mut x = x0.clone();
            for i in 0..3 {
                let t = schedule::model_timestep(sigmas[i]);
                let r = d
                    .step(
                        &mut g,
                        t,
                        (i < 2).then(|| schedule::model_timestep(sigmas[i + 1])),
                        sigmas[i + 1] - sigmas[i],
                        true,
                        &cancel,
                    )
                    .unwrap();
                assert_eq!(
                    d.transformer_buffers(),
                    fp,
                    "seed {seed} step {i}: the same buffers"
                );
                let ts = ArrayD::from_elem(IxDyn(&[1]), t);
                let v = {
                    let mut feed: Vec<(&str, TensorIn)> = vec![
                        ("hidden_states", TensorIn::F32(x.view())),
                        ("timestep", TensorIn::F32(ts.view())),
                    ];
                    feed.extend(
                        consts
                            .iter()
                            .map(|(n, a)| (n.as_str(), TensorIn::F32(a.view()))),
                    );
                    g.run(&feed).unwrap().remove(0).1
                };
                schedule::euler_step(
                    x.as_slice_mut().unwrap(),
                    v.as_slice().unwrap(),
                    sigmas[i],
                    sigmas[i + 1],
                );
                assert_eq!(r.latents.as_deref(), x.as_slice(), "seed {seed} step {i}");
                assert_eq!((r.bad_velocity, r.bad_latents), (0, 0));
            }
        }
        let d = dd.unwrap();
        assert_eq!(d.transformer_runs(), 6);
        // Another latent shape does not fit: a new loop (new buffers) is needed.
        let (_, consts) = tiny_inputs(1);
        let feeds: Vec<(&str, TensorIn)> = consts
            .iter()
            .map(|(n, a)| (n.as_str(), TensorIn::F32(a.view())))
            .collect();
        let lc = DeviceDenoise::constants(&g, &feeds).unwrap();
        assert!(!d.fits(&g, &spec, &[1, 16, 32], &lc));
        assert!(!d.fits(
            &g,
            &StepSpec {
                cfg: true,
                ..spec.clone()
            },
            &[1, 16, 64],
            &lc
        ));
        drop(step);
    }
}
