//! A model folder resolved into graph files, tokenizers and settings, from any of the layouts fluxrt reads:
//! - `manifest`: the export step's folder (manifest.json says everything);
//! - `bfl`: the official black-forest-labs FLUX.1-*-onnx layout (`clip.opt/model.onnx`, ...);
//! - `optimum`: optimum-onnx's diffusers-style folders and transformers-style names.
//!
//! Without a manifest, the variant is read off the transformer graph (a `guidance` input means dev) once it
//! is loaded, and the FLUX.1 defaults for that variant apply ([`ModelSpec::set_variant`]).

pub mod contract;
pub mod hub;
pub mod manifest;
pub mod shapes;
pub mod tokenizer_search;

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
    /// The text length the graphs fix (BFL's: 256 schnell, 512 dev), which overrides the variant's default.
    pub fixed_text_len: Option<usize>,
}

impl ModelSpec {
    /// Resolves a model folder; every missing piece is an error that names it.
    pub fn resolve(root: &Path) -> Result<ModelSpec> {
        Self::resolve_with(root, None)
    }

    /// [`resolve`](Self::resolve) with the tokenizers taken from `tokenizers` (`--tokenizers`: a folder holding
    /// `tokenizer/` and `tokenizer_2/`, or a repo id in the Hugging Face cache). Without it, a folder that has no
    /// tokenizers (BFL's downloads) gets them from the places [`tokenizer_search`] lists. A `root` that does not
    /// exist but reads as a repo id (`black-forest-labs/FLUX.1-schnell-onnx`) is that repository's snapshot in the
    /// Hugging Face cache.
    pub fn resolve_with(root: &Path, tokenizers: Option<&Path>) -> Result<ModelSpec> {
        let cached;
        let root = match cached_repo(root) {
            Some(snap) => {
                cached = snap;
                cached.as_path()
            }
            None => root,
        };
        if !root.exists() {
            return Err(Error::input(format!("model folder {} does not exist", root.display())).with_hint(
                "pass --model with a folder made by `python -m export`, or an official FLUX.1 ONNX download",
            ));
        }
        if !root.is_dir() {
            return Err(Error::input(format!("{} is not a folder", root.display()))
                .with_hint("--model takes the model folder, not a file inside it"));
        }
        let mut spec = if root.join(manifest::FILE_NAME).is_file() {
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
            crate::runtime::onnx_io::check_complete(&g.path)?;
        }
        spec.follow_fixed_dims()?;
        if tokenizers.is_some() || spec.layout != Layout::Manifest {
            let (clip, t5) = tokenizer_search::find(root, tokenizers)?;
            spec.clip_tokenizer.path = clip;
            spec.t5_tokenizer.path = t5;
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
            let mut d = Defaults::for_variant(v);
            d.t5_max_length = self.fixed_text_len.unwrap_or(d.t5_max_length);
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
    /// first present in [`preferred_precisions`] of the first provider, else the first present that is not ModelOpt's.
    /// ModelOpt's folders (fp8, fp4, fp4_svd32) are refused with an [`ErrorKind::Provider`](crate::ErrorKind::Provider)
    /// error unless NV TensorRT RTX, the one provider that runs their custom ops, comes first. With one of them the
    /// T5 graph becomes `t5-fp8.opt` when the folder has it. Other layouts keep their transformer (its precision was
    /// chosen at export); `wanted` is an input error for them. Whether the chosen graphs run on the providers at all
    /// (bf16) is [`check_runnable`](Self::check_runnable)'s question.
    pub fn select_transformer_precision_for(
        &mut self,
        active: &[Provider],
        wanted: Option<&str>,
    ) -> Result<()> {
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
            None => match preferred_precisions(active)
                .iter()
                .copied()
                .find(|p| present.contains(p))
                .or_else(|| present.iter().copied().find(|p| !is_modelopt(p)))
                .or_else(|| present.first().copied())
            {
                Some(p) => p,
                None => return Ok(()),
            },
        };
        let path = file(chosen);
        if is_modelopt(chosen) && active.first() != Some(&Provider::NvTensorRtRtx) {
            let others: Vec<&str> = present
                .iter()
                .copied()
                .filter(|p| !is_modelopt(p))
                .collect();
            return Err(Error::provider(format!(
                "the {chosen} transformer graph {} is NVIDIA ModelOpt quantization, whose custom ops (domain `trt`) \
                 only the NV TensorRT RTX execution provider runs; it is not the first active provider",
                path.display()
            ))
            .with_hint(modelopt_hint(&others)));
        }
        if let Some(g) = self.graphs.get_mut(&Role::Transformer) {
            g.path = path;
        }
        let t5_fp8 = self.root.join(BFL_T5_FP8);
        if let Some(g) = self.graphs.get_mut(&Role::T5) {
            let t5 = self.root.join(layout_file(Role::T5, Layout::Bfl, ""));
            g.path = if is_modelopt(chosen) && t5_fp8.is_file() {
                t5_fp8
            } else {
                t5
            };
        }
        Ok(())
    }

    /// Checks, before any session is made, that every graph is a complete download and can run on `active` (priority
    /// order; the first provider is the one that takes the graph): a bf16 graph (as BFL publishes them) needs TensorRT
    /// or NV TensorRT RTX, since ONNX Runtime's CPU, CUDA, DirectML and CoreML providers lack bf16 kernels for most
    /// ops; a graph with ModelOpt's `trt`-domain ops needs NV TensorRT RTX. Each refusal names the command that
    /// fixes it (`fluxrt convert`).
    pub fn check_runnable(&self, active: &[Provider]) -> Result<()> {
        let first = active.first().copied().unwrap_or(Provider::Cpu);
        for g in self.graphs.values() {
            let summary = crate::runtime::onnx_io::check_complete(&g.path)?;
            let bf16 = summary
                .inputs
                .iter()
                .chain(&summary.outputs)
                .any(|io| io.dtype == crate::runtime::ElemType::BF16);
            if bf16 && !matches!(first, Provider::TensorRt | Provider::NvTensorRtRtx) {
                return Err(Error::provider(format!(
                    "the {} graph {} is bf16 (as BFL publishes its ONNX files), which ONNX Runtime's {first} \
                     execution provider cannot run: it has no bf16 kernels for most ops",
                    g.role,
                    g.path.display()
                ))
                .with_hint(convert_hint(&self.root, first)));
            }
            if let Some(ops) = summary.custom_ops.get(MODELOPT_DOMAIN) {
                if first != Provider::NvTensorRtRtx {
                    let ops: Vec<&str> = ops.iter().map(String::as_str).collect();
                    return Err(Error::provider(format!(
                        "the {} graph {} uses NVIDIA ModelOpt's custom ops ({}, domain `trt`), which only the NV \
                         TensorRT RTX execution provider runs; the first active provider is {first}",
                        g.role,
                        g.path.display(),
                        ops.join(", ")
                    ))
                    .with_hint(modelopt_hint(&[])));
                }
            }
        }
        Ok(())
    }

    /// Follows what the graphs fix: a T5 graph (or transformer) with a fixed text length, as BFL's are (256 schnell,
    /// 512 dev), sets the length prompts are padded or truncated to, whatever the variant's default. Graphs that
    /// disagree with each other are a model error.
    fn follow_fixed_dims(&mut self) -> Result<()> {
        let mut lengths = Vec::new();
        for (role, input, axis) in [
            (Role::T5, "input_ids", 1),
            (Role::Transformer, "encoder_hidden_states", 1),
            (Role::Transformer, "txt_ids", 0),
        ] {
            let Some(g) = self.graphs.get(&role) else {
                continue;
            };
            let name = g.actual_name(input);
            let inputs = crate::runtime::onnx_io::read_declared_inputs(&g.path)?;
            let dim = inputs
                .iter()
                .find(|i| i.name == name)
                .and_then(|i| i.shape.get(axis).cloned());
            if let Some(crate::runtime::Dim::Fixed(n)) = dim {
                lengths.push((format!("{role} input {name}"), n as usize));
            }
        }
        if let Some((first_what, n)) = lengths.first().cloned() {
            if let Some((what, m)) = lengths.iter().find(|(_, m)| *m != n) {
                return Err(Error::model(format!(
                    "the graphs of {} disagree on the text length: {first_what} fixes {n}, {what} fixes {m}",
                    self.root.display()
                ))
                .with_hint("use graphs exported together (one download or one export)"));
            }
            self.fixed_text_len = Some(n);
            self.t5_tokenizer.settings.max_length = n;
            if let Some(d) = &mut self.defaults {
                d.t5_max_length = n;
            }
        }
        Ok(())
    }
}

/// BFL's fp8 T5 folder (ModelOpt quantization, NV TensorRT RTX only).
pub const BFL_T5_FP8: &str = "t5-fp8.opt/model.onnx";
/// The operator domain of NVIDIA ModelOpt's custom quantization ops.
pub const MODELOPT_DOMAIN: &str = "trt";

/// Whether a BFL transformer folder holds ModelOpt quantization (fp8, fp4, Kontext's fp4_svd32).
pub fn is_modelopt(precision: &str) -> bool {
    MODELOPT_PRECISIONS.contains(&precision)
}

fn modelopt_hint(others: &[&str]) -> String {
    let runs_it = if crate::runtime::compiled_in(Provider::NvTensorRtRtx) {
        "run with --provider tensorrt-rtx and an ONNX Runtime built with the NV TensorRT RTX provider (it is not in \
         the onnxruntime-gpu wheel: Windows ML or a source build with --use_nv_tensorrt_rtx)"
    } else {
        "rebuild fluxrt with --features nvrtx, load an ONNX Runtime built with the NV TensorRT RTX provider (it is \
         not in the onnxruntime-gpu wheel: Windows ML or a source build with --use_nv_tensorrt_rtx) and run with \
         --provider tensorrt-rtx"
    };
    if others.is_empty() {
        format!("{runs_it}; or download the bf16 transformer folder and run it with --provider tensorrt")
    } else {
        format!(
            "{runs_it}; or use --transformer-precision {} (bf16 runs on --provider tensorrt)",
            others.join(" / ")
        )
    }
}

/// How to run a bf16 folder on `provider`: convert it once, or use TensorRT.
fn convert_hint(root: &Path, provider: Provider) -> String {
    let precision = match provider {
        Provider::Cpu | Provider::OpenVino => "fp32",
        _ => "fp16",
    };
    let out = format!("{}-{precision}", root.display());
    format!(
        "convert the folder once: `fluxrt convert {} {out} --precision {precision}` (fp32 or int8 for CPUs, fp16 \
         for GPUs; needs Python with onnx and numpy), then use --model {out}; or run it as published with \
         --provider tensorrt on an NVIDIA GPU",
        root.display()
    )
}

/// The cache snapshot of a `--model` that is a repo id rather than an existing folder.
fn cached_repo(root: &Path) -> Option<PathBuf> {
    if root.exists() {
        return None;
    }
    let id = root.to_str().filter(|s| hub::is_repo_id(s))?;
    hub::snapshot(&hub::cache_root()?, id)
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
        fixed_text_len: None,
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

/// Precisions of BFL's transformer folders (as published: bf16, fp8, fp4, Kontext's fp4_svd32; as `fluxrt convert`
/// writes them: fp32, fp16, int8, int4), in the order fluxrt looks for them.
pub const BFL_TRANSFORMER_PRECISIONS: [&str; 8] = [
    "fp32",
    "fp16",
    "int8",
    "int4",
    "bf16",
    "fp8",
    "fp4",
    "fp4_svd32",
];
/// The BFL transformer precisions that are NVIDIA ModelOpt quantization (NV TensorRT RTX only).
pub const MODELOPT_PRECISIONS: [&str; 3] = ["fp8", "fp4", "fp4_svd32"];

/// The transformer precisions to prefer, best first, for the first (highest-priority) provider of `active`:
/// - CPU (and OpenVINO): fp32 (ONNX Runtime's CPU kernels are fp32), then int8, fp16, int4 (what `fluxrt convert`
///   writes); never bf16, which the CPU provider cannot run;
/// - CUDA, ROCm, MIGraphX, DirectML, CoreML: fp16 (their fast path), then fp32, int8, int4;
/// - TensorRT: bf16 (BFL's graphs target it; it runs bf16 natively), fp16, fp32;
/// - NV TensorRT RTX: as TensorRT, then ModelOpt's fp8, fp4, fp4_svd32 (lossy: only when asked for, or alone).
pub fn preferred_precisions(active: &[Provider]) -> &'static [&'static str] {
    const CPU: &[&str] = &["fp32", "int8", "fp16", "int4"];
    const GPU: &[&str] = &["fp16", "fp32", "int8", "int4"];
    const TRT: &[&str] = &["bf16", "fp16", "fp32"];
    const RTX: &[&str] = &["bf16", "fp16", "fp32", "fp8", "fp4", "fp4_svd32"];
    match active.first() {
        Some(Provider::TensorRt) => TRT,
        Some(Provider::NvTensorRtRtx) => RTX,
        Some(
            Provider::Cuda
            | Provider::Rocm
            | Provider::MiGraphX
            | Provider::DirectMl
            | Provider::CoreMl,
        ) => GPU,
        Some(Provider::Cpu | Provider::OpenVino) | None => CPU,
    }
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
        fixed_text_len: None,
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
        use Provider::*;
        let (_d, mut s) = bfl_with(&["fp8", "bf16", "fp4"]);
        // Not NV TensorRT RTX: the first non-ModelOpt folder (whether bf16 runs is check_runnable's question).
        s.select_transformer_precision(false, None).unwrap();
        assert_eq!(s.transformer_precision(), Some("bf16"));
        // Asking for fp8 without NV TensorRT RTX: a provider error that names the alternative.
        let e = s
            .select_transformer_precision(true, Some("fp8"))
            .unwrap_err();
        assert_eq!(e.kind, crate::ErrorKind::Provider);
        assert!(
            e.message.contains("fp8") && e.message.contains("NV TensorRT RTX"),
            "{e}"
        );
        let hint = e.hint.as_deref().unwrap();
        assert!(
            hint.contains("bf16") && hint.contains("tensorrt-rtx"),
            "{hint}"
        );
        assert_eq!(
            s.transformer_precision(),
            Some("bf16"),
            "unchanged after the refusal"
        );
        // With NV TensorRT RTX fp8 and fp4 are allowed, on request; bf16 stays the default.
        s.select_transformer_precision_for(&[NvTensorRtRtx, Cpu], Some("fp4"))
            .unwrap();
        assert_eq!(s.transformer_precision(), Some("fp4"));
        s.select_transformer_precision_for(&[NvTensorRtRtx, Cpu], None)
            .unwrap();
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
        let (_d, mut s) = bfl_with(&["fp32", "fp16", "int8", "bf16", "fp8"]);
        for (active, want) in [
            (vec![Cpu], "fp32"),
            (vec![OpenVino, Cpu], "fp32"),
            (vec![Cuda, Cpu], "fp16"),
            (vec![TensorRt, Cuda, Cpu], "bf16"),
            (vec![NvTensorRtRtx, Cpu], "bf16"),
            (vec![Rocm, Cpu], "fp16"),
            (vec![MiGraphX, Cpu], "fp16"),
            (vec![DirectMl, Cpu], "fp16"),
            (vec![CoreMl, Cpu], "fp16"),
        ] {
            s.select_transformer_precision_for(&active, None).unwrap();
            assert_eq!(s.transformer_precision(), Some(want), "{active:?}");
        }
        // A converted CPU folder: int8 before int4; TensorRT takes fp32 over ModelOpt's lossy fp8.
        let (_d, mut s) = bfl_with(&["int4", "int8"]);
        s.select_transformer_precision_for(&[Cpu], None).unwrap();
        assert_eq!(s.transformer_precision(), Some("int8"));
        let (_d, mut s) = bfl_with(&["fp32", "fp8"]);
        s.select_transformer_precision_for(&[TensorRt, Cpu], None)
            .unwrap();
        assert_eq!(s.transformer_precision(), Some("fp32"));
        assert_eq!(preferred_precisions(&[]), preferred_precisions(&[Cpu]));
        for active in [[Cpu], [Cuda], [DirectMl], [CoreMl]] {
            assert!(
                !preferred_precisions(&active).contains(&"bf16"),
                "{active:?} has no bf16 kernels"
            );
        }
    }

    #[test]
    fn only_modelopt_transformers_need_nv_tensorrt_rtx() {
        use Provider::*;
        for p in ["fp8", "fp4", "fp4_svd32"] {
            let (_d, mut s) = bfl_with(&[p]);
            let e = s.select_transformer_precision(true, None).unwrap_err();
            assert_eq!(e.kind, crate::ErrorKind::Provider);
            assert!(e.message.contains(&format!("transformer.opt/{p}")), "{e}");
            assert!(
                e.hint
                    .as_deref()
                    .unwrap()
                    .contains("--provider tensorrt-rtx"),
                "{e:?}"
            );
            s.select_transformer_precision_for(&[NvTensorRtRtx], None)
                .unwrap();
            assert_eq!(s.transformer_precision(), Some(p));
        }
        // Other layouts keep their transformer; a precision request is an input error there.
        let (clip, t5) = default_tokenizers(Path::new("/m"));
        let mut m = bare_spec(Path::new("/m"), Layout::Manifest, BTreeMap::new(), clip, t5);
        assert!(m.select_transformer_precision(false, None).is_ok());
        let e = m
            .select_transformer_precision(true, Some("fp8"))
            .unwrap_err();
        assert_eq!(e.kind, crate::ErrorKind::InvalidInput);
    }

    #[test]
    fn modelopt_transformers_take_the_fp8_t5_when_there() {
        use Provider::*;
        let (d, mut s) = bfl_with(&["bf16", "fp8"]);
        let t5 = |s: &ModelSpec| s.graphs[&Role::T5].path.clone();
        s.graphs.insert(
            Role::T5,
            GraphSpec {
                role: Role::T5,
                path: d.path().join("t5.opt/model.onnx"),
                renames: Vec::new(),
            },
        );
        std::fs::create_dir_all(d.path().join("t5-fp8.opt")).unwrap();
        std::fs::write(d.path().join(BFL_T5_FP8), b"x").unwrap();
        s.select_transformer_precision_for(&[NvTensorRtRtx], Some("fp8"))
            .unwrap();
        assert_eq!(t5(&s), d.path().join(BFL_T5_FP8));
        s.select_transformer_precision_for(&[NvTensorRtRtx], None)
            .unwrap();
        assert_eq!(t5(&s), d.path().join("t5.opt/model.onnx"));
    }

    #[test]
    fn convert_hint_names_the_command_for_the_provider() {
        let h = convert_hint(Path::new("/m/flux-dev-onnx"), Provider::Cpu);
        assert!(
            h.contains("fluxrt convert /m/flux-dev-onnx /m/flux-dev-onnx-fp32 --precision fp32"),
            "{h}"
        );
        assert!(convert_hint(Path::new("/m/x"), Provider::Cuda).contains("--precision fp16"));
        assert!(!h.contains("  "), "{h}");
    }
}
