//! Execution provider settings and what each provider receives for one session.
//!
//! - [`EpSettings`]: the settings of every GPU provider after defaults, config file and flags (the `Layer` types of
//!   each provider module are what one source gives; the config file itself is read above this layer).
//! - [`GraphOptions`]: what the layer above decides per graph: its TensorRT profile and whether its session may
//!   capture CUDA graphs. The runtime knows nothing of what a graph is for.
//! - [`ProviderOptions`]: the options one provider receives for one session, with [`ProviderOptions::ort_options`]
//!   the exact list ONNX Runtime gets (tests compare it with what `ort` builds).
//!
//! One module per provider ([`tensorrt`], [`cuda`], [`directml`], [`coreml`]); [`cache`] keys the provider caches,
//! [`values`] parses setting values. Everything here is pure and unit-tested, except reading a graph's fingerprint and
//! the machine's GPUs ([`cache`]) and creating cache folders ([`prepare_cache_dirs`]). docs/providers.md has the
//! table of every setting.

use std::path::Path;

/// Copies every field `$src` sets (`Some`) over `$dst`'s.
macro_rules! overlay {
    ($dst:expr, $src:expr; $($f:ident),+) => { $( if $src.$f.is_some() { $dst.$f = $src.$f.clone(); } )+ };
}

pub mod cache;
pub mod coreml;
pub mod cuda;
pub mod directml;
pub mod nvrtx;
pub mod tensorrt;
pub mod values;

pub use cache::{default_cache_root, graph_fingerprint, Fnv, GraphInfo, HostInfo};
pub use coreml::{ComputeUnits, CoreMlFormat, CoreMlLayer, CoreMlOptions, CoreMlSettings};
pub use cuda::{ArenaExtend, ConvSearch, CudaLayer, CudaOptions, CudaSettings};
pub use directml::{
    DirectMlLayer, DirectMlOptions, DirectMlSettings, DmlDeviceFilter, DmlPerformance,
};
pub use nvrtx::NvRtxOptions;
pub use tensorrt::{TensorRtLayer, TensorRtOptions, TensorRtSettings};
pub use values::ByteSize;

use super::profile::Profile;
use super::types::Provider;
use crate::{Error, Result};

/// Settings of every GPU provider. `Default` is fluxrt's defaults (see docs/providers.md).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EpSettings {
    /// GPU index for CUDA and TensorRT (default 0) and the DirectML adapter index (default: chosen by preference).
    pub device_id: Option<u32>,
    pub tensorrt: TensorRtSettings,
    pub cuda: CudaSettings,
    pub directml: DirectMlSettings,
    pub coreml: CoreMlSettings,
}

/// What the layer above decides for one graph's session.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GraphOptions {
    /// TensorRT's optimization profile (`None`: TensorRT builds an engine per new shape).
    pub profile: Option<Profile>,
    /// The session may capture CUDA graphs (when the provider's `cuda_graph` setting is on). Only a graph that is
    /// always run through the same device buffers may: a captured graph replays the device addresses of its capture
    /// run. Its profile must then be static (one shape), which also fixes its free dimensions.
    pub capture_cuda_graphs: bool,
}

/// What one provider receives for one graph.
#[derive(Debug, Clone, PartialEq)]
pub enum ProviderOptions {
    TensorRt(TensorRtOptions),
    NvRtx(NvRtxOptions),
    Cuda(CudaOptions),
    DirectMl(DirectMlOptions),
    CoreMl(CoreMlOptions),
    /// A provider registered with ONNX Runtime's defaults (CPU, ROCm, MIGraphX, OpenVINO).
    Defaults(Provider),
}

impl ProviderOptions {
    /// The option list the provider receives, with ONNX Runtime's option names, in the order fluxrt sets them.
    /// DirectML takes no option list; its entries name the fields of the registration call.
    pub fn ort_options(&self) -> Vec<(String, String)> {
        let v = match self {
            ProviderOptions::TensorRt(t) => t.ort_options(),
            ProviderOptions::NvRtx(n) => n.ort_options(),
            ProviderOptions::Cuda(c) => c.ort_options(),
            ProviderOptions::DirectMl(d) => d.ort_options(),
            ProviderOptions::CoreMl(c) => c.ort_options(),
            ProviderOptions::Defaults(_) => Vec::new(),
        };
        v.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }
}

/// A boolean as `ort`'s option builders send it (ONNX Runtime's TensorRT and CUDA parsers take `true`/`false`).
fn flag(b: bool) -> String {
    b.to_string()
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
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
    /// The settings from one layer per provider (defaults under them) and the device id.
    pub fn resolve(
        device_id: Option<u32>,
        tensorrt: &TensorRtLayer,
        cuda: &CudaLayer,
        directml: &DirectMlLayer,
        coreml: &CoreMlLayer,
    ) -> Result<EpSettings> {
        Ok(EpSettings {
            device_id,
            tensorrt: tensorrt.resolve()?,
            cuda: cuda.resolve(),
            directml: directml.resolve(),
            coreml: coreml.resolve(),
        })
    }

    /// The GPU the providers run on (0 unless a device id is set), for device memory.
    pub fn gpu_id(&self) -> i32 {
        self.device_id.map_or(0, |d| d as i32)
    }

    /// Whether CUDA graphs are asked for on one of `active` (CUDA's or TensorRT's `cuda_graph` setting).
    pub fn cuda_graphs_asked(&self, active: &[Provider]) -> bool {
        (active
            .iter()
            .any(|p| matches!(p, Provider::TensorRt | Provider::NvTensorRtRtx))
            && self.tensorrt.cuda_graph)
            || (active.contains(&Provider::Cuda) && self.cuda.cuda_graph)
    }

    /// Whether a session with `graph`'s options on `active` captures CUDA graphs. Such a session replays the
    /// device addresses of its captured run, so it must always be run through fixed device buffers
    /// ([`super::step_graph::loop_plan`]).
    pub fn cuda_graphs(&self, active: &[Provider], graph: &GraphOptions) -> bool {
        graph.capture_cuda_graphs && self.cuda_graphs_asked(active)
    }

    /// What provider `p` receives for a session: of `graph` (its file, which keys the TensorRT and CoreML caches,
    /// and its options), or without one (probing, the device loop's step graph: no caches, no profile, no CUDA
    /// graphs).
    pub fn provider_options(
        &self,
        p: Provider,
        graph: Option<(&GraphInfo, &GraphOptions)>,
        host: &HostInfo,
    ) -> ProviderOptions {
        let none = GraphOptions::default();
        let opts = graph.map_or(&none, |(_, o)| o);
        match p {
            Provider::TensorRt => {
                ProviderOptions::TensorRt(self.tensorrt.options(self.gpu_id(), graph, host))
            }
            Provider::NvTensorRtRtx => {
                ProviderOptions::NvRtx(self.tensorrt.nvrtx_options(self.gpu_id(), graph))
            }
            Provider::Cuda => ProviderOptions::Cuda(self.cuda.options(self.gpu_id(), opts)),
            Provider::DirectMl => {
                ProviderOptions::DirectMl(self.directml.options(self.device_id.map(|d| d as i32)))
            }
            Provider::CoreMl => {
                ProviderOptions::CoreMl(self.coreml.options(graph.map(|(g, _)| g), host))
            }
            other => ProviderOptions::Defaults(other),
        }
    }

    /// Settings that have no effect with these providers, one sentence each.
    pub fn warnings(&self, active: &[Provider]) -> Vec<String> {
        let mut w = Vec::new();
        if active.contains(&Provider::DirectMl) && self.device_id.is_some() {
            w.push(
                "DirectML: the device id picks the adapter; the performance preference and device filter are ignored"
                    .into(),
            );
        }
        w
    }
}

/// Creates the cache folders `o` names and writes a `fluxrt-cache.json` describing the key beside the engines.
pub fn prepare_cache_dirs(o: &ProviderOptions, g: &GraphInfo, host: &HostInfo) -> Result<()> {
    let dirs = match o {
        ProviderOptions::TensorRt(t) => [t.engine_cache_dir.as_ref(), t.timing_cache_dir.as_ref()],
        ProviderOptions::NvRtx(n) => [n.runtime_cache_dir.as_ref(), None],
        ProviderOptions::CoreMl(c) => [c.cache_dir.as_ref(), None],
        _ => return Ok(()),
    };
    for d in dirs.into_iter().flatten() {
        std::fs::create_dir_all(d).map_err(|e| {
            Error::io_at("create the provider cache folder", d, e)
                .with_hint("point the cache at a writable folder (--trt-cache-dir, --coreml-cache-dir) or turn it off")
        })?;
    }
    if let ProviderOptions::TensorRt(t) = o {
        if let Some(dir) = &t.engine_cache_dir {
            let text = serde_json::to_string_pretty(&t.describe(g, host)).unwrap_or_default();
            // Best effort: the description helps people, the engines do not need it.
            let _ = std::fs::write(dir.join("fluxrt-cache.json"), text);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::profile::InputProfile;

    fn host() -> HostInfo {
        HostInfo {
            ort_version: "1.31.1".into(),
            gpus: vec!["NVIDIA H100 80GB HBM3".into()],
        }
    }

    fn vae_graph() -> GraphInfo {
        GraphInfo {
            role: "vae_decoder".into(),
            path: "/m/vae.opt/model.onnx".into(),
            fingerprint: 42,
        }
    }

    /// The VAE decoder's profile for 512-1024 px, batch 1-4.
    fn vae_profile(max_batch: i64) -> Profile {
        Profile {
            inputs: vec![InputProfile {
                name: "latent".into(),
                min: vec![1, 16, 64, 64],
                opt: vec![1, 16, 128, 128],
                max: vec![max_batch, 16, 128, 128],
            }],
        }
    }

    fn with_profile(p: Profile, capture: bool) -> GraphOptions {
        GraphOptions {
            profile: Some(p),
            capture_cuda_graphs: capture,
        }
    }

    fn get<'a>(list: &'a [(String, String)], key: &str) -> Option<&'a str> {
        list.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    fn with_cache_root(mut s: EpSettings) -> EpSettings {
        s.tensorrt.cache_dir = Some("/cache/trt".into());
        s.coreml.cache_dir = Some("/cache/coreml".into());
        s
    }

    fn trt(
        s: &EpSettings,
        g: Option<(&GraphInfo, &GraphOptions)>,
        h: &HostInfo,
    ) -> TensorRtOptions {
        match s.provider_options(Provider::TensorRt, g, h) {
            ProviderOptions::TensorRt(t) => t,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn tensorrt_defaults() {
        let s = with_cache_root(EpSettings::default());
        let none = GraphOptions::default();
        let l = s
            .provider_options(Provider::TensorRt, Some((&vae_graph(), &none)), &host())
            .ort_options();
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
    fn tensorrt_settings_and_the_graphs_profile() {
        let mut s = with_cache_root(EpSettings::default());
        s.device_id = Some(1);
        s.tensorrt.bf16 = true;
        s.tensorrt.builder_optimization_level = 5;
        s.tensorrt.max_workspace_size = Some(8 << 30);
        s.tensorrt.timing_cache = false;
        let opts = with_profile(vae_profile(4), false);
        let l = s
            .provider_options(Provider::TensorRt, Some((&vae_graph(), &opts)), &host())
            .ort_options();
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
        assert_eq!(get(&l, "trt_cuda_graph_enable"), Some("false"));
    }

    #[test]
    fn cuda_graphs_only_where_the_graphs_options_allow_them() {
        let mut s = EpSettings::default();
        s.tensorrt.cuda_graph = true;
        s.cuda.cuda_graph = true;
        let capture = with_profile(vae_profile(1), true);
        let plain = with_profile(vae_profile(1), false);
        let g = vae_graph();
        assert!(trt(&s, Some((&g, &capture)), &host()).cuda_graph);
        assert!(!trt(&s, Some((&g, &plain)), &host()).cuda_graph);
        assert!(!trt(&s, None, &host()).cuda_graph, "probing");
        assert!(s.cuda.options(0, &capture).cuda_graph);
        assert!(!s.cuda.options(0, &plain).cuda_graph);
        for active in [
            vec![Provider::Cuda],
            vec![Provider::TensorRt, Provider::Cuda],
        ] {
            assert!(s.cuda_graphs(&active, &capture), "{active:?}");
            assert!(!s.cuda_graphs(&active, &plain), "{active:?}");
        }
        assert!(!s.cuda_graphs(&[Provider::Cpu], &capture));
        assert!(!s.cuda_graphs(&[Provider::DirectMl], &capture));
        // The setting off: no capture whatever the graph allows.
        let off = EpSettings::default();
        assert!(!off.cuda_graphs(&[Provider::Cuda], &capture));
        assert!(!off.cuda.options(0, &capture).cuda_graph);
    }

    #[test]
    fn cuda_defaults_and_settings() {
        let list = |s: &EpSettings| {
            s.provider_options(Provider::Cuda, None, &host())
                .ort_options()
        };
        assert_eq!(
            list(&EpSettings::default()),
            [
                ("device_id", "0"),
                ("cudnn_conv_algo_search", "EXHAUSTIVE"),
                ("arena_extend_strategy", "kSameAsRequested"),
                ("use_tf32", "true"),
                ("enable_cuda_graph", "false"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        let s = EpSettings {
            device_id: Some(2),
            cuda: CudaLayer {
                conv_algorithm_search: Some(ConvSearch::Heuristic),
                arena_extend_strategy: Some(ArenaExtend::NextPowerOfTwo),
                memory_limit: Some("20G".parse().unwrap()),
                tf32: Some(false),
                cuda_graph: None,
            }
            .resolve(),
            ..Default::default()
        };
        assert_eq!(
            list(&s),
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
        let list = |s: &EpSettings| {
            s.provider_options(Provider::DirectMl, None, &host())
                .ort_options()
        };
        assert_eq!(
            list(&EpSettings::default()),
            [
                ("performance_preference", "high_performance"),
                ("device_filter", "gpu")
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
        let mut s = EpSettings {
            device_id: Some(1),
            ..Default::default()
        };
        s.directml.performance_preference = DmlPerformance::MinimumPower;
        assert_eq!(list(&s), [("device_id".to_string(), "1".to_string())]);
        assert!(s.warnings(&[Provider::DirectMl])[0].contains("ignored"));
        assert!(s.warnings(&[Provider::Cuda]).is_empty());
    }

    #[test]
    fn coreml_settings() {
        let s = with_cache_root(EpSettings::default());
        let g = vae_graph();
        let none = GraphOptions::default();
        let l = s
            .provider_options(Provider::CoreMl, Some((&g, &none)), &host())
            .ort_options();
        assert_eq!(get(&l, "ModelFormat"), Some("MLProgram"));
        assert_eq!(get(&l, "MLComputeUnits"), Some("ALL"));
        assert_eq!(get(&l, "RequireStaticInputShapes"), Some("0"));
        assert!(get(&l, "ModelCacheDirectory")
            .unwrap()
            .starts_with("/cache/coreml/vae_decoder-"));
        let mut s = s.clone();
        s.coreml.compute_units = ComputeUnits::CpuAndNeuralEngine;
        s.coreml.model_format = CoreMlFormat::NeuralNetwork;
        s.coreml.model_cache = false;
        let l = s
            .provider_options(Provider::CoreMl, Some((&g, &none)), &host())
            .ort_options();
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
            let l = s
                .provider_options(Provider::CoreMl, None, &host())
                .ort_options();
            assert_eq!(get(&l, "MLComputeUnits"), Some(ort), "{name}");
        }
    }

    #[test]
    fn engine_cache_folder_changes_with_every_key_part() {
        let s = with_cache_root(EpSettings::default());
        let none = GraphOptions::default();
        let dir = |s: &EpSettings, g: &GraphInfo, o: &GraphOptions, h: &HostInfo| {
            trt(s, Some((g, o)), h).engine_cache_dir.unwrap()
        };
        let g = vae_graph();
        let base = dir(&s, &g, &none, &host());
        assert_eq!(base, dir(&s, &g, &none, &host()), "stable");
        let mut other = g.clone();
        other.fingerprint = 43;
        assert_ne!(base, dir(&s, &other, &none, &host()), "model");
        let h2 = HostInfo {
            ort_version: "1.32.0".into(),
            ..host()
        };
        assert_ne!(base, dir(&s, &g, &none, &h2), "onnxruntime");
        let h3 = HostInfo {
            gpus: vec!["NVIDIA L4".into()],
            ..host()
        };
        assert_ne!(base, dir(&s, &g, &none, &h3), "gpu");
        let mut s2 = s.clone();
        s2.device_id = Some(1);
        assert_ne!(base, dir(&s2, &g, &none, &host()), "device");
        let ranged = dir(&s, &g, &with_profile(vae_profile(4), false), &host());
        assert_ne!(base, ranged, "shape range");
        assert_ne!(
            ranged,
            dir(&s, &g, &with_profile(vae_profile(2), false), &host()),
            "batch range"
        );
        let mut s4 = s.clone();
        s4.tensorrt.fp16 = true;
        assert_ne!(base, dir(&s4, &g, &none, &host()), "precision");
        // Off: no folder; no graph (probing): no folder.
        let mut off = s.clone();
        off.tensorrt.engine_cache = false;
        assert!(trt(&off, Some((&g, &none)), &host())
            .engine_cache_dir
            .is_none());
        assert!(trt(&s, None, &host()).engine_cache_dir.is_none());
    }

    #[test]
    fn tensorrt_levels_past_5_are_refused_naming_the_setting() {
        let e = TensorRtLayer {
            builder_optimization_level: Some(9),
            ..Default::default()
        }
        .resolve()
        .unwrap_err();
        assert!(
            e.message.contains("optimization level") && e.message.contains('9'),
            "{e}"
        );
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
        s.tensorrt.max_workspace_size = Some(1 << 30);
        s.tensorrt.fp16 = true;
        let opts = with_profile(vae_profile(4), false);
        let t = trt(&s, Some((&vae_graph(), &opts)), &host());
        let got = ort_debug_options(&format!("{:?}", t.to_ort()));
        assert_eq!(got, sorted(ProviderOptions::TensorRt(t).ort_options()));
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn ort_cuda_receives_the_option_list() {
        let mut s = EpSettings::default();
        s.cuda.memory_limit = Some(20 << 30);
        s.cuda.conv_algorithm_search = ConvSearch::Heuristic;
        let c = s.cuda.options(0, &GraphOptions::default());
        let got = ort_debug_options(&format!("{:?}", c.to_ort()));
        assert_eq!(got, sorted(ProviderOptions::Cuda(c).ort_options()));
    }

    #[cfg(feature = "coreml")]
    #[test]
    fn ort_coreml_receives_the_option_list() {
        let mut s = with_cache_root(EpSettings::default());
        s.coreml.static_input_shapes = true;
        let c = s.coreml.options(Some(&vae_graph()), &host());
        let got = ort_debug_options(&format!("{:?}", c.to_ort()));
        assert_eq!(get(&got, "RequireStaticInputShapes"), Some("1"));
        assert_eq!(got, sorted(ProviderOptions::CoreMl(c).ort_options()));
    }

    #[cfg(feature = "directml")]
    #[test]
    fn ort_directml_receives_the_settings() {
        let s = EpSettings::default();
        let d = format!("{:?}", s.directml.options(None).to_ort());
        assert!(
            d.contains("device_id: None") && d.contains("HighPerformance") && d.contains("Gpu"),
            "{d}"
        );
        let d = format!("{:?}", s.directml.options(Some(1)).to_ort());
        assert!(d.contains("device_id: Some(1)"), "{d}");
    }
}
