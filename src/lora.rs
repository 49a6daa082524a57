//! Run-time LoRA: reads LoRA `.safetensors` files (diffusers/PEFT or kohya naming), maps them onto the LoRA slots
//! of a transformer graph exported with `--lora-slots`, and stacks several LoRAs into the factors the graph takes.
//!
//! Pure (no ONNX Runtime). A slotted graph computes `y = linear(x) + (x @ A) @ B` for every `nn.Linear` of
//! diffusers' `FluxTransformer2DModel` (module path `M`), with optional inputs `M.lora_A` `[in, r]` and
//! `M.lora_B` `[r, out]`. So a LoRA pair `down [r, in]`, `up [out, r]` with `alpha` becomes `A = down^T`,
//! `B = up^T * alpha / r`; the user's scale is folded into `B` when LoRAs are stacked. The key conversion mirrors
//! `export/lora.py` (which is tested against diffusers' loader): the same files load here and fuse at export.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use half::{bf16, f16};
use ndarray::{Array2, ArrayD, Axis};
use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};

use crate::runtime::{Dim, IoInfo};
use crate::{Error, Result};

/// Graph input suffixes of a LoRA slot: `M.lora_A` `[in, r]`, `M.lora_B` `[r, out]`.
pub use crate::model::contract::{
    is_lora_slot_input as is_slot_input, LORA_A_SUFFIX as A_SUFFIX, LORA_B_SUFFIX as B_SUFFIX,
};

const TEXT_ENCODER_HINT: &str =
    "fluxrt applies LoRAs to the transformer only at run time; fuse a LoRA with text-encoder \
     layers at export instead: python -m export CHECKPOINT OUT --lora FILE:SCALE";
const NO_SLOTS_HINT: &str =
    "re-export the model with LoRA slots: python -m export CHECKPOINT OUT --lora-slots \
     (or fuse the LoRA at export: --lora FILE:SCALE)";
const OTHER_MODEL_HINT: &str =
    "use a LoRA trained for this model (FLUX.1 LoRAs do not fit the tiny test models, and the other way round)";

/// One LoRA slot of a transformer graph: a Linear layer by its diffusers module path, and its sizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub module: String,
    pub in_features: usize,
    pub out_features: usize,
}

/// The LoRA slots a transformer graph declares: inputs `M.lora_A` `[in, r]` with a matching `M.lora_B`
/// `[r, out]`, `in` and `out` fixed. Graphs without such inputs (BFL, optimum, plain exports) have none.
pub fn discover_slots(inputs: &[IoInfo]) -> Vec<Slot> {
    let fixed = |d: Option<&Dim>| match d {
        Some(Dim::Fixed(n)) if *n > 0 => Some(*n as usize),
        _ => None,
    };
    let mut slots = BTreeMap::new();
    for a in inputs {
        let Some(module) = a.name.strip_suffix(A_SUFFIX) else {
            continue;
        };
        let b_name = format!("{module}{B_SUFFIX}");
        let Some(b) = inputs.iter().find(|i| i.name == b_name) else {
            continue;
        };
        if a.shape.len() != 2 || b.shape.len() != 2 {
            continue;
        }
        if let (Some(i), Some(o)) = (fixed(a.shape.first()), fixed(b.shape.get(1))) {
            slots.insert(
                module.to_string(),
                Slot {
                    module: module.to_string(),
                    in_features: i,
                    out_features: o,
                },
            );
        }
    }
    slots.into_values().collect()
}

/// The key naming of a LoRA file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Naming {
    /// `transformer.<module>.lora_A.weight` / `lora_B.weight` / `.alpha` (also without the prefix, PEFT).
    Diffusers,
    /// `lora_unet_<bfl_layer>.lora_down.weight` / `lora_up.weight` / `.alpha` (kohya / sd-scripts).
    Kohya,
}

impl Naming {
    pub fn name(self) -> &'static str {
        match self {
            Naming::Diffusers => "diffusers",
            Naming::Kohya => "kohya",
        }
    }
}

/// One slot's low-rank factors: `A` `[in, r]`, `B` `[r, out]` (alpha / rank folded into `B`).
#[derive(Debug, Clone, PartialEq)]
pub struct Factors {
    pub a: Array2<f32>,
    pub b: Array2<f32>,
}

impl Factors {
    pub fn rank(&self) -> usize {
        self.a.ncols()
    }
    /// The weight update `A @ B` `[in, out]` (for checks; the graph never forms it).
    pub fn delta(&self) -> Array2<f32> {
        self.a.dot(&self.b)
    }
}

/// A loaded LoRA, validated against one model's slots.
#[derive(Clone)]
pub struct Lora {
    /// The file name (no folders: it goes into PNG parameters and server answers).
    pub name: String,
    /// sha256 of the file, hex.
    pub sha256: String,
    /// sha256 of the file's tensor data (after the 8-byte length and the JSON header), hex: the "addnet" hash
    /// A1111 shortens to 12 digits for `Lora hashes`, so it does not change when only metadata does.
    pub addnet_hash: String,
    pub naming: Naming,
    /// Per slot module.
    pub modules: BTreeMap<String, Factors>,
}

impl fmt::Debug for Lora {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lora")
            .field("name", &self.name)
            .field("sha256", &self.sha256)
            .field("addnet_hash", &self.addnet_hash)
            .field("naming", &self.naming)
            .field("layers", &self.modules.len())
            .finish()
    }
}

/// A LoRA chosen for a request, with its strength.
#[derive(Debug, Clone)]
pub struct LoraChoice {
    pub lora: Arc<Lora>,
    pub scale: f32,
}

impl LoraChoice {
    pub fn new(lora: Arc<Lora>, scale: f32) -> LoraChoice {
        LoraChoice { lora, scale }
    }
}

/// Whether two requests use the same LoRAs in the same order with the same scales (so they can share a batch).
pub fn same_set(a: &[LoraChoice], b: &[LoraChoice]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| Arc::ptr_eq(&x.lora, &y.lora) && x.scale.to_bits() == y.scale.to_bits())
}

/// A scale must be a finite number (negative is allowed: it subtracts the LoRA).
pub fn check_scale(scale: f32, what: &str) -> Result<()> {
    if scale.is_finite() {
        Ok(())
    } else {
        Err(Error::input(format!(
            "the scale of LoRA {what} must be a finite number, got {scale}"
        ))
        .with_hint("pass a number such as 0.8 (1.0 is the LoRA's full strength)"))
    }
}

/// The one check that a LoRA file exists: done when `--lora` is parsed, so the CLI and the server fail before
/// any model loads ([`Lora::load`] only turns a file that vanished since into the same kind of error).
fn check_file(path: &Path, hint: &str) -> Result<()> {
    if path.is_file() {
        return Ok(());
    }
    Err(Error::input(format!("LoRA file {} does not exist", path.display())).with_hint(hint))
}

/// `FILE[:SCALE]` as the export's `--lora` takes it: the text after the last `:` is the scale when it is a
/// number; otherwise the whole text is the file (scale 1.0) if it exists, else the scale is reported as bad.
/// The file must exist.
pub fn parse_spec(text: &str) -> Result<(std::path::PathBuf, f32)> {
    let hint = "pass --lora FILE or --lora FILE:SCALE with a LoRA .safetensors file";
    if let Some((path, scale)) = text.rsplit_once(':').filter(|(p, _)| !p.is_empty()) {
        match scale.trim().parse::<f32>() {
            Ok(v) => {
                check_scale(v, path)?;
                check_file(Path::new(path), hint)?;
                return Ok((path.into(), v));
            }
            Err(_) if !Path::new(text).exists() => {
                return Err(Error::input(format!(
                    "--lora {text}: the scale {scale:?} is not a number"
                ))
                .with_hint(
                    "write --lora FILE or --lora FILE:SCALE, e.g. --lora style.safetensors:0.8",
                ));
            }
            Err(_) => {}
        }
    }
    check_file(Path::new(text), hint)?;
    Ok((text.into(), 1.0))
}

/// `NAME=FILE` of `fluxrt serve --lora`; the file must exist.
pub fn parse_named(text: &str) -> Result<(String, std::path::PathBuf)> {
    let bad = || {
        Error::input(format!("--lora {text}: expected NAME=FILE")).with_hint(
            "e.g. --lora style=loras/style.safetensors; clients then ask for {\"name\": \"style\"}",
        )
    };
    let (name, file) = text.split_once('=').ok_or_else(bad)?;
    let name = name.trim();
    if name.is_empty()
        || file.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(bad());
    }
    check_file(
        Path::new(file),
        "pass --lora NAME=FILE with the path of a LoRA .safetensors file",
    )
    .map_err(|e| Error {
        message: format!("--lora {name}: {}", e.message),
        ..e
    })?;
    Ok((name.to_string(), file.into()))
}

/// One tensor of the file, as f32.
struct Tensor {
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl Tensor {
    fn matrix(&self) -> Option<Array2<f32>> {
        (self.shape.len() == 2)
            .then(|| Array2::from_shape_vec((self.shape[0], self.shape[1]), self.data.clone()).ok())
            .flatten()
    }
}

/// Per layer: the first key seen (for messages) and its (down, up, alpha) tensors.
type Grouped = BTreeMap<String, (String, [Option<Tensor>; 3])>;

/// Graph feeds: `(input name, value)`.
pub type Feeds = Vec<(String, ArrayD<f32>)>;

/// One LoRA pair before it is checked against a slot: `down` `[r, in]`, `up` `[out, r]`, scale alpha / r.
struct Pair {
    module: String,
    /// The key it came from, for messages.
    key: String,
    down: Array2<f32>,
    up: Array2<f32>,
    scale: f32,
}

impl Lora {
    /// Reads `path` and maps it onto `slots`. Every problem is an error naming the file (and the layer).
    pub fn load(path: &Path, slots: &[Slot]) -> Result<Lora> {
        let label = path.display().to_string();
        if slots.is_empty() {
            return Err(Error::model(format!(
                "cannot apply LoRA {label} at run time: the model's transformer graph has no LoRA slots"
            ))
            .with_hint(NO_SLOTS_HINT));
        }
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(
                    check_file(path, "pass the path of a LoRA .safetensors file")
                        .err()
                        .unwrap_or_else(|| Error::io_at("read LoRA file", path, e)),
                )
            }
            Err(e) => return Err(Error::io_at("read LoRA file", path, e)),
        };
        let name = path
            .file_name()
            .map_or(label.clone(), |n| n.to_string_lossy().into_owned());
        let mut lora = Lora::from_bytes(&label, &bytes, slots)?;
        lora.name = name;
        Ok(lora)
    }

    /// [`Lora::load`] on the file's bytes; `label` names it in messages (and becomes [`Lora::name`]).
    pub fn from_bytes(label: &str, bytes: &[u8], slots: &[Slot]) -> Result<Lora> {
        let tensors = read_tensors(label, bytes)?;
        let naming = detect_naming(label, &tensors)?;
        let pairs = match naming {
            Naming::Diffusers => diffusers_pairs(label, tensors)?,
            Naming::Kohya => kohya_pairs(label, tensors, slots)?,
        };
        let modules = fit(label, pairs, slots)?;
        Ok(Lora {
            name: label.to_string(),
            sha256: sha256_hex(bytes),
            addnet_hash: addnet_hash_hex(bytes),
            naming,
            modules,
        })
    }

    /// What `--json` and the server's `/v1/models` / `/ready` say about this LoRA.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "file": self.name,
            "sha256": self.sha256,
            "naming": self.naming.name(),
            "layers": self.modules.len(),
        })
    }

    /// Checks that this LoRA fits `slots` (it was loaded for the same model).
    pub fn check_fits(&self, slots: &[Slot]) -> Result<()> {
        for (module, f) in &self.modules {
            let ok = slots.iter().any(|s| {
                s.module == *module && s.in_features == f.a.nrows() && s.out_features == f.b.ncols()
            });
            if !ok {
                return Err(Error::input(format!(
                    "LoRA {} was loaded for another model: layer {module} [{} -> {}] has no matching slot here",
                    self.name,
                    f.a.nrows(),
                    f.b.ncols()
                ))
                .with_hint("load the LoRA through the pipeline that runs it (Pipeline::load_lora)"));
            }
        }
        Ok(())
    }
}

fn read_tensors(label: &str, bytes: &[u8]) -> Result<BTreeMap<String, Tensor>> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| {
        Error::input(format!(
            "LoRA file {label} is not a valid safetensors file ({e})"
        ))
        .with_hint("pass a LoRA .safetensors file (diffusers/PEFT or kohya naming); the file may be truncated")
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.iter() {
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => view
                .data()
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => view
                .data()
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F64 => view
                .data()
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
                .collect(),
            other => {
                return Err(Error::input(format!(
                    "LoRA file {label}: tensor {name} is {other:?}, not a float \
                     (f32, f64, f16, bf16)"
                )))
            }
        };
        if let Some(bad) = data.iter().find(|v| !v.is_finite()) {
            return Err(Error::input(format!(
                "LoRA file {label}: tensor {name} holds {bad}; the LoRA is damaged"
            )));
        }
        out.insert(
            name.to_string(),
            Tensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    if out.is_empty() {
        return Err(Error::input(format!("LoRA file {label} holds no tensors")));
    }
    Ok(out)
}

fn detect_naming(label: &str, t: &BTreeMap<String, Tensor>) -> Result<Naming> {
    if let Some(k) = t.keys().find(|k| k.contains("dora_scale")) {
        return Err(Error::input(format!(
            "LoRA file {label} is a DoRA ({k}); fluxrt cannot apply DoRA weights"
        )));
    }
    let te = |k: &str| {
        k.starts_with("lora_te")
            || k.starts_with("text_encoder.")
            || k.starts_with("text_encoder_2.")
    };
    if let Some(k) = t.keys().find(|k| te(k)) {
        return Err(Error::input(format!(
            "LoRA file {label} has text-encoder (CLIP/T5) layers (e.g. {k}), which run-time LoRA does not support"
        ))
        .with_hint(TEXT_ENCODER_HINT));
    }
    if t.keys()
        .any(|k| k.ends_with(".lora_down.weight") || k.ends_with(".lora_up.weight"))
    {
        return Ok(Naming::Kohya);
    }
    if t.keys()
        .any(|k| k.ends_with(".lora_A.weight") || k.ends_with(".lora_B.weight"))
    {
        return Ok(Naming::Diffusers);
    }
    let first = t.keys().next().map(String::as_str).unwrap_or_default();
    Err(Error::input(format!(
        "LoRA file {label} has no LoRA weights (no lora_A/lora_B or lora_down/lora_up keys, e.g. {first:?}); it is not a LoRA"
    )))
}

/// Splits `key` into (layer, part) for the given part suffixes.
fn split_key<'k>(key: &'k str, parts: &[&'static str]) -> Option<(&'k str, &'static str)> {
    parts
        .iter()
        .find_map(|p| key.strip_suffix(p).map(|layer| (layer, *p)))
}

/// The (down, up, alpha) of every layer; an error for an unknown key or a layer missing half of its pair.
fn group(
    label: &str,
    tensors: BTreeMap<String, Tensor>,
    [down, up, alpha]: [&'static str; 3],
    strip: &dyn Fn(&str) -> Option<String>,
) -> Result<Grouped> {
    let mut layers: Grouped = BTreeMap::new();
    for (key, t) in tensors {
        let Some((layer, part)) = split_key(&key, &[down, up, alpha]) else {
            return Err(Error::input(format!(
                "LoRA file {label}: key {key:?} is not a LoRA weight ({down}, {up} or {alpha})"
            ))
            .with_hint(OTHER_MODEL_HINT));
        };
        let Some(layer) = strip(layer) else {
            return Err(Error::input(format!(
                "LoRA file {label}: key {key:?} is not a transformer layer of a Flux LoRA"
            ))
            .with_hint(OTHER_MODEL_HINT));
        };
        let slot = [down, up, alpha]
            .iter()
            .position(|p| *p == part)
            .expect("part is one of the three");
        let entry = layers
            .entry(layer)
            .or_insert_with(|| (key.clone(), [None, None, None]));
        entry.1[slot] = Some(t);
    }
    Ok(layers)
}

/// Down, up and the file's alpha (if any) of one grouped layer, checked to be a low-rank pair.
fn pair_parts(
    label: &str,
    layer: &str,
    [down, up, alpha]: [Option<Tensor>; 3],
    names: [&str; 2],
) -> Result<(Array2<f32>, Array2<f32>, Option<f32>)> {
    let (Some(down), Some(up)) = (down, up) else {
        return Err(Error::input(format!(
            "LoRA file {label}: layer {layer} lacks its {} or {} weight; the file is incomplete",
            names[0], names[1]
        )));
    };
    let shapes = format!(
        "{} {:?} and {} {:?}",
        names[0], down.shape, names[1], up.shape
    );
    let (Some(d), Some(u)) = (down.matrix(), up.matrix()) else {
        return Err(Error::input(format!(
            "LoRA file {label}: layer {layer} has {shapes}, which are not matrices"
        )));
    };
    let rank = d.nrows();
    if u.ncols() != rank || rank == 0 {
        return Err(Error::input(format!(
            "LoRA file {label}: layer {layer} has {shapes}, which are not a low-rank pair"
        )));
    }
    let alpha = match alpha {
        None => None,
        Some(a) if a.data.len() == 1 => Some(a.data[0]),
        Some(a) => {
            return Err(Error::input(format!(
                "LoRA file {label}: the alpha of layer {layer} has shape {:?}, expected one number",
                a.shape
            )))
        }
    };
    Ok((d, u, alpha))
}

/// The alpha PEFT gives each layer of a diffusers-named file, as diffusers 0.42.1 (`get_peft_kwargs`) and
/// PEFT 0.21 (`get_pattern_key`) configure it. `alphas` are the file's `(module, alpha)` in key order.
/// Without any alpha every layer has alpha = its rank (scale 1). Otherwise diffusers takes the "most common"
/// alpha as the default, but counts the alpha tensors by identity, so in effect the FIRST alpha (in the file's
/// sorted key order) is the default; layers whose alpha differs go into `alpha_pattern`, which PEFT matches as
/// a suffix of the module path (`proj_out` also matches `single_transformer_blocks.0.proj_out`), first pattern
/// first. A layer without `.alpha` thus gets the default, not its rank.
struct PeftAlphas {
    default: Option<f32>,
    pattern: Vec<(String, f32)>,
}

impl PeftAlphas {
    fn new(alphas: &[(String, f32)]) -> PeftAlphas {
        let default = alphas.first().map(|(_, a)| *a);
        let pattern = alphas
            .iter()
            .filter(|(_, a)| Some(*a) != default)
            .cloned()
            .collect();
        PeftAlphas { default, pattern }
    }

    fn alpha(&self, module: &str, rank: usize) -> f32 {
        let Some(default) = self.default else {
            return rank as f32;
        };
        self.pattern
            .iter()
            .find(|(k, _)| {
                module == k
                    || module
                        .strip_suffix(k.as_str())
                        .is_some_and(|head| head.ends_with('.'))
            })
            .map_or(default, |(_, a)| *a)
    }
}

fn diffusers_pairs(label: &str, tensors: BTreeMap<String, Tensor>) -> Result<Vec<Pair>> {
    // diffusers' own naming has the `transformer.` prefix; PEFT's save format has none. (`base_model.model.`
    // marks fal-Kontext files with BFL layer names, which only the export's diffusers conversion reads.)
    let prefixed = tensors.keys().any(|k| k.starts_with("transformer."));
    let strip = |layer: &str| -> Option<String> {
        if prefixed {
            layer.strip_prefix("transformer.").map(str::to_string)
        } else {
            Some(layer.to_string())
        }
    };
    // The file's alphas in key order (BTreeMap: sorted, as safetensors hands them to diffusers).
    let alphas: Vec<(String, f32)> = tensors
        .iter()
        .filter_map(|(k, t)| {
            let module = strip(k.strip_suffix(".alpha")?)?;
            (t.data.len() == 1).then(|| (module, t.data[0]))
        })
        .collect();
    let peft = PeftAlphas::new(&alphas);
    let layers = group(
        label,
        tensors,
        [".lora_A.weight", ".lora_B.weight", ".alpha"],
        &strip,
    )?;
    let mut pairs = Vec::new();
    for (module, (key, parts)) in layers {
        let (down, up, _own) = pair_parts(label, &module, parts, ["lora_A", "lora_B"])?;
        let rank = down.nrows();
        let scale = peft.alpha(&module, rank) / rank as f32;
        pairs.push(Pair {
            module,
            key,
            down,
            up,
            scale,
        });
    }
    Ok(pairs)
}

/// What a kohya (BFL-named) layer becomes in diffusers' module names.
#[derive(Debug, PartialEq)]
enum Target {
    One(String),
    /// The up weight split along `out` into equal parts (fused q, k, v), the down weight shared.
    Equal(Vec<String>),
    /// Split with this model's slot out-dims (a single block's linear1: q, k, v, mlp-in).
    SlotDims(Vec<String>),
    /// The two halves of the output swapped: BFL's (shift, scale) vs diffusers' (scale, shift).
    Swapped(String),
}

/// The diffusers modules a kohya `lora_unet_<layer>` maps to (diffusers' `_convert_kohya_flux_lora_to_diffusers`,
/// with `export/lora.py`'s fixes: linear1 split by this model's sizes, top-level layers kept).
fn kohya_target(layer: &str) -> Option<Target> {
    let block = |rest: &str| -> Option<(usize, String)> {
        let (n, tail) = rest.split_once('_')?;
        Some((n.parse().ok()?, tail.to_string()))
    };
    if let Some((i, tail)) = layer.strip_prefix("double_blocks_").and_then(block) {
        let d = format!("transformer_blocks.{i}");
        let one = |m: &str| Some(Target::One(format!("{d}.{m}")));
        return match tail.as_str() {
            "img_attn_qkv" => Some(Target::Equal(
                ["to_q", "to_k", "to_v"]
                    .iter()
                    .map(|m| format!("{d}.attn.{m}"))
                    .collect(),
            )),
            "txt_attn_qkv" => Some(Target::Equal(
                ["add_q_proj", "add_k_proj", "add_v_proj"]
                    .iter()
                    .map(|m| format!("{d}.attn.{m}"))
                    .collect(),
            )),
            "img_attn_proj" => one("attn.to_out.0"),
            "txt_attn_proj" => one("attn.to_add_out"),
            "img_mlp_0" => one("ff.net.0.proj"),
            "img_mlp_2" => one("ff.net.2"),
            "txt_mlp_0" => one("ff_context.net.0.proj"),
            "txt_mlp_2" => one("ff_context.net.2"),
            "img_mod_lin" => one("norm1.linear"),
            "txt_mod_lin" => one("norm1_context.linear"),
            _ => None,
        };
    }
    if let Some((i, tail)) = layer.strip_prefix("single_blocks_").and_then(block) {
        let s = format!("single_transformer_blocks.{i}");
        return match tail.as_str() {
            "linear1" => Some(Target::SlotDims(vec![
                format!("{s}.attn.to_q"),
                format!("{s}.attn.to_k"),
                format!("{s}.attn.to_v"),
                format!("{s}.proj_mlp"),
            ])),
            "linear2" => Some(Target::One(format!("{s}.proj_out"))),
            "modulation_lin" => Some(Target::One(format!("{s}.norm.linear"))),
            _ => None,
        };
    }
    let top = match layer {
        "img_in" => "x_embedder",
        "txt_in" => "context_embedder",
        "time_in_in_layer" => "time_text_embed.timestep_embedder.linear_1",
        "time_in_out_layer" => "time_text_embed.timestep_embedder.linear_2",
        "vector_in_in_layer" => "time_text_embed.text_embedder.linear_1",
        "vector_in_out_layer" => "time_text_embed.text_embedder.linear_2",
        "guidance_in_in_layer" => "time_text_embed.guidance_embedder.linear_1",
        "guidance_in_out_layer" => "time_text_embed.guidance_embedder.linear_2",
        "final_layer_linear" => "proj_out",
        "final_layer_adaLN_modulation_1" => return Some(Target::Swapped("norm_out.linear".into())),
        _ => return None,
    };
    Some(Target::One(top.to_string()))
}

fn kohya_pairs(
    label: &str,
    tensors: BTreeMap<String, Tensor>,
    slots: &[Slot],
) -> Result<Vec<Pair>> {
    let strip = |layer: &str| layer.strip_prefix("lora_unet_").map(str::to_string);
    let layers = group(
        label,
        tensors,
        [".lora_down.weight", ".lora_up.weight", ".alpha"],
        &strip,
    )?;
    let mut pairs = Vec::new();
    for (layer, (key, parts)) in layers {
        let (down, up, alpha) = pair_parts(label, &layer, parts, ["lora_down", "lora_up"])?;
        // diffusers folds each kohya layer's own alpha in; a layer without one has alpha = rank.
        let scale = alpha.map_or(1.0, |a| a / down.nrows() as f32);
        let Some(target) = kohya_target(&layer) else {
            return Err(Error::input(format!(
                "LoRA file {label}: kohya layer lora_unet_{layer} is not a Flux transformer layer"
            ))
            .with_hint(OTHER_MODEL_HINT));
        };
        let split = |modules: Vec<String>, dims: Vec<usize>| -> Result<Vec<Pair>> {
            if dims.iter().sum::<usize>() != up.nrows() {
                return Err(Error::input(format!(
                    "LoRA file {label} does not fit this model: kohya layer lora_unet_{layer} updates {} outputs, \
                     the model's {} have {} ({})",
                    up.nrows(),
                    modules.join(", "),
                    dims.iter().sum::<usize>(),
                    dims.iter().map(usize::to_string).collect::<Vec<_>>().join(" + ")
                ))
                .with_hint(OTHER_MODEL_HINT));
            }
            let mut row = 0;
            Ok(modules
                .into_iter()
                .zip(dims)
                .map(|(module, d)| {
                    let part = up.slice(ndarray::s![row..row + d, ..]).to_owned();
                    row += d;
                    Pair {
                        module,
                        key: key.clone(),
                        down: down.clone(),
                        up: part,
                        scale,
                    }
                })
                .collect())
        };
        match target {
            Target::One(module) => pairs.push(Pair {
                module,
                key,
                down,
                up,
                scale,
            }),
            Target::Swapped(module) => {
                let half = up.nrows() / 2;
                let swapped = ndarray::concatenate(
                    Axis(0),
                    &[
                        up.slice(ndarray::s![half.., ..]),
                        up.slice(ndarray::s![..half, ..]),
                    ],
                )
                .expect("halves of one matrix");
                pairs.push(Pair {
                    module,
                    key,
                    down,
                    up: swapped,
                    scale,
                });
            }
            Target::Equal(modules) => {
                let n = modules.len();
                if up.nrows() % n != 0 {
                    return Err(Error::input(format!(
                        "LoRA file {label}: kohya layer lora_unet_{layer} has lora_up {:?}, whose {} outputs do not split into {n} equal parts",
                        up.shape(),
                        up.nrows()
                    )));
                }
                let dims = vec![up.nrows() / n; n];
                pairs.extend(split(modules, dims)?);
            }
            Target::SlotDims(modules) => {
                let mut dims = Vec::new();
                for m in &modules {
                    match slots.iter().find(|s| s.module == *m) {
                        Some(s) => dims.push(s.out_features),
                        None => {
                            return Err(no_slot(label, m, &key, slots));
                        }
                    }
                }
                pairs.extend(split(modules, dims)?);
            }
        }
    }
    Ok(pairs)
}

fn no_slot(label: &str, module: &str, key: &str, slots: &[Slot]) -> Error {
    let count = |p: &str| {
        let mut blocks: Vec<&str> = slots
            .iter()
            .filter_map(|s| s.module.strip_prefix(p))
            .filter_map(|r| r.split('.').next())
            .collect();
        blocks.dedup();
        blocks.len()
    };
    Error::input(format!(
        "LoRA file {label} has layer {module} (key {key}), which this model has no LoRA slot for \
         (it has {} slots: {} double and {} single blocks); it was made for another model",
        slots.len(),
        count("transformer_blocks."),
        count("single_transformer_blocks.")
    ))
    .with_hint(OTHER_MODEL_HINT)
}

/// Checks every pair against its slot and turns it into factors; two pairs for one module are stacked.
fn fit(label: &str, pairs: Vec<Pair>, slots: &[Slot]) -> Result<BTreeMap<String, Factors>> {
    let mut out: BTreeMap<String, Factors> = BTreeMap::new();
    for p in pairs {
        let Some(slot) = slots.iter().find(|s| s.module == p.module) else {
            return Err(no_slot(label, &p.module, &p.key, slots));
        };
        let (lin, lout) = (p.down.ncols(), p.up.nrows());
        if (lin, lout) != (slot.in_features, slot.out_features) {
            return Err(Error::input(format!(
                "LoRA file {label} does not fit layer {}: the layer is [{} -> {}], the LoRA's update is [{lin} -> {lout}] \
                 (down {:?}, up {:?}, key {}); it was made for another model",
                p.module,
                slot.in_features,
                slot.out_features,
                p.down.shape(),
                p.up.shape(),
                p.key
            ))
            .with_hint(OTHER_MODEL_HINT));
        }
        let f = Factors {
            a: p.down.t().as_standard_layout().into_owned(),
            b: p.up.t().mapv(|v| v * p.scale),
        };
        match out.remove(&p.module) {
            Some(prev) => {
                out.insert(p.module, concat(&[(&prev, 1.0), (&f, 1.0)]));
            }
            None => {
                out.insert(p.module, f);
            }
        }
    }
    if out.is_empty() {
        return Err(Error::input(format!(
            "LoRA file {label} has no transformer layers"
        )));
    }
    Ok(out)
}

/// Factors concatenated along the rank, each `B` scaled: `A = [A1 A2 ..]`, `B = [s1 B1; s2 B2; ..]`, so
/// `A @ B = s1 A1 B1 + s2 A2 B2 + ..`.
fn concat(parts: &[(&Factors, f32)]) -> Factors {
    let a: Vec<_> = parts.iter().map(|(f, _)| f.a.view()).collect();
    let b: Vec<Array2<f32>> = parts.iter().map(|(f, s)| f.b.mapv(|v| v * s)).collect();
    let bv: Vec<_> = b.iter().map(|x| x.view()).collect();
    Factors {
        a: ndarray::concatenate(Axis(1), &a).expect("same in-features"),
        b: ndarray::concatenate(Axis(0), &bv).expect("same out-features"),
    }
}

/// Several LoRAs with their scales, stacked per slot in order; slots no LoRA touches are absent.
pub fn stack(choices: &[LoraChoice]) -> BTreeMap<String, Factors> {
    let mut per: BTreeMap<&str, Vec<(&Factors, f32)>> = BTreeMap::new();
    for c in choices {
        for (m, f) in &c.lora.modules {
            per.entry(m.as_str()).or_default().push((f, c.scale));
        }
    }
    per.into_iter()
        .map(|(m, parts)| (m.to_string(), concat(&parts)))
        .collect()
}

/// The graph feeds of stacked factors: `(M.lora_A, A)`, `(M.lora_B, B)` per slot.
pub fn feeds(stacked: BTreeMap<String, Factors>) -> Feeds {
    let mut out = Vec::with_capacity(stacked.len() * 2);
    for (m, f) in stacked {
        out.push((format!("{m}{A_SUFFIX}"), f.a.into_dyn()));
        out.push((format!("{m}{B_SUFFIX}"), f.b.into_dyn()));
    }
    out
}

/// SHA-256 of `data`, lower-case hex, to record which LoRA file made an image.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// A1111's "addnet" hash of a safetensors file (`modules/hashes.py` `addnet_hash_safetensors`): sha256 of the
/// bytes after the 8-byte header length and the JSON header, lower-case hex. Hashes the whole input when the
/// length is out of range (the file was already parsed, so that only happens for non-safetensors input).
pub fn addnet_hash_hex(data: &[u8]) -> String {
    let start = data
        .get(..8)
        .map(|n| u64::from_le_bytes(n.try_into().expect("8 bytes")))
        .and_then(|n| usize::try_from(n).ok()?.checked_add(8))
        .filter(|&start| start <= data.len())
        .unwrap_or(0);
    sha256_hex(&data[start..])
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{arr2, Array2};

    /// A safetensors file of f32 (or f16 when `half` is set) tensors.
    fn file(tensors: &[(&str, Vec<usize>, Vec<f32>)], half: bool) -> Vec<u8> {
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
            .iter()
            .map(|(n, s, v)| {
                let b = if half {
                    v.iter()
                        .flat_map(|x| f16::from_f32(*x).to_le_bytes())
                        .collect()
                } else {
                    v.iter().flat_map(|x| x.to_le_bytes()).collect()
                };
                (n.to_string(), s.clone(), b)
            })
            .collect();
        let dtype = if half { Dtype::F16 } else { Dtype::F32 };
        let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
            .iter()
            .map(|(n, s, b)| {
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(dtype, s.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize(views, None).unwrap()
    }

    fn slot(m: &str, i: usize, o: usize) -> Slot {
        Slot {
            module: m.into(),
            in_features: i,
            out_features: o,
        }
    }

    /// Deterministic values start, start + 0.5, start + 1, ...
    fn ramp(n: usize, start: f32) -> Vec<f32> {
        (0..n).map(|i| start + i as f32 * 0.5).collect()
    }

    fn mat(r: usize, c: usize, v: &[f32]) -> Array2<f32> {
        Array2::from_shape_vec((r, c), v.to_vec()).unwrap()
    }

    fn close(a: &Array2<f32>, b: &Array2<f32>) {
        assert_eq!(a.shape(), b.shape());
        let d = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(d <= 1e-5, "max diff {d}\n{a}\n{b}");
    }

    fn slots() -> Vec<Slot> {
        vec![
            slot("transformer_blocks.0.attn.to_q", 3, 2),
            slot("transformer_blocks.0.attn.to_k", 3, 2),
            slot("transformer_blocks.0.attn.to_v", 3, 2),
            slot("transformer_blocks.0.attn.add_q_proj", 3, 2),
            slot("transformer_blocks.0.attn.add_k_proj", 3, 2),
            slot("transformer_blocks.0.attn.add_v_proj", 3, 2),
            slot("transformer_blocks.0.ff.net.0.proj", 3, 4),
            slot("single_transformer_blocks.0.attn.to_q", 3, 2),
            slot("single_transformer_blocks.0.attn.to_k", 3, 2),
            slot("single_transformer_blocks.0.attn.to_v", 3, 2),
            slot("single_transformer_blocks.0.proj_mlp", 3, 5),
            slot("single_transformer_blocks.0.proj_out", 8, 3),
            slot("norm_out.linear", 3, 4),
            slot("proj_out", 3, 4),
            slot("x_embedder", 4, 3),
        ]
    }

    fn err(bytes: &[u8], slots: &[Slot]) -> Error {
        Lora::from_bytes("x.safetensors", bytes, slots).unwrap_err()
    }

    #[test]
    fn slots_are_discovered_from_graph_inputs() {
        let io = |n: &str, shape: Vec<Dim>| IoInfo {
            name: n.into(),
            dtype: crate::runtime::ElemType::F32,
            shape,
        };
        let r = || Dim::Symbolic("r".into());
        let inputs = vec![
            io(
                "hidden_states",
                vec![Dim::Symbolic("b".into()), Dim::Fixed(16), Dim::Fixed(64)],
            ),
            io("x_embedder.lora_A", vec![Dim::Fixed(64), r()]),
            io("x_embedder.lora_B", vec![r(), Dim::Fixed(32)]),
            io("proj_out.lora_A", vec![Dim::Fixed(32), r()]),
            // No B half, or no fixed size: not a slot.
            io("orphan.lora_A", vec![Dim::Fixed(8), r()]),
            io("dyn.lora_A", vec![r(), r()]),
            io("dyn.lora_B", vec![r(), r()]),
        ];
        assert_eq!(discover_slots(&inputs), vec![slot("x_embedder", 64, 32)]);
        assert!(discover_slots(&inputs[..1]).is_empty());
        assert!(is_slot_input("a.b.lora_A") && is_slot_input("a.lora_B"));
        assert!(!is_slot_input("hidden_states"));
    }

    #[test]
    fn diffusers_naming_with_alpha_folds_alpha_over_rank_into_b() {
        let down = ramp(6, 0.1); // [2, 3]
        let up = ramp(4, -0.3); // [2, 2]
        let bytes = file(
            &[
                (
                    "transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
                    vec![2, 3],
                    down.clone(),
                ),
                (
                    "transformer.transformer_blocks.0.attn.to_q.lora_B.weight",
                    vec![2, 2],
                    up.clone(),
                ),
                (
                    "transformer.transformer_blocks.0.attn.to_q.alpha",
                    vec![],
                    vec![1.0],
                ),
            ],
            false,
        );
        let l = Lora::from_bytes("x.safetensors", &bytes, &slots()).unwrap();
        assert_eq!(l.naming, Naming::Diffusers);
        let f = &l.modules["transformer_blocks.0.attn.to_q"];
        close(&f.a, &mat(2, 3, &down).t().to_owned());
        close(&f.b, &(mat(2, 2, &up).t().to_owned() * 0.5)); // alpha 1 / rank 2
        close(
            &f.delta(),
            &(mat(2, 3, &down).t().dot(&mat(2, 2, &up).t()) * 0.5),
        );
        assert_eq!(l.sha256, sha256_hex(&bytes));
    }

    #[test]
    fn peft_names_without_prefix_and_f16_load_without_alpha() {
        // Rank 1; halves are exact in f16.
        let (down, up) = (ramp(3, 0.5), ramp(4, 1.0));
        for prefix in ["", "transformer."] {
            let bytes = file(
                &[
                    (
                        &format!("{prefix}proj_out.lora_A.weight"),
                        vec![1, 3],
                        down.clone(),
                    ),
                    (
                        &format!("{prefix}proj_out.lora_B.weight"),
                        vec![4, 1],
                        up.clone(),
                    ),
                ],
                true,
            );
            let l = Lora::from_bytes("x", &bytes, &slots()).unwrap();
            let f = &l.modules["proj_out"];
            assert_eq!(f.rank(), 1);
            close(&f.b, &mat(1, 4, &up)); // no alpha: scale 1
        }
        // `base_model.model.` marks fal-Kontext files with BFL layer names (diffusers' is_fal_kontext), not
        // diffusers modules: refused like any layer of another model.
        let bytes = file(
            &[
                ("base_model.model.proj_out.lora_A.weight", vec![1, 3], down),
                ("base_model.model.proj_out.lora_B.weight", vec![4, 1], up),
            ],
            false,
        );
        let e = err(&bytes, &slots());
        assert!(
            e.message.contains("base_model.model.proj_out") && e.message.contains("no LoRA slot"),
            "{e}"
        );
    }

    #[test]
    fn partial_alphas_follow_diffusers_peft_config() {
        // Rank 2 everywhere. Alphas in sorted key order: norm_out.linear 4 (the first: the default, which
        // diffusers' identity-counted "most common" picks, though 6 is more common), proj_out 1 (pattern),
        // single_transformer_blocks.0.attn.to_q 4, .to_v 6, transformer_blocks.0.attn.to_k 6, .to_v 6 (pattern).
        // Without alpha: to_q gets the default 4, not its rank; so do single_transformer_blocks.0.attn.to_k and
        // x_embedder. PEFT matches the pattern `proj_out` as a suffix, so single_transformer_blocks.0.proj_out
        // (no alpha) gets 1.
        let mut t: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        let layers = [
            ("transformer_blocks.0.attn.to_q", 3, 2, None),
            ("transformer_blocks.0.attn.to_k", 3, 2, Some(6.0)),
            ("transformer_blocks.0.attn.to_v", 3, 2, Some(6.0)),
            ("single_transformer_blocks.0.attn.to_q", 3, 2, Some(4.0)),
            ("single_transformer_blocks.0.attn.to_k", 3, 2, None),
            ("single_transformer_blocks.0.attn.to_v", 3, 2, Some(6.0)),
            ("single_transformer_blocks.0.proj_out", 8, 3, None),
            ("norm_out.linear", 3, 4, Some(4.0)),
            ("proj_out", 3, 4, Some(1.0)),
            ("x_embedder", 4, 3, None),
        ];
        for (m, i, o, alpha) in layers {
            t.push((
                format!("transformer.{m}.lora_A.weight"),
                vec![2, i],
                ramp(2 * i, 0.1),
            ));
            t.push((
                format!("transformer.{m}.lora_B.weight"),
                vec![o, 2],
                ramp(2 * o, 0.2),
            ));
            if let Some(a) = alpha {
                t.push((format!("transformer.{m}.alpha"), vec![], vec![a]));
            }
        }
        let refs: Vec<(&str, Vec<usize>, Vec<f32>)> = t
            .iter()
            .map(|(n, s, v)| (n.as_str(), s.clone(), v.clone()))
            .collect();
        let l = Lora::from_bytes("x", &file(&refs, false), &slots()).unwrap();
        let want = [
            ("transformer_blocks.0.attn.to_q", 4.0),
            ("transformer_blocks.0.attn.to_k", 6.0),
            ("transformer_blocks.0.attn.to_v", 6.0),
            ("single_transformer_blocks.0.attn.to_q", 4.0),
            ("single_transformer_blocks.0.attn.to_k", 4.0),
            ("single_transformer_blocks.0.attn.to_v", 6.0),
            ("single_transformer_blocks.0.proj_out", 1.0),
            ("norm_out.linear", 4.0),
            ("proj_out", 1.0),
            ("x_embedder", 4.0),
        ];
        for (m, alpha) in want {
            let (i, o) = layers
                .iter()
                .find(|l| l.0 == m)
                .map(|l| (l.1, l.2))
                .unwrap();
            let up = mat(o, 2, &ramp(2 * o, 0.2));
            close(&l.modules[m].b, &(up.t().to_owned() * (alpha / 2.0)));
            assert_eq!(l.modules[m].a.nrows(), i, "{m}");
        }
        // No alpha at all: alpha = rank (scale 1) per layer.
        assert_eq!(PeftAlphas::new(&[]).alpha("proj_out", 3), 3.0);
    }

    #[test]
    fn kohya_plain_layer_and_alpha() {
        let bytes = file(
            &[
                (
                    "lora_unet_double_blocks_0_img_mlp_0.lora_down.weight",
                    vec![2, 3],
                    ramp(6, 0.1),
                ),
                (
                    "lora_unet_double_blocks_0_img_mlp_0.lora_up.weight",
                    vec![4, 2],
                    ramp(8, 0.2),
                ),
                (
                    "lora_unet_double_blocks_0_img_mlp_0.alpha",
                    vec![],
                    vec![4.0],
                ),
            ],
            false,
        );
        let l = Lora::from_bytes("x", &bytes, &slots()).unwrap();
        assert_eq!(l.naming, Naming::Kohya);
        let f = &l.modules["transformer_blocks.0.ff.net.0.proj"];
        let want = mat(2, 3, &ramp(6, 0.1))
            .t()
            .dot(&mat(4, 2, &ramp(8, 0.2)).t())
            * 2.0;
        close(&f.delta(), &want);
    }

    #[test]
    fn kohya_qkv_splits_up_in_three_and_shares_down() {
        let down = mat(2, 3, &ramp(6, 0.1));
        let up = mat(6, 2, &ramp(12, -1.0));
        for (side, mods) in [
            ("img", ["attn.to_q", "attn.to_k", "attn.to_v"]),
            (
                "txt",
                ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
            ),
        ] {
            let k = format!("lora_unet_double_blocks_0_{side}_attn_qkv");
            let bytes = file(
                &[
                    (
                        &format!("{k}.lora_down.weight"),
                        vec![2, 3],
                        down.iter().copied().collect(),
                    ),
                    (
                        &format!("{k}.lora_up.weight"),
                        vec![6, 2],
                        up.iter().copied().collect(),
                    ),
                ],
                false,
            );
            let l = Lora::from_bytes("x", &bytes, &slots()).unwrap();
            assert_eq!(l.modules.len(), 3);
            for (i, m) in mods.iter().enumerate() {
                let f = &l.modules[&format!("transformer_blocks.0.{m}")];
                close(&f.a, &down.t().to_owned());
                let part = up.slice(ndarray::s![2 * i..2 * i + 2, ..]);
                close(&f.delta(), &down.t().dot(&part.t()));
            }
        }
    }

    #[test]
    fn kohya_linear1_splits_with_this_models_slot_sizes() {
        // q, k, v are 2 wide and the MLP 5 here: 11 outputs, not four equal parts.
        let down = mat(1, 3, &[1.0, 2.0, 3.0]);
        let up = mat(11, 1, &ramp(11, 0.0));
        let k = "lora_unet_single_blocks_0_linear1";
        let bytes = file(
            &[
                (
                    &format!("{k}.lora_down.weight"),
                    vec![1, 3],
                    down.iter().copied().collect(),
                ),
                (
                    &format!("{k}.lora_up.weight"),
                    vec![11, 1],
                    up.iter().copied().collect(),
                ),
            ],
            false,
        );
        let l = Lora::from_bytes("x", &bytes, &slots()).unwrap();
        let s = "single_transformer_blocks.0";
        let rows = [
            ("attn.to_q", 0..2),
            ("attn.to_k", 2..4),
            ("attn.to_v", 4..6),
            ("proj_mlp", 6..11),
        ];
        for (m, r) in rows {
            let f = &l.modules[&format!("{s}.{m}")];
            close(&f.b, &up.slice(ndarray::s![r, ..]).t().to_owned());
        }
        // A model whose linear1 is another size: a clear mismatch naming the layer.
        let mut other = slots();
        other
            .iter_mut()
            .find(|s| s.module.ends_with("proj_mlp"))
            .unwrap()
            .out_features = 6;
        let e = err(&bytes, &other);
        assert!(
            e.message.contains("lora_unet_single_blocks_0_linear1") && e.message.contains("11"),
            "{e}"
        );
    }

    #[test]
    fn kohya_final_adaln_swaps_shift_and_scale() {
        let down = mat(1, 3, &[1.0, 0.0, 0.0]);
        let up = mat(4, 1, &[1.0, 2.0, 3.0, 4.0]); // BFL: shift (1, 2), scale (3, 4)
        let k = "lora_unet_final_layer_adaLN_modulation_1";
        let bytes = file(
            &[
                (
                    &format!("{k}.lora_down.weight"),
                    vec![1, 3],
                    down.iter().copied().collect(),
                ),
                (
                    &format!("{k}.lora_up.weight"),
                    vec![4, 1],
                    up.iter().copied().collect(),
                ),
                (&format!("{k}.alpha"), vec![], vec![2.0]),
            ],
            false,
        );
        let l = Lora::from_bytes("x", &bytes, &slots()).unwrap();
        // diffusers: scale first, then shift; alpha 2 / rank 1 folded in (diffusers itself drops it, export/lora.py
        // keeps it).
        close(
            &l.modules["norm_out.linear"].b,
            &arr2(&[[6.0, 8.0, 2.0, 4.0]]),
        );
    }

    #[test]
    fn kohya_names_map_like_diffusers() {
        let one = |l: &str| match kohya_target(l) {
            Some(Target::One(m)) => m,
            other => panic!("{l}: {other:?}"),
        };
        for (k, m) in [
            (
                "double_blocks_3_img_attn_proj",
                "transformer_blocks.3.attn.to_out.0",
            ),
            ("double_blocks_3_img_mlp_2", "transformer_blocks.3.ff.net.2"),
            (
                "double_blocks_3_img_mod_lin",
                "transformer_blocks.3.norm1.linear",
            ),
            (
                "double_blocks_3_txt_attn_proj",
                "transformer_blocks.3.attn.to_add_out",
            ),
            (
                "double_blocks_3_txt_mlp_0",
                "transformer_blocks.3.ff_context.net.0.proj",
            ),
            (
                "double_blocks_3_txt_mlp_2",
                "transformer_blocks.3.ff_context.net.2",
            ),
            (
                "double_blocks_3_txt_mod_lin",
                "transformer_blocks.3.norm1_context.linear",
            ),
            (
                "single_blocks_12_linear2",
                "single_transformer_blocks.12.proj_out",
            ),
            (
                "single_blocks_12_modulation_lin",
                "single_transformer_blocks.12.norm.linear",
            ),
            ("img_in", "x_embedder"),
            ("txt_in", "context_embedder"),
            (
                "time_in_in_layer",
                "time_text_embed.timestep_embedder.linear_1",
            ),
            (
                "time_in_out_layer",
                "time_text_embed.timestep_embedder.linear_2",
            ),
            (
                "vector_in_in_layer",
                "time_text_embed.text_embedder.linear_1",
            ),
            (
                "vector_in_out_layer",
                "time_text_embed.text_embedder.linear_2",
            ),
            (
                "guidance_in_in_layer",
                "time_text_embed.guidance_embedder.linear_1",
            ),
            (
                "guidance_in_out_layer",
                "time_text_embed.guidance_embedder.linear_2",
            ),
            ("final_layer_linear", "proj_out"),
        ] {
            assert_eq!(one(k), m, "{k}");
        }
        assert_eq!(
            kohya_target("single_blocks_2_linear1"),
            Some(Target::SlotDims(vec![
                "single_transformer_blocks.2.attn.to_q".into(),
                "single_transformer_blocks.2.attn.to_k".into(),
                "single_transformer_blocks.2.attn.to_v".into(),
                "single_transformer_blocks.2.proj_mlp".into(),
            ]))
        );
        assert_eq!(kohya_target("double_blocks_x_img_in"), None);
        assert_eq!(kohya_target("input_blocks_1_0"), None);
    }

    fn lora(module: &str, a: Array2<f32>, b: Array2<f32>) -> Arc<Lora> {
        Arc::new(Lora {
            name: "t".into(),
            sha256: String::new(),
            addnet_hash: String::new(),
            naming: Naming::Diffusers,
            modules: [(module.to_string(), Factors { a, b })].into(),
        })
    }

    #[test]
    fn stacking_concatenates_ranks_and_scales_b() {
        let l1 = lora("m", mat(3, 1, &[1.0, 2.0, 3.0]), mat(1, 2, &[1.0, -1.0]));
        let l2 = lora("m", mat(3, 2, &ramp(6, 0.0)), mat(2, 2, &ramp(4, 1.0)));
        let l3 = lora("other", mat(1, 1, &[1.0]), mat(1, 1, &[1.0]));
        let choices = vec![
            LoraChoice::new(l1.clone(), 0.6),
            LoraChoice::new(l2.clone(), 0.5),
            LoraChoice::new(l3, 2.0),
        ];
        let s = stack(&choices);
        assert_eq!(s["m"].rank(), 3);
        let want = l1.modules["m"].delta() * 0.6 + l2.modules["m"].delta() * 0.5;
        close(&s["m"].delta(), &want);
        close(&s["other"].b, &arr2(&[[2.0]]));
        let f = feeds(s);
        let names: Vec<&str> = f.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["m.lora_A", "m.lora_B", "other.lora_A", "other.lora_B"]
        );
        // Same LoRAs, order and scales batch together; anything else does not.
        assert!(same_set(&choices, &choices.clone()));
        assert!(!same_set(&choices[..1], &choices[..2]));
        assert!(!same_set(
            &choices[..1],
            &[LoraChoice::new(l1.clone(), 0.7)]
        ));
        assert!(same_set(&[], &[]));
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let e = err(b"not a safetensors file", &slots());
        assert!(e.message.contains("not a valid safetensors file"), "{e}");
        assert!(e.hint.is_some());

        let e = err(
            &file(&[("weight", vec![2], vec![1.0, 2.0])], false),
            &slots(),
        );
        assert!(e.message.contains("no LoRA weights"), "{e}");

        let e = err(
            &file(
                &[(
                    "transformer.proj_out.lora_A.weight",
                    vec![1, 3],
                    vec![1.0; 3],
                )],
                false,
            ),
            &slots(),
        );
        assert!(e.message.contains("lacks its lora_A or lora_B"), "{e}");

        let e = err(
            &file(
                &[
                    (
                        "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
                        vec![1, 3],
                        vec![1.0; 3],
                    ),
                    (
                        "lora_unet_img_in.lora_down.weight",
                        vec![1, 4],
                        vec![1.0; 4],
                    ),
                ],
                false,
            ),
            &slots(),
        );
        assert!(e.message.contains("text-encoder"), "{e}");
        assert!(e.hint.as_deref().unwrap().contains("--lora FILE:SCALE"));
        let e = err(
            &file(
                &[(
                    "text_encoder.text_model.fc1.lora_A.weight",
                    vec![1, 3],
                    vec![1.0; 3],
                )],
                false,
            ),
            &slots(),
        );
        assert!(e.message.contains("text-encoder"), "{e}");

        let e = err(
            &file(
                &[
                    (
                        "transformer.proj_out.lora_A.weight",
                        vec![1, 3],
                        vec![f32::NAN; 3],
                    ),
                    (
                        "transformer.proj_out.lora_B.weight",
                        vec![4, 1],
                        vec![1.0; 4],
                    ),
                ],
                false,
            ),
            &slots(),
        );
        assert!(e.message.contains("NaN"), "{e}");

        let e = err(
            &file(
                &[(
                    "transformer.proj_out.lora_magnitude_vector.dora_scale",
                    vec![1],
                    vec![1.0],
                )],
                false,
            ),
            &slots(),
        );
        assert!(e.message.contains("DoRA"), "{e}");
    }

    #[test]
    fn a_lora_for_another_model_names_the_layer_and_shapes() {
        // A layer this model lacks (a deeper model).
        let e = err(
            &file(
                &[
                    (
                        "transformer.transformer_blocks.7.attn.to_q.lora_A.weight",
                        vec![1, 3],
                        vec![1.0; 3],
                    ),
                    (
                        "transformer.transformer_blocks.7.attn.to_q.lora_B.weight",
                        vec![2, 1],
                        vec![1.0; 2],
                    ),
                ],
                false,
            ),
            &slots(),
        );
        assert!(
            e.message.contains("transformer_blocks.7.attn.to_q")
                && e.message.contains("no LoRA slot"),
            "{e}"
        );
        assert!(e.message.contains("1 double and 1 single blocks"), "{e}");
        // A wider model: a shape mismatch.
        let e = err(
            &file(
                &[
                    (
                        "transformer.proj_out.lora_A.weight",
                        vec![1, 6],
                        vec![1.0; 6],
                    ),
                    (
                        "transformer.proj_out.lora_B.weight",
                        vec![4, 1],
                        vec![1.0; 4],
                    ),
                ],
                false,
            ),
            &slots(),
        );
        assert!(
            e.message.contains("does not fit layer proj_out") && e.message.contains("[3 -> 4]"),
            "{e}"
        );
        assert!(e.message.contains("[6 -> 4]"), "{e}");
        // A kohya name that is no Flux layer (an SD UNet LoRA).
        let e = err(
            &file(
                &[
                    (
                        "lora_unet_input_blocks_1_0_emb_layers_1.lora_down.weight",
                        vec![1, 3],
                        vec![1.0; 3],
                    ),
                    (
                        "lora_unet_input_blocks_1_0_emb_layers_1.lora_up.weight",
                        vec![2, 1],
                        vec![1.0; 2],
                    ),
                ],
                false,
            ),
            &slots(),
        );
        assert!(e.message.contains("not a Flux transformer layer"), "{e}");
        // Loaded for one model, run on another.
        let l = Lora::from_bytes(
            "x",
            &file(
                &[
                    (
                        "transformer.proj_out.lora_A.weight",
                        vec![1, 3],
                        vec![1.0; 3],
                    ),
                    (
                        "transformer.proj_out.lora_B.weight",
                        vec![4, 1],
                        vec![1.0; 4],
                    ),
                ],
                false,
            ),
            &slots(),
        )
        .unwrap();
        assert!(l.check_fits(&slots()).is_ok());
        assert!(l.check_fits(&[slot("proj_out", 3, 5)]).is_err());
    }

    #[test]
    fn a_model_without_slots_is_refused_with_the_export_hint() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l.safetensors");
        std::fs::write(&p, b"whatever").unwrap();
        let e = Lora::load(&p, &[]).unwrap_err();
        assert!(e.message.contains("no LoRA slots"), "{e}");
        assert!(e.hint.unwrap().contains("--lora-slots"));
        let e = Lora::load(&dir.path().join("missing.safetensors"), &slots()).unwrap_err();
        assert!(e.message.contains("does not exist"), "{e}");
    }

    #[test]
    fn specs_parse_like_the_exports() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.safetensors");
        std::fs::write(&a, b"x").unwrap();
        let a = a.display().to_string();
        assert_eq!(parse_spec(&a).unwrap(), (a.clone().into(), 1.0));
        assert_eq!(
            parse_spec(&format!("{a}:0.8")).unwrap(),
            (a.clone().into(), 0.8)
        );
        assert_eq!(
            parse_spec(&format!("{a}:-1")).unwrap(),
            (a.clone().into(), -1.0)
        );
        let e = parse_spec(&format!("{a}:strong")).unwrap_err();
        assert!(e.message.contains("not a number"), "{e}");
        let e = parse_spec(&format!("{a}:inf")).unwrap_err();
        assert!(e.message.contains("finite"), "{e}");
        assert!(parse_spec(&format!("{a}:NaN")).is_err());
        // a missing file fails here, before any model loads
        let e = parse_spec("nope.safetensors:0.8").unwrap_err();
        assert!(
            e.message.contains("does not exist") && e.hint.is_some(),
            "{e}"
        );
        assert_eq!(
            parse_named(&format!("style={a}")).unwrap(),
            ("style".into(), a.clone().into())
        );
        let e = parse_named("style=nope.safetensors").unwrap_err();
        assert!(
            e.message.contains("--lora style") && e.message.contains("does not exist"),
            "{e}"
        );
        assert!(parse_named("style").is_err());
        assert!(parse_named("=x").is_err());
        assert!(parse_named("a b=x").is_err());
        assert!(check_scale(f32::INFINITY, "x").is_err());
    }

    #[test]
    fn addnet_hash_skips_the_header() {
        let bytes = file(
            &[("proj_out.lora_A.weight", vec![1, 3], ramp(3, 0.5))],
            false,
        );
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(addnet_hash_hex(&bytes), sha256_hex(&bytes[8 + n..]));
        assert_ne!(addnet_hash_hex(&bytes), sha256_hex(&bytes));
        // the same tensors under other metadata: same addnet hash, other file hash
        let view =
            safetensors::tensor::TensorView::new(Dtype::F32, vec![1, 3], &bytes[8 + n..]).unwrap();
        let meta = std::collections::HashMap::from([("ss_note".to_string(), "x".to_string())]);
        let other = safetensors::serialize([("proj_out.lora_A.weight", view)], Some(meta)).unwrap();
        assert_eq!(addnet_hash_hex(&other), addnet_hash_hex(&bytes));
        assert_ne!(sha256_hex(&other), sha256_hex(&bytes));
        // not a safetensors length: the whole input
        assert_eq!(addnet_hash_hex(b"abc"), sha256_hex(b"abc"));
    }

    #[test]
    fn sha256_matches_the_standard_vectors() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            sha256_hex(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
    }
}
