//! The shapes of a FLUX model's graph calls, for TensorRT profiles and CUDA graphs: the declared image size and batch
//! range (`--trt-sizes 512-1024 --trt-batch 1-4`), the graph calls one request makes ([`RequestShape`]), and each
//! graph's optimization profile ([`derive()`]), so that one engine per graph serves the whole range and ONNX Runtime
//! never rebuilds an engine for a new shape. [`ShapePlan`] puts them together for a loaded model: the options of each
//! graph's session ([`GraphOptions`]: profile, CUDA-graph capture) and the refusal of requests outside the range.
//!
//! Each dynamic dimension gets its value from what it means in the FLUX.1 contract (the transformer's
//! `hidden_states` is `[B, S, 64]`, the VAE decoder's `latent` is `[B, 16, h, w]`, ...), or, for an input the
//! contract does not know, from the graph's own dimension name (`B`, `S`, `L`, `h`, `w`, `H`, `W`, as the export
//! step writes them). Fixed dimensions keep their declared value.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::{contract, Defaults, ModelSpec, Role, Variant};
use crate::runtime::ep::{EpSettings, GraphInfo, GraphOptions, HostInfo};
use crate::runtime::onnx_io::read_declared_inputs;
use crate::runtime::profile::{InputProfile, Profile};
use crate::runtime::{Dim, IoInfo, Provider};
use crate::{Error, Result};

/// Image sizes a profile covers, in pixels: width and height each between `min` and `max` (inclusive), tuned for
/// `opt`. Every value is a multiple of 16 (the FLUX latent patch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeRange {
    /// (width, height)
    pub min: (u32, u32),
    /// (width, height); `None` = the model's default size, clamped into the range.
    pub opt: Option<(u32, u32)>,
    /// (width, height)
    pub max: (u32, u32),
}

/// Batch sizes (images per graph call) a profile covers; `opt: None` = `min`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchRange {
    pub min: u32,
    pub opt: Option<u32>,
    pub max: u32,
}

/// A declared shape range: image sizes and batch sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShapeRange {
    pub sizes: SizeRange,
    pub batch: BatchRange,
}

fn parse_size(s: &str) -> std::result::Result<(u32, u32), String> {
    let s = s.trim();
    let num = |t: &str| {
        t.trim()
            .parse::<u32>()
            .map_err(|_| format!("{t:?} is not a whole number of pixels"))
    };
    let (w, h) = match s.split_once(['x', 'X']) {
        Some((w, h)) => (num(w)?, num(h)?),
        None => {
            let n = num(s)?;
            (n, n)
        }
    };
    for v in [w, h] {
        if v == 0 || v % 16 != 0 {
            return Err(format!(
                "{v} is not a positive multiple of 16 (FLUX image sizes are multiples of 16)"
            ));
        }
    }
    Ok((w, h))
}

fn size_str((w, h): (u32, u32)) -> String {
    if w == h {
        w.to_string()
    } else {
        format!("{w}x{h}")
    }
}

/// Splits `MIN-MAX@OPT` (MAX and OPT optional) into its parts.
fn split_range(s: &str) -> (&str, Option<&str>, Option<&str>) {
    let (range, opt) = match s.split_once('@') {
        Some((r, o)) => (r, Some(o)),
        None => (s, None),
    };
    match range.split_once('-') {
        Some((a, b)) => (a, Some(b), opt),
        None => (range, None, opt),
    }
}

impl FromStr for SizeRange {
    type Err = Error;

    /// `1024` (one size), `512-1024` (width and height each from 512 to 1024), `512x768-1024x1344` (width x height at
    /// each end), with an optional tuning size after `@`: `512-1024@768`.
    fn from_str(s: &str) -> Result<SizeRange> {
        let bad = |why: String| {
            Error::input(format!("invalid image size range {s:?}: {why}")).with_hint(
                "write MIN-MAX in pixels, e.g. 512-1024 or 512x768-1024x1344, optionally @OPT",
            )
        };
        let (a, b, o) = split_range(s);
        let min = parse_size(a).map_err(bad)?;
        let max = match b {
            Some(b) => parse_size(b).map_err(bad)?,
            None => min,
        };
        let opt = o.map(parse_size).transpose().map_err(bad)?;
        if min.0 > max.0 || min.1 > max.1 {
            return Err(bad(format!(
                "the minimum {} is larger than the maximum {}",
                size_str(min),
                size_str(max)
            )));
        }
        if let Some(o) = opt {
            if o.0 < min.0 || o.0 > max.0 || o.1 < min.1 || o.1 > max.1 {
                return Err(bad(format!(
                    "the tuning size {} is outside the range",
                    size_str(o)
                )));
            }
        }
        Ok(SizeRange { min, opt, max })
    }
}

impl fmt::Display for SizeRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&size_str(self.min))?;
        if self.max != self.min {
            write!(f, "-{}", size_str(self.max))?;
        }
        if let Some(o) = self.opt {
            write!(f, "@{}", size_str(o))?;
        }
        Ok(())
    }
}

impl SizeRange {
    pub fn contains(&self, width: u32, height: u32) -> bool {
        (self.min.0..=self.max.0).contains(&width) && (self.min.1..=self.max.1).contains(&height)
    }

    /// The size TensorRT tunes for: `opt`, else `default` clamped into the range (per dimension).
    pub fn opt_or(&self, default: (u32, u32)) -> (u32, u32) {
        self.opt.unwrap_or((
            default.0.clamp(self.min.0, self.max.0),
            default.1.clamp(self.min.1, self.max.1),
        ))
    }
}

impl FromStr for BatchRange {
    type Err = Error;

    /// `1` (one batch size), `1-4`, `1-4@2` (tuned for 2).
    fn from_str(s: &str) -> Result<BatchRange> {
        let bad = |why: String| {
            Error::input(format!("invalid batch range {s:?}: {why}"))
                .with_hint("write MIN-MAX images per call, e.g. 1-4, optionally @OPT")
        };
        let num = |t: &str| match t.trim().parse::<u32>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(bad(format!("{:?} is not a whole number >= 1", t.trim()))),
        };
        let (a, b, o) = split_range(s);
        let min = num(a)?;
        let max = b.map(num).transpose()?.unwrap_or(min);
        let opt = o.map(num).transpose()?;
        if min > max {
            return Err(bad(format!(
                "the minimum {min} is larger than the maximum {max}"
            )));
        }
        if opt.is_some_and(|o| o < min || o > max) {
            return Err(bad("the tuning batch is outside the range".into()));
        }
        Ok(BatchRange { min, opt, max })
    }
}

impl fmt::Display for BatchRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.min)?;
        if self.max != self.min {
            write!(f, "-{}", self.max)?;
        }
        if let Some(o) = self.opt {
            write!(f, "@{o}")?;
        }
        Ok(())
    }
}

impl BatchRange {
    pub fn contains(&self, batch: u32) -> bool {
        (self.min..=self.max).contains(&batch)
    }
    pub fn opt_or_min(&self) -> u32 {
        self.opt.unwrap_or(self.min)
    }
}

impl ShapeRange {
    /// One image size and one batch size: the shapes never change, so CUDA graphs may be captured.
    pub fn is_static(&self) -> bool {
        self.sizes.min == self.sizes.max && self.batch.min == self.batch.max
    }

    pub fn contains(&self, width: u32, height: u32, batch: u32) -> bool {
        self.sizes.contains(width, height) && self.batch.contains(batch)
    }

    /// `Ok` when a request of `batch` images at `width` x `height` fits; otherwise an
    /// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) error naming the range. `what` names what the range
    /// belongs to (e.g. "the TensorRT profile the engines were built for").
    pub fn check_request(&self, width: u32, height: u32, batch: usize, what: &str) -> Result<()> {
        let batch32 = u32::try_from(batch).unwrap_or(u32::MAX);
        if self.contains(width, height, batch32) {
            return Ok(());
        }
        Err(Error::input(format!(
            "{width}x{height} with {batch} image(s) per call is outside {what}: {}",
            self.describe()
        ))
        .with_hint(
            "ask for a size and image count within that range, or rebuild the engines for a wider range \
             (fluxrt build-engines --trt-sizes MIN-MAX --trt-batch MIN-MAX) and restart with the same flags",
        ))
    }

    /// Like [`check_request`](Self::check_request), for every graph call a request makes: the transformer's
    /// rows (2B with true CFG), the text encoders' B, and the VAE's tiles when tiling applies (each tile is one
    /// decoder call of B images; img2img encodes each image alone, tile by tile). The error names the graph call
    /// that falls outside the range.
    pub fn check_shape(&self, req: &RequestShape, what: &str) -> Result<()> {
        for call in req.calls() {
            let batch32 = u32::try_from(call.batch).unwrap_or(u32::MAX);
            if self.contains(call.width, call.height, batch32) {
                continue;
            }
            return Err(Error::input(format!(
                "{}x{} with {} image(s) {} is outside {what}: {}",
                req.width,
                req.height,
                req.images,
                call.describe(),
                self.describe()
            ))
            .with_hint(call.hint()));
        }
        Ok(())
    }

    /// e.g. `width and height 512-1024 px, batch 1-4`.
    pub fn describe(&self) -> String {
        let s = &self.sizes;
        let sizes = if s.min.0 == s.min.1 && s.max.0 == s.max.1 {
            format!("width and height {}-{} px", s.min.0, s.max.0)
        } else {
            format!(
                "width {}-{} px and height {}-{} px",
                s.min.0, s.max.0, s.min.1, s.max.1
            )
        };
        format!("{sizes}, batch {}-{}", self.batch.min, self.batch.max)
    }
}

/// The graph calls of one request, for checking them against a shape range before anything runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestShape {
    pub width: u32,
    pub height: u32,
    /// Images in the batch (B).
    pub images: usize,
    /// True CFG: the transformer runs the prompt and negative rows together (2B).
    pub true_cfg: bool,
    /// The VAE's tiles in pixels (distinct sizes) when tiling applies; `None`: one pass over the whole image.
    pub vae_tiles: Option<Vec<(u32, u32)>>,
    /// img2img: the VAE encoder runs too (one image per call).
    pub encodes: bool,
}

impl RequestShape {
    /// A plain text-to-image request of `images` images.
    pub fn new(width: u32, height: u32, images: usize) -> RequestShape {
        RequestShape {
            width,
            height,
            images,
            true_cfg: false,
            vae_tiles: None,
            encodes: false,
        }
    }

    /// The transformer's batch: one row per image, two with true CFG (prompt and negative rows together).
    pub fn transformer_rows(&self) -> usize {
        if self.true_cfg {
            2 * self.images
        } else {
            self.images
        }
    }

    /// Every distinct graph call: (what, width, height, batch).
    fn calls(&self) -> Vec<GraphCall> {
        let (w, h, b) = (self.width, self.height, self.images);
        let mut calls = vec![
            GraphCall {
                graph: CallKind::Transformer { cfg: self.true_cfg },
                width: w,
                height: h,
                batch: self.transformer_rows(),
            },
            GraphCall {
                graph: CallKind::TextEncoders,
                width: w,
                height: h,
                batch: b,
            },
        ];
        let tiles = self.vae_tiles.clone();
        let vae = |graph: fn(bool) -> CallKind, batch: usize| -> Vec<GraphCall> {
            match &tiles {
                Some(t) => t
                    .iter()
                    .map(|&(tw, th)| GraphCall {
                        graph: graph(true),
                        width: tw,
                        height: th,
                        batch,
                    })
                    .collect(),
                None => vec![GraphCall {
                    graph: graph(false),
                    width: w,
                    height: h,
                    batch,
                }],
            }
        };
        calls.extend(vae(|tiled| CallKind::VaeDecoder { tiled }, b));
        if self.encodes {
            calls.extend(vae(|tiled| CallKind::VaeEncoder { tiled }, 1));
        }
        calls
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallKind {
    Transformer { cfg: bool },
    TextEncoders,
    VaeDecoder { tiled: bool },
    VaeEncoder { tiled: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct GraphCall {
    graph: CallKind,
    width: u32,
    height: u32,
    batch: usize,
}

impl GraphCall {
    fn describe(&self) -> String {
        match self.graph {
            CallKind::Transformer { cfg: true } => format!(
                "runs the transformer on {} rows (true CFG doubles the batch), which",
                self.batch
            ),
            CallKind::VaeDecoder { tiled: true } => format!(
                "decodes in VAE tiles of {}x{} px ({} per call), which",
                self.width, self.height, self.batch
            ),
            CallKind::VaeEncoder { tiled: true } => format!(
                "encodes the init image in VAE tiles of {}x{} px, which",
                self.width, self.height
            ),
            CallKind::VaeEncoder { tiled: false } => {
                "encodes the init image one per call, which".to_string()
            }
            _ => "per call".to_string(),
        }
    }

    fn hint(&self) -> &'static str {
        match self.graph {
            CallKind::Transformer { cfg: true } => {
                "true CFG runs 2 x images rows per transformer call: ask for fewer images, or rebuild the engines \
                 with a larger batch range (fluxrt build-engines --trt-batch MIN-MAX) and restart with the same flags"
            }
            CallKind::VaeDecoder { tiled: true } | CallKind::VaeEncoder { tiled: true } => {
                "tiled VAE calls see tiles as small as the image's edge remainder: rebuild the engines with a range \
                 down to the smallest tile (fluxrt build-engines --trt-sizes MIN-MAX), or use --vae-tiling off or \
                 another --vae-tile-size"
            }
            _ => {
                "ask for a size and image count within that range, or rebuild the engines for a wider range \
                 (fluxrt build-engines --trt-sizes MIN-MAX --trt-batch MIN-MAX) and restart with the same flags"
            }
        }
    }
}

/// What a model fixes about its shapes, for profile derivation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelShapes {
    /// T5 sequence length `L` (256 for schnell, 512 for dev).
    pub t5_len: u32,
    /// The model's default image size (width, height): the tuning size unless the range gives one.
    pub default_size: (u32, u32),
    /// Pixels per latent pixel (8 for the FLUX VAE).
    pub vae_factor: u32,
}

impl Default for ModelShapes {
    /// FLUX.1-schnell.
    fn default() -> Self {
        ModelShapes {
            t5_len: 256,
            default_size: (1024, 1024),
            vae_factor: 8,
        }
    }
}

impl ModelShapes {
    /// The shapes of a resolved model. A layout without a manifest learns its variant (and so the T5 length) from
    /// the transformer graph's declared inputs, read from the file header without loading weights.
    pub fn of(spec: &ModelSpec) -> Result<ModelShapes> {
        let variant = match spec.variant {
            Some(v) => v,
            None => {
                let t = spec.graph(Role::Transformer)?;
                let inputs = read_declared_inputs(&t.path)?;
                let guidance = t.actual_name("guidance");
                if inputs.iter().any(|i| i.name == guidance) {
                    Variant::Dev
                } else {
                    Variant::Schnell
                }
            }
        };
        let d = spec
            .defaults
            .clone()
            .unwrap_or_else(|| Defaults::for_variant(variant));
        Ok(ModelShapes {
            t5_len: d.t5_max_length as u32,
            default_size: (d.width, d.height),
            vae_factor: spec.vae.downsample_factor as u32,
        })
    }
}

/// What one axis of a contract input means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Axis {
    Batch,
    /// Packed image tokens (H/16)*(W/16).
    Seq,
    /// T5 length.
    TextLen,
    LatentH,
    LatentW,
    PixelH,
    PixelW,
    /// A constant of the contract (64 channels, 3 id axes, ...).
    Const(i64),
    /// A model width (4096, 768, ...) that differs between real and tiny models: must be declared fixed.
    Width,
}

impl Axis {
    /// What a dimension of the contract file means (`contract/flux-onnx.json`): its symbols, the `*_dim` model
    /// widths, or a number every FLUX.1 model has.
    fn of_contract(d: &contract::ContractDim) -> Option<Axis> {
        match d {
            contract::ContractDim::Fixed(n) => Some(Axis::Const(*n)),
            contract::ContractDim::Symbol(s) if s.ends_with("_dim") => Some(Axis::Width),
            contract::ContractDim::Symbol(s) => axis_by_name(s),
        }
    }
}

/// A run-time LoRA slot input ([`contract::is_lora_slot_input`]): an overridable initializer, not a required input.
/// ONNX Runtime's TensorRT provider sees it as a weight (its zero-rank default), so it gets no profile.
fn is_lora_slot(io: &IoInfo) -> bool {
    contract::is_lora_slot_input(&io.name)
        || io
            .shape
            .iter()
            .any(|d| matches!(d, Dim::Symbolic(s) if s.starts_with(contract::LORA_RANK_PREFIX)))
}

/// The axes of a contract input (contract names), `None` for an input the contract does not define.
fn contract_axes(role: Role, name: &str) -> Option<Vec<Axis>> {
    contract::input(role, name)?
        .shape
        .iter()
        .map(Axis::of_contract)
        .collect()
}

/// The contract name of a graph input: the name itself, or the contract name an optimum-onnx graph renames.
fn contract_name(role: Role, graph_name: &str) -> String {
    if contract::inputs(role, true)
        .iter()
        .any(|p| p.name == graph_name)
    {
        return graph_name.to_string();
    }
    contract::optimum_names(role)
        .iter()
        .find(|(_, actual)| *actual == graph_name)
        .map_or(graph_name, |(c, _)| *c)
        .to_string()
}

/// The meaning of a dimension by its name in the graph (the export step's names and common aliases).
fn axis_by_name(sym: &str) -> Option<Axis> {
    Some(match sym {
        "B" | "batch" | "batch_size" | "N" => Axis::Batch,
        "S" | "image_seq_len" | "img_seq_len" => Axis::Seq,
        "L" | "text_seq_len" | "txt_seq_len" | "t5_seq_len" => Axis::TextLen,
        "h" | "latent_height" | "height_latent" => Axis::LatentH,
        "w" | "latent_width" | "width_latent" => Axis::LatentW,
        "H" | "height" | "image_height" => Axis::PixelH,
        "W" | "width" | "image_width" => Axis::PixelW,
        _ => return None,
    })
}

/// Derives the profile of one graph from its declared inputs. `role` is the graph's pipeline role, when known
/// (`None`: dimension names alone decide). Inputs whose dimensions are all fixed need no profile and are left out.
pub fn derive(
    role: Option<Role>,
    inputs: &[IoInfo],
    range: &ShapeRange,
    model: &ModelShapes,
) -> Result<Profile> {
    let (bmin, bmax) = (range.batch.min as i64, range.batch.max as i64);
    let bopt = range.batch.opt_or_min() as i64;
    let smin = range.sizes.min;
    let smax = range.sizes.max;
    let sopt = range.sizes.opt_or(model.default_size);
    let vae = model.vae_factor.max(1) as i64;
    // (width, height) -> value of an axis
    let value = |axis: Axis, (w, h): (u32, u32)| -> Option<i64> {
        let (w, h) = (w as i64, h as i64);
        Some(match axis {
            Axis::Seq => (h / (vae * 2)) * (w / (vae * 2)),
            Axis::TextLen => model.t5_len as i64,
            Axis::LatentH => h / vae,
            Axis::LatentW => w / vae,
            Axis::PixelH => h,
            Axis::PixelW => w,
            Axis::Const(c) => c,
            Axis::Batch | Axis::Width => return None,
        })
    };
    let mut out = Profile::default();
    for io in inputs {
        if io.shape.iter().all(|d| matches!(d, Dim::Fixed(_))) || is_lora_slot(io) {
            continue;
        }
        let axes = role.and_then(|r| contract_axes(r, &contract_name(r, &io.name)));
        let (mut min, mut opt, mut max) = (Vec::new(), Vec::new(), Vec::new());
        for (i, d) in io.shape.iter().enumerate() {
            let sym = match d {
                Dim::Fixed(n) => {
                    min.push(*n);
                    opt.push(*n);
                    max.push(*n);
                    continue;
                }
                Dim::Symbolic(s) => s,
            };
            let axis = axes
                .as_deref()
                .filter(|a| a.len() == io.shape.len())
                .map(|a| a[i])
                .or_else(|| axis_by_name(sym));
            let fail = || {
                Error::model(format!(
                    "cannot derive a TensorRT profile for input {io}: dimension {i} ({sym}) has no known meaning"
                ))
                .with_hint(
                    "export the graph with the standard dimension names (B, S, L, h, w, H, W) or with that dimension \
                     fixed, or leave --trt-sizes unset to let TensorRT build engines per shape",
                )
            };
            match axis {
                Some(Axis::Batch) => {
                    min.push(bmin);
                    opt.push(bopt);
                    max.push(bmax);
                }
                Some(a) => {
                    let (Some(lo), Some(mid), Some(hi)) =
                        (value(a, smin), value(a, sopt), value(a, smax))
                    else {
                        return Err(fail());
                    };
                    min.push(lo);
                    opt.push(mid);
                    max.push(hi);
                }
                None => return Err(fail()),
            }
        }
        out.inputs.push(InputProfile {
            name: io.name.clone(),
            min,
            opt,
            max,
        });
    }
    Ok(out)
}

/// The profile of every graph of a model, read from each graph file's declared inputs.
pub fn model_profiles(
    spec: &ModelSpec,
    range: &ShapeRange,
    model: &ModelShapes,
) -> Result<Vec<(Role, Profile)>> {
    let mut out = Vec::new();
    for (role, g) in &spec.graphs {
        let inputs = read_declared_inputs(&g.path)?;
        out.push((*role, derive(Some(*role), &inputs, range, model)?));
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------------------------
// A loaded model's shapes on its providers

/// Whether the session of `role` may capture CUDA graphs: only the transformer's. A captured graph replays the device
/// addresses of its capture run, so every input and output must stay in the same device buffer for the session's
/// lifetime; only the denoising loop's transformer is driven that way (the device loop's fixed buffers). The text
/// encoders and the VAE run once per request through plain runs, and would gain little from a graph anyway.
pub fn may_capture_cuda_graphs(role: Role) -> bool {
    role == Role::Transformer
}

/// The declared shape range of a loaded model (or none) and the model's fixed shapes: what each graph's session is
/// told (profile, CUDA graphs) and which requests it may then serve.
#[derive(Debug, Clone, PartialEq)]
pub struct ShapePlan {
    pub range: Option<ShapeRange>,
    pub model: ModelShapes,
}

impl ShapePlan {
    /// The plan of `spec` with `range`. The model's shapes are read (the transformer's header, for a layout without a
    /// manifest) only when a range is declared: without one nothing needs them.
    pub fn new(spec: &ModelSpec, range: Option<ShapeRange>) -> Result<ShapePlan> {
        let model = match range {
            Some(_) => ModelShapes::of(spec)?,
            None => ModelShapes::default(),
        };
        Ok(ShapePlan { range, model })
    }

    /// One image size and one batch size: CUDA graphs may be captured.
    pub fn is_static(&self) -> bool {
        self.range.as_ref().is_some_and(ShapeRange::is_static)
    }

    /// The options of the session of `role`, whose file declares `inputs` (read by the caller only when a range is
    /// declared: `None` otherwise): the TensorRT profile of the declared range, and CUDA graphs for the transformer
    /// when the range is one shape.
    pub fn graph_options(&self, role: Role, inputs: Option<&[IoInfo]>) -> Result<GraphOptions> {
        let profile = match (&self.range, inputs) {
            (Some(range), Some(inputs)) => Some(derive(Some(role), inputs, range, &self.model)?),
            _ => None,
        };
        Ok(GraphOptions {
            profile,
            capture_cuda_graphs: may_capture_cuda_graphs(role) && self.is_static(),
        })
    }

    /// [`graph_options`](Self::graph_options) for the graph file at `path`, reading its declared inputs when a range
    /// needs them. A profile error names the graph file.
    pub fn graph_options_of(&self, role: Role, path: &Path) -> Result<GraphOptions> {
        let inputs = match self.range {
            Some(_) => Some(read_declared_inputs(path)?),
            None => None,
        };
        self.graph_options(role, inputs.as_deref())
            .map_err(|e| Error {
                message: format!("{role} graph {}: {}", path.display(), e.message),
                ..e
            })
    }

    /// Whether the session of `role` captures CUDA graphs on `active` with `ep` (then only the device loop may run it).
    pub fn captures_cuda_graphs(&self, ep: &EpSettings, active: &[Provider], role: Role) -> bool {
        may_capture_cuda_graphs(role) && self.is_static() && ep.cuda_graphs_asked(active)
    }

    /// The range requests must stay in with these providers, and what it belongs to: the TensorRT profile when
    /// TensorRT is active with a declared range, or the static shape of CUDA graphs on the CUDA provider.
    pub fn request_range(
        &self,
        ep: &EpSettings,
        active: &[Provider],
    ) -> Option<(&ShapeRange, &'static str)> {
        let range = self.range.as_ref()?;
        if active.contains(&Provider::TensorRt) {
            Some((range, "the TensorRT profile the engines were built for"))
        } else if active.contains(&Provider::Cuda) && ep.cuda.cuda_graph && range.is_static() {
            Some((range, "the static shape the CUDA graphs were captured for"))
        } else {
            None
        }
    }

    /// Refuses a request of `batch` images at `width` x `height` outside [`request_range`](Self::request_range),
    /// instead of letting TensorRT rebuild its engine (minutes) or a CUDA graph replay the wrong shape.
    pub fn check_request(
        &self,
        ep: &EpSettings,
        active: &[Provider],
        width: u32,
        height: u32,
        batch: usize,
    ) -> Result<()> {
        match self.request_range(ep, active) {
            Some((range, what)) => range.check_request(width, height, batch, what),
            None => Ok(()),
        }
    }

    /// Like [`check_request`](Self::check_request) for every graph call of a request: true CFG's 2B transformer
    /// rows and the VAE's tiles ([`RequestShape`]).
    pub fn check_request_shape(
        &self,
        ep: &EpSettings,
        active: &[Provider],
        req: &RequestShape,
    ) -> Result<()> {
        match self.request_range(ep, active) {
            Some((range, what)) => range.check_shape(req, what),
            None => Ok(()),
        }
    }

    /// Settings that have no effect with these providers and shapes, one sentence each (the providers' own
    /// included).
    pub fn warnings(&self, ep: &EpSettings, active: &[Provider]) -> Vec<String> {
        let mut w = Vec::new();
        let static_hint = "CUDA graphs need one image size and one batch size (e.g. --trt-sizes 1024 --trt-batch 1); they stay off";
        if active.contains(&Provider::TensorRt) && ep.tensorrt.cuda_graph && !self.is_static() {
            w.push(format!("TensorRT: {static_hint}"));
        }
        if active.contains(&Provider::Cuda) && ep.cuda.cuda_graph && !self.is_static() {
            w.push(format!("CUDA: {static_hint}"));
        }
        w.extend(ep.warnings(active));
        if active.contains(&Provider::TensorRt) && self.range.is_none() {
            w.push(
                "TensorRT: no shape range declared (--trt-sizes, --trt-batch): engines are built at the first request \
                 of each new shape, which takes minutes"
                    .into(),
            );
        }
        w
    }
}

/// CUDA graphs asked for without a shape range: pins the one shape a single request needs (its size and its
/// transformer rows) into `range`, as `--trt-sizes WxH --trt-batch ROWS` would. Returns whether it did. A declared
/// range is left alone (its own warnings and refusals apply).
pub fn pin_request_shape(
    range: &mut Option<ShapeRange>,
    ep: &EpSettings,
    req: &RequestShape,
) -> Result<bool> {
    if range.is_some() || !(ep.cuda.cuda_graph || ep.tensorrt.cuda_graph) {
        return Ok(false);
    }
    *range = Some(ShapeRange {
        sizes: format!("{}x{}", req.width, req.height).parse()?,
        batch: req.transformer_rows().to_string().parse()?,
    });
    Ok(true)
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

/// The TensorRT engine cache state of every graph of a model, with these settings and this range on this machine:
/// what `fluxrt build-engines` produced and what `fluxrt serve` will reuse (a hit means no engine build at load).
/// Empty when the engine cache is off.
pub fn engine_cache_status(
    spec: &ModelSpec,
    ep: &EpSettings,
    range: Option<ShapeRange>,
    host: &HostInfo,
) -> Result<Vec<EngineCacheStatus>> {
    if !ep.tensorrt.engine_cache {
        return Ok(Vec::new());
    }
    let plan = ShapePlan::new(spec, range)?;
    let mut out = Vec::new();
    for (role, g) in &spec.graphs {
        let info = GraphInfo::read(role.name(), &g.path)?;
        let opts = plan.graph_options_of(*role, &g.path)?;
        let o = ep.tensorrt.options(ep.gpu_id(), Some((&info, &opts)), host);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::ElemType;
    use std::path::PathBuf;

    fn sym(s: &str) -> Dim {
        Dim::Symbolic(s.into())
    }
    fn fx(n: i64) -> Dim {
        Dim::Fixed(n)
    }
    fn io(name: &str, dtype: ElemType, shape: Vec<Dim>) -> IoInfo {
        IoInfo {
            name: name.into(),
            dtype,
            shape,
        }
    }

    /// The declared inputs of the official FLUX.1 exports (real model widths).
    fn flux_inputs(role: Role, guidance: bool) -> Vec<IoInfo> {
        use ElemType::*;
        match role {
            Role::Clip => vec![io("input_ids", I32, vec![sym("B"), fx(77)])],
            Role::T5 => vec![io("input_ids", I32, vec![sym("B"), sym("L")])],
            Role::Transformer => {
                let mut v = vec![
                    io("hidden_states", BF16, vec![sym("B"), sym("S"), fx(64)]),
                    io(
                        "encoder_hidden_states",
                        BF16,
                        vec![sym("B"), sym("L"), fx(4096)],
                    ),
                    io("pooled_projections", BF16, vec![sym("B"), fx(768)]),
                    io("timestep", BF16, vec![sym("B")]),
                    io("img_ids", F32, vec![sym("S"), fx(3)]),
                    io("txt_ids", F32, vec![sym("L"), fx(3)]),
                ];
                if guidance {
                    v.push(io("guidance", F32, vec![sym("B")]));
                }
                v
            }
            Role::VaeDecoder => vec![io(
                "latent",
                F32,
                vec![sym("B"), fx(16), sym("h"), sym("w")],
            )],
            Role::VaeEncoder => vec![io("images", F32, vec![sym("B"), fx(3), sym("H"), sym("W")])],
        }
    }

    fn range(s: &str, b: &str) -> ShapeRange {
        ShapeRange {
            sizes: s.parse().unwrap(),
            batch: b.parse().unwrap(),
        }
    }

    fn strings(p: &Profile) -> [String; 3] {
        [p.min_shapes(), p.opt_shapes(), p.max_shapes()]
    }

    #[test]
    fn schnell_512_1024_batch_1_4_every_graph() {
        let r = range("512-1024", "1-4");
        let m = ModelShapes::default(); // schnell: T5 256, CLIP 77, 1024x1024, VAE 8
        let p = |role| derive(Some(role), &flux_inputs(role, false), &r, &m).unwrap();
        assert_eq!(
            strings(&p(Role::Transformer)),
            [
                "hidden_states:1x1024x64,encoder_hidden_states:1x256x4096,pooled_projections:1x768,timestep:1,\
                 img_ids:1024x3,txt_ids:256x3",
                "hidden_states:1x4096x64,encoder_hidden_states:1x256x4096,pooled_projections:1x768,timestep:1,\
                 img_ids:4096x3,txt_ids:256x3",
                "hidden_states:4x4096x64,encoder_hidden_states:4x256x4096,pooled_projections:4x768,timestep:4,\
                 img_ids:4096x3,txt_ids:256x3",
            ]
            .map(String::from)
        );
        assert_eq!(
            strings(&p(Role::T5)),
            ["input_ids:1x256", "input_ids:1x256", "input_ids:4x256"].map(String::from)
        );
        assert_eq!(
            strings(&p(Role::Clip)),
            ["input_ids:1x77", "input_ids:1x77", "input_ids:4x77"].map(String::from)
        );
        assert_eq!(
            strings(&p(Role::VaeDecoder)),
            [
                "latent:1x16x64x64",
                "latent:1x16x128x128",
                "latent:4x16x128x128"
            ]
            .map(String::from)
        );
        assert_eq!(
            strings(&p(Role::VaeEncoder)),
            [
                "images:1x3x512x512",
                "images:1x3x1024x1024",
                "images:4x3x1024x1024"
            ]
            .map(String::from)
        );
    }

    #[test]
    fn dev_guidance_and_t5_512_non_square_with_explicit_opt() {
        let r = range("512x768-1024x1344@768x1024", "1-2@2");
        let m = ModelShapes {
            t5_len: 512,
            ..ModelShapes::default()
        };
        let p = derive(
            Some(Role::Transformer),
            &flux_inputs(Role::Transformer, true),
            &r,
            &m,
        )
        .unwrap();
        // S = (H/16)*(W/16): min 48*32, opt 64*48, max 84*64.
        assert_eq!(
            p.min_shapes(),
            "hidden_states:1x1536x64,encoder_hidden_states:1x512x4096,pooled_projections:1x768,timestep:1,\
             img_ids:1536x3,txt_ids:512x3,guidance:1"
        );
        assert_eq!(
            p.opt_shapes(),
            "hidden_states:2x3072x64,encoder_hidden_states:2x512x4096,pooled_projections:2x768,timestep:2,\
             img_ids:3072x3,txt_ids:512x3,guidance:2"
        );
        assert_eq!(
            p.max_shapes(),
            "hidden_states:2x5376x64,encoder_hidden_states:2x512x4096,pooled_projections:2x768,timestep:2,\
             img_ids:5376x3,txt_ids:512x3,guidance:2"
        );
        let vae = derive(
            Some(Role::VaeDecoder),
            &flux_inputs(Role::VaeDecoder, false),
            &r,
            &m,
        )
        .unwrap();
        // latent h = H/8 (height first), w = W/8.
        assert_eq!(
            strings(&vae),
            [
                "latent:1x16x96x64",
                "latent:2x16x128x96",
                "latent:2x16x168x128"
            ]
            .map(String::from)
        );
    }

    #[test]
    fn static_range_gives_equal_min_opt_max() {
        let r = range("1024", "1");
        assert!(r.is_static());
        let p = derive(
            Some(Role::VaeDecoder),
            &flux_inputs(Role::VaeDecoder, false),
            &r,
            &ModelShapes::default(),
        )
        .unwrap();
        let [a, b, c] = strings(&p);
        assert_eq!(a, "latent:1x16x128x128");
        assert_eq!(a, b);
        assert_eq!(b, c);
        assert!(!range("512-1024", "1").is_static());
        assert!(!range("1024", "1-2").is_static());
    }

    #[test]
    fn default_opt_is_the_model_size_clamped_into_the_range() {
        let r = range("256-512", "1");
        let p = derive(
            Some(Role::VaeDecoder),
            &flux_inputs(Role::VaeDecoder, false),
            &r,
            &ModelShapes::default(),
        )
        .unwrap();
        assert_eq!(p.opt_shapes(), "latent:1x16x64x64");
    }

    #[test]
    fn optimum_names_and_dimension_names() {
        let r = range("512-1024", "1-4");
        let m = ModelShapes::default();
        // optimum's VAE decoder calls its input latent_sample, with its own dimension names.
        let ins = vec![io(
            "latent_sample",
            ElemType::F32,
            vec![
                sym("batch_size"),
                fx(16),
                sym("height_latent"),
                sym("width_latent"),
            ],
        )];
        let p = derive(Some(Role::VaeDecoder), &ins, &r, &m).unwrap();
        assert_eq!(p.max_shapes(), "latent_sample:4x16x128x128");
        // Unknown role: the export step's dimension names decide.
        let ins = vec![io("x", ElemType::F32, vec![sym("B"), sym("S"), fx(64)])];
        let p = derive(None, &ins, &r, &m).unwrap();
        assert_eq!(p.min_shapes(), "x:1x1024x64");
        // Fully fixed inputs need no profile.
        let ins = vec![io("y", ElemType::F32, vec![fx(2), fx(3)])];
        assert!(derive(None, &ins, &r, &m).unwrap().is_empty());
    }

    #[test]
    fn an_unknown_dynamic_dimension_is_an_error_naming_it() {
        let r = range("512-1024", "1-4");
        let ins = vec![io("z", ElemType::F32, vec![sym("B"), sym("mystery")])];
        let e = derive(None, &ins, &r, &ModelShapes::default()).unwrap_err();
        assert_eq!(e.kind, crate::ErrorKind::Model);
        assert!(
            e.message.contains("mystery") && e.message.contains("z"),
            "{e}"
        );
        // A model width left dynamic cannot be guessed either.
        let ins = vec![io(
            "pooled_projections",
            ElemType::F32,
            vec![sym("B"), sym("D")],
        )];
        let e = derive(Some(Role::Transformer), &ins, &r, &ModelShapes::default()).unwrap_err();
        assert!(e.message.contains("(D)"), "{e}");
    }

    #[test]
    fn range_parsing_and_display() {
        let s: SizeRange = "512-1024".parse().unwrap();
        assert_eq!((s.min, s.max, s.opt), ((512, 512), (1024, 1024), None));
        assert_eq!(s.to_string(), "512-1024");
        let s: SizeRange = "512x768-1024x1344@768x1024".parse().unwrap();
        assert_eq!(s.to_string(), "512x768-1024x1344@768x1024");
        assert!(s.contains(1024, 768) && !s.contains(1024, 1360) && !s.contains(496, 768));
        assert_eq!("1024".parse::<SizeRange>().unwrap().to_string(), "1024");
        for bad in [
            "",
            "abc",
            "500-1024",
            "1024-512",
            "512-1024@2048",
            "0",
            "512x-1024",
        ] {
            let e = bad.parse::<SizeRange>().unwrap_err();
            assert_eq!(e.kind, crate::ErrorKind::InvalidInput, "{bad}");
            assert!(e.message.contains(&format!("{bad:?}")), "{e}");
        }
        let b: BatchRange = "1-4".parse().unwrap();
        assert_eq!((b.min, b.opt, b.max), (1, None, 4));
        assert_eq!("1-4@2".parse::<BatchRange>().unwrap().to_string(), "1-4@2");
        assert_eq!("3".parse::<BatchRange>().unwrap().to_string(), "3");
        for bad in ["0", "4-1", "1-4@5", "x", "-2"] {
            assert!(bad.parse::<BatchRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn requests_outside_the_range_are_refused_naming_it() {
        let r = range("512-1024", "1-4");
        assert!(r.check_request(1024, 512, 4, "the profile").is_ok());
        let e = r
            .check_request(1536, 1024, 1, "the TensorRT profile")
            .unwrap_err();
        assert_eq!(e.kind, crate::ErrorKind::InvalidInput);
        assert!(e.message.contains("1536x1024"), "{e}");
        assert!(
            e.message
                .contains("width and height 512-1024 px, batch 1-4"),
            "{e}"
        );
        assert_tidy(&e);
        assert!(e.hint.unwrap().contains("build-engines"));
        let e = r
            .check_request(512, 512, 5, "the TensorRT profile")
            .unwrap_err();
        assert!(e.message.contains("5 image(s)"), "{e}");
    }

    /// Messages and hints are one line of single spaces (a lost `\` continuation leaves a run of indentation).
    fn assert_tidy(e: &Error) {
        for text in std::iter::once(&e.message).chain(e.hint.as_ref()) {
            assert!(!text.contains("  "), "two spaces in {text:?}");
        }
    }

    #[test]
    fn true_cfg_and_vae_tiles_are_checked_per_graph_call() {
        let r = range("256-2048", "1-4");
        let mut q = RequestShape::new(1024, 1024, 2);
        assert!(r.check_shape(&q, "the profile").is_ok());
        // True CFG: 2 images run as 4 transformer rows (fits), 3 as 6 (refused, naming CFG).
        q.true_cfg = true;
        assert!(r.check_shape(&q, "the profile").is_ok());
        q.images = 3;
        let e = r.check_shape(&q, "the TensorRT profile").unwrap_err();
        assert_eq!(e.kind, crate::ErrorKind::InvalidInput);
        assert!(
            e.message.contains("6 rows") && e.message.contains("true CFG"),
            "{e}"
        );
        assert_tidy(&e);
        assert!(e.hint.unwrap().contains("--trt-batch"));
        // Tiled VAE: the whole image fits the range, but a 256 px edge tile does not fit 512-2048.
        let r = range("512-2048", "1-4");
        let mut q = RequestShape::new(2048, 1024, 1);
        assert!(r.check_shape(&q, "the profile").is_ok());
        // The tiles of 1024 px tiles over 2048x1024 (vae_tiling's tile_sizes_follow_the_grid).
        q.vae_tiles = Some(vec![(512, 256), (1024, 256), (512, 1024), (1024, 1024)]);
        let e = r.check_shape(&q, "the TensorRT profile").unwrap_err();
        assert!(e.message.contains("VAE tiles of 512x256 px"), "{e}");
        assert_tidy(&e);
        assert!(e.hint.unwrap().contains("--vae-tiling off"));
        // Tiles inside the range: accepted even when the image itself is above it.
        let r = range("256-1024", "1-4");
        let e = r
            .check_shape(&q, "the profile")
            .expect_err("2048 > 1024 for the transformer");
        assert_tidy(&e);
        let r2 = range("256-2048", "1-1");
        q.encodes = true;
        assert!(r2.check_shape(&q, "the profile").is_ok());
        q.images = 2;
        let e = r2.check_shape(&q, "the profile").unwrap_err();
        assert!(e.message.contains("2 image(s) per call"), "{e}");
        assert_tidy(&e);
        let _ = r;
    }

    fn bundled(model: &str, file: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models")
            .join(model)
            .join(file)
    }

    /// The reader agrees with the manifest the export step wrote for every bundled graph.
    #[test]
    fn reads_declared_inputs_of_the_bundled_graphs() {
        for model in ["tiny-flux-schnell", "tiny-flux-dev"] {
            let m = crate::model::Manifest::read(&bundled(model, "manifest.json")).unwrap();
            for (name, g) in &m.graphs {
                let got = read_declared_inputs(&bundled(model, &g.file)).unwrap();
                let want: Vec<(String, Vec<String>)> = g
                    .inputs
                    .iter()
                    .map(|i| {
                        let dims = i
                            .shape
                            .iter()
                            .map(|d| match d {
                                serde_json::Value::String(s) => s.clone(),
                                other => other.to_string(),
                            })
                            .collect();
                        (i.name.clone(), dims)
                    })
                    .collect();
                // Run-time LoRA slot inputs (crate::lora) are not in the manifest's input list.
                let (slots, got): (Vec<IoInfo>, Vec<IoInfo>) = got
                    .into_iter()
                    .partition(|i| i.name.ends_with(".lora_A") || i.name.ends_with(".lora_B"));
                for s in &slots {
                    assert!(
                        s.shape
                            .iter()
                            .any(|d| d.to_string().starts_with("lora_rank_")),
                        "{model}/{name}: {s}"
                    );
                }
                let got_names: Vec<(String, Vec<String>)> = got
                    .iter()
                    .map(|i| (i.name.clone(), i.shape.iter().map(Dim::to_string).collect()))
                    .collect();
                assert_eq!(got_names, want, "{model}/{name}");
                let dtypes: Vec<String> = got.iter().map(|i| i.dtype.to_string()).collect();
                let want_dtypes: Vec<String> = g
                    .inputs
                    .iter()
                    .map(|i| match i.dtype.as_str() {
                        "float32" => "f32".into(),
                        "int32" => "i32".into(),
                        "int64" => "i64".into(),
                        other => other.into(),
                    })
                    .collect();
                assert_eq!(dtypes, want_dtypes, "{model}/{name}");
            }
        }
    }

    #[test]
    fn profiles_of_the_bundled_model() {
        let spec = ModelSpec::resolve(&bundled("tiny-flux-schnell", "")).unwrap();
        let m = ModelShapes::of(&spec).unwrap();
        assert_eq!(m.t5_len, 256);
        assert_eq!(m.default_size, (256, 256));
        let r = range("128-256", "1-2");
        let all = model_profiles(&spec, &r, &m).unwrap();
        let get = |role: Role| all.iter().find(|(r, _)| *r == role).unwrap().1.clone();
        // LoRA slot inputs (in exports with them) get no profile: they are overridable initializers.
        assert_eq!(
            get(Role::Transformer).max_shapes(),
            "hidden_states:2x256x64,encoder_hidden_states:2x256x16,pooled_projections:2x8,timestep:2,\
             img_ids:256x3,txt_ids:256x3"
        );
        assert_eq!(get(Role::Clip).min_shapes(), "input_ids:1x77");
        assert_eq!(get(Role::VaeDecoder).min_shapes(), "latent:1x16x16x16");
    }

    fn plan(sizes: &str, batch: &str) -> ShapePlan {
        ShapePlan {
            range: Some(range(sizes, batch)),
            model: ModelShapes::default(),
        }
    }

    #[test]
    fn cuda_graphs_pin_the_request_shape() {
        let mut ep = EpSettings::default();
        let mut r = None;
        let one = RequestShape::new(512, 768, 1);
        assert!(
            !pin_request_shape(&mut r, &ep, &one).unwrap(),
            "no CUDA graphs: nothing to pin"
        );
        ep.cuda.cuda_graph = true;
        // One image with true CFG: two transformer rows.
        let cfg = RequestShape {
            true_cfg: true,
            ..one
        };
        assert!(pin_request_shape(&mut r, &ep, &cfg).unwrap());
        let pinned = r.unwrap();
        assert!(pinned.is_static());
        assert!(
            pinned.contains(512, 768, 2)
                && !pinned.contains(512, 768, 1)
                && !pinned.contains(768, 512, 2)
        );
        // A declared range stays as it is.
        let other = RequestShape::new(1024, 1024, 1);
        assert!(!pin_request_shape(&mut r, &ep, &other).unwrap());
        assert_eq!(r, Some(pinned));
    }

    #[test]
    fn a_static_shape_fixes_the_transformers_dimensions_and_allows_capture() {
        let transformer =
            read_declared_inputs(&bundled("tiny-flux-schnell", "transformer.onnx")).unwrap();
        let p = plan("512x768", "2");
        let o = p
            .graph_options(Role::Transformer, Some(&transformer))
            .unwrap();
        assert!(o.capture_cuda_graphs);
        // B rows, S = (768/16) * (512/16) image tokens, L = the T5 length.
        assert_eq!(
            crate::runtime::profile::static_dimensions(
                "transformer",
                o.profile.as_ref().unwrap(),
                &transformer
            )
            .unwrap(),
            [
                ("B".to_string(), 2),
                ("S".to_string(), 1536),
                ("L".to_string(), 256)
            ]
        );
        // Only the transformer captures: the other graphs run through plain runs.
        let vae = read_declared_inputs(&bundled("tiny-flux-schnell", "vae_decoder.onnx")).unwrap();
        assert!(
            !p.graph_options(Role::VaeDecoder, Some(&vae))
                .unwrap()
                .capture_cuda_graphs
        );
        // A size range is not one shape: no capture, and the image tokens S stay free (one batch and the T5 length
        // are still one value each).
        let ranged = plan("512-1024", "1");
        let o = ranged
            .graph_options(Role::Transformer, Some(&transformer))
            .unwrap();
        assert!(!o.capture_cuda_graphs);
        assert_eq!(
            crate::runtime::profile::static_dimensions(
                "t",
                o.profile.as_ref().unwrap(),
                &transformer
            )
            .unwrap(),
            [("B".to_string(), 1), ("L".to_string(), 256)]
        );
        // No range: no profile, and no header is read.
        let none = ShapePlan {
            range: None,
            model: ModelShapes::default(),
        };
        assert_eq!(
            none.graph_options(Role::Transformer, None).unwrap(),
            GraphOptions::default()
        );
    }

    #[test]
    fn cuda_graphs_only_for_the_transformer_with_a_static_shape() {
        let mut ep = EpSettings::default();
        ep.tensorrt.cuda_graph = true;
        ep.cuda.cuda_graph = true;
        let p = plan("1024", "1");
        for active in [
            vec![Provider::Cuda],
            vec![Provider::TensorRt, Provider::Cuda],
        ] {
            assert!(
                p.captures_cuda_graphs(&ep, &active, Role::Transformer),
                "{active:?}"
            );
            for role in [Role::Clip, Role::T5, Role::VaeDecoder, Role::VaeEncoder] {
                assert!(!p.captures_cuda_graphs(&ep, &active, role), "{role}");
            }
        }
        assert!(!p.captures_cuda_graphs(&ep, &[Provider::Cpu], Role::Transformer));
        assert!(p
            .warnings(&ep, &[Provider::TensorRt, Provider::Cuda])
            .is_empty());
        // A range is not static: no capture, and a warning that says why.
        let ranged = plan("512-1024", "1-4");
        assert!(!ranged.captures_cuda_graphs(&ep, &[Provider::Cuda], Role::Transformer));
        assert!(ranged.warnings(&ep, &[Provider::TensorRt])[0]
            .contains("CUDA graphs need one image size"));
        // Without a declared shape there is nothing static.
        let none = ShapePlan {
            range: None,
            model: ModelShapes::default(),
        };
        assert!(!none.captures_cuda_graphs(&ep, &[Provider::Cuda], Role::Transformer));
        assert_eq!(none.warnings(&ep, &[Provider::Cuda]).len(), 1);
    }

    #[test]
    fn request_range_refusal() {
        let mut ep = EpSettings::default();
        let p = plan("512-1024", "1-4");
        let trt = [Provider::TensorRt, Provider::Cpu];
        assert!(p.check_request(&ep, &trt, 1024, 1024, 4).is_ok());
        let e = p.check_request(&ep, &trt, 2048, 1024, 1).unwrap_err();
        assert_eq!(e.kind, crate::ErrorKind::InvalidInput);
        assert!(
            e.message.contains("TensorRT profile") && e.message.contains("512-1024"),
            "{e}"
        );
        // Without TensorRT (and without CUDA graphs) nothing is refused.
        assert!(p
            .check_request(&ep, &[Provider::Cuda, Provider::Cpu], 2048, 1024, 9)
            .is_ok());
        // CUDA graphs on the CUDA provider pin one shape.
        let p = plan("1024", "1");
        ep.cuda.cuda_graph = true;
        let e = p
            .check_request(&ep, &[Provider::Cuda], 512, 512, 1)
            .unwrap_err();
        assert!(e.message.contains("CUDA graphs"), "{e}");
        // True CFG doubles the transformer batch: one image is two rows, outside a static batch of 1.
        let mut q = RequestShape::new(1024, 1024, 1);
        assert!(p.check_request_shape(&ep, &[Provider::Cuda], &q).is_ok());
        q.true_cfg = true;
        let e = p
            .check_request_shape(&ep, &[Provider::Cuda], &q)
            .unwrap_err();
        assert!(e.message.contains("2 rows"), "{e}");
        assert!(p.check_request_shape(&ep, &[Provider::Cpu], &q).is_ok());
    }
}
