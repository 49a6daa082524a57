//! A model folder resolved into graph files, tokenizers and settings, from any of the layouts fluxrt reads:
//! - `manifest`: the export step's folder (manifest.json says everything);
//! - `bfl`: the official black-forest-labs FLUX.1-*-onnx layout (`clip.opt/model.onnx`, ...);
//! - `optimum`: optimum-onnx's diffusers-style folders and transformers-style names.
//!
//! Without a manifest, the variant is read off the transformer graph (a `guidance` input means dev) once it
//! is loaded, and the FLUX.1 defaults for that variant apply ([`ModelSpec::set_variant`]).

pub mod contract;
pub mod manifest;
pub mod shapes;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub use contract::Role;
pub use manifest::{Defaults, Manifest, VaeConfig, Variant};

use crate::runtime::Provider;
use crate::schedule::SchedulerConfig;
use crate::text::{TokenizerSettings, TokenizerSource};
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    Manifest,
    Bfl,
    Optimum,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::Manifest => "fluxrt manifest",
            Layout::Bfl => "BFL ONNX",
            Layout::Optimum => "optimum-onnx",
        }
    }
}

/// One graph file and how its I/O names map to the contract's.
#[derive(Debug, Clone)]
pub struct GraphSpec {
    pub role: Role,
    pub path: PathBuf,
    /// Contract name -> the graph's own name, where they differ.
    pub renames: Vec<(&'static str, &'static str)>,
}

impl GraphSpec {
    pub fn actual_name(&self, contract_name: &str) -> String {
        self.renames
            .iter()
            .find(|(c, _)| *c == contract_name)
            .map_or(contract_name, |(_, a)| *a)
            .to_string()
    }
}

/// Where one tokenizer is and how it frames prompts.
#[derive(Debug, Clone)]
pub struct TokenizerSpec {
    /// A tokenizer.json (manifest models), or a tokenizer folder (BFL and optimum layouts: `tokenizer/`,
    /// `tokenizer_2/`) in which [`PromptTokenizer::from_file`](crate::text::PromptTokenizer::from_file) picks
    /// tokenizer.json, or for CLIP vocab.json + merges.txt as the Hugging Face hub ships them.
    pub path: PathBuf,
    pub settings: TokenizerSettings,
}

#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub root: PathBuf,
    pub name: String,
    pub layout: Layout,
    /// Known from the manifest; otherwise set from the transformer graph's inputs.
    pub variant: Option<Variant>,
    pub latent_channels: usize,
    pub vae: VaeConfig,
    pub defaults: Option<Defaults>,
    pub scheduler: Option<SchedulerConfig>,
    pub clip_tokenizer: TokenizerSpec,
    pub t5_tokenizer: TokenizerSpec,
    pub graphs: BTreeMap<Role, GraphSpec>,
}

impl ModelSpec {
    /// Resolves a model folder; every missing piece is an error that names it.
    pub fn resolve(root: &Path) -> Result<ModelSpec> {
        if !root.exists() {
            return Err(Error::input(format!("model folder {} does not exist", root.display())).with_hint(
                "pass --model with a folder made by `python -m export`, or an official FLUX.1 ONNX download",
            ));
        }
        if !root.is_dir() {
            return Err(Error::input(format!("{} is not a folder", root.display()))
                .with_hint("--model takes the model folder, not a file inside it"));
        }
        let spec = if root.join(manifest::FILE_NAME).is_file() {
            from_manifest(root)?
        } else if root.join("clip.opt").is_dir() || root.join("transformer.opt").is_dir() {
            from_bfl(root)?
        } else if root.join("transformer").join("model.onnx").is_file() {
            from_optimum(root)?
        } else {
            return Err(Error::input(format!(
                "{} holds no Flux model: no manifest.json, no BFL `*.opt/` folders, no optimum `transformer/model.onnx`",
                root.display()
            ))
            .with_hint("export one with `python -m export CHECKPOINT OUT_DIR`"));
        };
        for g in spec.graphs.values() {
            require_file(&g.path, &format!("the {} graph", g.role))?;
        }
        for tok in [&spec.clip_tokenizer, &spec.t5_tokenizer] {
            TokenizerSource::locate(&tok.path, tok.settings.style)?;
        }
        Ok(spec)
    }

    pub fn graph(&self, role: Role) -> Result<&GraphSpec> {
        self.graphs.get(&role).ok_or_else(|| {
            Error::model(format!("model {} has no {role} graph", self.name))
                .with_hint("export it with `python -m export CHECKPOINT OUT --components ...`")
        })
    }

    /// Fills in what a manifest-less layout learns from its transformer graph.
    pub fn set_variant(&mut self, v: Variant) {
        if self.variant.is_none() {
            self.variant = Some(v);
        }
        let v = self.variant.unwrap_or(v);
        if self.defaults.is_none() {
            let d = Defaults::for_variant(v);
            self.t5_tokenizer.settings.max_length = d.t5_max_length;
            self.defaults = Some(d);
        }
        if self.scheduler.is_none() {
            self.scheduler = Some(match v {
                Variant::Schnell => SchedulerConfig::schnell(),
                Variant::Dev => SchedulerConfig::dev(),
            });
        }
    }

    pub fn defaults(&self) -> Defaults {
        self.defaults
            .clone()
            .unwrap_or_else(|| Defaults::for_variant(self.variant.unwrap_or(Variant::Schnell)))
    }

    pub fn scheduler(&self) -> SchedulerConfig {
        self.scheduler
            .clone()
            .unwrap_or_else(|| match self.variant {
                Some(Variant::Dev) => SchedulerConfig::dev(),
                _ => SchedulerConfig::schnell(),
            })
    }

    /// The transformer's precision where the layout names it: the BFL `transformer.opt/<precision>` folder.
    pub fn transformer_precision(&self) -> Option<&'static str> {
        if self.layout != Layout::Bfl {
            return None;
        }
        let path = &self.graphs.get(&Role::Transformer)?.path;
        let dir = path.parent()?.file_name()?.to_str()?;
        BFL_TRANSFORMER_PRECISIONS
            .iter()
            .copied()
            .find(|p| *p == dir)
    }

    /// [`select_transformer_precision_for`](Self::select_transformer_precision_for) with TensorRT alone (`tensorrt`)
    /// or the CPU.
    pub fn select_transformer_precision(
        &mut self,
        tensorrt: bool,
        wanted: Option<&str>,
    ) -> Result<()> {
        let active: &[Provider] = if tensorrt {
            &[Provider::TensorRt]
        } else {
            &[Provider::Cpu]
        };
        self.select_transformer_precision_for(active, wanted)
    }

    /// Chooses the BFL transformer folder for the active providers (priority order): `wanted` when given, else the
    /// first present in [`preferred_precisions`] of the first provider. The fp8/fp4 graphs (TensorRT quantization)
    /// are refused with an [`ErrorKind::Provider`](crate::ErrorKind::Provider) error unless TensorRT is active.
    /// Other layouts keep their transformer (its precision was chosen at export: `python -m export --precision`,
    /// fp16 with fp32 islands); `wanted` is an input error for them.
    pub fn select_transformer_precision_for(
        &mut self,
        active: &[Provider],
        wanted: Option<&str>,
    ) -> Result<()> {
        let tensorrt = active.contains(&Provider::TensorRt);
        if self.layout != Layout::Bfl {
            return match wanted {
                Some(w) => Err(Error::input(format!(
                    "transformer precision {w} selects a BFL transformer.opt/<precision> folder, but {} is a {} model",
                    self.name,
                    self.layout.name()
                ))
                .with_hint("leave --transformer-precision unset for this model")),
                None => Ok(()),
            };
        }
        let file = |p: &str| {
            self.root
                .join(layout_file(Role::Transformer, Layout::Bfl, p))
        };
        let present: Vec<&'static str> = BFL_TRANSFORMER_PRECISIONS
            .iter()
            .copied()
            .filter(|p| file(p).is_file())
            .collect();
        let order = preferred_precisions(active);
        let chosen = match wanted {
            Some(w) => match present.iter().copied().find(|p| *p == w) {
                Some(p) => p,
                None => {
                    return Err(Error::model(format!(
                        "{} has no transformer.opt/{w}/model.onnx (it has: {})",
                        self.root.display(),
                        present.join(", ")
                    ))
                    .with_hint("pick a precision the model has, or download that folder of the FLUX.1 ONNX repository"))
                }
            },
            None => match order
                .iter()
                .copied()
                .find(|p| present.contains(p))
                .or_else(|| present.first().copied())
            {
                Some(p) => p,
                None => return Ok(()),
            },
        };
        let path = file(chosen);
        if TENSORRT_ONLY_PRECISIONS.contains(&chosen) && !tensorrt {
            let others: Vec<&str> = present
                .iter()
                .copied()
                .filter(|p| !TENSORRT_ONLY_PRECISIONS.contains(p))
                .collect();
            return Err(Error::provider(format!(
                "the {chosen} transformer graph {} runs only on the TensorRT execution provider, which is not active",
                path.display()
            ))
            .with_hint(if others.is_empty() {
                "run with --provider tensorrt on an NVIDIA GPU (fluxrt built with --features tensorrt), or download \
                 the bf16 transformer folder of the FLUX.1 ONNX repository"
                    .to_string()
            } else {
                format!(
                    "run with --provider tensorrt, or use --transformer-precision {}",
                    others.join(" / ")
                )
            }));
        }
        if let Some(g) = self.graphs.get_mut(&Role::Transformer) {
            g.path = path;
        }
        Ok(())
    }
}

fn require_file(path: &Path, what: &str) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(Error::model(format!(
            "{what} {} is not a file",
            path.display()
        ))),
        Err(_) => Err(
            Error::model(format!("{what} is missing: {} not found", path.display())).with_hint(
                "re-export the model or copy the missing file from the original download",
            ),
        ),
    }
}

fn from_manifest(root: &Path) -> Result<ModelSpec> {
    let m = Manifest::read(&root.join(manifest::FILE_NAME))?;
    let mut graphs = BTreeMap::new();
    for (name, g) in &m.graphs {
        let role = Role::from_name(name).ok_or_else(|| {
            Error::model(format!("manifest lists an unknown graph `{name}`"))
                .with_hint("known graphs: clip, t5, transformer, vae_decoder, vae_encoder")
        })?;
        graphs.insert(
            role,
            GraphSpec {
                role,
                path: root.join(&g.file),
                renames: Vec::new(),
            },
        );
    }
    let tok = |e: &manifest::TokenizerEntry, base: TokenizerSettings| TokenizerSpec {
        path: root.join(&e.file),
        settings: TokenizerSettings {
            max_length: e.max_length,
            pad_id: e.pad_id,
            bos_id: e.bos_id.or(base.bos_id),
            eos_id: e.eos_id.or(base.eos_id),
            ..base
        },
    };
    let clip = tok(
        &m.tokenizers.clip,
        TokenizerSettings::clip(m.tokenizers.clip.max_length),
    );
    let mut t5 = tok(
        &m.tokenizers.t5,
        TokenizerSettings::t5(m.defaults.t5_max_length),
    );
    // The T5 graph runs at the model's sequence length, which may be shorter than the tokenizer's limit.
    t5.settings.max_length = m.defaults.t5_max_length;
    Ok(ModelSpec {
        root: root.to_path_buf(),
        name: m.name.clone(),
        layout: Layout::Manifest,
        variant: Some(m.variant),
        latent_channels: m.latent_channels,
        vae: m.vae.clone(),
        defaults: Some(m.defaults.clone()),
        scheduler: Some(m.scheduler.clone()),
        clip_tokenizer: clip,
        t5_tokenizer: t5,
        graphs,
    })
}

/// The diffusers tokenizer folders, in whichever form they come (the export step's tokenizer.json, or the
/// Hugging Face hub's files: CLIP as vocab.json + merges.txt, T5 as the hub's tokenizer.json).
fn default_tokenizers(root: &Path) -> (TokenizerSpec, TokenizerSpec) {
    (
        TokenizerSpec {
            path: root.join("tokenizer"),
            settings: TokenizerSettings::clip(77),
        },
        // Length fixed by set_variant once the variant is known.
        TokenizerSpec {
            path: root.join("tokenizer_2"),
            settings: TokenizerSettings::t5(256),
        },
    )
}

fn folder_name(root: &Path) -> String {
    root.canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| root.display().to_string())
}

/// Precisions of BFL's transformer folders, in the order fluxrt prefers them on a generic provider.
pub const BFL_TRANSFORMER_PRECISIONS: [&str; 5] = ["fp32", "fp16", "bf16", "fp8", "fp4"];
/// The BFL transformer precisions only TensorRT runs (its fp8/fp4 quantization).
pub const TENSORRT_ONLY_PRECISIONS: [&str; 2] = ["fp8", "fp4"];

/// The transformer precisions to prefer, best first, for the first (highest-priority) provider of `active`:
/// - CPU (and OpenVINO): fp32 (ONNX Runtime's CPU kernels are fp32; fp16/bf16 graphs are cast or slow), then fp16,
///   bf16;
/// - CUDA, ROCm, MIGraphX: fp16, then bf16 (half the memory, but ONNX Runtime's CUDA EP lacks bf16 kernels for
///   many ops, which then run on the CPU: see [`precision_warning`]), then fp32;
/// - TensorRT: bf16 (BFL's graphs target it; it runs bf16 natively), fp16, fp32, then its quantized fp8, fp4 (lossy:
///   only when nothing else is there, or asked for);
/// - DirectML and CoreML: fp16 (their fast path; bf16 is poorly supported), fp32, bf16.
pub fn preferred_precisions(active: &[Provider]) -> &'static [&'static str] {
    const CPU: &[&str] = &["fp32", "fp16", "bf16"];
    const GPU: &[&str] = &["fp16", "bf16", "fp32"];
    const TRT: &[&str] = &["bf16", "fp16", "fp32", "fp8", "fp4"];
    const HALF: &[&str] = &["fp16", "fp32", "bf16"];
    match active.first() {
        Some(Provider::TensorRt) => TRT,
        Some(Provider::Cuda | Provider::Rocm | Provider::MiGraphX) => GPU,
        Some(Provider::DirectMl | Provider::CoreMl) => HALF,
        Some(Provider::Cpu | Provider::OpenVino) | None => CPU,
    }
}

/// A warning when the transformer `precision` chosen for `active` may run partly on the CPU: bf16 on the CUDA EP
/// (ONNX Runtime has no CUDA bf16 kernel for many ops, e.g. ReduceMean, Pow, Erf; those nodes fall back to the CPU,
/// with copies between them). TensorRT runs bf16 natively, so nothing is said when it comes first.
pub fn precision_warning(active: &[Provider], precision: Option<&str>) -> Option<String> {
    (active.first() == Some(&Provider::Cuda) && precision == Some("bf16")).then(|| {
        "the bf16 transformer runs on the CUDA execution provider, which lacks bf16 kernels for many ops: those \
         nodes may run on the CPU (slow); use an fp16 transformer folder, or --provider tensorrt, which runs BFL's \
         bf16 graphs natively"
            .to_string()
    })
}

/// The file of `role` in the official layout (`contract/flux-onnx.json`), `{precision}` filled in.
fn layout_file(role: Role, layout: Layout, precision: &str) -> PathBuf {
    let files = &contract::graph(role).files;
    let rel = match layout {
        Layout::Optimum => &files.optimum,
        _ => &files.bfl,
    };
    PathBuf::from(rel.replace("{precision}", precision))
}

fn from_bfl(root: &Path) -> Result<ModelSpec> {
    let mut graphs = BTreeMap::new();
    let mut add = |role: Role, rel: PathBuf| {
        graphs.insert(
            role,
            GraphSpec {
                role,
                path: root.join(rel),
                renames: Vec::new(),
            },
        );
    };
    for role in [Role::Clip, Role::T5, Role::VaeDecoder] {
        add(role, layout_file(role, Layout::Bfl, ""));
    }
    let present = |p: &str| {
        root.join(layout_file(Role::Transformer, Layout::Bfl, p))
            .is_file()
    };
    match BFL_TRANSFORMER_PRECISIONS.iter().find(|p| present(p)) {
        Some(p) => add(
            Role::Transformer,
            layout_file(Role::Transformer, Layout::Bfl, p),
        ),
        None => {
            return Err(Error::model(format!(
                "{} has no transformer.opt/<precision>/model.onnx (looked for {})",
                root.display(),
                BFL_TRANSFORMER_PRECISIONS.join(", ")
            ))
            .with_hint("download the transformer.opt folder of the FLUX.1 ONNX repository"))
        }
    }
    // Only Kontext's download has a VAE encoder.
    let encoder = layout_file(Role::VaeEncoder, Layout::Bfl, "");
    if root.join(&encoder).is_file() {
        add(Role::VaeEncoder, encoder);
    }
    let (clip, t5) = default_tokenizers(root);
    Ok(bare_spec(root, Layout::Bfl, graphs, clip, t5))
}

fn from_optimum(root: &Path) -> Result<ModelSpec> {
    let mut graphs = BTreeMap::new();
    for role in Role::ALL {
        let path = root.join(layout_file(role, Layout::Optimum, ""));
        if role == Role::VaeEncoder && !path.is_file() {
            continue; // optional: only img2img needs it
        }
        graphs.insert(
            role,
            GraphSpec {
                role,
                path,
                renames: contract::optimum_names(role),
            },
        );
    }
    let (clip, t5) = default_tokenizers(root);
    Ok(bare_spec(root, Layout::Optimum, graphs, clip, t5))
}

fn bare_spec(
    root: &Path,
    layout: Layout,
    graphs: BTreeMap<Role, GraphSpec>,
    clip: TokenizerSpec,
    t5: TokenizerSpec,
) -> ModelSpec {
    ModelSpec {
        root: root.to_path_buf(),
        name: folder_name(root),
        layout,
        variant: None,
        latent_channels: 16,
        vae: VaeConfig::default(),
        defaults: None,
        scheduler: None,
        clip_tokenizer: clip,
        t5_tokenizer: t5,
        graphs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundled(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models")
            .join(name)
    }

    #[test]
    fn resolves_the_bundled_manifest_model() {
        let s = ModelSpec::resolve(&bundled("tiny-flux-dev")).unwrap();
        assert_eq!(s.layout, Layout::Manifest);
        assert_eq!(s.variant, Some(Variant::Dev));
        assert_eq!(s.graphs.len(), 5);
        assert_eq!(s.t5_tokenizer.settings.max_length, 512);
        assert_eq!(s.clip_tokenizer.settings.max_length, 77);
    }

    #[test]
    fn a_missing_folder_is_a_bad_request_with_a_hint() {
        let e = ModelSpec::resolve(Path::new("/nonexistent/model")).unwrap_err();
        assert_eq!(e.kind, crate::ErrorKind::InvalidInput);
        assert!(e.message.contains("does not exist"), "{e}");
        assert!(e.hint.is_some());
    }

    #[test]
    fn a_folder_without_a_model_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let e = ModelSpec::resolve(d.path()).unwrap_err();
        assert!(e.message.contains("holds no Flux model"), "{e}");
    }

    #[test]
    fn set_variant_fills_defaults_for_manifestless_layouts() {
        let d = tempfile::tempdir().unwrap();
        let (clip, t5) = default_tokenizers(d.path());
        let mut s = bare_spec(d.path(), Layout::Bfl, BTreeMap::new(), clip, t5);
        s.set_variant(Variant::Dev);
        assert_eq!(s.defaults().steps, 28);
        assert_eq!(s.t5_tokenizer.settings.max_length, 512);
        assert!(s.scheduler().use_dynamic_shifting);
    }

    /// A BFL spec whose transformer.opt has the given precision folders (files need not be real graphs here).
    fn bfl_with(precisions: &[&str]) -> (tempfile::TempDir, ModelSpec) {
        let d = tempfile::tempdir().unwrap();
        for p in precisions {
            let dir = d.path().join("transformer.opt").join(p);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("model.onnx"), b"x").unwrap();
        }
        let (clip, t5) = default_tokenizers(d.path());
        let mut graphs = BTreeMap::new();
        graphs.insert(
            Role::Transformer,
            GraphSpec {
                role: Role::Transformer,
                path: d
                    .path()
                    .join("transformer.opt")
                    .join(precisions[0])
                    .join("model.onnx"),
                renames: Vec::new(),
            },
        );
        let spec = bare_spec(d.path(), Layout::Bfl, graphs, clip, t5);
        (d, spec)
    }

    #[test]
    fn bfl_transformer_precision_follows_the_provider() {
        let (_d, mut s) = bfl_with(&["fp8", "bf16", "fp4"]);
        // Not TensorRT: the first non-quantized folder.
        s.select_transformer_precision(false, None).unwrap();
        assert_eq!(s.transformer_precision(), Some("bf16"));
        // Asking for fp8 without TensorRT: a provider error that names the alternative.
        let e = s
            .select_transformer_precision(false, Some("fp8"))
            .unwrap_err();
        assert_eq!(e.kind, crate::ErrorKind::Provider);
        assert!(
            e.message.contains("fp8") && e.message.contains("TensorRT"),
            "{e}"
        );
        assert!(e.hint.as_deref().unwrap().contains("bf16"), "{e:?}");
        assert_eq!(
            s.transformer_precision(),
            Some("bf16"),
            "unchanged after the refusal"
        );
        // With TensorRT fp8 and fp4 are allowed, on request.
        s.select_transformer_precision(true, Some("fp4")).unwrap();
        assert_eq!(s.transformer_precision(), Some("fp4"));
        s.select_transformer_precision(true, None).unwrap();
        assert_eq!(s.transformer_precision(), Some("bf16"));
        // A folder the model lacks.
        let e = s
            .select_transformer_precision(true, Some("fp16"))
            .unwrap_err();
        assert_eq!(e.kind, crate::ErrorKind::Model);
        assert!(
            e.message.contains("fp16") && e.message.contains("bf16, fp8, fp4"),
            "{e}"
        );
    }

    #[test]
    fn transformer_precision_per_provider() {
        use Provider::*;
        let (_d, mut s) = bfl_with(&["fp32", "fp16", "bf16", "fp8"]);
        for (active, want) in [
            (vec![Cpu], "fp32"),
            (vec![OpenVino, Cpu], "fp32"),
            (vec![Cuda, Cpu], "fp16"),
            (vec![TensorRt, Cuda, Cpu], "bf16"),
            (vec![Rocm, Cpu], "fp16"),
            (vec![MiGraphX, Cpu], "fp16"),
            (vec![DirectMl, Cpu], "fp16"),
            (vec![CoreMl, Cpu], "fp16"),
        ] {
            s.select_transformer_precision_for(&active, None).unwrap();
            assert_eq!(s.transformer_precision(), Some(want), "{active:?}");
        }
        // Only what the model has: CUDA with fp32 + fp8 takes fp32 (fp8 needs TensorRT); TensorRT takes fp32 over
        // its lossy fp8 too.
        let (_d, mut s) = bfl_with(&["fp32", "fp8"]);
        s.select_transformer_precision_for(&[Cuda, Cpu], None)
            .unwrap();
        assert_eq!(s.transformer_precision(), Some("fp32"));
        s.select_transformer_precision_for(&[TensorRt, Cpu], None)
            .unwrap();
        assert_eq!(s.transformer_precision(), Some("fp32"));
        let (_d, mut s) = bfl_with(&["fp16", "bf16"]);
        s.select_transformer_precision_for(&[Cpu], None).unwrap();
        assert_eq!(
            s.transformer_precision(),
            Some("fp16"),
            "CPU: fp16 before bf16"
        );
        assert_eq!(preferred_precisions(&[]), preferred_precisions(&[Cpu]));
        // Without fp16, CUDA takes bf16 before fp32, and says that some nodes may run on the CPU.
        let (_d, mut s) = bfl_with(&["fp32", "bf16"]);
        s.select_transformer_precision_for(&[Cuda, Cpu], None)
            .unwrap();
        assert_eq!(s.transformer_precision(), Some("bf16"));
        let w = precision_warning(&[Cuda, Cpu], s.transformer_precision()).unwrap();
        assert!(w.contains("CPU") && w.contains("tensorrt"), "{w}");
        assert!(!w.contains("  "), "{w}");
        for (active, precision) in [
            (vec![TensorRt, Cuda, Cpu], "bf16"),
            (vec![Cuda, Cpu], "fp16"),
            (vec![Cpu], "bf16"),
        ] {
            assert_eq!(
                precision_warning(&active, Some(precision)),
                None,
                "{active:?} {precision}"
            );
        }
    }

    #[test]
    fn only_quantized_transformers_need_tensorrt() {
        let (_d, mut s) = bfl_with(&["fp8"]);
        let e = s.select_transformer_precision(false, None).unwrap_err();
        assert_eq!(e.kind, crate::ErrorKind::Provider);
        assert!(e.message.contains("transformer.opt/fp8"), "{e}");
        assert!(
            e.hint.as_deref().unwrap().contains("--provider tensorrt"),
            "{e:?}"
        );
        s.select_transformer_precision(true, None).unwrap();
        assert_eq!(s.transformer_precision(), Some("fp8"));
        // Other layouts keep their transformer; a precision request is an input error there.
        let (clip, t5) = default_tokenizers(Path::new("/m"));
        let mut m = bare_spec(Path::new("/m"), Layout::Manifest, BTreeMap::new(), clip, t5);
        assert!(m.select_transformer_precision(false, None).is_ok());
        let e = m
            .select_transformer_precision(true, Some("fp8"))
            .unwrap_err();
        assert_eq!(e.kind, crate::ErrorKind::InvalidInput);
    }
}
