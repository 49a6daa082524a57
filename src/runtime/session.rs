//! One ONNX graph, loaded into an ONNX Runtime session, run with f32/i64 arrays whatever its declared types.

use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ndarray::ArrayD;
use ort::ep::ExecutionProviderDispatch;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor};

use super::cancel::Canceller;
use super::convert::{collect_outputs, convert_input};
use super::ep::{self, EpSettings, GraphOptions};
use super::library;
use super::optimized_cache::{load_cached, CacheUse, CACHE_DATA_FILE};
use super::placement::{self, NodeCounts};
use super::providers::{self, ProviderPlan};
use super::types::{given_str, shape_str, Dim, ElemType, IoInfo, Optimization, Provider, TensorIn};
use crate::{Error, ErrorKind, Result};

/// How to build sessions.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Intra-op threads; `None` = `FLUXRT_THREADS`, else the physical cores ([`intra_threads`]).
    pub threads: Option<usize>,
    pub optimization: Optimization,
    /// From [`providers::probe`]; the default is CPU only.
    pub providers: ProviderPlan,
    /// ONNX Runtime's memory pattern planning (off by default, unlike ONNX Runtime: the pattern keeps one block laid
    /// out for all of a run's activations, which raised the bench model's peak at 512x512 from 2330 to 3224 MiB with
    /// no speed gain; benches/NOTES.md).
    pub memory_pattern: bool,
    /// The CPU provider's arena allocator (on by default, as in ONNX Runtime).
    pub cpu_arena: bool,
    /// Folder of the optimized-graph cache ([`optimized_cache_dir`](super::optimized_cache_dir) gives the usual one); `None` turns it off.
    /// Used for CPU-only sessions: the first load writes the optimized graph there, later loads read it back and
    /// skip the optimizer.
    pub optimized_cache: Option<PathBuf>,
    /// GPU provider settings (TensorRT, CUDA, DirectML, CoreML); see [`ep`].
    pub ep: EpSettings,
    /// Per graph, by the label [`Graph::load`] gets: its TensorRT profile and whether it may capture CUDA graphs
    /// (the layer above decides; a graph without an entry gets neither).
    pub graphs: std::collections::BTreeMap<String, GraphOptions>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            threads: None,
            optimization: Optimization::default(),
            providers: ProviderPlan::default(),
            memory_pattern: false,
            cpu_arena: true,
            optimized_cache: None,
            ep: EpSettings::default(),
            graphs: Default::default(),
        }
    }
}

/// The intra-op threads of a session: `requested` when set (and not 0), else `FLUXRT_THREADS` (a positive number;
/// the CLI's `--threads` reads it too and refuses a bad value), else [`physical_cores`].
pub fn intra_threads(requested: Option<usize>) -> usize {
    requested.filter(|&t| t > 0).unwrap_or_else(|| {
        std::env::var("FLUXRT_THREADS")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|&t| t > 0)
            .unwrap_or_else(physical_cores)
    })
}

/// The number of physical cores available to this process (at least 1): logical CPUs the process may use, divided
/// by the SMT width when that can be read (Linux), since ONNX Runtime's kernels gain little from hyper-threads.
pub fn physical_cores() -> usize {
    let logical = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let smt = smt_width().unwrap_or(1).max(1);
    (logical / smt).max(1)
}

fn smt_width() -> Option<usize> {
    // e.g. "0,1" or "0-1" for two hardware threads per core.
    let list =
        std::fs::read_to_string("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list")
            .ok()?;
    let mut n = 0;
    for part in list.trim().split(',') {
        n += match part.split_once('-') {
            Some((a, b)) => {
                b.parse::<usize>()
                    .ok()?
                    .checked_sub(a.parse::<usize>().ok()?)?
                    + 1
            }
            None => 1,
        };
    }
    Some(n)
}

/// A run's outputs: `(name, values as f32)` in the graph's output order, copied out of ONNX Runtime's memory.
pub type Outputs = Vec<(String, ArrayD<f32>)>;

/// A loaded ONNX graph. `run` takes `&mut self`: use one `Graph` per thread, or a `Mutex`.
pub struct Graph {
    session: Session,
    role: String,
    path: PathBuf,
    inputs: Vec<IoInfo>,
    /// Inputs a run may leave out: initializers that are also graph inputs ("overridable initializers", e.g. the
    /// run-time LoRA slots of a transformer export, whose defaults are zero-rank).
    optional: Vec<IoInfo>,
    outputs: Vec<IoInfo>,
    providers: Vec<Provider>,
    /// Nodes per provider as ONNX Runtime placed them ([`placement`]).
    placement: NodeCounts,
    /// Whether the session captures CUDA graphs ([`EpSettings::cuda_graphs`]).
    cuda_graphs: bool,
    /// Time spent inside ONNX Runtime's run calls of this graph, summed.
    ort_time: Duration,
    load_time: Duration,
    cache: CacheUse,
}

impl fmt::Debug for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Graph")
            .field("role", &self.role)
            .field("path", &self.path)
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .field("providers", &self.providers)
            .finish()
    }
}

const REEXPORT_HINT: &str =
    "re-export the graph or re-download the model (the file may be incomplete or damaged)";

impl Graph {
    /// Loads `path` (external data resolves relative to it). `role` names the graph in messages (`clip`, `t5`,
    /// `transformer`, `vae`). Loads ONNX Runtime through [`library::init(None)`](library::init) if needed.
    pub fn load(path: &Path, role: &str, cfg: &SessionConfig) -> Result<Graph> {
        let what = format!("{role} graph {}", path.display());
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::model(format!("{what} does not exist")).with_hint(
                    "check the model folder; re-export the graph or re-download the model if the file is missing",
                ));
            }
            Err(e) => return Err(Error::model(format!("cannot read {what}: {e}"))),
        };
        if meta.is_dir() {
            return Err(Error::model(format!(
                "{what} is a folder, not an .onnx file"
            )));
        }
        if meta.len() == 0 {
            return Err(Error::model(format!("{what} is empty (0 bytes)")).with_hint(REEXPORT_HINT));
        }
        let started = Instant::now();
        let lib = library::init(None)?;

        let providers: Vec<Provider> = if cfg.providers.active.is_empty() {
            vec![Provider::Cpu]
        } else {
            cfg.providers.active.clone()
        };
        // CPU is always ONNX Runtime's implicit last provider; registering it explicitly would turn its arena off,
        // which is only done when asked for.
        let none = GraphOptions::default();
        let graph_opts = cfg.graphs.get(role).unwrap_or(&none);
        let mut eps = Vec::new();
        for p in providers.iter().copied().filter(|p| *p != Provider::Cpu) {
            match providers::dispatch(p, &cfg.ep, Some((role, path, graph_opts)))? {
                Some(d) => eps.push(d),
                None => {
                    return Err(Error::provider(format!(
                        "{what}: execution provider {p} is not compiled into this fluxrt binary"
                    ))
                    .with_hint(format!(
                        "rebuild with `--features {p}`, or probe providers before loading"
                    )))
                }
            }
        }
        if !cfg.cpu_arena {
            eps.push(ort::ep::CPU::default().with_arena_allocator(false).build());
        }
        let threads = intra_threads(cfg.threads);
        // DirectML requires memory patterns off and sequential execution.
        let needs = ep::session_overrides(&providers);
        let cuda_graphs = cfg.ep.cuda_graphs(&providers, graph_opts);
        let static_dims = match (&graph_opts.profile, cuda_graphs) {
            (Some(profile), true) => {
                let declared = super::onnx_io::read_declared_inputs(path)?;
                super::profile::static_dimensions(role, profile, &declared)?
            }
            _ => Vec::new(),
        };
        // The placement report of the session in use (a damaged cache entry makes a second build).
        let placed = std::cell::RefCell::new(NodeCounts::new());
        let build = |file: &Path, level: Optimization, save: Option<&Path>| {
            let opts = BuildOptions {
                optimization: level,
                threads,
                memory_pattern: cfg.memory_pattern && !needs.no_memory_pattern,
                sequential: needs.sequential_execution,
                save_optimized: save,
                dimensions: &static_dims,
            };
            let log_id = placement::capture();
            let session = build_session(lib, file, &opts, eps.clone(), &log_id);
            *placed.borrow_mut() = placement::finish(&log_id);
            session
        };
        let cache_dir = cfg
            .optimized_cache
            .as_deref()
            .filter(|_| providers == [Provider::Cpu] && cfg.optimization != Optimization::Disable);
        let built = match cache_dir {
            Some(dir) => load_cached(dir, lib.version(), path, cfg.optimization, &build)
                .map_err(|e| load_error(&what, &e)),
            None => build(path, cfg.optimization, None)
                .map(|s| (s, CacheUse::Off))
                .map_err(|e| load_error(&what, &e)),
        };
        let (session, cache) = built?;

        let inputs = session
            .inputs()
            .iter()
            .map(|o| IoInfo::from_outlet(o.name(), o.dtype()))
            .collect();
        let optional = session
            .overridable_initializers()
            .iter()
            .map(|o| IoInfo::from_outlet(o.name(), o.dtype()))
            .collect();
        let outputs = session
            .outputs()
            .iter()
            .map(|o| IoInfo::from_outlet(o.name(), o.dtype()))
            .collect();
        Ok(Graph {
            session,
            role: role.to_string(),
            path: path.to_path_buf(),
            inputs,
            optional,
            outputs,
            providers,
            placement: placed.into_inner(),
            cuda_graphs,
            ort_time: Duration::ZERO,
            load_time: started.elapsed(),
            cache,
        })
    }

    /// Time spent inside ONNX Runtime's run calls of this graph so far (input checks, conversions and output
    /// copies excluded).
    pub fn ort_time(&self) -> Duration {
        self.ort_time
    }

    /// How long [`Graph::load`] took (session creation, including the optimized-graph cache).
    pub fn load_time(&self) -> Duration {
        self.load_time
    }

    /// Whether the session came from the optimized-graph cache.
    pub fn cache_use(&self) -> CacheUse {
        self.cache
    }

    pub fn role(&self) -> &str {
        &self.role
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn inputs(&self) -> &[IoInfo] {
        &self.inputs
    }
    pub fn outputs(&self) -> &[IoInfo] {
        &self.outputs
    }
    /// Inputs a run may leave out (overridable initializers), with their declared types and shapes.
    pub fn optional_inputs(&self) -> &[IoInfo] {
        &self.optional
    }
    /// A required or optional input by name.
    pub fn input(&self, name: &str) -> Option<&IoInfo> {
        self.inputs
            .iter()
            .chain(&self.optional)
            .find(|i| i.name == name)
    }
    pub fn output(&self, name: &str) -> Option<&IoInfo> {
        self.outputs.iter().find(|o| o.name == name)
    }
    /// The providers this session was built with, in priority order (CPU last when it is the fallback).
    pub fn providers(&self) -> &[Provider] {
        &self.providers
    }

    /// A captured CUDA graph would replay the device addresses of an earlier run, and plain runs and the host
    /// binding put inputs and outputs at new addresses: refuse instead of returning a stale result.
    fn refuse_cuda_graphs(&self, what: &str) -> Result<()> {
        if !self.cuda_graphs {
            return Ok(());
        }
        Err(Error::runtime(format!(
            "the {} graph {} captures CUDA graphs and cannot be run through {what}: a replayed graph reads and \
             writes the device buffers of its capture run",
            self.role,
            self.path.display()
        ))
        .with_hint(
            "turn CUDA graphs off (--cuda-graph false, --trt-cuda-graph false), or use --device-loop on or auto",
        ))
    }

    /// How many nodes ONNX Runtime placed on each provider (its names, e.g. `CUDAExecutionProvider`), from its
    /// own report at session creation; empty if it gave none.
    pub fn placement(&self) -> &[(String, usize)] {
        &self.placement
    }

    /// Whether the session captures CUDA graphs (only a transformer's, with CUDA graphs asked for and static
    /// shapes): it replays its captured device addresses, so only the device loop's fixed buffers may drive it.
    pub fn cuda_graphs(&self) -> bool {
        self.cuda_graphs
    }

    /// Runs the graph. Every declared input must be given once; outputs come back in the graph's order, as f32.
    pub fn run(&mut self, inputs: &[(&str, TensorIn)]) -> Result<Outputs> {
        self.run_inner(inputs, None)
    }

    /// Like [`run`](Graph::run), cancellable through `cancel` from another thread (then the error kind is
    /// [`ErrorKind::Cancelled`]).
    pub fn run_with(&mut self, inputs: &[(&str, TensorIn)], cancel: &Canceller) -> Result<Outputs> {
        self.run_inner(inputs, Some(cancel))
    }

    fn run_inner(
        &mut self,
        inputs: &[(&str, TensorIn)],
        cancel: Option<&Canceller>,
    ) -> Result<Outputs> {
        if cancel.is_some_and(Canceller::is_cancelled) {
            return Err(self.cancelled());
        }
        self.refuse_cuda_graphs("a plain run")?;
        let values = self.prepare(inputs)?;
        // Every run goes through run options, which also keep it at the quiet log level (see `placement`).
        let uncancellable = Canceller::new();
        let cancel = cancel.unwrap_or(&uncancellable);
        let Some(opts) = cancel.begin()? else {
            return Err(self.cancelled());
        };
        let t0 = Instant::now();
        let ort_time = &mut self.ort_time;
        let mut timed = |outs: ort::session::SessionOutputs<'_>| {
            *ort_time += t0.elapsed();
            collect_outputs(outs.into_iter())
        };
        let result = self
            .session
            .run_with_options(values, opts.as_ref())
            .map(&mut timed);
        cancel.end(&opts);
        match result {
            Ok(Ok(outs)) => Ok(outs),
            Ok(Err((name, ty))) => Err(Error::model(format!(
                "{} graph {}: output {name} has element type {ty}, which fluxrt cannot convert to f32",
                self.role,
                self.path.display()
            ))),
            Err(_) if cancel.is_cancelled() => Err(self.cancelled()),
            Err(e) => Err(Error::runtime(format!("running the {} graph {} failed: {e}", self.role, self.path.display()))),
        }
    }

    fn cancelled(&self) -> Error {
        Error::new(
            ErrorKind::Cancelled,
            format!("run of the {} graph cancelled", self.role),
        )
    }

    fn model_error(&self, msg: String) -> Error {
        Error::model(format!(
            "{} graph {}: {msg}",
            self.role,
            self.path.display()
        ))
    }

    /// Checks names, ranks and fixed dimensions, and converts each input to the declared element type.
    fn prepare<'v>(
        &self,
        given: &[(&str, TensorIn<'v>)],
    ) -> Result<Vec<(Cow<'static, str>, SessionInputValue<'v>)>> {
        for (i, (name, _)) in given.iter().enumerate() {
            if self.input(name).is_none() {
                let declared: Vec<String> = self.inputs.iter().map(IoInfo::to_string).collect();
                return Err(self.model_error(format!(
                    "has no input named {name:?}; its inputs are: {}",
                    declared.join(", ")
                )));
            }
            if given[..i].iter().any(|(n, _)| n == name) {
                return Err(self.model_error(format!("input {name:?} given twice")));
            }
        }
        let mut values = Vec::with_capacity(self.inputs.len());
        // Required inputs must be given; optional ones (overridable initializers) that were given replace their
        // defaults for this run.
        let required = self.inputs.iter().map(|info| (info, true));
        for (info, needed) in required.chain(self.optional.iter().map(|info| (info, false))) {
            let Some((_, t)) = given.iter().find(|(n, _)| *n == info.name) else {
                if needed {
                    return Err(self.model_error(format!("required input {info} was not given")));
                }
                continue;
            };
            self.check_shape(info, t.shape())?;
            let value = convert_input(t, &info.dtype).map_err(|why| {
                self.model_error(format!(
                    "input {} ({} {}): {why}",
                    info.name,
                    info.dtype,
                    shape_str(&info.shape)
                ))
            })?;
            values.push((Cow::Owned(info.name.clone()), value));
        }
        Ok(values)
    }
}

struct BuildOptions<'a> {
    optimization: Optimization,
    threads: usize,
    memory_pattern: bool,
    /// Force sequential execution (DirectML).
    sequential: bool,
    /// Write the optimized graph here (weights over 1 KiB to `model.data` beside it).
    save_optimized: Option<&'a Path>,
    /// Free-dimension overrides: symbolic input dimensions fixed to these values.
    dimensions: &'a [(String, i64)],
}

fn build_session(
    lib: &library::OrtLibrary,
    path: &Path,
    opts: &BuildOptions,
    eps: Vec<ExecutionProviderDispatch>,
    log_id: &str,
) -> ort::Result<Session> {
    // VERBOSE only for ONNX Runtime's node placement report (`placement`); runs log at WARNING.
    let mut builder = Session::builder(lib.env())?
        .with_log_id(log_id)?
        .with_log_level(ort::logging::LogLevel::Verbose)?
        .with_optimization_level(opts.optimization.into())?
        .with_intra_threads(opts.threads)?;
    if !opts.memory_pattern {
        builder = builder.with_memory_pattern(false)?;
    }
    if opts.sequential {
        builder = builder.with_parallel_execution(false)?;
    }
    for (name, value) in opts.dimensions {
        builder = builder.with_dimension_override(name, *value)?;
    }
    if let Some(out) = opts.save_optimized {
        builder = builder
            .with_optimized_model_path(out)?
            .with_config_entry(
                "session.optimized_model_external_initializers_file_name",
                CACHE_DATA_FILE,
            )?
            .with_config_entry(
                "session.optimized_model_external_initializers_min_size_in_bytes",
                "1024",
            )?;
    }
    if !eps.is_empty() {
        builder = builder.with_execution_providers(eps)?;
    }
    builder.commit_from_file(path)
}

/// Inputs bound once and outputs written into preallocated buffers, for loops that run one graph many times
/// ([`Graph::binding`]). On CPU nothing is copied or allocated per run: an f32 input is updated in place through
/// [`Binding::input_mut`] and re-registered (not copied) before the next run; outputs land in the same buffers
/// every run. On a GPU provider ONNX Runtime copies a bound host input to the device when it is bound (once for
/// the text embeddings, ids and guidance; each step for the updated latents).
pub struct Binding {
    io: ort::session::IoBinding,
    inputs: Vec<(String, DynValue, bool)>,
    outputs: Vec<(String, Tensor<f32>)>,
}

impl fmt::Debug for Binding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Binding")
            .field(
                "inputs",
                &self.inputs.iter().map(|i| &i.0).collect::<Vec<_>>(),
            )
            .field(
                "outputs",
                &self.outputs.iter().map(|o| &o.0).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Binding {
    /// The data of a bound f32 input, to update in place; it is re-registered before the next run.
    /// `None` when the input is not bound or not declared f32.
    pub fn input_mut(&mut self, name: &str) -> Option<&mut [f32]> {
        let (_, v, dirty) = self.inputs.iter_mut().find(|(n, _, _)| n == name)?;
        *dirty = true;
        v.try_extract_tensor_mut::<f32>().ok().map(|(_, d)| d)
    }

    /// The data of a bound f32 output, as the last run left it.
    pub fn output(&self, name: &str) -> Option<&[f32]> {
        let (_, t) = self.outputs.iter().find(|(n, _)| n == name)?;
        Some(t.extract_tensor().1)
    }

    /// An input to update in place and an output to read, at the same time (e.g. latents and velocity).
    pub fn input_mut_and_output(
        &mut self,
        input: &str,
        output: &str,
    ) -> Option<(&mut [f32], &[f32])> {
        let (_, v, dirty) = self.inputs.iter_mut().find(|(n, _, _)| n == input)?;
        *dirty = true;
        let x = v.try_extract_tensor_mut::<f32>().ok()?.1;
        let (_, t) = self.outputs.iter().find(|(n, _)| n == output)?;
        Some((x, t.extract_tensor().1))
    }
}

impl Graph {
    /// A new, empty binding for this graph.
    pub fn binding(&self) -> Result<Binding> {
        let io = self.session.create_binding().map_err(|e| {
            Error::runtime(format!(
                "{} graph: cannot create an I/O binding: {e}",
                self.role
            ))
        })?;
        Ok(Binding {
            io,
            inputs: Vec::new(),
            outputs: Vec::new(),
        })
    }

    /// Binds (copies once, converted to the declared element type) an input, checked as [`Graph::run`] checks it.
    pub fn bind_input(&self, b: &mut Binding, name: &str, t: TensorIn) -> Result<()> {
        let value = self.input_value(name, &t)?;
        b.io.bind_input(name, &value)
            .map_err(|e| self.model_error(format!("cannot bind input {name}: {e}")))?;
        b.inputs.retain(|(n, _, _)| n != name);
        b.inputs.push((name.to_string(), value, false));
        Ok(())
    }

    /// Binds an f32 output to a preallocated buffer of `shape` (the graph must declare it f32).
    pub fn bind_output(&self, b: &mut Binding, name: &str, shape: &[usize]) -> Result<()> {
        let info = self
            .output(name)
            .ok_or_else(|| self.model_error(format!("has no output named {name:?}")))?;
        if info.dtype != ElemType::F32 {
            return Err(self.model_error(format!(
                "output {info} is not f32; only f32 outputs can be bound"
            )));
        }
        let mut t = Tensor::<f32>::new(self.session.allocator(), shape.to_vec())
            .map_err(|e| self.model_error(format!("cannot allocate output {name}: {e}")))?;
        b.io.bind_output(name, &mut t)
            .map_err(|e| self.model_error(format!("cannot bind output {name}: {e}")))?;
        b.outputs.retain(|(n, _)| n != name);
        b.outputs.push((name.to_string(), t));
        Ok(())
    }

    /// Runs with a binding: every declared input must be bound; outputs are read through [`Binding::output`].
    pub fn run_binding(&mut self, b: &mut Binding, cancel: &Canceller) -> Result<()> {
        if cancel.is_cancelled() {
            return Err(self.cancelled());
        }
        self.refuse_cuda_graphs("the host I/O binding")?;
        for info in &self.inputs {
            if !b.inputs.iter().any(|(n, _, _)| *n == info.name) {
                return Err(self.model_error(format!("required input {info} was not bound")));
            }
        }
        for (name, value, dirty) in b.inputs.iter_mut() {
            if *dirty {
                b.io.bind_input(name.as_str(), &*value)
                    .map_err(|e| Error::runtime(format!("cannot re-bind input {name}: {e}")))?;
                *dirty = false;
            }
        }
        self.run_io(&b.io, cancel)
    }

    /// The session, for the device loop's allocator and bindings ([`super::step_graph`]).
    pub(crate) fn session(&self) -> &Session {
        &self.session
    }

    /// An input checked as [`Graph::run`] checks it and converted to the declared element type, as an owned value
    /// (to bind; binding copies it to the device).
    pub(crate) fn input_value(&self, name: &str, t: &TensorIn) -> Result<DynValue> {
        let info = self
            .input(name)
            .ok_or_else(|| self.model_error(format!("has no input named {name:?}")))?
            .clone();
        self.check_shape(&info, t.shape())?;
        let fail = |e: ort::Error| self.model_error(format!("input {}: {e}", info.name));
        match (t, &info.dtype) {
            (TensorIn::F32(a), ElemType::F32) => {
                Tensor::from_array(a.as_standard_layout().into_owned())
                    .map(|v| v.into_dyn())
                    .map_err(fail)
            }
            (TensorIn::I64(a), ElemType::I64) => {
                Tensor::from_array(a.as_standard_layout().into_owned())
                    .map(|v| v.into_dyn())
                    .map_err(fail)
            }
            _ => match convert_input(t, &info.dtype) {
                Ok(SessionInputValue::Owned(v)) => Ok(v),
                Ok(_) => {
                    Err(self.model_error(format!("input {name}: cannot bind a borrowed value")))
                }
                Err(why) => {
                    Err(self.model_error(format!("input {} ({}): {why}", info.name, info.dtype)))
                }
            },
        }
    }

    /// Runs with an ort binding whose inputs and outputs the caller manages (the device loop); cancellable.
    pub(crate) fn run_io(
        &mut self,
        io: &ort::session::IoBinding,
        cancel: &Canceller,
    ) -> Result<()> {
        if cancel.is_cancelled() {
            return Err(self.cancelled());
        }
        let Some(opts) = cancel.begin()? else {
            return Err(self.cancelled());
        };
        let t0 = Instant::now();
        let result = self
            .session
            .run_binding_with_options(io, opts.as_ref())
            .map(drop);
        self.ort_time += t0.elapsed();
        cancel.end(&opts);
        match result {
            Ok(()) => Ok(()),
            Err(_) if cancel.is_cancelled() => Err(self.cancelled()),
            Err(e) => Err(Error::runtime(format!(
                "running the {} graph {} failed: {e}",
                self.role,
                self.path.display()
            ))),
        }
    }

    fn check_shape(&self, info: &IoInfo, shape: &[usize]) -> Result<()> {
        if shape.len() != info.shape.len() {
            return Err(self.model_error(format!(
                "input {} expects rank {} {}, given rank {} {}",
                info.name,
                info.shape.len(),
                shape_str(&info.shape),
                shape.len(),
                given_str(shape)
            )));
        }
        for (d, (want, &have)) in info.shape.iter().zip(shape).enumerate() {
            if let Dim::Fixed(w) = want {
                if *w != have as i64 {
                    return Err(self.model_error(format!(
                        "input {} expects shape {}, given {} (dimension {d} differs)",
                        info.name,
                        shape_str(&info.shape),
                        given_str(shape)
                    )));
                }
            }
        }
        Ok(())
    }
}

fn load_error(what: &str, e: &ort::Error) -> Error {
    use ort::ErrorCode as C;
    let msg = e.message();
    match e.code() {
        // Whatever its code: ONNX Runtime refuses graph capture when some nodes run on the CPU.
        _ if msg.contains("graph capture") => Error::provider(format!(
            "{what}: CUDA graphs need every node on the GPU, and ONNX Runtime keeps some of this graph's on the CPU: {msg}"
        ))
        .with_hint("turn CUDA graphs off (--cuda-graph false, --trt-cuda-graph false); `fluxrt bench --provider cuda` without them lists the nodes each provider got"),
        C::InvalidProtobuf => Error::model(format!(
            "{what} is not a valid ONNX model (it could not be parsed; truncated or damaged?): {msg}"
        ))
        .with_hint(REEXPORT_HINT),
        _ if msg.contains("xternal data") => {
            Error::model(format!("{what}: its external data (weights stored beside it) is missing or unreadable: {msg}"))
                .with_hint("keep the .onnx file and its external data files (.onnx_data, .data) together in one folder, or re-download the model")
        }
        C::NoSuchFile => Error::model(format!("{what} refers to a file that is missing (external weights?): {msg}"))
            .with_hint("keep the .onnx file and its external data files (.onnx_data, .data) together in one folder"),
        C::ExecutionProviderFailure => Error::provider(format!("{what}: an execution provider failed: {msg}"))
            .with_hint("try another provider order, or run on cpu"),
        C::NotImplemented if msg.contains("bfloat16") => Error::model(format!("{what} is bf16 where this execution provider has no bf16 kernel: {msg}"))
            .with_hint("convert the model folder once: `fluxrt convert MODEL OUT --precision fp32` (fp16 for GPUs), or run bf16 graphs with --provider tensorrt"),
        C::NotImplemented => Error::model(format!("{what} uses something this ONNX Runtime cannot run: {msg}"))
            .with_hint("update ONNX Runtime, or re-export the graph with a supported opset / element types"),
        _ => Error::model(format!("ONNX Runtime cannot load {what}: {msg}")).with_hint(REEXPORT_HINT),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::library::tests::test_library;
    use half::f16;
    use ndarray::{arr1, arr2, Array2, ShapeBuilder};
    use std::time::{Duration, Instant};

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/runtime")
            .join(name)
    }

    fn load(name: &str) -> Graph {
        test_library();
        let cfg = SessionConfig {
            threads: Some(1),
            ..Default::default()
        };
        Graph::load(&fixture(name), name, &cfg).unwrap_or_else(|e| panic!("{e}"))
    }

    fn out<'a>(outs: &'a [(String, ArrayD<f32>)], name: &str) -> &'a ArrayD<f32> {
        &outs
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no output {name}"))
            .1
    }

    #[test]
    fn refused_graph_capture_is_explained() {
        test_library();
        let e = load_error(
            "transformer graph t.onnx",
            &ort::Error::new(
                "This session cannot use the graph capture feature as requested by the user as all compute graph \
                 nodes have not been partitioned to the CUDAExecutionProvider",
            ),
        );
        assert_eq!(e.kind, ErrorKind::Provider);
        assert!(
            e.message.contains("CUDA graphs need every node on the GPU"),
            "{e}"
        );
        assert!(
            e.hint
                .as_deref()
                .unwrap_or("")
                .contains("--cuda-graph false"),
            "{e}"
        );
    }

    #[test]
    fn f32_add_zero_copy_and_strided() {
        let mut g = load("add_f32.onnx");
        assert_eq!(g.providers(), &[Provider::Cpu]);
        // ONNX Runtime's own placement report: the graph's one Add node, on the CPU.
        assert_eq!(g.placement(), &[("CPUExecutionProvider".to_string(), 1)]);
        assert_eq!(
            g.inputs()[0],
            IoInfo {
                name: "x".into(),
                dtype: ElemType::F32,
                shape: vec![Dim::Fixed(2), Dim::Fixed(3)]
            }
        );
        assert_eq!(g.outputs()[0].name, "sum");
        let x = arr2(&[[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]]).into_dyn();
        // A transposed (non-contiguous) view must be copied into standard layout, not misread.
        let yt = arr2(&[[10.0f32, 40.0], [20.0, 50.0], [30.0, 60.0]]);
        let y = yt.t().into_dyn();
        let outs = g
            .run(&[("x", TensorIn::F32(x.view())), ("y", TensorIn::F32(y))])
            .unwrap();
        assert_eq!(outs.len(), 1);
        assert_eq!(
            out(&outs, "sum"),
            &arr2(&[[11.0f32, 22.0, 33.0], [44.0, 55.0, 66.0]]).into_dyn()
        );
        // Fortran-order owned array too.
        let yf = Array2::from_shape_vec((2, 3).f(), vec![1.0f32, 4.0, 2.0, 5.0, 3.0, 6.0])
            .unwrap()
            .into_dyn();
        let outs = g.run(&[("y", (&yf).into()), ("x", (&x).into())]).unwrap();
        assert_eq!(
            out(&outs, "sum"),
            &arr2(&[[2.0f32, 4.0, 6.0], [8.0, 10.0, 12.0]]).into_dyn()
        );
    }

    #[test]
    fn f16_input_and_output_are_converted() {
        let mut g = load("scale_f16.onnx");
        assert_eq!(g.inputs()[0].dtype, ElemType::F16);
        assert_eq!(
            g.inputs()[0].shape,
            vec![Dim::Symbolic("N".into()), Dim::Fixed(4)]
        );
        let x = arr2(&[
            [0.5f32, 1.0, -2.0, 100.0],
            [0.1, 0.2, 0.3, 0.4],
            [1e-3, 2e4, 0.0, -0.0],
        ])
        .into_dyn();
        let outs = g.run(&[("x", TensorIn::F32(x.view()))]).unwrap();
        let y = out(&outs, "y");
        assert_eq!(y.shape(), &[3, 4]);
        for (a, b) in x.iter().zip(y.iter()) {
            let want = f16::from_f32(f16::from_f32(*a).to_f32() * 2.0).to_f32();
            assert_eq!(*b, want, "{a}");
        }
    }

    #[test]
    fn bf16_roundtrip() {
        let mut g = load("inc_bf16.onnx");
        assert_eq!(g.inputs()[0].dtype, ElemType::BF16);
        let x = arr1(&[1.0f32, 2.5, -3.0, 1000.0]).into_dyn();
        let outs = g.run(&[("x", TensorIn::F32(x.view()))]).unwrap();
        assert_eq!(
            out(&outs, "y"),
            &arr1(&[2.0f32, 3.5, -2.0, 1000.0]).into_dyn()
        );
    }

    #[test]
    fn i64_ids_into_int32_graph() {
        let mut g = load("ids_i32.onnx");
        assert_eq!(
            g.inputs()[0],
            IoInfo {
                name: "input_ids".into(),
                dtype: ElemType::I32,
                shape: vec![Dim::Symbolic("batch".into()), Dim::Symbolic("seq".into())]
            }
        );
        assert_eq!(g.outputs()[1].dtype, ElemType::I32);
        let ids = arr2(&[[49406i64, 320, 49407], [1, 2, 3]]).into_dyn();
        let outs = g.run(&[("input_ids", TensorIn::I64(ids.view()))]).unwrap();
        assert_eq!(outs[0].0, "embeddings");
        assert_eq!(outs[1].0, "ids_echo");
        assert_eq!(
            out(&outs, "embeddings"),
            &arr2(&[[24703.0f32, 160.0, 24703.5], [0.5, 1.0, 1.5]]).into_dyn()
        );
        assert_eq!(out(&outs, "ids_echo"), &ids.mapv(|v| v as f32));

        let too_big = arr2(&[[1i64 << 40]]).into_dyn();
        let err = g
            .run(&[("input_ids", TensorIn::I64(too_big.view()))])
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Model);
        assert!(err.message.contains("does not fit"), "{err}");
    }

    #[test]
    fn i64_kept_for_int64_graph() {
        let mut g = load("ids_i64.onnx");
        let ids = arr1(&[5i64, 7, 9]).into_dyn();
        let outs = g.run(&[("ids", TensorIn::I64(ids.view()))]).unwrap();
        assert_eq!(out(&outs, "out"), &arr1(&[4.0f32, 6.0, 8.0]).into_dyn());
        // f32 into an int input is refused with both types named.
        let f = arr1(&[1.0f32]).into_dyn();
        let err = g.run(&[("ids", TensorIn::F32(f.view()))]).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Model);
        assert!(
            err.message.contains("f32") && err.message.contains("i64"),
            "{err}"
        );
    }

    #[test]
    fn external_data_resolves_next_to_the_model() {
        test_library();
        // Copy the model and its data to another folder and load from there, away from the working directory.
        let dir = tempfile::tempdir().unwrap();
        for f in ["add_const.onnx", "add_const.onnx.data"] {
            std::fs::copy(fixture(&format!("external/{f}")), dir.path().join(f)).unwrap();
        }
        let mut g = Graph::load(
            &dir.path().join("add_const.onnx"),
            "ext",
            &SessionConfig::default(),
        )
        .unwrap();
        let x = arr1(&[1.0f32, 2.0, 3.0, 4.0]).into_dyn();
        let outs = g.run(&[("x", TensorIn::F32(x.view()))]).unwrap();
        assert_eq!(
            out(&outs, "y"),
            &arr1(&[11.0f32, 22.0, 33.0, 44.0]).into_dyn()
        );

        // Without its data file: a model error that says what is missing.
        std::fs::remove_file(dir.path().join("add_const.onnx.data")).unwrap();
        let err = Graph::load(
            &dir.path().join("add_const.onnx"),
            "ext",
            &SessionConfig::default(),
        )
        .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Model, "{err}");
        assert!(err.message.contains("add_const.onnx"), "{err}");
    }

    #[test]
    fn bad_files_are_model_errors_naming_the_file() {
        test_library();
        let dir = tempfile::tempdir().unwrap();
        let cfg = SessionConfig::default();

        let missing = dir.path().join("missing.onnx");
        let err = Graph::load(&missing, "vae", &cfg).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Model);
        assert!(
            err.message.contains("vae") && err.message.contains(&missing.display().to_string()),
            "{err}"
        );
        assert!(
            err.hint.as_deref().unwrap().contains("re-download"),
            "{err}"
        );

        let empty = dir.path().join("empty.onnx");
        std::fs::write(&empty, b"").unwrap();
        let err = Graph::load(&empty, "clip", &cfg).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Model);
        assert!(
            err.message.contains(&empty.display().to_string()) && err.message.contains("empty"),
            "{err}"
        );

        let garbage = dir.path().join("garbage.onnx");
        std::fs::write(
            &garbage,
            b"\xff\xfe not a protobuf at all \x00\x01\x02 <html>404</html>",
        )
        .unwrap();
        let err = Graph::load(&garbage, "t5", &cfg).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Model, "{err}");
        assert!(
            err.message.contains(&garbage.display().to_string()),
            "{err}"
        );
        assert!(err.hint.as_deref().unwrap().contains("re-export"), "{err}");

        let good = std::fs::read(fixture("ids_i32.onnx")).unwrap();
        let truncated = dir.path().join("truncated.onnx");
        std::fs::write(&truncated, &good[..good.len() / 2]).unwrap();
        let err = Graph::load(&truncated, "transformer", &cfg).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Model, "{err}");
        assert!(
            err.message.contains(&truncated.display().to_string()),
            "{err}"
        );

        let err = Graph::load(dir.path(), "transformer", &cfg).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Model, "{err}");
    }

    #[test]
    fn optional_inputs_may_be_left_out_or_given_in_runs_and_bindings() {
        // y = x + (x @ A) @ B, A and B overridable initializers defaulting to zero rank (like LoRA slots).
        let mut g = load("lora_slot.onnx");
        assert_eq!(g.inputs().len(), 1);
        let names: Vec<&str> = g
            .optional_inputs()
            .iter()
            .map(|i| i.name.as_str())
            .collect();
        assert_eq!(names, ["lin.lora_A", "lin.lora_B"]);
        assert_eq!(g.input("lin.lora_A").unwrap().shape[0], Dim::Fixed(3));
        let x = arr2(&[[1.0f32, 2.0, 3.0], [0.0, 1.0, 0.0]]).into_dyn();
        let outs = g.run(&[("x", x.view().into())]).unwrap();
        assert_eq!(out(&outs, "y"), &x);
        let a = arr2(&[[1.0f32], [0.0], [0.0]]).into_dyn();
        let b = arr2(&[[1.0f32, 10.0, 0.0]]).into_dyn();
        let want = arr2(&[[2.0f32, 12.0, 3.0], [0.0, 1.0, 0.0]]).into_dyn();
        let feed = [
            ("x", TensorIn::F32(x.view())),
            ("lin.lora_A", TensorIn::F32(a.view())),
            ("lin.lora_B", TensorIn::F32(b.view())),
        ];
        assert_eq!(out(&g.run(&feed).unwrap(), "y"), &want);
        // The fixed dimension of an optional input is checked like any other.
        let bad = Array2::<f32>::zeros((4, 1)).into_dyn();
        let e = g
            .run(&[
                ("x", x.view().into()),
                ("lin.lora_A", bad.view().into()),
                ("lin.lora_B", b.view().into()),
            ])
            .unwrap_err();
        assert!(e.message.contains("lin.lora_A"), "{e}");
        // Bound: the same, through an I/O binding.
        let mut bind = g.binding().unwrap();
        for (n, t) in &feed {
            g.bind_input(&mut bind, n, t.clone()).unwrap();
        }
        g.bind_output(&mut bind, "y", &[2, 3]).unwrap();
        g.run_binding(&mut bind, &Canceller::new()).unwrap();
        assert_eq!(bind.output("y").unwrap(), want.as_slice().unwrap());
    }

    #[test]
    fn input_errors_name_graph_input_and_shapes() {
        let mut g = load("add_f32.onnx");
        let x = Array2::<f32>::zeros((2, 3)).into_dyn();

        let err = g
            .run(&[
                ("x", TensorIn::F32(x.view())),
                ("z", TensorIn::F32(x.view())),
            ])
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Model);
        assert!(
            err.message.contains("add_f32.onnx") && err.message.contains("\"z\""),
            "{err}"
        );
        assert!(err.message.contains("x f32[2, 3]"), "{err}");

        let err = g.run(&[("x", TensorIn::F32(x.view()))]).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Model);
        assert!(err.message.contains("required input y"), "{err}");

        let x1 = arr1(&[1.0f32, 2.0]).into_dyn();
        let err = g
            .run(&[
                ("x", TensorIn::F32(x1.view())),
                ("y", TensorIn::F32(x.view())),
            ])
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Model);
        assert!(
            err.message.contains("expects rank 2") && err.message.contains("given rank 1 [2]"),
            "{err}"
        );

        let x4 = Array2::<f32>::zeros((2, 4)).into_dyn();
        let err = g
            .run(&[
                ("x", TensorIn::F32(x4.view())),
                ("y", TensorIn::F32(x.view())),
            ])
            .unwrap_err();
        assert!(
            err.message.contains("expects shape [2, 3], given [2, 4]"),
            "{err}"
        );

        let err = g
            .run(&[
                ("x", TensorIn::F32(x.view())),
                ("x", TensorIn::F32(x.view())),
            ])
            .unwrap_err();
        assert!(err.message.contains("given twice"), "{err}");
    }

    #[test]
    fn cancel_before_run() {
        let mut g = load("add_f32.onnx");
        let x = Array2::<f32>::zeros((2, 3)).into_dyn();
        let c = Canceller::new();
        assert!(g
            .run_with(&[("x", (&x).into()), ("y", (&x).into())], &c)
            .is_ok());
        c.clone().cancel();
        let err = g
            .run_with(&[("x", (&x).into()), ("y", (&x).into())], &c)
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::Cancelled);
        // Other cancellers and plain runs are unaffected.
        assert!(g
            .run_with(&[("x", (&x).into()), ("y", (&x).into())], &Canceller::new())
            .is_ok());
        assert!(g.run(&[("x", (&x).into()), ("y", (&x).into())]).is_ok());
    }

    #[test]
    fn cancel_from_another_thread() {
        let mut g = load("slow_loop.onnx");
        let x = ndarray::Array2::<f32>::ones((16, 16)).into_dyn();
        // A short run finishes normally.
        let trips = ndarray::arr0(10i64).into_dyn();
        let outs = g
            .run(&[("trips", (&trips).into()), ("x", (&x).into())])
            .unwrap();
        assert_eq!(out(&outs, "y").shape(), &[16, 16]);

        // ~50 million iterations would take minutes; cancel after 200 ms.
        let trips = ndarray::arr0(50_000_000i64).into_dyn();
        let c = Canceller::new();
        let c2 = c.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            c2.cancel();
        });
        let start = Instant::now();
        let err = g
            .run_with(&[("trips", (&trips).into()), ("x", (&x).into())], &c)
            .unwrap_err();
        let took = start.elapsed();
        t.join().unwrap();
        assert_eq!(err.kind, ErrorKind::Cancelled, "{err}");
        assert!(took < Duration::from_secs(10), "cancel took {took:?}");
        assert!(
            took >= Duration::from_millis(150),
            "returned before the cancel: {took:?}"
        );
        // The graph is still usable.
        let trips = ndarray::arr0(3i64).into_dyn();
        assert!(g
            .run(&[("trips", (&trips).into()), ("x", (&x).into())])
            .is_ok());
    }

    #[test]
    fn optimization_levels_parse() {
        assert_eq!("ALL".parse::<Optimization>().unwrap(), Optimization::All);
        assert_eq!(
            "disable".parse::<Optimization>().unwrap(),
            Optimization::Disable
        );
        assert_eq!(
            "fast".parse::<Optimization>().unwrap_err().kind,
            ErrorKind::InvalidInput
        );
        assert!(physical_cores() >= 1);
    }
}
