//! The CoreML execution provider: `[providers.coreml]` settings, a session's options (a compiled-model cache keyed
//! by the graph) and `ort`'s builder.

use std::path::PathBuf;

use serde::Deserialize;

use super::cache::{default_cache_root, safe_name, Fnv, GraphInfo, HostInfo};
use super::path_str;
use super::values::string_enum;

/// Bumped whenever the cache key or layout changes.
const CACHE_FORMAT: &str = "fluxrt-coreml-v1";

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

impl CoreMlLayer {
    pub fn overlay(&mut self, top: &CoreMlLayer) {
        overlay!(self, top; model_format, compute_units, model_cache, cache_dir, static_input_shapes);
    }

    pub fn resolve(&self) -> CoreMlSettings {
        let d = CoreMlSettings::default();
        CoreMlSettings {
            model_format: self.model_format.unwrap_or(d.model_format),
            compute_units: self.compute_units.unwrap_or(d.compute_units),
            model_cache: self.model_cache.unwrap_or(d.model_cache),
            cache_dir: self.cache_dir.clone(),
            static_input_shapes: self.static_input_shapes.unwrap_or(d.static_input_shapes),
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

impl CoreMlSettings {
    /// The options of one session; the compiled-model cache needs the graph to key it by.
    pub fn options(&self, graph: Option<&GraphInfo>, host: &HostInfo) -> CoreMlOptions {
        let cache_dir = graph.filter(|_| self.model_cache).map(|g| {
            let root = self
                .cache_dir
                .clone()
                .unwrap_or_else(|| default_cache_root().join("coreml"));
            let mut h = Fnv::default();
            h.field(CACHE_FORMAT)
                .field(&host.ort_version)
                .field(&g.fingerprint.to_string())
                .field(self.model_format.name());
            root.join(format!("{}-{:016x}", safe_name(&g.role), h.finish()))
        });
        CoreMlOptions {
            model_format: self.model_format,
            compute_units: self.compute_units,
            cache_dir,
            static_input_shapes: self.static_input_shapes,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct CoreMlOptions {
    pub model_format: CoreMlFormat,
    pub compute_units: ComputeUnits,
    pub cache_dir: Option<PathBuf>,
    pub static_input_shapes: bool,
}

/// A boolean as ONNX Runtime's Core ML provider reads it: only `"1"` is true there.
fn coreml_flag(b: bool) -> &'static str {
    if b {
        "1"
    } else {
        "0"
    }
}

impl CoreMlOptions {
    pub(super) fn ort_options(&self) -> Vec<(&'static str, String)> {
        let mut v = vec![
            (
                "ModelFormat",
                match self.model_format {
                    CoreMlFormat::MlProgram => "MLProgram",
                    CoreMlFormat::NeuralNetwork => "NeuralNetwork",
                }
                .to_string(),
            ),
            (
                "MLComputeUnits",
                match self.compute_units {
                    ComputeUnits::All => "ALL",
                    ComputeUnits::CpuAndGpu => "CPUAndGPU",
                    ComputeUnits::CpuAndNeuralEngine => "CPUAndNeuralEngine",
                    ComputeUnits::CpuOnly => "CPUOnly",
                }
                .to_string(),
            ),
        ];
        if let Some(d) = &self.cache_dir {
            v.push(("ModelCacheDirectory", path_str(d)));
        }
        v.push((
            "RequireStaticInputShapes",
            coreml_flag(self.static_input_shapes).to_string(),
        ));
        v
    }

    #[cfg(feature = "coreml")]
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
