//! The TensorRT execution provider: its `[providers.tensorrt]` settings, the options one graph's session gets
//! (engine and timing caches keyed by graph, ONNX Runtime version, GPU, precision and profile; the profile and CUDA
//! graphs as the layer above decides them per graph) and `ort`'s builder.

use std::path::PathBuf;

use serde::Deserialize;

use super::cache::{default_cache_root, safe_name, Fnv, GraphInfo, HostInfo};
use super::values::{de_parsed, ByteSize};
use super::{flag, path_str, GraphOptions};
use crate::runtime::profile::Profile;
use crate::{Error, Result};

/// Bumped whenever the engine cache key or layout changes.
const CACHE_FORMAT: &str = "fluxrt-tensorrt-engine-v1";

/// `[providers.tensorrt]`: what a config file or the flags give (unset = not given).
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

impl TensorRtLayer {
    /// Puts every setting `top` gives over this layer's.
    pub fn overlay(&mut self, top: &TensorRtLayer) {
        overlay!(self, top; fp16, bf16, layer_norm_fp32_fallback, engine_cache, cache_dir, timing_cache,
            builder_optimization_level, max_workspace_size, cuda_graph);
    }

    /// The settings: this layer over the defaults.
    pub fn resolve(&self) -> Result<TensorRtSettings> {
        let d = TensorRtSettings::default();
        let level = self
            .builder_optimization_level
            .unwrap_or(d.builder_optimization_level);
        if level > 5 {
            return Err(Error::input(format!(
                "TensorRT builder optimization level must be 0-5, got {level}"
            ))
            .with_hint("3 is TensorRT's default; 5 searches longest for the fastest kernels"));
        }
        Ok(TensorRtSettings {
            fp16: self.fp16.unwrap_or(d.fp16),
            bf16: self.bf16.unwrap_or(d.bf16),
            layer_norm_fp32_fallback: self
                .layer_norm_fp32_fallback
                .unwrap_or(d.layer_norm_fp32_fallback),
            engine_cache: self.engine_cache.unwrap_or(d.engine_cache),
            cache_dir: self.cache_dir.clone(),
            timing_cache: self.timing_cache.unwrap_or(d.timing_cache),
            builder_optimization_level: level,
            max_workspace_size: self.max_workspace_size.map(|b| b.0),
            cuda_graph: self.cuda_graph.unwrap_or(d.cuda_graph),
        })
    }
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
    /// Capture CUDA graphs, for the graphs whose options allow it.
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

impl TensorRtSettings {
    /// The root cache folder.
    pub fn cache_root(&self) -> PathBuf {
        self.cache_dir
            .clone()
            .unwrap_or_else(|| default_cache_root().join("tensorrt"))
    }

    /// The options of one session on GPU `device_id`: for `graph` (with its profile and capture decision), or for
    /// probing without caches, profile or CUDA graphs (`None`).
    pub fn options(
        &self,
        device_id: i32,
        graph: Option<(&GraphInfo, &GraphOptions)>,
        host: &HostInfo,
    ) -> TensorRtOptions {
        let mut o = TensorRtOptions {
            device_id,
            fp16: self.fp16,
            bf16: self.bf16,
            layer_norm_fp32_fallback: self.layer_norm_fp32_fallback,
            builder_optimization_level: self.builder_optimization_level,
            max_workspace_size: self.max_workspace_size,
            engine_cache_dir: None,
            timing_cache_dir: None,
            profile: graph.and_then(|(_, g)| g.profile.clone()),
            cuda_graph: self.cuda_graph && graph.is_some_and(|(_, g)| g.capture_cuda_graphs),
        };
        if let Some((g, _)) = graph {
            let root = self.cache_root();
            if self.engine_cache {
                o.engine_cache_dir = Some(root.join(engine_cache_name(&o, g, host)));
            }
            if self.timing_cache {
                o.timing_cache_dir = Some(root.join("timing"));
            }
        }
        o
    }
}

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

impl TensorRtOptions {
    /// The option list with ONNX Runtime's names, in the order fluxrt sets them.
    pub(super) fn ort_options(&self) -> Vec<(&'static str, String)> {
        let mut v = vec![
            ("device_id", self.device_id.to_string()),
            ("trt_fp16_enable", flag(self.fp16)),
            ("trt_bf16_enable", flag(self.bf16)),
            (
                "trt_layer_norm_fp32_fallback",
                flag(self.layer_norm_fp32_fallback),
            ),
            (
                "trt_builder_optimization_level",
                self.builder_optimization_level.to_string(),
            ),
        ];
        if let Some(w) = self.max_workspace_size {
            v.push(("trt_max_workspace_size", w.to_string()));
        }
        v.push((
            "trt_engine_cache_enable",
            flag(self.engine_cache_dir.is_some()),
        ));
        if let Some(d) = &self.engine_cache_dir {
            v.push(("trt_engine_cache_path", path_str(d)));
        }
        v.push((
            "trt_timing_cache_enable",
            flag(self.timing_cache_dir.is_some()),
        ));
        if let Some(d) = &self.timing_cache_dir {
            v.push(("trt_timing_cache_path", path_str(d)));
        }
        if let Some(p) = self.profile.as_ref().filter(|p| !p.is_empty()) {
            v.push(("trt_profile_min_shapes", p.min_shapes()));
            v.push(("trt_profile_opt_shapes", p.opt_shapes()));
            v.push(("trt_profile_max_shapes", p.max_shapes()));
        }
        v.push(("trt_cuda_graph_enable", flag(self.cuda_graph)));
        v
    }

    /// What `fluxrt-cache.json` beside the engines says about them.
    pub(super) fn describe(&self, g: &GraphInfo, host: &HostInfo) -> serde_json::Value {
        serde_json::json!({
            "graph": g.role,
            "file": g.path,
            "onnxruntime": host.ort_version,
            "gpu": host.gpu_label(self.device_id as u32),
            "fp16": self.fp16,
            "bf16": self.bf16,
            "builder_optimization_level": self.builder_optimization_level,
            "profile": self.profile.as_ref().map(|p| serde_json::json!({
                "min": p.min_shapes(), "opt": p.opt_shapes(), "max": p.max_shapes(),
            })),
        })
    }

    #[cfg(feature = "tensorrt")]
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

/// The engine cache folder name of a graph: `<role>-<16 hex digits>` hashing the cache format, ONNX Runtime's
/// version, the graph's fingerprint, the GPU (device id and the machine's GPU models), the precision flags, the
/// builder level and the profile.
fn engine_cache_name(o: &TensorRtOptions, g: &GraphInfo, host: &HostInfo) -> String {
    let mut h = Fnv::default();
    h.field(CACHE_FORMAT)
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
