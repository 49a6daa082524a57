//! Execution providers: names, what this build and the loaded library support, and probing which ones really work.
//!
//! A provider is usable only when three things hold: fluxrt was built with its cargo feature, the loaded ONNX Runtime
//! library contains it, and registering it succeeds (the GPU wheel lists CUDA even on machines without CUDA; only
//! registration finds out). [`probe`] checks all three once per provider and process, and says why a provider was
//! rejected.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use ort::ep::{self, ExecutionProviderDispatch};
use ort::session::Session;

use super::ep::{
    prepare_cache_dirs, EpSettings, GraphInfo, GraphOptions, HostInfo, ProviderOptions,
};
use super::library;
use super::types::Provider;
use crate::{Error, Result};

/// Whether this fluxrt binary was built with the provider's cargo feature.
pub fn compiled_in(p: Provider) -> bool {
    match p {
        Provider::Cpu => true,
        Provider::Cuda => cfg!(feature = "cuda"),
        Provider::TensorRt => cfg!(feature = "tensorrt"),
        Provider::NvTensorRtRtx => cfg!(feature = "nvrtx"),
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

    /// The active providers' names, in priority order.
    pub fn active_names(&self) -> Vec<String> {
        self.active.iter().map(|p| p.name().to_string()).collect()
    }

    /// One line for the user, e.g. `cuda, cpu (rejected: tensorrt: ...)`.
    pub fn describe(&self) -> String {
        let mut s = self.active_names().join(", ");
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

/// The `ort` provider object for `p` with `settings`, for the graph `(label, path, options)` (its TensorRT profile,
/// CUDA graphs and the cache folders keyed by it; `None` when probing), if compiled in. Registered with
/// `error_on_failure`. Creates the provider's cache folders. The options come from [`EpSettings::provider_options`];
/// without a graph (probing, the device loop's step graph) CUDA graphs stay off.
pub(crate) fn dispatch(
    p: Provider,
    settings: &EpSettings,
    graph: Option<(&str, &Path, &GraphOptions)>,
) -> Result<Option<ExecutionProviderDispatch>> {
    if !compiled_in(p) {
        return Ok(None);
    }
    let host = HostInfo::detect(library::get().map_or("", |l| l.version()));
    // Only TensorRT and CoreML key caches by the graph file.
    let info = match graph {
        Some((label, path, _))
            if matches!(
                p,
                Provider::TensorRt | Provider::NvTensorRtRtx | Provider::CoreMl
            ) =>
        {
            Some(GraphInfo::read(label, path)?)
        }
        _ => None,
    };
    let opts = match (&info, graph) {
        (Some(g), Some((_, _, o))) => settings.provider_options(p, Some((g, o)), &host),
        // CUDA reads the graph's options (CUDA graphs), not its file.
        (None, Some((_, _, o))) if p == Provider::Cuda => {
            ProviderOptions::Cuda(settings.cuda.options(settings.gpu_id(), o))
        }
        _ => settings.provider_options(p, None, &host),
    };
    if let Some(g) = &info {
        prepare_cache_dirs(&opts, g, &host)?;
    }
    let d: ExecutionProviderDispatch = match (p, &opts) {
        (Provider::Cpu, _) => ep::CPU::default().build(),
        #[cfg(feature = "cuda")]
        (Provider::Cuda, ProviderOptions::Cuda(o)) => o.to_ort().build(),
        #[cfg(feature = "tensorrt")]
        (Provider::TensorRt, ProviderOptions::TensorRt(o)) => o.to_ort().build(),
        #[cfg(feature = "nvrtx")]
        (Provider::NvTensorRtRtx, ProviderOptions::NvRtx(o)) => o.to_ort().build(),
        #[cfg(feature = "directml")]
        (Provider::DirectMl, ProviderOptions::DirectMl(o)) => o.to_ort().build(),
        #[cfg(feature = "coreml")]
        (Provider::CoreMl, ProviderOptions::CoreMl(o)) => o.to_ort().build(),
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
            // A CUDA machine: the probe takes it, with nothing rejected.
            let plan = probe(&[Provider::Cuda], true).unwrap();
            assert_eq!(plan.active, vec![Provider::Cuda]);
            assert!(plan.rejected.is_empty(), "{:?}", plan.rejected);
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
