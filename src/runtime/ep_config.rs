//! Execution provider settings in one place: what the user can set (the `[providers]` section of a config file and
//! the matching command-line flags, flags overriding the file), the defaults, and the options each provider
//! receives for each graph (TensorRT engine and timing caches keyed by model, ONNX Runtime version, GPU and shape
//! range; optimization profiles from [`trt_profile`]; CUDA graphs only with static shapes; the
//! session settings DirectML requires; CoreML's model format, compute units and cache).
//!
//! Everything here is pure and unit-tested, except the few functions that read files or the machine
//! ([`load_config`], [`GraphInfo::read`], [`HostInfo::detect`], [`engine_cache_status`]). The `to_ort` methods turn the
//! resolved options into `ort`'s provider builders (only with the provider's cargo feature); with every feature on,
//! tests check that what `ort` receives is exactly [`ProviderOptions::ort_options`].
//!
//! docs/providers.md has the table of every setting.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

use super::providers::Provider;
use super::session::{Dim, IoInfo};
use super::trt_profile::{self, BatchRange, ModelShapes, Profile, ShapeRange, SizeRange};
use crate::model::{ModelSpec, Role, BFL_TRANSFORMER_PRECISIONS};
use crate::{Error, Result};

// ---------------------------------------------------------------------------------------------------------------
// Setting values

/// An enum of string settings: parsed from the CLI (kebab or snake case) and from the config file (same), shown in
/// snake case.
macro_rules! string_enum {
    ($(#[$m:meta])* pub enum $name:ident ($what:literal) { $($(#[$vm:meta])* $var:ident = $s:literal $(| $alias:literal)*,)+ }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name { $($(#[$vm])* $var,)+ }

        impl $name {
            /// The accepted values, as the config file writes them.
            pub const NAMES: &'static [&'static str] = &[$($s),+];

            pub fn name(self) -> &'static str {
                match self { $($name::$var => $s,)+ }
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                let k = s.trim().to_ascii_lowercase().replace(['-', ' '], "_");
                $( if k == $s $(|| k == $alias)* { return Ok($name::$var); } )+
                Err(Error::input(format!("unknown {} {:?}", $what, s.trim()))
                    .with_hint(format!("use one of: {}", Self::NAMES.join(", "))))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                s.parse().map_err(|e: Error| serde::de::Error::custom(one_line(&e)))
            }
        }
    };
}

string_enum! {
    /// cuDNN's convolution algorithm search (CUDA `cudnn_conv_algo_search`).
    pub enum ConvSearch("cuDNN convolution algorithm search") {
        /// Benchmark every algorithm on the first run of each shape (ONNX Runtime's default; fastest once warm).
        Exhaustive = "exhaustive",
        /// cuDNN's heuristics: no benchmarking, quick first runs at new shapes.
        Heuristic = "heuristic",
        /// The implicit-precomputed-GEMM algorithm: least memory.
        Default = "default",
    }
}

string_enum! {
    /// How the CUDA memory arena grows (`arena_extend_strategy`).
    pub enum ArenaExtend("arena extend strategy") {
        NextPowerOfTwo = "next_power_of_two" | "knextpoweroftwo",
        /// Grow by exactly what is asked: less waste with multi-GB weights.
        SameAsRequested = "same_as_requested" | "ksameasrequested",
    }
}

string_enum! {
    /// DirectML adapter choice when no device id is given.
    pub enum DmlPerformance("DirectML performance preference") {
        Default = "default",
        HighPerformance = "high_performance",
        MinimumPower = "minimum_power",
    }
}

string_enum! {
    /// Which DirectML adapters may be picked when no device id is given.
    pub enum DmlDeviceFilter("DirectML device filter") {
        Gpu = "gpu",
        Npu = "npu",
        Any = "any",
    }
}

string_enum! {
    /// The Core ML model format.
    pub enum CoreMlFormat("Core ML model format") {
        /// ML Program (Core ML 5+, macOS 12+): fp16, dynamic shapes, large models.
        MlProgram = "mlprogram" | "ml_program",
        /// The older NeuralNetwork format.
        NeuralNetwork = "neuralnetwork" | "neural_network",
    }
}

string_enum! {
    /// The Apple compute units Core ML may use.
    pub enum ComputeUnits("Core ML compute units") {
        All = "all",
        CpuAndGpu = "cpu_and_gpu" | "cpu+gpu",
        CpuAndNeuralEngine = "cpu_and_ne" | "cpu+ane" | "cpu_and_ane" | "cpu+ne" | "cpu_and_neural_engine",
        CpuOnly = "cpu_only" | "cpu",
    }
}

/// A byte count: `8589934592`, `8GiB`, `8G`, `512MiB`, `512M`, `64KiB`, ... (K/M/G/T are powers of 1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = Error;
    fn from_str(s: &str) -> Result<ByteSize> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            "t" | "tb" | "tib" => 1 << 40,
            _ => 0,
        };
        match num.parse::<u64>().ok().and_then(|n| n.checked_mul(mult)) {
            Some(n) if mult > 0 => Ok(ByteSize(n)),
            _ => Err(Error::input(format!("invalid byte size {t:?}")).with_hint(
                "write a number of bytes, optionally with K, M, G or T (powers of 1024), e.g. 8GiB",
            )),
        }
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, shift) in [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)] {
            if n != 0 && n.is_multiple_of(1u64 << shift) {
                return write!(f, "{}{unit}", n >> shift);
            }
        }
        write!(f, "{n}")
    }
}

fn one_line(e: &Error) -> String {
    match &e.hint {
        Some(h) => format!("{} ({h})", e.message),
        None => e.message.clone(),
    }
}

/// A string or a number in the config file, parsed with the type's `FromStr`.
fn de_parsed<'de, D, T>(d: D) -> std::result::Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr<Err = Error>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum StrOrNum {
        S(String),
        N(i64),
    }
    let s = match StrOrNum::deserialize(d)? {
        StrOrNum::S(s) => s,
        StrOrNum::N(n) => n.to_string(),
    };
    s.parse()
        .map(Some)
        .map_err(|e: Error| serde::de::Error::custom(one_line(&e)))
}

// ---------------------------------------------------------------------------------------------------------------
// One layer of settings: the config file's [providers] section, or the command-line flags. Unset = not given.

/// `[providers.tensorrt]`
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorRtLayer {
    pub fp16: Option<bool>,
    pub bf16: Option<bool>,
    pub layer_norm_fp32_fallback: Option<bool>,
    pub engine_cache: Option<bool>,
    pub cache_dir: Option<PathBuf>,
    pub timing_cache: Option<bool>,
    pub builder_optimization_level: Option<u8>,
    #[serde(default, deserialize_with = "de_parsed")]
    pub max_workspace_size: Option<ByteSize>,
    pub cuda_graph: Option<bool>,
}

/// `[providers.cuda]`
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CudaLayer {
    pub conv_algorithm_search: Option<ConvSearch>,
    pub arena_extend_strategy: Option<ArenaExtend>,
    #[serde(default, deserialize_with = "de_parsed")]
    pub memory_limit: Option<ByteSize>,
    pub tf32: Option<bool>,
    pub cuda_graph: Option<bool>,
}

/// `[providers.directml]`
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectMlLayer {
    pub performance_preference: Option<DmlPerformance>,
    pub device_filter: Option<DmlDeviceFilter>,
}

/// `[providers.coreml]`
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoreMlLayer {
    pub model_format: Option<CoreMlFormat>,
    pub compute_units: Option<ComputeUnits>,
    pub model_cache: Option<bool>,
    pub cache_dir: Option<PathBuf>,
    pub static_input_shapes: Option<bool>,
}

/// The `[providers]` section of a config file, or the equivalent command-line flags.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvidersLayer {
    /// Providers in priority order, as `--provider` takes them (`tensorrt,cuda,cpu`).
    pub order: Option<String>,
    pub device_id: Option<u32>,
    #[serde(default, deserialize_with = "de_parsed")]
    pub sizes: Option<SizeRange>,
    #[serde(default, deserialize_with = "de_parsed")]
    pub batch: Option<BatchRange>,
    pub transformer_precision: Option<String>,
    #[serde(default)]
    pub tensorrt: TensorRtLayer,
    #[serde(default)]
    pub cuda: CudaLayer,
    #[serde(default)]
    pub directml: DirectMlLayer,
    #[serde(default)]
    pub coreml: CoreMlLayer,
}

macro_rules! overlay {
    ($dst:expr, $src:expr; $($f:ident),+) => { $( if $src.$f.is_some() { $dst.$f = $src.$f.clone(); } )+ };
}

impl ProvidersLayer {
    /// Puts every setting `top` gives over this layer's.
    pub fn overlay(&mut self, top: &ProvidersLayer) {
        overlay!(self, top; order, device_id, sizes, batch, transformer_precision);
        overlay!(self.tensorrt, top.tensorrt; fp16, bf16, layer_norm_fp32_fallback, engine_cache, cache_dir,
            timing_cache, builder_optimization_level, max_workspace_size, cuda_graph);
        overlay!(self.cuda, top.cuda; conv_algorithm_search, arena_extend_strategy, memory_limit, tf32, cuda_graph);
        overlay!(self.directml, top.directml; performance_preference, device_filter);
        overlay!(self.coreml, top.coreml; model_format, compute_units, model_cache, cache_dir, static_input_shapes);
    }

    /// The settings of the layers, later ones overriding earlier ones (file, then flags), over the defaults.
    pub fn resolve(layers: &[&ProvidersLayer]) -> Result<ProviderConfig> {
        let mut l = ProvidersLayer::default();
        for top in layers {
            l.overlay(top);
        }
        let order = l
            .order
            .as_deref()
            .map(super::providers::parse_list)
            .transpose()?;
        let transformer_precision = match l.transformer_precision.as_deref().map(str::trim) {
            None | Some("auto") | Some("") => None,
            Some(p) => {
                let p = p.to_ascii_lowercase();
                if !BFL_TRANSFORMER_PRECISIONS.contains(&p.as_str()) {
                    return Err(Error::input(format!("unknown transformer precision {p:?}"))
                        .with_hint(format!(
                            "use auto or one of: {}",
                            BFL_TRANSFORMER_PRECISIONS.join(", ")
                        )));
                }
                Some(p)
            }
        };
        let shapes = match (l.sizes, l.batch) {
            (Some(sizes), batch) => Some(ShapeRange {
                sizes,
                batch: batch.unwrap_or(BatchRange {
                    min: 1,
                    opt: None,
                    max: 1,
                }),
            }),
            (None, Some(b)) => {
                return Err(Error::input(format!(
                    "a batch range ({b}) needs an image size range too"
                ))
                .with_hint(
                    "give --trt-sizes (providers.sizes) as well, e.g. --trt-sizes 512-1024",
                ))
            }
            (None, None) => None,
        };
        let d = EpSettings::default();
        let t = &l.tensorrt;
        let level = t
            .builder_optimization_level
            .unwrap_or(d.tensorrt.builder_optimization_level);
        if level > 5 {
            return Err(Error::input(format!(
                "TensorRT builder optimization level must be 0-5, got {level}"
            ))
            .with_hint("3 is TensorRT's default; 5 searches longest for the fastest kernels"));
        }
        let ep = EpSettings {
            device_id: l.device_id,
            shapes,
            tensorrt: TensorRtSettings {
                fp16: t.fp16.unwrap_or(d.tensorrt.fp16),
                bf16: t.bf16.unwrap_or(d.tensorrt.bf16),
                layer_norm_fp32_fallback: t
                    .layer_norm_fp32_fallback
                    .unwrap_or(d.tensorrt.layer_norm_fp32_fallback),
                engine_cache: t.engine_cache.unwrap_or(d.tensorrt.engine_cache),
                cache_dir: t.cache_dir.clone(),
                timing_cache: t.timing_cache.unwrap_or(d.tensorrt.timing_cache),
                builder_optimization_level: level,
                max_workspace_size: t.max_workspace_size.map(|b| b.0),
                cuda_graph: t.cuda_graph.unwrap_or(d.tensorrt.cuda_graph),
            },
            cuda: CudaSettings {
                conv_algorithm_search: l
                    .cuda
                    .conv_algorithm_search
                    .unwrap_or(d.cuda.conv_algorithm_search),
                arena_extend_strategy: l
                    .cuda
                    .arena_extend_strategy
                    .unwrap_or(d.cuda.arena_extend_strategy),
                memory_limit: l.cuda.memory_limit.map(|b| b.0),
                tf32: l.cuda.tf32.unwrap_or(d.cuda.tf32),
                cuda_graph: l.cuda.cuda_graph.unwrap_or(d.cuda.cuda_graph),
            },
            directml: DirectMlSettings {
                performance_preference: l
                    .directml
                    .performance_preference
                    .unwrap_or(d.directml.performance_preference),
                device_filter: l.directml.device_filter.unwrap_or(d.directml.device_filter),
            },
            coreml: CoreMlSettings {
                model_format: l.coreml.model_format.unwrap_or(d.coreml.model_format),
                compute_units: l.coreml.compute_units.unwrap_or(d.coreml.compute_units),
                model_cache: l.coreml.model_cache.unwrap_or(d.coreml.model_cache),
                cache_dir: l.coreml.cache_dir.clone(),
                static_input_shapes: l
                    .coreml
                    .static_input_shapes
                    .unwrap_or(d.coreml.static_input_shapes),
            },
            model: None,
        };
        Ok(ProviderConfig {
            order,
            transformer_precision,
            ep,
        })
    }

    /// Makes relative folders relative to `base` (the config file's folder).
    fn anchor_paths(&mut self, base: &Path) {
        for p in [&mut self.tensorrt.cache_dir, &mut self.coreml.cache_dir]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }
}

#[derive(Deserialize)]
struct ConfigFile {
    /// Other sections belong to other parts of fluxrt and are not checked here.
    #[serde(default)]
    providers: ProvidersLayer,
}

/// Parses a config file's `[providers]` section (other sections are ignored). An unknown key or a bad value is an
/// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) error naming the file, the line and the key.
pub fn parse_config(text: &str, origin: &str) -> Result<ProvidersLayer> {
    toml::from_str::<ConfigFile>(text)
        .map(|c| c.providers)
        .map_err(|e| {
            // The table the bad key sits in: the last `[header]` line before it.
            let section = e
                .span()
                .and_then(|span| {
                    let header = text
                        .get(..span.start)?
                        .lines()
                        .rev()
                        .map(str::trim)
                        .find(|l| l.starts_with('['))?;
                    let end = header.rfind(']')?;
                    Some(format!(" (in {})", &header[..=end]))
                })
                .unwrap_or_default();
            Error::input(format!(
                "config file {origin}{section}: {}",
                e.to_string().trim_end()
            ))
            .with_hint(
                "see docs/providers.md for the keys of the [providers] section and their values",
            )
        })
}

/// Reads a config file's `[providers]` section; relative folders in it are relative to the file's folder.
pub fn load_config(path: &Path) -> Result<ProvidersLayer> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::input(format!(
            "cannot read the config file {}: {e}",
            path.display()
        ))
    })?;
    let mut layer = parse_config(&text, &path.display().to_string())?;
    layer.anchor_paths(path.parent().unwrap_or(Path::new(".")));
    Ok(layer)
}

// ---------------------------------------------------------------------------------------------------------------
// Resolved settings

/// The provider settings after defaults, config file and flags: what [`super::SessionConfig::ep`] carries.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProviderConfig {
    /// Provider order from the config file (`--provider` wins).
    pub order: Option<Vec<Provider>>,
    /// The BFL transformer folder to use (`fp32`, `fp16`, `bf16`, `fp8`, `fp4`); `None` picks one for the provider.
    pub transformer_precision: Option<String>,
    pub ep: EpSettings,
}

/// Settings of every GPU provider. `Default` is fluxrt's defaults (see docs/providers.md).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EpSettings {
    /// GPU index for CUDA and TensorRT (default 0) and the DirectML adapter index (default: chosen by preference).
    pub device_id: Option<u32>,
    /// Declared image size and batch range: TensorRT profiles, and static shapes for CUDA graphs.
    pub shapes: Option<ShapeRange>,
    pub tensorrt: TensorRtSettings,
    pub cuda: CudaSettings,
    pub directml: DirectMlSettings,
    pub coreml: CoreMlSettings,
    /// The model's fixed shapes (T5 length, ...), set by [`EpSettings::for_model`]; needed for profiles.
    pub model: Option<ModelShapes>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TensorRtSettings {
    pub fp16: bool,
    pub bf16: bool,
    pub layer_norm_fp32_fallback: bool,
    pub engine_cache: bool,
    /// Root of the engine and timing caches; `None` = [`default_cache_root`]`/tensorrt`.
    pub cache_dir: Option<PathBuf>,
    pub timing_cache: bool,
    pub builder_optimization_level: u8,
    pub max_workspace_size: Option<u64>,
    /// Capture CUDA graphs, when the shape range is static.
    pub cuda_graph: bool,
}

impl Default for TensorRtSettings {
    fn default() -> Self {
        TensorRtSettings {
            fp16: false,
            bf16: false,
            layer_norm_fp32_fallback: true,
            engine_cache: true,
            cache_dir: None,
            timing_cache: true,
            builder_optimization_level: 3,
            max_workspace_size: None,
            cuda_graph: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct CudaSettings {
    pub conv_algorithm_search: ConvSearch,
    pub arena_extend_strategy: ArenaExtend,
    pub memory_limit: Option<u64>,
    pub tf32: bool,
    /// Capture CUDA graphs, when the shape range is static.
    pub cuda_graph: bool,
}

impl Default for CudaSettings {
    fn default() -> Self {
        CudaSettings {
            conv_algorithm_search: ConvSearch::Exhaustive,
            arena_extend_strategy: ArenaExtend::SameAsRequested,
            memory_limit: None,
            tf32: true,
            cuda_graph: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct DirectMlSettings {
    pub performance_preference: DmlPerformance,
    pub device_filter: DmlDeviceFilter,
}

impl Default for DirectMlSettings {
    fn default() -> Self {
        DirectMlSettings {
            performance_preference: DmlPerformance::HighPerformance,
            device_filter: DmlDeviceFilter::Gpu,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct CoreMlSettings {
    pub model_format: CoreMlFormat,
    pub compute_units: ComputeUnits,
    pub model_cache: bool,
    /// `None` = [`default_cache_root`]`/coreml`.
    pub cache_dir: Option<PathBuf>,
    pub static_input_shapes: bool,
}

impl Default for CoreMlSettings {
    fn default() -> Self {
        CoreMlSettings {
            model_format: CoreMlFormat::MlProgram,
            compute_units: ComputeUnits::All,
            model_cache: true,
            cache_dir: None,
            static_input_shapes: false,
        }
    }
}

/// Where fluxrt keeps provider caches: `FLUXRT_CACHE_DIR`, else `$XDG_CACHE_HOME/fluxrt`, else `%LOCALAPPDATA%\fluxrt`,
/// else `~/.cache/fluxrt`, else the temporary folder's `fluxrt-cache`.
pub fn default_cache_root() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(d) = var("FLUXRT_CACHE_DIR") {
        return d;
    }
    var("XDG_CACHE_HOME")
        .or_else(|| var("LOCALAPPDATA"))
        .or_else(|| var("HOME").map(|h| h.join(".cache")))
        .map(|b| b.join("fluxrt"))
        .unwrap_or_else(|| std::env::temp_dir().join("fluxrt-cache"))
}

/// The machine facts that key the caches.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostInfo {
    pub ort_version: String,
    /// GPU models found on the machine (NVIDIA: `/proc/driver/nvidia/gpus`), sorted; empty when unknown.
    pub gpus: Vec<String>,
}

impl HostInfo {
    /// The loaded ONNX Runtime's version and the GPUs this machine reports.
    pub fn detect(ort_version: &str) -> HostInfo {
        let mut gpus = Vec::new();
        if let Ok(dir) = std::fs::read_dir("/proc/driver/nvidia/gpus") {
            for e in dir.flatten() {
                if let Ok(info) = std::fs::read_to_string(e.path().join("information")) {
                    if let Some(m) = info.lines().find_map(|l| l.strip_prefix("Model:")) {
                        gpus.push(m.trim().to_string());
                    }
                }
            }
        }
        gpus.sort();
        HostInfo {
            ort_version: ort_version.to_string(),
            gpus,
        }
    }

    /// e.g. `gpu 0 of [NVIDIA H100 80GB HBM3]`, or `gpu 0` when the models are unknown.
    pub fn gpu_label(&self, device_id: u32) -> String {
        if self.gpus.is_empty() {
            format!("gpu {device_id}")
        } else {
            format!("gpu {device_id} of [{}]", self.gpus.join(", "))
        }
    }
}

/// One graph, as far as provider options depend on it.
#[derive(Debug, Clone, PartialEq)]
pub struct GraphInfo {
    /// The pipeline role name (`transformer`, `clip`, `t5`, `vae_decoder`, ...), or any label.
    pub role: String,
    pub path: PathBuf,
    /// Content fingerprint (see [`graph_fingerprint`]).
    pub fingerprint: u64,
    /// Declared inputs, when a profile is needed.
    pub inputs: Option<Vec<IoInfo>>,
}

impl GraphInfo {
    /// Fingerprints the file and, when `with_inputs`, reads its declared inputs (no weights are read).
    pub fn read(role: &str, path: &Path, with_inputs: bool) -> Result<GraphInfo> {
        let fingerprint = graph_fingerprint(path).map_err(|e| {
            Error::model(format!("cannot read {role} graph {}: {e}", path.display()))
        })?;
        let inputs = if with_inputs {
            Some(trt_profile::read_declared_inputs(path)?)
        } else {
            None
        };
        Ok(GraphInfo {
            role: role.to_string(),
            path: path.to_path_buf(),
            fingerprint,
            inputs,
        })
    }
}

/// FNV-1a, 64 bit: stable across Rust versions and machines, so cache folder names stay valid.
#[derive(Debug, Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        for &x in b {
            self.0 ^= u64::from(x);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self
    }
    /// A field: its bytes and a separator, so that ("ab","c") and ("a","bc") differ.
    pub fn field(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes()).bytes(&[0xff])
    }
    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// The model part of a cache key: the graph file's size, modification time, first and last MiB, and the size and
/// modification time of external data files beside it (`*.onnx_data`, `*.data`, or names starting with the graph's
/// stem).
pub fn graph_fingerprint(path: &Path) -> std::io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    const MIB: u64 = 1 << 20;
    let mut h = Fnv::default();
    let stamp = |h: &mut Fnv, m: &std::fs::Metadata| {
        h.field(&m.len().to_string());
        if let Ok(t) = m.modified() {
            if let Ok(d) = t.duration_since(std::time::UNIX_EPOCH) {
                h.field(&format!("{}.{}", d.as_secs(), d.subsec_nanos()));
            }
        }
    };
    let mut f = std::fs::File::open(path)?;
    let meta = f.metadata()?;
    stamp(&mut h, &meta);
    let mut buf = vec![0u8; MIB.min(meta.len()) as usize];
    f.read_exact(&mut buf)?;
    h.bytes(&buf);
    if meta.len() > MIB {
        f.seek(SeekFrom::End(-(MIB as i64)))?;
        f.read_exact(&mut buf)?;
        h.bytes(&buf);
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let own = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Some(dir) = path.parent() {
        let mut side: Vec<(String, std::fs::Metadata)> =
            std::fs::read_dir(if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            })?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let data = name.ends_with(".onnx_data")
                    || name.ends_with(".data")
                    || (name.starts_with(&format!("{stem}.")) && name != own);
                (data && !name.ends_with(".onnx")).then(|| e.metadata().ok().map(|m| (name, m)))?
            })
            .collect();
        side.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, m) in side {
            h.field(&name);
            stamp(&mut h, &m);
        }
    }
    Ok(h.finish())
}

/// Bumped whenever the engine cache key or layout changes.
const TRT_CACHE_FORMAT: &str = "fluxrt-tensorrt-engine-v1";
const COREML_CACHE_FORMAT: &str = "fluxrt-coreml-v1";

// ---------------------------------------------------------------------------------------------------------------
// What each provider receives

/// The TensorRT provider's options for one graph.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRtOptions {
    pub device_id: i32,
    pub fp16: bool,
    pub bf16: bool,
    pub layer_norm_fp32_fallback: bool,
    pub builder_optimization_level: u8,
    pub max_workspace_size: Option<u64>,
    /// The graph's engine cache folder (`None`: cache off, or no graph to key it by).
    pub engine_cache_dir: Option<PathBuf>,
    /// Shared by all graphs of all models on this GPU type.
    pub timing_cache_dir: Option<PathBuf>,
    pub profile: Option<Profile>,
    pub cuda_graph: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CudaOptions {
    pub device_id: i32,
    pub conv_algorithm_search: ConvSearch,
    pub arena_extend_strategy: ArenaExtend,
    pub memory_limit: Option<u64>,
    pub tf32: bool,
    pub cuda_graph: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DirectMlOptions {
    /// The adapter index; when set, ONNX Runtime ignores the preference and filter.
    pub device_id: Option<i32>,
    pub performance_preference: DmlPerformance,
    pub device_filter: DmlDeviceFilter,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CoreMlOptions {
    pub model_format: CoreMlFormat,
    pub compute_units: ComputeUnits,
    pub cache_dir: Option<PathBuf>,
    pub static_input_shapes: bool,
}

/// What one provider receives for one graph.
#[derive(Debug, Clone, PartialEq)]
pub enum ProviderOptions {
    TensorRt(TensorRtOptions),
    Cuda(CudaOptions),
    DirectMl(DirectMlOptions),
    CoreMl(CoreMlOptions),
    /// A provider registered with ONNX Runtime's defaults (CPU, ROCm, MIGraphX, OpenVINO).
    Defaults(Provider),
}

/// A boolean as `ort`'s option builders send it (ONNX Runtime's TensorRT and CUDA parsers take `true`/`false`).
fn flag(b: bool) -> String {
    b.to_string()
}

/// A boolean as ONNX Runtime's Core ML provider reads it: only `"1"` is true there.
fn coreml_flag(b: bool) -> &'static str {
    if b {
        "1"
    } else {
        "0"
    }
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

impl ProviderOptions {
    /// The option list the provider receives, with ONNX Runtime's option names, in the order fluxrt sets them.
    /// DirectML takes no option list; its entries name the fields of the registration call.
    pub fn ort_options(&self) -> Vec<(String, String)> {
        let mut v: Vec<(&str, String)> = Vec::new();
        match self {
            ProviderOptions::TensorRt(t) => {
                v.push(("device_id", t.device_id.to_string()));
                v.push(("trt_fp16_enable", flag(t.fp16)));
                v.push(("trt_bf16_enable", flag(t.bf16)));
                v.push((
                    "trt_layer_norm_fp32_fallback",
                    flag(t.layer_norm_fp32_fallback),
                ));
                v.push((
                    "trt_builder_optimization_level",
                    t.builder_optimization_level.to_string(),
                ));
                if let Some(w) = t.max_workspace_size {
                    v.push(("trt_max_workspace_size", w.to_string()));
                }
                v.push((
                    "trt_engine_cache_enable",
                    flag(t.engine_cache_dir.is_some()),
                ));
                if let Some(d) = &t.engine_cache_dir {
                    v.push(("trt_engine_cache_path", path_str(d)));
                }
                v.push((
                    "trt_timing_cache_enable",
                    flag(t.timing_cache_dir.is_some()),
                ));
                if let Some(d) = &t.timing_cache_dir {
                    v.push(("trt_timing_cache_path", path_str(d)));
                }
                if let Some(p) = t.profile.as_ref().filter(|p| !p.is_empty()) {
                    v.push(("trt_profile_min_shapes", p.min_shapes()));
                    v.push(("trt_profile_opt_shapes", p.opt_shapes()));
                    v.push(("trt_profile_max_shapes", p.max_shapes()));
                }
                v.push(("trt_cuda_graph_enable", flag(t.cuda_graph)));
            }
            ProviderOptions::Cuda(c) => {
                v.push(("device_id", c.device_id.to_string()));
                v.push((
                    "cudnn_conv_algo_search",
                    c.conv_algorithm_search.name().to_ascii_uppercase(),
                ));
                v.push((
                    "arena_extend_strategy",
                    match c.arena_extend_strategy {
                        ArenaExtend::NextPowerOfTwo => "kNextPowerOfTwo",
                        ArenaExtend::SameAsRequested => "kSameAsRequested",
                    }
                    .to_string(),
                ));
                if let Some(m) = c.memory_limit {
                    v.push(("gpu_mem_limit", m.to_string()));
                }
                v.push(("use_tf32", flag(c.tf32)));
                v.push(("enable_cuda_graph", flag(c.cuda_graph)));
            }
            ProviderOptions::DirectMl(d) => match d.device_id {
                Some(id) => v.push(("device_id", id.to_string())),
                None => {
                    v.push((
                        "performance_preference",
                        d.performance_preference.name().to_string(),
                    ));
                    v.push(("device_filter", d.device_filter.name().to_string()));
                }
            },
            ProviderOptions::CoreMl(c) => {
                v.push((
                    "ModelFormat",
                    match c.model_format {
                        CoreMlFormat::MlProgram => "MLProgram",
                        CoreMlFormat::NeuralNetwork => "NeuralNetwork",
                    }
                    .to_string(),
                ));
                v.push((
                    "MLComputeUnits",
                    match c.compute_units {
                        ComputeUnits::All => "ALL",
                        ComputeUnits::CpuAndGpu => "CPUAndGPU",
                        ComputeUnits::CpuAndNeuralEngine => "CPUAndNeuralEngine",
                        ComputeUnits::CpuOnly => "CPUOnly",
                    }
                    .to_string(),
                ));
                if let Some(d) = &c.cache_dir {
                    v.push(("ModelCacheDirectory", path_str(d)));
                }
                v.push((
                    "RequireStaticInputShapes",
                    coreml_flag(c.static_input_shapes).to_string(),
                ));
            }
            ProviderOptions::Defaults(_) => {}
        }
        v.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }
}

/// Whether the graph with pipeline role `role` may capture CUDA graphs: only the transformer. A captured graph
/// replays the device addresses of its capture run, so every input and output must stay in the same device buffer
/// for the session's lifetime; only the denoising loop's transformer is driven that way (fixed buffers of the
/// device loop, [`super::step_graph::DeviceDenoise`]). The text encoders and the VAE run once per request through
/// plain runs, whose inputs and outputs ONNX Runtime allocates anew, and gain little from a graph anyway.
pub fn captures_cuda_graphs(role: &str) -> bool {
    role == Role::Transformer.name()
}

/// Session settings a provider needs from ONNX Runtime's session options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SessionOverrides {
    /// Memory pattern planning must be off (DirectML).
    pub no_memory_pattern: bool,
    /// Nodes must run one at a time (DirectML).
    pub sequential_execution: bool,
}

/// What the active providers require of the session: DirectML needs memory patterns off and sequential execution.
pub fn session_overrides(active: &[Provider]) -> SessionOverrides {
    let dml = active.contains(&Provider::DirectMl);
    SessionOverrides {
        no_memory_pattern: dml,
        sequential_execution: dml,
    }
}

impl EpSettings {
    /// These settings with the model's fixed shapes filled in (needed when a shape range is declared).
    pub fn for_model(&self, spec: &ModelSpec) -> Result<EpSettings> {
        let mut s = self.clone();
        if s.shapes.is_some() {
            s.model = Some(ModelShapes::of(spec)?);
        }
        Ok(s)
    }

    /// CUDA graphs asked for without a shape range: pin the one shape a single request needs (its size and its
    /// transformer rows), as `--trt-sizes WxH --trt-batch ROWS` would. Returns whether it did. A declared range is
    /// left alone (its own warnings and refusals apply).
    pub fn pin_request_shape(&mut self, req: &trt_profile::RequestShape) -> Result<bool> {
        if self.shapes.is_some() || !(self.cuda.cuda_graph || self.tensorrt.cuda_graph) {
            return Ok(false);
        }
        self.shapes = Some(ShapeRange {
            sizes: format!("{}x{}", req.width, req.height).parse()?,
            batch: req.transformer_rows().to_string().parse()?,
        });
        Ok(true)
    }

    /// The GPU the providers run on (0 unless a device id is set), for device memory.
    pub fn gpu_id(&self) -> i32 {
        self.device_id.map_or(0, |d| d as i32)
    }

    fn static_shapes(&self) -> bool {
        self.shapes.as_ref().is_some_and(ShapeRange::is_static)
    }

    /// The TensorRT root cache folder.
    pub fn tensorrt_cache_root(&self) -> PathBuf {
        self.tensorrt
            .cache_dir
            .clone()
            .unwrap_or_else(|| default_cache_root().join("tensorrt"))
    }

    /// The TensorRT options for `graph` (`None`: for probing, without caches or profile).
    pub fn tensorrt_options(
        &self,
        graph: Option<&GraphInfo>,
        host: &HostInfo,
    ) -> Result<TensorRtOptions> {
        let t = &self.tensorrt;
        let profile = match (graph, &self.shapes) {
            (Some(g), Some(range)) => {
                let model = self.model.ok_or_else(|| {
                    Error::input(
                        "a TensorRT shape range needs the model's shapes (T5 length, default size)",
                    )
                    .with_hint(
                        "library users: pass the settings through EpSettings::for_model(&spec)",
                    )
                })?;
                let inputs = g.inputs.as_deref().ok_or_else(|| {
                    Error::runtime(format!("{} graph: declared inputs were not read", g.role))
                })?;
                let p = trt_profile::derive(Role::from_name(&g.role), inputs, range, &model)
                    .map_err(|e| Error {
                        message: format!("{} graph {}: {}", g.role, g.path.display(), e.message),
                        ..e
                    })?;
                Some(p)
            }
            _ => None,
        };
        let mut o = TensorRtOptions {
            device_id: self.gpu_id(),
            fp16: t.fp16,
            bf16: t.bf16,
            layer_norm_fp32_fallback: t.layer_norm_fp32_fallback,
            builder_optimization_level: t.builder_optimization_level,
            max_workspace_size: t.max_workspace_size,
            engine_cache_dir: None,
            timing_cache_dir: None,
            profile,
            cuda_graph: t.cuda_graph
                && self.static_shapes()
                && graph.is_some_and(|g| captures_cuda_graphs(&g.role)),
        };
        if let Some(g) = graph {
            let root = self.tensorrt_cache_root();
            if t.engine_cache {
                o.engine_cache_dir = Some(root.join(engine_cache_name(&o, g, host)));
            }
            if t.timing_cache {
                o.timing_cache_dir = Some(root.join("timing"));
            }
        }
        Ok(o)
    }

    /// The CUDA options of a session that is not the transformer's (probing, the step graph): CUDA graphs off.
    pub fn cuda_options(&self) -> CudaOptions {
        self.cuda_options_for(None)
    }

    /// The CUDA options of the graph with pipeline role `role` (CUDA graphs only for the transformer, see
    /// [`captures_cuda_graphs`]).
    pub fn cuda_options_for(&self, role: Option<&str>) -> CudaOptions {
        let c = &self.cuda;
        CudaOptions {
            device_id: self.gpu_id(),
            conv_algorithm_search: c.conv_algorithm_search,
            arena_extend_strategy: c.arena_extend_strategy,
            memory_limit: c.memory_limit,
            tf32: c.tf32,
            cuda_graph: c.cuda_graph
                && self.static_shapes()
                && role.is_some_and(captures_cuda_graphs),
        }
    }

    /// Whether a session of the graph with pipeline role `role` on `active` captures CUDA graphs (CUDA's
    /// `enable_cuda_graph` or TensorRT's `trt_cuda_graph_enable`). Such a session replays the device addresses of
    /// its captured run, so it must always be run through the device loop's fixed buffers
    /// ([`super::step_graph::loop_plan`]).
    pub fn cuda_graphs(&self, active: &[Provider], role: &str) -> bool {
        captures_cuda_graphs(role)
            && self.static_shapes()
            && ((active.contains(&Provider::TensorRt) && self.tensorrt.cuda_graph)
                || (active.contains(&Provider::Cuda) && self.cuda.cuda_graph))
    }

    /// The value of every symbolic dimension of a graph whose session captures CUDA graphs, from its one static
    /// shape (`--trt-sizes WxH --trt-batch B`), in declared order. Given to ONNX Runtime as free-dimension
    /// overrides, they let its optimizer fold the graph's shape arithmetic, which the CUDA provider would
    /// otherwise leave on the CPU: graph capture needs every node on the GPU. Empty without a static shape.
    pub fn static_dimensions(&self, role: &str, inputs: &[IoInfo]) -> Result<Vec<(String, i64)>> {
        let (Some(range), Some(model)) =
            (self.shapes.as_ref().filter(|r| r.is_static()), self.model)
        else {
            return Ok(Vec::new());
        };
        let profile = trt_profile::derive(Role::from_name(role), inputs, range, &model)?;
        let mut dims: Vec<(String, i64)> = Vec::new();
        for p in &profile.inputs {
            let Some(io) = inputs.iter().find(|io| io.name == p.name) else {
                continue;
            };
            for (d, &v) in io.shape.iter().zip(&p.min) {
                let Dim::Symbolic(sym) = d else { continue };
                match dims.iter().find(|(s, _)| s == sym) {
                    None => dims.push((sym.clone(), v)),
                    Some((_, w)) if *w == v => {}
                    Some((_, w)) => {
                        return Err(Error::model(format!(
                            "{role} graph: dimension {sym} would be {w} for one input and {v} for input {}",
                            io.name
                        ))
                        .with_hint("export the graph with distinct names for distinct dimensions, or turn CUDA graphs off"))
                    }
                }
            }
        }
        Ok(dims)
    }

    pub fn directml_options(&self) -> DirectMlOptions {
        DirectMlOptions {
            device_id: self.device_id.map(|d| d as i32),
            performance_preference: self.directml.performance_preference,
            device_filter: self.directml.device_filter,
        }
    }

    pub fn coreml_options(&self, graph: Option<&GraphInfo>, host: &HostInfo) -> CoreMlOptions {
        let c = &self.coreml;
        let cache_dir = graph.filter(|_| c.model_cache).map(|g| {
            let root = c
                .cache_dir
                .clone()
                .unwrap_or_else(|| default_cache_root().join("coreml"));
            let mut h = Fnv::default();
            h.field(COREML_CACHE_FORMAT)
                .field(&host.ort_version)
                .field(&g.fingerprint.to_string())
                .field(c.model_format.name());
            root.join(format!("{}-{:016x}", safe_name(&g.role), h.finish()))
        });
        CoreMlOptions {
            model_format: c.model_format,
            compute_units: c.compute_units,
            cache_dir,
            static_input_shapes: c.static_input_shapes,
        }
    }

    /// What provider `p` receives for `graph` (its role decides CUDA graphs; none without a graph).
    pub fn provider_options(
        &self,
        p: Provider,
        graph: Option<&GraphInfo>,
        host: &HostInfo,
    ) -> Result<ProviderOptions> {
        self.provider_options_for(p, graph.map(|g| g.role.as_str()), graph, host)
    }

    /// What provider `p` receives for the graph with pipeline role `role`; `graph` is read only for TensorRT and
    /// CoreML (profiles, caches), so a CUDA session passes its role alone.
    pub fn provider_options_for(
        &self,
        p: Provider,
        role: Option<&str>,
        graph: Option<&GraphInfo>,
        host: &HostInfo,
    ) -> Result<ProviderOptions> {
        Ok(match p {
            Provider::TensorRt => ProviderOptions::TensorRt(self.tensorrt_options(graph, host)?),
            Provider::Cuda => ProviderOptions::Cuda(self.cuda_options_for(role)),
            Provider::DirectMl => ProviderOptions::DirectMl(self.directml_options()),
            Provider::CoreMl => ProviderOptions::CoreMl(self.coreml_options(graph, host)),
            other => ProviderOptions::Defaults(other),
        })
    }

    /// The range requests must stay in with these providers, and what it belongs to: the TensorRT profile when
    /// TensorRT is active with a declared range, or the static shape of CUDA graphs on the CUDA provider.
    pub fn request_range(&self, active: &[Provider]) -> Option<(&ShapeRange, &'static str)> {
        let range = self.shapes.as_ref()?;
        if active.contains(&Provider::TensorRt) {
            Some((range, "the TensorRT profile the engines were built for"))
        } else if active.contains(&Provider::Cuda) && self.cuda.cuda_graph && range.is_static() {
            Some((range, "the static shape the CUDA graphs were captured for"))
        } else {
            None
        }
    }

    /// Refuses a request of `batch` images at `width` x `height` outside [`request_range`](Self::request_range),
    /// instead of letting TensorRT rebuild its engine (minutes) or a CUDA graph replay the wrong shape.
    pub fn check_request(
        &self,
        active: &[Provider],
        width: u32,
        height: u32,
        batch: usize,
    ) -> Result<()> {
        match self.request_range(active) {
            Some((range, what)) => range.check_request(width, height, batch, what),
            None => Ok(()),
        }
    }

    /// Like [`check_request`](Self::check_request) for every graph call of a request: true CFG's 2B transformer
    /// rows and the VAE's tiles ([`trt_profile::RequestShape`]).
    pub fn check_request_shape(
        &self,
        active: &[Provider],
        req: &trt_profile::RequestShape,
    ) -> Result<()> {
        match self.request_range(active) {
            Some((range, what)) => range.check_shape(req, what),
            None => Ok(()),
        }
    }

    /// Settings that have no effect with these providers and shapes, one sentence each.
    pub fn warnings(&self, active: &[Provider]) -> Vec<String> {
        let mut w = Vec::new();
        let static_hint = "CUDA graphs need one image size and one batch size (e.g. --trt-sizes 1024 --trt-batch 1); they stay off";
        if active.contains(&Provider::TensorRt) && self.tensorrt.cuda_graph && !self.static_shapes()
        {
            w.push(format!("TensorRT: {static_hint}"));
        }
        if active.contains(&Provider::Cuda) && self.cuda.cuda_graph && !self.static_shapes() {
            w.push(format!("CUDA: {static_hint}"));
        }
        if active.contains(&Provider::DirectMl) && self.device_id.is_some() {
            w.push(
                "DirectML: the device id picks the adapter; the performance preference and device filter are ignored"
                    .into(),
            );
        }
        if active.contains(&Provider::TensorRt) && self.shapes.is_none() {
            w.push(
                "TensorRT: no shape range declared (--trt-sizes, --trt-batch): engines are built at the first request \
                 of each new shape, which takes minutes"
                    .into(),
            );
        }
        w
    }
}

fn safe_name(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The engine cache folder name of a graph: `<role>-<16 hex digits>` hashing the cache format, ONNX Runtime's
/// version, the graph's fingerprint, the GPU (device id and the machine's GPU models), the precision flags, the
/// builder level and the profile.
fn engine_cache_name(o: &TensorRtOptions, g: &GraphInfo, host: &HostInfo) -> String {
    let mut h = Fnv::default();
    h.field(TRT_CACHE_FORMAT)
        .field(&host.ort_version)
        .field(&g.fingerprint.to_string())
        .field(&host.gpu_label(o.device_id as u32))
        .field(&format!(
            "fp16={} bf16={} ln32={} level={}",
            o.fp16, o.bf16, o.layer_norm_fp32_fallback, o.builder_optimization_level
        ));
    match &o.profile {
        Some(p) => h
            .field(&p.min_shapes())
            .field(&p.opt_shapes())
            .field(&p.max_shapes()),
        None => h.field("dynamic"),
    };
    format!("{}-{:016x}", safe_name(&g.role), h.finish())
}

/// Whether a graph's TensorRT engine is already cached.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EngineCacheStatus {
    pub graph: String,
    pub dir: PathBuf,
    /// `*.engine` files in the folder.
    pub engines: usize,
    pub hit: bool,
}

/// The TensorRT engine cache state of every graph of a model, with these settings on this machine: what
/// `fluxrt build-engines` produced and what `fluxrt serve` will reuse (a hit means no engine build at load).
/// Empty when the engine cache is off.
pub fn engine_cache_status(
    spec: &ModelSpec,
    ep: &EpSettings,
    host: &HostInfo,
) -> Result<Vec<EngineCacheStatus>> {
    if !ep.tensorrt.engine_cache {
        return Ok(Vec::new());
    }
    let ep = if ep.shapes.is_some() && ep.model.is_none() {
        ep.for_model(spec)?
    } else {
        ep.clone()
    };
    let mut out = Vec::new();
    for (role, g) in &spec.graphs {
        let info = GraphInfo::read(role.name(), &g.path, ep.shapes.is_some())?;
        let o = ep.tensorrt_options(Some(&info), host)?;
        let Some(dir) = o.engine_cache_dir else {
            continue;
        };
        let engines = std::fs::read_dir(&dir)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".engine"))
                    .count()
            })
            .unwrap_or(0);
        out.push(EngineCacheStatus {
            graph: role.name().to_string(),
            dir,
            engines,
            hit: engines > 0,
        });
    }
    Ok(out)
}

/// Creates the cache folders `o` names and writes a `fluxrt-cache.json` describing the key beside the engines.
pub fn prepare_cache_dirs(o: &ProviderOptions, g: &GraphInfo, host: &HostInfo) -> Result<()> {
    let (dirs, describe) = match o {
        ProviderOptions::TensorRt(t) => (
            [t.engine_cache_dir.as_ref(), t.timing_cache_dir.as_ref()],
            t.engine_cache_dir.as_ref(),
        ),
        ProviderOptions::CoreMl(c) => ([c.cache_dir.as_ref(), None], None),
        _ => return Ok(()),
    };
    for d in dirs.into_iter().flatten() {
        std::fs::create_dir_all(d).map_err(|e| {
            Error::io_at("create the provider cache folder", d, e)
                .with_hint("point the cache at a writable folder (--trt-cache-dir, --coreml-cache-dir) or turn it off")
        })?;
    }
    if let (Some(dir), ProviderOptions::TensorRt(t)) = (describe, o) {
        let info = serde_json::json!({
            "graph": g.role,
            "file": g.path,
            "onnxruntime": host.ort_version,
            "gpu": host.gpu_label(t.device_id as u32),
            "fp16": t.fp16,
            "bf16": t.bf16,
            "builder_optimization_level": t.builder_optimization_level,
            "profile": t.profile.as_ref().map(|p| serde_json::json!({
                "min": p.min_shapes(), "opt": p.opt_shapes(), "max": p.max_shapes(),
            })),
        });
        let text = serde_json::to_string_pretty(&info).unwrap_or_default();
        // Best effort: the description helps people, the engines do not need it.
        let _ = std::fs::write(dir.join("fluxrt-cache.json"), text);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// ort's provider builders (only with each provider's cargo feature)

#[cfg(feature = "tensorrt")]
impl TensorRtOptions {
    pub(crate) fn to_ort(&self) -> ort::ep::TensorRT {
        let mut e = ort::ep::TensorRT::default()
            .with_device_id(self.device_id)
            .with_fp16(self.fp16)
            .with_bf16(self.bf16)
            .with_layer_norm_fp32_fallback(self.layer_norm_fp32_fallback)
            .with_builder_optimization_level(self.builder_optimization_level);
        if let Some(w) = self.max_workspace_size {
            e = e.with_max_workspace_size(usize::try_from(w).unwrap_or(usize::MAX));
        }
        e = e.with_engine_cache(self.engine_cache_dir.is_some());
        if let Some(d) = &self.engine_cache_dir {
            e = e.with_engine_cache_path(path_str(d));
        }
        e = e.with_timing_cache(self.timing_cache_dir.is_some());
        if let Some(d) = &self.timing_cache_dir {
            e = e.with_timing_cache_path(path_str(d));
        }
        if let Some(p) = self.profile.as_ref().filter(|p| !p.is_empty()) {
            e = e
                .with_profile_min_shapes(p.min_shapes())
                .with_profile_opt_shapes(p.opt_shapes())
                .with_profile_max_shapes(p.max_shapes());
        }
        e.with_cuda_graph(self.cuda_graph)
    }
}

#[cfg(feature = "cuda")]
impl CudaOptions {
    pub(crate) fn to_ort(&self) -> ort::ep::CUDA {
        use ort::ep::cuda::ConvAlgorithmSearch as S;
        use ort::ep::ArenaExtendStrategy as A;
        let mut e = ort::ep::CUDA::default()
            .with_device_id(self.device_id)
            .with_conv_algorithm_search(match self.conv_algorithm_search {
                ConvSearch::Exhaustive => S::Exhaustive,
                ConvSearch::Heuristic => S::Heuristic,
                ConvSearch::Default => S::Default,
            })
            .with_arena_extend_strategy(match self.arena_extend_strategy {
                ArenaExtend::NextPowerOfTwo => A::NextPowerOfTwo,
                ArenaExtend::SameAsRequested => A::SameAsRequested,
            });
        if let Some(m) = self.memory_limit {
            e = e.with_memory_limit(usize::try_from(m).unwrap_or(usize::MAX));
        }
        e.with_tf32(self.tf32).with_cuda_graph(self.cuda_graph)
    }
}

#[cfg(feature = "directml")]
impl DirectMlOptions {
    pub(crate) fn to_ort(&self) -> ort::ep::DirectML {
        use ort::ep::directml::{DeviceFilter as F, PerformancePreference as P};
        let e = ort::ep::DirectML::default()
            .with_performance_preference(match self.performance_preference {
                DmlPerformance::Default => P::Default,
                DmlPerformance::HighPerformance => P::HighPerformance,
                DmlPerformance::MinimumPower => P::MinimumPower,
            })
            .with_device_filter(match self.device_filter {
                DmlDeviceFilter::Gpu => F::Gpu,
                DmlDeviceFilter::Npu => F::Npu,
                DmlDeviceFilter::Any => F::Any,
            });
        match self.device_id {
            Some(id) => e.with_device_id(id),
            None => e,
        }
    }
}

#[cfg(feature = "coreml")]
impl CoreMlOptions {
    pub(crate) fn to_ort(&self) -> ort::ep::CoreML {
        use ort::ep::coreml::{ComputeUnits as U, ModelFormat as M};
        let mut e = ort::ep::CoreML::default()
            .with_model_format(match self.model_format {
                CoreMlFormat::MlProgram => M::MLProgram,
                CoreMlFormat::NeuralNetwork => M::NeuralNetwork,
            })
            .with_compute_units(match self.compute_units {
                ComputeUnits::All => U::All,
                ComputeUnits::CpuAndGpu => U::CPUAndGPU,
                ComputeUnits::CpuAndNeuralEngine => U::CPUAndNeuralEngine,
                ComputeUnits::CpuOnly => U::CPUOnly,
            });
        if let Some(d) = &self.cache_dir {
            e = e.with_model_cache_dir(path_str(d));
        }
        // Not `with_static_input_shapes`: ort sends "true"/"false", and ONNX Runtime's Core ML provider only takes
        // "1" as true, so the wrapper cannot turn the option on.
        use ort::ep::ArbitrarilyConfigurableExecutionProvider;
        e.with_arbitrary_config(
            "RequireStaticInputShapes",
            coreml_flag(self.static_input_shapes),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::session::{Dim, ElemType};
    use crate::ErrorKind;

    fn host() -> HostInfo {
        HostInfo {
            ort_version: "1.31.1".into(),
            gpus: vec!["NVIDIA H100 80GB HBM3".into()],
        }
    }

    fn layer(toml_text: &str) -> ProvidersLayer {
        parse_config(toml_text, "test.toml").unwrap_or_else(|e| panic!("{e}"))
    }

    fn resolve(layers: &[&ProvidersLayer]) -> EpSettings {
        ProvidersLayer::resolve(layers).unwrap().ep
    }

    fn vae_graph() -> GraphInfo {
        GraphInfo {
            role: "vae_decoder".into(),
            path: "/m/vae.opt/model.onnx".into(),
            fingerprint: 42,
            inputs: Some(vec![IoInfo {
                name: "latent".into(),
                dtype: ElemType::F32,
                shape: vec![
                    Dim::Symbolic("B".into()),
                    Dim::Fixed(16),
                    Dim::Symbolic("h".into()),
                    Dim::Symbolic("w".into()),
                ],
            }]),
        }
    }

    fn opts(o: &ProviderOptions) -> Vec<(String, String)> {
        o.ort_options()
    }

    fn get<'a>(list: &'a [(String, String)], key: &str) -> Option<&'a str> {
        list.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    fn with_cache_root(mut s: EpSettings) -> EpSettings {
        s.tensorrt.cache_dir = Some("/cache/trt".into());
        s.coreml.cache_dir = Some("/cache/coreml".into());
        s
    }

    #[test]
    fn tensorrt_defaults() {
        let s = with_cache_root(EpSettings::default());
        let o = s
            .provider_options(Provider::TensorRt, Some(&vae_graph()), &host())
            .unwrap();
        let l = opts(&o);
        let keys: Vec<&str> = l.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "device_id",
                "trt_fp16_enable",
                "trt_bf16_enable",
                "trt_layer_norm_fp32_fallback",
                "trt_builder_optimization_level",
                "trt_engine_cache_enable",
                "trt_engine_cache_path",
                "trt_timing_cache_enable",
                "trt_timing_cache_path",
                "trt_cuda_graph_enable",
            ]
        );
        assert_eq!(get(&l, "device_id"), Some("0"));
        assert_eq!(get(&l, "trt_fp16_enable"), Some("false"));
        assert_eq!(get(&l, "trt_builder_optimization_level"), Some("3"));
        assert_eq!(get(&l, "trt_engine_cache_enable"), Some("true"));
        let dir = get(&l, "trt_engine_cache_path").unwrap();
        assert!(dir.starts_with("/cache/trt/vae_decoder-"), "{dir}");
        assert_eq!(dir.len(), "/cache/trt/vae_decoder-".len() + 16);
        assert_eq!(get(&l, "trt_timing_cache_path"), Some("/cache/trt/timing"));
        assert_eq!(get(&l, "trt_cuda_graph_enable"), Some("false"));
    }

    #[test]
    fn tensorrt_from_flags_and_config() {
        let file = layer(
            r#"
            [providers]
            device_id = 1
            sizes = "512-1024"
            batch = "1-4"
            [providers.tensorrt]
            fp16 = true
            builder_optimization_level = 5
            max_workspace_size = "8GiB"
            cache_dir = "/cache/trt"
            "#,
        );
        // The flags override the file: bf16 on, fp16 off, timing cache off.
        let flags = ProvidersLayer {
            tensorrt: TensorRtLayer {
                fp16: Some(false),
                bf16: Some(true),
                timing_cache: Some(false),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut s = resolve(&[&file, &flags]);
        s.model = Some(ModelShapes::default());
        let l = opts(
            &s.provider_options(Provider::TensorRt, Some(&vae_graph()), &host())
                .unwrap(),
        );
        assert_eq!(get(&l, "device_id"), Some("1"));
        assert_eq!(get(&l, "trt_fp16_enable"), Some("false"));
        assert_eq!(get(&l, "trt_bf16_enable"), Some("true"));
        assert_eq!(get(&l, "trt_builder_optimization_level"), Some("5"));
        assert_eq!(get(&l, "trt_max_workspace_size"), Some("8589934592"));
        assert_eq!(get(&l, "trt_timing_cache_enable"), Some("false"));
        assert_eq!(get(&l, "trt_timing_cache_path"), None);
        assert_eq!(get(&l, "trt_profile_min_shapes"), Some("latent:1x16x64x64"));
        assert_eq!(
            get(&l, "trt_profile_opt_shapes"),
            Some("latent:1x16x128x128")
        );
        assert_eq!(
            get(&l, "trt_profile_max_shapes"),
            Some("latent:4x16x128x128")
        );
        // A range is not static: no CUDA graph even if asked for.
        s.tensorrt.cuda_graph = true;
        let l = opts(
            &s.provider_options(Provider::TensorRt, Some(&vae_graph()), &host())
                .unwrap(),
        );
        assert_eq!(get(&l, "trt_cuda_graph_enable"), Some("false"));
        assert!(s.warnings(&[Provider::TensorRt])[0].contains("CUDA graphs need one image size"));
    }

    #[test]
    fn cuda_graphs_pin_the_request_shape() {
        let mut s = EpSettings::default();
        let one = trt_profile::RequestShape::new(512, 768, 1);
        assert!(
            !s.pin_request_shape(&one).unwrap(),
            "no CUDA graphs: nothing to pin"
        );
        s.cuda.cuda_graph = true;
        // One image with true CFG: two transformer rows.
        let cfg = trt_profile::RequestShape {
            true_cfg: true,
            ..one
        };
        assert!(s.pin_request_shape(&cfg).unwrap());
        assert!(s.static_shapes());
        let r = s.shapes.as_ref().unwrap();
        assert!(r.contains(512, 768, 2) && !r.contains(512, 768, 1) && !r.contains(768, 512, 2));
        // A declared range stays as it is.
        let before = s.shapes;
        let other = trt_profile::RequestShape::new(1024, 1024, 1);
        assert!(!s.pin_request_shape(&other).unwrap());
        assert_eq!(s.shapes, before);
    }

    #[test]
    fn static_dimensions_from_the_static_shape() {
        let transformer = trt_profile::read_declared_inputs(
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("models/tiny-flux-schnell/transformer.onnx"),
        )
        .unwrap();
        let mut s = resolve(&[&layer("[providers]\nsizes = \"512x768\"\nbatch = 2\n")]);
        s.model = Some(ModelShapes::default());
        // B rows, S = (768/16) * (512/16) image tokens, L = the T5 length.
        assert_eq!(
            s.static_dimensions("transformer", &transformer).unwrap(),
            [
                ("B".to_string(), 2),
                ("S".to_string(), 1536),
                ("L".to_string(), 256)
            ]
        );
        // A range is not one shape: nothing to fix.
        s.shapes = Some(ShapeRange {
            sizes: "512-1024".parse().unwrap(),
            batch: "1".parse().unwrap(),
        });
        assert!(s
            .static_dimensions("transformer", &transformer)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn cuda_graph_only_with_static_shapes() {
        let mut s = resolve(&[&layer(
            "[providers]\nsizes = 1024\nbatch = 1\n[providers.tensorrt]\ncuda_graph = true\n[providers.cuda]\ncuda_graph = true\n",
        )]);
        s.model = Some(ModelShapes::default());
        assert!(s.shapes.unwrap().is_static());
        // Only the transformer's session captures CUDA graphs: it alone runs with fixed device buffers (the device
        // loop); every other graph, the step graph and probing (no graph) keep them off.
        let transformer = GraphInfo {
            role: "transformer".into(),
            ..vae_graph()
        };
        let trt = |g: &GraphInfo| {
            let l = opts(
                &s.provider_options(Provider::TensorRt, Some(g), &host())
                    .unwrap(),
            );
            let p = get(&l, "trt_profile_min_shapes").unwrap().to_string();
            assert_eq!(Some(p.as_str()), get(&l, "trt_profile_max_shapes"));
            get(&l, "trt_cuda_graph_enable").unwrap().to_string()
        };
        assert_eq!(trt(&transformer), "true");
        for role in ["clip", "t5", "vae_decoder", "vae_encoder", "step"] {
            let g = GraphInfo {
                role: role.into(),
                ..vae_graph()
            };
            assert_eq!(trt(&g), "false", "{role}");
        }
        let t = opts(
            &s.provider_options(Provider::TensorRt, None, &host())
                .unwrap(),
        );
        assert_eq!(get(&t, "trt_cuda_graph_enable"), Some("false"));
        let cuda = |role: Option<&str>| {
            let l = opts(
                &s.provider_options_for(Provider::Cuda, role, None, &host())
                    .unwrap(),
            );
            get(&l, "enable_cuda_graph").unwrap().to_string()
        };
        assert_eq!(cuda(Some("transformer")), "true");
        for role in [
            Some("clip"),
            Some("t5"),
            Some("vae_decoder"),
            Some("vae_encoder"),
            None,
        ] {
            assert_eq!(cuda(role), "false", "{role:?}");
        }
        assert_eq!(
            get(
                &opts(&s.provider_options(Provider::Cuda, None, &host()).unwrap()),
                "enable_cuda_graph"
            ),
            Some("false")
        );
        assert!(!s.cuda_options().cuda_graph);
        // Per session: the transformer on CUDA or TensorRT, nothing else.
        for active in [
            vec![Provider::Cuda],
            vec![Provider::TensorRt, Provider::Cuda],
        ] {
            assert!(s.cuda_graphs(&active, "transformer"), "{active:?}");
            assert!(!s.cuda_graphs(&active, "vae_decoder"), "{active:?}");
            assert!(!s.cuda_graphs(&active, "t5"), "{active:?}");
        }
        assert!(!s.cuda_graphs(&[Provider::Cpu], "transformer"));
        assert!(!s.cuda_graphs(&[Provider::DirectMl], "transformer"));
        assert!(s.warnings(&[Provider::TensorRt, Provider::Cuda]).is_empty());
        // Without a declared shape there is nothing static.
        let s = resolve(&[&layer("[providers.cuda]\ncuda_graph = true\n")]);
        let c = opts(
            &s.provider_options_for(Provider::Cuda, Some("transformer"), None, &host())
                .unwrap(),
        );
        assert_eq!(get(&c, "enable_cuda_graph"), Some("false"));
        assert!(!s.cuda_graphs(&[Provider::Cuda], "transformer"));
        assert_eq!(s.warnings(&[Provider::Cuda]).len(), 1);
    }

    #[test]
    fn cuda_defaults_and_settings() {
        let s = EpSettings::default();
        assert_eq!(
            opts(&s.provider_options(Provider::Cuda, None, &host()).unwrap()),
            [
                ("device_id", "0"),
                ("cudnn_conv_algo_search", "EXHAUSTIVE"),
                ("arena_extend_strategy", "kSameAsRequested"),
                ("use_tf32", "true"),
                ("enable_cuda_graph", "false"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        let s = resolve(&[&layer(
            "[providers]\ndevice_id = 2\n[providers.cuda]\nconv_algorithm_search = \"heuristic\"\n\
             arena_extend_strategy = \"next_power_of_two\"\nmemory_limit = \"20G\"\ntf32 = false\n",
        )]);
        assert_eq!(
            opts(&s.provider_options(Provider::Cuda, None, &host()).unwrap()),
            [
                ("device_id", "2"),
                ("cudnn_conv_algo_search", "HEURISTIC"),
                ("arena_extend_strategy", "kNextPowerOfTwo"),
                ("gpu_mem_limit", "21474836480"),
                ("use_tf32", "false"),
                ("enable_cuda_graph", "false"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
    }

    #[test]
    fn directml_session_settings_and_adapter() {
        let so = session_overrides(&[Provider::DirectMl, Provider::Cpu]);
        assert!(so.no_memory_pattern && so.sequential_execution);
        assert_eq!(
            session_overrides(&[Provider::Cuda, Provider::Cpu]),
            SessionOverrides::default()
        );
        let s = EpSettings::default();
        assert_eq!(
            opts(
                &s.provider_options(Provider::DirectMl, None, &host())
                    .unwrap()
            ),
            [
                ("performance_preference", "high_performance"),
                ("device_filter", "gpu")
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        let s = resolve(&[&layer(
            "[providers]\ndevice_id = 1\n[providers.directml]\nperformance_preference = \"minimum_power\"\n",
        )]);
        assert_eq!(
            opts(
                &s.provider_options(Provider::DirectMl, None, &host())
                    .unwrap()
            ),
            [("device_id".to_string(), "1".to_string())]
        );
        assert!(s.warnings(&[Provider::DirectMl])[0].contains("ignored"));
    }

    #[test]
    fn coreml_settings() {
        let s = with_cache_root(EpSettings::default());
        let g = vae_graph();
        let l = opts(
            &s.provider_options(Provider::CoreMl, Some(&g), &host())
                .unwrap(),
        );
        assert_eq!(get(&l, "ModelFormat"), Some("MLProgram"));
        assert_eq!(get(&l, "MLComputeUnits"), Some("ALL"));
        assert_eq!(get(&l, "RequireStaticInputShapes"), Some("0"));
        assert!(get(&l, "ModelCacheDirectory")
            .unwrap()
            .starts_with("/cache/coreml/vae_decoder-"));
        let s = resolve(&[&layer(
            "[providers.coreml]\ncompute_units = \"cpu_and_ne\"\nmodel_format = \"neuralnetwork\"\nmodel_cache = false\n",
        )]);
        let l = opts(
            &s.provider_options(Provider::CoreMl, Some(&g), &host())
                .unwrap(),
        );
        assert_eq!(get(&l, "MLComputeUnits"), Some("CPUAndNeuralEngine"));
        assert_eq!(get(&l, "ModelFormat"), Some("NeuralNetwork"));
        assert_eq!(get(&l, "ModelCacheDirectory"), None);
        for (name, ort) in [
            ("all", "ALL"),
            ("cpu-and-gpu", "CPUAndGPU"),
            ("cpu+ane", "CPUAndNeuralEngine"),
            ("cpu", "CPUOnly"),
        ] {
            let mut s = EpSettings::default();
            s.coreml.compute_units = name.parse().unwrap();
            let l = opts(&s.provider_options(Provider::CoreMl, None, &host()).unwrap());
            assert_eq!(get(&l, "MLComputeUnits"), Some(ort), "{name}");
        }
    }

    #[test]
    fn engine_cache_folder_changes_with_every_key_part() {
        let mut s = with_cache_root(EpSettings::default());
        s.model = Some(ModelShapes::default());
        let dir = |s: &EpSettings, g: &GraphInfo, h: &HostInfo| {
            s.tensorrt_options(Some(g), h)
                .unwrap()
                .engine_cache_dir
                .unwrap()
        };
        let g = vae_graph();
        let base = dir(&s, &g, &host());
        assert_eq!(base, dir(&s, &g, &host()), "stable");
        let mut other = g.clone();
        other.fingerprint = 43;
        assert_ne!(base, dir(&s, &other, &host()), "model");
        let h2 = HostInfo {
            ort_version: "1.32.0".into(),
            ..host()
        };
        assert_ne!(base, dir(&s, &g, &h2), "onnxruntime");
        let h3 = HostInfo {
            gpus: vec!["NVIDIA L4".into()],
            ..host()
        };
        assert_ne!(base, dir(&s, &g, &h3), "gpu");
        let mut s2 = s.clone();
        s2.device_id = Some(1);
        assert_ne!(base, dir(&s2, &g, &host()), "device");
        let mut s3 = s.clone();
        s3.shapes = Some(ShapeRange {
            sizes: "512-1024".parse().unwrap(),
            batch: "1-4".parse().unwrap(),
        });
        let ranged = dir(&s3, &g, &host());
        assert_ne!(base, ranged, "shape range");
        s3.shapes = Some(ShapeRange {
            sizes: "512-1024".parse().unwrap(),
            batch: "1-2".parse().unwrap(),
        });
        assert_ne!(ranged, dir(&s3, &g, &host()), "batch range");
        let mut s4 = s.clone();
        s4.tensorrt.fp16 = true;
        assert_ne!(base, dir(&s4, &g, &host()), "precision");
        // Off: no folder; no graph (probing): no folder.
        let mut off = s.clone();
        off.tensorrt.engine_cache = false;
        assert!(off
            .tensorrt_options(Some(&g), &host())
            .unwrap()
            .engine_cache_dir
            .is_none());
        assert!(s
            .tensorrt_options(None, &host())
            .unwrap()
            .engine_cache_dir
            .is_none());
    }

    #[test]
    fn config_errors_name_the_key() {
        let e = parse_config("[providers.tensorrt]\nfp61 = true\n", "my.toml").unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput);
        assert!(
            e.message.contains("my.toml") && e.message.contains("fp61"),
            "{e}"
        );
        assert!(e.message.contains("line 2"), "{e}");
        assert!(e.message.contains("(in [providers.tensorrt])"), "{e}");
        let e = parse_config("[providers]\nsize = \"512-1024\"\n", "my.toml").unwrap_err();
        assert!(
            e.message.contains("`size`") && e.message.contains("(in [providers])"),
            "{e}"
        );
        let e = parse_config(
            "[providers.cuda]\nconv_algorithm_search = \"fastest\"\n",
            "c.toml",
        )
        .unwrap_err();
        assert!(
            e.message.contains("fastest") && e.message.contains("heuristic"),
            "{e}"
        );
        let e = parse_config("[providers]\nsizes = \"500-1024\"\n", "c.toml").unwrap_err();
        assert!(e.message.contains("500"), "{e}");
        let e = parse_config(
            "[providers.tensorrt]\nmax_workspace_size = \"8 parsecs\"\n",
            "c.toml",
        )
        .unwrap_err();
        assert!(e.message.contains("8 parsecs"), "{e}");
        let e = parse_config("[providers]\ndevice_id = \"zero\"\n", "c.toml").unwrap_err();
        assert!(e.message.contains("device_id"), "{e}");
        // Other sections are someone else's business.
        assert_eq!(layer("[server]\nport = 1\n"), ProvidersLayer::default());
        // Values checked after merging name the setting.
        let e = ProvidersLayer::resolve(&[&layer(
            "[providers.tensorrt]\nbuilder_optimization_level = 9\n",
        )])
        .unwrap_err();
        assert!(
            e.message.contains("optimization level") && e.message.contains('9'),
            "{e}"
        );
        let e = ProvidersLayer::resolve(&[&layer("[providers]\nbatch = \"1-4\"\n")]).unwrap_err();
        assert!(e.hint.as_deref().unwrap().contains("--trt-sizes"), "{e}");
        let e =
            ProvidersLayer::resolve(&[&layer("[providers]\ntransformer_precision = \"int3\"\n")])
                .unwrap_err();
        assert!(e.message.contains("int3"), "{e}");
        let e = ProvidersLayer::resolve(&[&layer("[providers]\norder = \"cuda,vulkan\"\n")])
            .unwrap_err();
        assert!(e.message.contains("vulkan"), "{e}");
    }

    #[test]
    fn full_config_file_parses() {
        let text = include_str!("../../docs/providers.example.toml");
        let c = ProvidersLayer::resolve(&[&layer(text)]).unwrap();
        assert_eq!(
            c.order,
            Some(vec![Provider::TensorRt, Provider::Cuda, Provider::Cpu])
        );
        let shapes = c.ep.shapes.unwrap();
        assert_eq!(
            (shapes.sizes.to_string(), shapes.batch.to_string()),
            ("512-1024".into(), "1-4".into())
        );
    }

    #[test]
    fn relative_cache_dirs_follow_the_config_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("fluxrt.toml");
        std::fs::write(&p, "[providers.tensorrt]\ncache_dir = \"engines\"\n[providers.coreml]\ncache_dir = \"/abs\"\n").unwrap();
        let l = load_config(&p).unwrap();
        assert_eq!(l.tensorrt.cache_dir, Some(d.path().join("engines")));
        assert_eq!(l.coreml.cache_dir, Some(PathBuf::from("/abs")));
        let e = load_config(&d.path().join("missing.toml")).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput);
    }

    #[test]
    fn byte_sizes() {
        assert_eq!("8GiB".parse::<ByteSize>().unwrap().0, 8 << 30);
        assert_eq!("512m".parse::<ByteSize>().unwrap().0, 512 << 20);
        assert_eq!("1234".parse::<ByteSize>().unwrap().0, 1234);
        assert_eq!(ByteSize(8 << 30).to_string(), "8GiB");
        assert_eq!(ByteSize(1000).to_string(), "1000");
        for bad in ["", "G", "8 parsecs", "-1", "99999999999T"] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad}");
        }
    }

    #[test]
    fn request_range_refusal() {
        let mut s = EpSettings {
            shapes: Some(ShapeRange {
                sizes: "512-1024".parse().unwrap(),
                batch: "1-4".parse().unwrap(),
            }),
            ..Default::default()
        };
        let trt = [Provider::TensorRt, Provider::Cpu];
        assert!(s.check_request(&trt, 1024, 1024, 4).is_ok());
        let e = s.check_request(&trt, 2048, 1024, 1).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput);
        assert!(
            e.message.contains("TensorRT profile") && e.message.contains("512-1024"),
            "{e}"
        );
        // Without TensorRT (and without CUDA graphs) nothing is refused.
        assert!(s
            .check_request(&[Provider::Cuda, Provider::Cpu], 2048, 1024, 9)
            .is_ok());
        // CUDA graphs on the CUDA provider pin one shape.
        s.shapes = Some(ShapeRange {
            sizes: "1024".parse().unwrap(),
            batch: "1".parse().unwrap(),
        });
        s.cuda.cuda_graph = true;
        let e = s.check_request(&[Provider::Cuda], 512, 512, 1).unwrap_err();
        assert!(e.message.contains("CUDA graphs"), "{e}");
        // True CFG doubles the transformer batch: one image is two rows, outside a static batch of 1.
        let mut q = trt_profile::RequestShape::new(1024, 1024, 1);
        assert!(s.check_request_shape(&[Provider::Cuda], &q).is_ok());
        q.true_cfg = true;
        let e = s.check_request_shape(&[Provider::Cuda], &q).unwrap_err();
        assert!(e.message.contains("2 rows"), "{e}");
        assert!(s.check_request_shape(&[Provider::Cpu], &q).is_ok());
    }

    #[test]
    fn fingerprint_sees_content_and_side_data() {
        let d = tempfile::tempdir().unwrap();
        let g = d.path().join("model.onnx");
        std::fs::write(&g, b"graph").unwrap();
        let a = graph_fingerprint(&g).unwrap();
        assert_eq!(a, graph_fingerprint(&g).unwrap());
        std::fs::write(d.path().join("backbone.onnx_data"), b"weights").unwrap();
        let b = graph_fingerprint(&g).unwrap();
        assert_ne!(a, b);
        std::fs::write(d.path().join("other.onnx"), b"another graph").unwrap();
        assert_eq!(
            b,
            graph_fingerprint(&g).unwrap(),
            "other graphs do not count"
        );
        std::fs::write(&g, b"grapH").unwrap();
        assert_ne!(b, graph_fingerprint(&g).unwrap());
    }

    /// What `ort`'s builder holds, parsed from its `Debug` output: `{"key": "value", ...}`.
    #[allow(dead_code)]
    fn ort_debug_options(debug: &str) -> Vec<(String, String)> {
        let mut strings = Vec::new();
        let mut chars = debug.chars();
        while let Some(c) = chars.next() {
            if c == '"' {
                let mut s = String::new();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => s.extend(chars.next()),
                        '"' => break,
                        c => s.push(c),
                    }
                }
                strings.push(s);
            }
        }
        let mut out: Vec<(String, String)> = strings
            .chunks(2)
            .map(|kv| (kv[0].clone(), kv[1].clone()))
            .collect();
        out.sort();
        out
    }

    #[allow(dead_code)]
    fn sorted(mut v: Vec<(String, String)>) -> Vec<(String, String)> {
        v.sort();
        v
    }

    #[cfg(feature = "tensorrt")]
    #[test]
    fn ort_tensorrt_receives_the_option_list() {
        let mut s = with_cache_root(EpSettings::default());
        s.model = Some(ModelShapes::default());
        s.shapes = Some(ShapeRange {
            sizes: "512-1024".parse().unwrap(),
            batch: "1-4".parse().unwrap(),
        });
        s.tensorrt.max_workspace_size = Some(1 << 30);
        s.tensorrt.fp16 = true;
        let ProviderOptions::TensorRt(t) = s
            .provider_options(Provider::TensorRt, Some(&vae_graph()), &host())
            .unwrap()
        else {
            unreachable!()
        };
        let got = ort_debug_options(&format!("{:?}", t.to_ort()));
        assert_eq!(got, sorted(ProviderOptions::TensorRt(t).ort_options()));
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn ort_cuda_receives_the_option_list() {
        let mut s = EpSettings::default();
        s.cuda.memory_limit = Some(20 << 30);
        s.cuda.conv_algorithm_search = ConvSearch::Heuristic;
        let c = s.cuda_options();
        let got = ort_debug_options(&format!("{:?}", c.to_ort()));
        assert_eq!(got, sorted(ProviderOptions::Cuda(c).ort_options()));
    }

    #[cfg(feature = "coreml")]
    #[test]
    fn ort_coreml_receives_the_option_list() {
        let mut s = with_cache_root(EpSettings::default());
        s.coreml.static_input_shapes = true;
        let c = s.coreml_options(Some(&vae_graph()), &host());
        let got = ort_debug_options(&format!("{:?}", c.to_ort()));
        assert_eq!(get(&got, "RequireStaticInputShapes"), Some("1"));
        assert_eq!(got, sorted(ProviderOptions::CoreMl(c).ort_options()));
    }

    #[cfg(feature = "directml")]
    #[test]
    fn ort_directml_receives_the_settings() {
        let mut s = EpSettings::default();
        let d = format!("{:?}", s.directml_options().to_ort());
        assert!(
            d.contains("device_id: None") && d.contains("HighPerformance") && d.contains("Gpu"),
            "{d}"
        );
        s.device_id = Some(1);
        let d = format!("{:?}", s.directml_options().to_ort());
        assert!(d.contains("device_id: Some(1)"), "{d}");
    }
}
