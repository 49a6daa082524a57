//! The NV TensorRT RTX execution provider (`NvTensorRTRTXExecutionProvider`): TensorRT for RTX GPUs, the only
//! provider in which ONNX Runtime registers NVIDIA ModelOpt's `trt`-domain ops (`TRT_FP8QuantizeLinear`,
//! `TRT_FP4DynamicQuantize`, ...) that BFL's fp8/fp4 graphs use. It shares the `[providers.tensorrt]` settings that
//! apply to it (workspace, CUDA graphs, the cache folder, which holds its runtime cache) and gets the graph's shape
//! profile like TensorRT.

use std::path::PathBuf;

use super::cache::{safe_name, GraphInfo};
use super::tensorrt::TensorRtSettings;
use super::{flag, path_str, GraphOptions};
use crate::runtime::profile::Profile;

/// The NV TensorRT RTX provider's options for one graph.
#[derive(Debug, Clone, PartialEq)]
pub struct NvRtxOptions {
    pub device_id: i32,
    pub max_workspace_size: Option<u64>,
    /// The runtime cache (compiled kernels) of the graph; `None` without a graph or with the engine cache off.
    pub runtime_cache_dir: Option<PathBuf>,
    pub profile: Option<Profile>,
    pub cuda_graph: bool,
}

impl TensorRtSettings {
    /// What the NV TensorRT RTX provider receives for `graph` (or for a probe without one).
    pub fn nvrtx_options(
        &self,
        device_id: i32,
        graph: Option<(&GraphInfo, &GraphOptions)>,
    ) -> NvRtxOptions {
        NvRtxOptions {
            device_id,
            max_workspace_size: self.max_workspace_size,
            runtime_cache_dir: graph.filter(|_| self.engine_cache).map(|(g, _)| {
                self.cache_root().join("nvrtx").join(format!(
                    "{}-{:016x}",
                    safe_name(&g.role),
                    g.fingerprint
                ))
            }),
            profile: graph.and_then(|(_, g)| g.profile.clone()),
            cuda_graph: self.cuda_graph && graph.is_some_and(|(_, g)| g.capture_cuda_graphs),
        }
    }
}

impl NvRtxOptions {
    /// The option list with ONNX Runtime's names (`nv_*`), in the order fluxrt sets them.
    pub(super) fn ort_options(&self) -> Vec<(&'static str, String)> {
        let mut v = vec![("device_id", self.device_id.to_string())];
        if let Some(w) = self.max_workspace_size {
            v.push(("nv_max_workspace_size", w.to_string()));
        }
        if let Some(d) = &self.runtime_cache_dir {
            v.push(("nv_runtime_cache_path", path_str(d)));
        }
        if let Some(p) = self.profile.as_ref().filter(|p| !p.is_empty()) {
            v.push(("nv_profile_min_shapes", p.min_shapes()));
            v.push(("nv_profile_opt_shapes", p.opt_shapes()));
            v.push(("nv_profile_max_shapes", p.max_shapes()));
        }
        v.push(("enable_cuda_graph", flag(self.cuda_graph)));
        v
    }

    #[cfg(feature = "nvrtx")]
    pub(crate) fn to_ort(&self) -> ort::ep::NVRTX {
        let mut e = ort::ep::NVRTX::default().with_device_id(self.device_id as u32);
        if let Some(w) = self.max_workspace_size {
            e = e.with_max_workspace(usize::try_from(w).unwrap_or(usize::MAX));
        }
        if let Some(d) = &self.runtime_cache_dir {
            e = e.with_runtime_cache_path(path_str(d));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::ep::tensorrt::TensorRtLayer;

    #[test]
    fn options_follow_the_tensorrt_settings() {
        let s = TensorRtLayer {
            max_workspace_size: Some("2GiB".parse().unwrap()),
            cuda_graph: Some(true),
            cache_dir: Some("/c".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        // A probe: no graph, so no cache, no profile, no CUDA graphs.
        let probe = s.nvrtx_options(1, None);
        assert_eq!(
            probe.ort_options(),
            vec![
                ("device_id", "1".to_string()),
                ("nv_max_workspace_size", (2u64 << 30).to_string()),
                ("enable_cuda_graph", "false".to_string()),
            ]
        );
        let g = GraphInfo {
            role: "transformer".into(),
            path: "/m/transformer.opt/fp8/model.onnx".into(),
            fingerprint: 0xabc,
        };
        let opts = GraphOptions {
            profile: None,
            capture_cuda_graphs: true,
        };
        let o = s.nvrtx_options(0, Some((&g, &opts)));
        let list = o.ort_options();
        let cache = &list
            .iter()
            .find(|(k, _)| *k == "nv_runtime_cache_path")
            .unwrap()
            .1;
        assert!(cache.starts_with("/c/nvrtx/transformer-"), "{cache}");
        assert_eq!(
            list.last().unwrap(),
            &("enable_cuda_graph", "true".to_string())
        );
        // The engine cache setting turns the runtime cache off too.
        let off = TensorRtLayer {
            engine_cache: Some(false),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert!(off
            .nvrtx_options(0, Some((&g, &opts)))
            .runtime_cache_dir
            .is_none());
    }
}
