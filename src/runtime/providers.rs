//! Execution providers: names, what this build and the loaded library support, and probing which ones really work.
//!
//! A provider is usable only when three things hold: fluxrt was built with its cargo feature, the loaded ONNX Runtime
//! library contains it, and registering it succeeds (the GPU wheel lists CUDA even on machines without CUDA; only
//! registration finds out). [`probe`] checks all three once per provider and process, and says why a provider was
//! rejected.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Mutex;

use ort::ep::{self, ExecutionProviderDispatch};
use ort::session::Session;

use super::ep_config::{self, EpSettings, GraphInfo, HostInfo};
use super::library;
use crate::{Error, Result};

/// An ONNX Runtime execution provider that fluxrt knows how to register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Provider {
    Cpu,
    Cuda,
    TensorRt,
    DirectMl,
    CoreMl,
    Rocm,
    MiGraphX,
    OpenVino,
}

impl Provider {
    pub const ALL: [Provider; 8] = [
        Provider::Cpu,
        Provider::Cuda,
        Provider::TensorRt,
        Provider::DirectMl,
        Provider::CoreMl,
        Provider::Rocm,
        Provider::MiGraphX,
        Provider::OpenVino,
    ];

    /// The short name used on the command line (`cuda`, `tensorrt`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Provider::Cpu => "cpu",
            Provider::Cuda => "cuda",
            Provider::TensorRt => "tensorrt",
            Provider::DirectMl => "directml",
            Provider::CoreMl => "coreml",
            Provider::Rocm => "rocm",
            Provider::MiGraphX => "migraphx",
            Provider::OpenVino => "openvino",
        }
    }

    /// ONNX Runtime's name (`CUDAExecutionProvider`, ...), as `GetAvailableProviders` lists it.
    pub fn ort_name(self) -> &'static str {
        match self {
            Provider::Cpu => "CPUExecutionProvider",
            Provider::Cuda => "CUDAExecutionProvider",
            Provider::TensorRt => "TensorrtExecutionProvider",
            Provider::DirectMl => "DmlExecutionProvider",
            Provider::CoreMl => "CoreMLExecutionProvider",
            Provider::Rocm => "ROCMExecutionProvider",
            Provider::MiGraphX => "MIGraphXExecutionProvider",
            Provider::OpenVino => "OpenVINOExecutionProvider",
        }
    }

    /// The cargo feature that compiles the provider into fluxrt (`None` for CPU, which is always there).
    pub fn feature(self) -> Option<&'static str> {
        match self {
            Provider::Cpu => None,
            other => Some(other.name()),
        }
    }

    /// The ONNX Runtime package that contains the provider.
    fn package(self) -> &'static str {
        match self {
            Provider::Cpu => "onnxruntime",
            Provider::Cuda | Provider::TensorRt => "onnxruntime-gpu",
            Provider::DirectMl => "onnxruntime-directml (Windows)",
            Provider::CoreMl => "onnxruntime (the macOS build)",
            Provider::Rocm => "onnxruntime-rocm",
            Provider::MiGraphX => "onnxruntime-migraphx",
            Provider::OpenVino => "onnxruntime-openvino",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Provider {
    type Err = Error;

    /// Case-insensitive; accepts aliases (`trt`, `dml`, `ov`, ...) and ONNX Runtime's names (`CUDAExecutionProvider`).
    fn from_str(s: &str) -> Result<Provider> {
        let key = s.trim().to_ascii_lowercase().replace(['-', '_', ' '], "");
        let key = key.strip_suffix("executionprovider").unwrap_or(&key);
        let p = match key {
            "cpu" => Provider::Cpu,
            "cuda" => Provider::Cuda,
            "tensorrt" | "trt" | "nvtensorrt" => Provider::TensorRt,
            "directml" | "dml" => Provider::DirectMl,
            "coreml" => Provider::CoreMl,
            "rocm" => Provider::Rocm,
            "migraphx" => Provider::MiGraphX,
            "openvino" | "ov" => Provider::OpenVino,
            _ => {
                return Err(
                    Error::input(format!("unknown execution provider {:?}", s.trim())).with_hint(
                        format!(
                            "valid providers: {} (aliases: trt, dml, ov)",
                            Provider::ALL.map(Provider::name).join(", ")
                        ),
                    ),
                )
            }
        };
        Ok(p)
    }
}

/// Parses a comma-separated list like `tensorrt,cuda,cpu`, in priority order. Duplicates are dropped.
pub fn parse_list(s: &str) -> Result<Vec<Provider>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let p: Provider = part.parse()?;
        if !out.contains(&p) {
            out.push(p);
        }
    }
    if out.is_empty() {
        return Err(
            Error::input(format!("empty execution provider list {s:?}")).with_hint(format!(
                "give one or more of: {}",
                Provider::ALL.map(Provider::name).join(", ")
            )),
        );
    }
    Ok(out)
}

/// Whether this fluxrt binary was built with the provider's cargo feature.
pub fn compiled_in(p: Provider) -> bool {
    match p {
        Provider::Cpu => true,
        Provider::Cuda => cfg!(feature = "cuda"),
        Provider::TensorRt => cfg!(feature = "tensorrt"),
        Provider::DirectMl => cfg!(feature = "directml"),
        Provider::CoreMl => cfg!(feature = "coreml"),
        Provider::Rocm => cfg!(feature = "rocm"),
        Provider::MiGraphX => cfg!(feature = "migraphx"),
        Provider::OpenVino => cfg!(feature = "openvino"),
    }
}

/// The providers the loaded ONNX Runtime library contains (`GetAvailableProviders`), e.g.
/// `["AzureExecutionProvider", "CPUExecutionProvider"]` for the CPU wheel. Loads the library through
/// [`library::init(None)`](library::init) if nothing is loaded yet; empty when no library can be loaded.
pub fn available_in_library() -> Vec<String> {
    if library::init(None).is_err() {
        return Vec::new();
    }
    let api = ort::api();
    let mut list: *mut *mut std::ffi::c_char = std::ptr::null_mut();
    let mut len: std::ffi::c_int = 0;
    // SAFETY: C API call with valid out-pointers; the list is released below with the length it came with.
    let status = unsafe { (api.GetAvailableProviders)(&mut list, &mut len) };
    // SAFETY: a status from the C API.
    if unsafe { ort::Error::result_from_status(status) }.is_err() || list.is_null() {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(len.max(0) as usize);
    for i in 0..len.max(0) as usize {
        // SAFETY: `list` holds `len` NUL-terminated strings.
        let s = unsafe { *list.add(i) };
        if !s.is_null() {
            out.push(
                unsafe { std::ffi::CStr::from_ptr(s) }
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    // SAFETY: releasing what GetAvailableProviders allocated.
    let status = unsafe { (api.ReleaseAvailableProviders)(list, len) };
    let _ = unsafe { ort::Error::result_from_status(status) };
    out
}

/// The providers to use, in priority order, and those that were asked for but cannot be used, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderPlan {
    pub active: Vec<Provider>,
    pub rejected: Vec<(Provider, String)>,
}

impl ProviderPlan {
    /// CPU only; needs no probing.
    pub fn cpu() -> ProviderPlan {
        ProviderPlan {
            active: vec![Provider::Cpu],
            rejected: Vec::new(),
        }
    }

    /// One line for the user, e.g. `cuda, cpu (rejected: tensorrt: ...)`.
    pub fn describe(&self) -> String {
        let mut s = self
            .active
            .iter()
            .map(|p| p.name())
            .collect::<Vec<_>>()
            .join(", ");
        for (p, why) in &self.rejected {
            s.push_str(&format!("\n  {p} not used: {why}"));
        }
        s
    }
}

impl Default for ProviderPlan {
    fn default() -> Self {
        ProviderPlan::cpu()
    }
}

/// Probe results, once per provider per process: `Ok` or the reason it is unusable.
static PROBED: Mutex<Option<HashMap<Provider, std::result::Result<(), String>>>> = Mutex::new(None);

/// Probes each requested provider (once per process) and returns the usable ones in the requested order, CPU
/// appended as the fallback unless `no_fallback`. With `no_fallback`, any unusable requested provider is an
/// [`ErrorKind::Provider`](crate::ErrorKind::Provider) error listing the reasons. Loads ONNX Runtime through
/// [`library::init(None)`](library::init) if needed.
pub fn probe(requested: &[Provider], no_fallback: bool) -> Result<ProviderPlan> {
    let lib = library::init(None)?;
    let mut plan = ProviderPlan {
        active: Vec::new(),
        rejected: Vec::new(),
    };
    let mut available: Option<Vec<String>> = None;
    for &p in requested {
        if plan.active.contains(&p) || plan.rejected.iter().any(|(r, _)| *r == p) {
            continue;
        }
        let cached = PROBED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(|m| m.get(&p).cloned());
        let outcome = match cached {
            Some(o) => o,
            None => {
                let available = available.get_or_insert_with(available_in_library);
                let o = probe_one(p, available, lib);
                PROBED
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert_with(HashMap::new)
                    .insert(p, o.clone());
                o
            }
        };
        match outcome {
            Ok(()) => plan.active.push(p),
            Err(why) => plan.rejected.push((p, why)),
        }
    }
    if no_fallback {
        if !plan.rejected.is_empty() {
            let reasons: Vec<String> = plan
                .rejected
                .iter()
                .map(|(p, why)| format!("{p}: {why}"))
                .collect();
            return Err(Error::provider(format!(
                "requested execution provider(s) cannot be used and fallback is off:\n  {}",
                reasons.join("\n  ")
            ))
            .with_hint("fix the provider as described, or drop --no-fallback to run on the remaining providers and CPU"));
        }
        if plan.active.is_empty() {
            return Err(Error::provider("no execution provider requested")
                .with_hint("ask for at least one, e.g. cpu"));
        }
    } else if !plan.active.contains(&Provider::Cpu) {
        plan.active.push(Provider::Cpu);
    }
    Ok(plan)
}

fn probe_one(
    p: Provider,
    available: &[String],
    lib: &library::OrtLibrary,
) -> std::result::Result<(), String> {
    if !compiled_in(p) {
        return Err(format!(
            "not compiled into this fluxrt binary; rebuild with `--features {}`",
            p.feature().unwrap_or_default()
        ));
    }
    if p == Provider::Cpu {
        return Ok(()); // always there; nothing to register
    }
    if !available.iter().any(|a| a == p.ort_name()) {
        return Err(format!(
            "the ONNX Runtime library {} ({}) does not contain {} (it has: {}); install {}=={} or point --ort-lib at a build with it",
            lib.version(),
            lib.path().display(),
            p.ort_name(),
            available.join(", "),
            p.package().split(' ').next().unwrap_or("onnxruntime"),
            library::RECOMMENDED_VERSION
        ));
    }
    let Some(d) = dispatch(p, &EpSettings::default(), None).map_err(|e| e.to_string())? else {
        return Err("not compiled into this fluxrt binary".to_string());
    };
    register_on_throwaway(lib, d.error_on_failure())
        .map_err(|e| format!("registration failed: {e}"))
}

fn register_on_throwaway(
    lib: &library::OrtLibrary,
    d: ExecutionProviderDispatch,
) -> ort::Result<()> {
    let _builder = Session::builder(lib.env())?.with_execution_providers([d])?;
    Ok(())
}

/// The `ort` provider object for `p` with `settings`, for the graph `(role, path)` (its TensorRT profile and
/// the cache folders keyed by it; `None` when probing), if compiled in. Registered with `error_on_failure`. Creates
/// the provider's cache folders. The options come from [`EpSettings::provider_options_for`]; without a graph (probing,
/// the device loop's step graph) CUDA graphs stay off.
pub(crate) fn dispatch(
    p: Provider,
    settings: &EpSettings,
    graph: Option<(&str, &Path)>,
) -> Result<Option<ExecutionProviderDispatch>> {
    if !compiled_in(p) {
        return Ok(None);
    }
    let host = HostInfo::detect(library::get().map_or("", |l| l.version()));
    let info = match graph {
        Some((role, path)) if matches!(p, Provider::TensorRt | Provider::CoreMl) => {
            Some(GraphInfo::read(
                role,
                path,
                p == Provider::TensorRt && settings.shapes.is_some(),
            )?)
        }
        _ => None,
    };
    let opts =
        settings.provider_options_for(p, graph.map(|(role, _)| role), info.as_ref(), &host)?;
    if let Some(g) = &info {
        ep_config::prepare_cache_dirs(&opts, g, &host)?;
    }
    let d: ExecutionProviderDispatch = match (p, &opts) {
        (Provider::Cpu, _) => ep::CPU::default().build(),
        #[cfg(feature = "cuda")]
        (Provider::Cuda, ep_config::ProviderOptions::Cuda(o)) => o.to_ort().build(),
        #[cfg(feature = "tensorrt")]
        (Provider::TensorRt, ep_config::ProviderOptions::TensorRt(o)) => o.to_ort().build(),
        #[cfg(feature = "directml")]
        (Provider::DirectMl, ep_config::ProviderOptions::DirectMl(o)) => o.to_ort().build(),
        #[cfg(feature = "coreml")]
        (Provider::CoreMl, ep_config::ProviderOptions::CoreMl(o)) => o.to_ort().build(),
        #[cfg(feature = "rocm")]
        (Provider::Rocm, _) => ep::ROCm::default().build(),
        #[cfg(feature = "migraphx")]
        (Provider::MiGraphX, _) => ep::MIGraphX::default().build(),
        #[cfg(feature = "openvino")]
        (Provider::OpenVino, _) => ep::OpenVINO::default().build(),
        #[allow(unreachable_patterns)]
        _ => return Ok(None),
    };
    Ok(Some(d.error_on_failure()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::library::tests::test_library;
    use crate::ErrorKind;

    #[test]
    fn parse_names_and_aliases() {
        assert_eq!("CPU".parse::<Provider>().unwrap(), Provider::Cpu);
        assert_eq!(" Cuda ".parse::<Provider>().unwrap(), Provider::Cuda);
        assert_eq!("trt".parse::<Provider>().unwrap(), Provider::TensorRt);
        assert_eq!("TensorRT".parse::<Provider>().unwrap(), Provider::TensorRt);
        assert_eq!("dml".parse::<Provider>().unwrap(), Provider::DirectMl);
        assert_eq!("CoreML".parse::<Provider>().unwrap(), Provider::CoreMl);
        assert_eq!("MIGraphX".parse::<Provider>().unwrap(), Provider::MiGraphX);
        assert_eq!("open-vino".parse::<Provider>().unwrap(), Provider::OpenVino);
        assert_eq!(
            "CUDAExecutionProvider".parse::<Provider>().unwrap(),
            Provider::Cuda
        );
        for p in Provider::ALL {
            assert_eq!(p.name().parse::<Provider>().unwrap(), p);
            assert_eq!(p.ort_name().parse::<Provider>().unwrap(), p);
        }
    }

    #[test]
    fn unknown_name_lists_valid_ones() {
        let err = "vulkan".parse::<Provider>().unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidInput);
        assert!(err.message.contains("vulkan"), "{err}");
        let hint = err.hint.unwrap();
        for p in Provider::ALL {
            assert!(hint.contains(p.name()), "{hint}");
        }
    }

    #[test]
    fn parse_lists() {
        assert_eq!(
            parse_list("tensorrt,cuda,cpu").unwrap(),
            vec![Provider::TensorRt, Provider::Cuda, Provider::Cpu]
        );
        assert_eq!(
            parse_list(" cuda , cuda,cpu,").unwrap(),
            vec![Provider::Cuda, Provider::Cpu]
        );
        assert_eq!(
            parse_list("cuda,gpu").unwrap_err().kind,
            ErrorKind::InvalidInput
        );
        assert_eq!(parse_list(" , ").unwrap_err().kind, ErrorKind::InvalidInput);
    }

    #[test]
    fn cpu_is_always_compiled_in() {
        assert!(compiled_in(Provider::Cpu));
        assert_eq!(compiled_in(Provider::Cuda), cfg!(feature = "cuda"));
    }

    #[test]
    fn library_lists_cpu() {
        test_library();
        let list = available_in_library();
        assert!(list.iter().any(|p| p == "CPUExecutionProvider"), "{list:?}");
    }

    #[test]
    fn probe_cpu() {
        test_library();
        let plan = probe(&[Provider::Cpu], true).unwrap();
        assert_eq!(plan.active, vec![Provider::Cpu]);
        assert!(plan.rejected.is_empty());
        assert_eq!(probe(&[Provider::Cpu], false).unwrap(), plan);
    }

    /// On this CPU-only machine CUDA is rejected with a reason: not compiled in (default features) or not in the
    /// library (CPU wheel) or registration failed (GPU wheel without CUDA). With `no_fallback` that is an error.
    #[test]
    fn probe_cuda_on_cpu_machine() {
        let lib = test_library();
        let available = available_in_library();
        let cuda_really_works = compiled_in(Provider::Cuda)
            && available.iter().any(|p| p == "CUDAExecutionProvider")
            && probe_one(Provider::Cuda, &available, lib).is_ok();
        if cuda_really_works {
            eprintln!("CUDA is usable here; skipping the rejection check");
            return;
        }
        let plan = probe(&[Provider::Cuda], false).unwrap();
        assert_eq!(plan.active, vec![Provider::Cpu]);
        assert_eq!(plan.rejected.len(), 1);
        let (p, why) = &plan.rejected[0];
        assert_eq!(*p, Provider::Cuda);
        if !compiled_in(Provider::Cuda) {
            assert!(why.contains("--features cuda"), "{why}");
        } else if !available.iter().any(|p| p == "CUDAExecutionProvider") {
            assert!(why.contains("onnxruntime-gpu"), "{why}");
        } else {
            assert!(why.contains("registration failed"), "{why}");
        }

        let err = probe(&[Provider::Cuda, Provider::Cpu], true).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Provider);
        assert!(err.message.contains("cuda"), "{err}");
        assert!(err.message.contains(why.as_str()), "{err}");
    }

    #[test]
    fn probe_keeps_order_and_appends_cpu() {
        test_library();
        let plan = probe(&[Provider::TensorRt, Provider::Cuda], false).unwrap();
        assert_eq!(*plan.active.last().unwrap(), Provider::Cpu);
        // The usable ones keep their requested order, CPU last.
        let order: Vec<_> = plan
            .active
            .iter()
            .filter(|p| **p != Provider::Cpu)
            .copied()
            .collect();
        let mut sorted = order.clone();
        sorted.sort_by_key(|p| {
            [Provider::TensorRt, Provider::Cuda]
                .iter()
                .position(|q| q == p)
        });
        assert_eq!(order, sorted);
        assert_eq!(plan.active.len() + plan.rejected.len(), 3);
    }
}
