//! The last stage: VAE output -> 8-bit RGB -> PNG with the generation parameters -> files on disk.
//!
//! Everything here is pure except the three file-system functions at the bottom
//! ([`check_writable`], [`write_atomically`] and the probe inside it).
//!
//! * [`to_unit_float`] / [`to_rgb8`] reproduce diffusers' `VaeImageProcessor.postprocess` followed by
//!   `numpy_to_pil` bit for bit: `x * 0.5 + 0.5`, clamp to `[0, 1]`, `* 255`, numpy's `round()` (half to
//!   even), cast to `u8`, all in `f32`.
//! * [`a1111_parameters`] writes the AUTOMATIC1111 "infotext" (prompt, `Negative prompt:` line, then the
//!   `Key: value, Key: value` line) that A1111, Forge, ComfyUI loaders and image browsers read back.
//! * [`encode_png`] stores that text in a `tEXt` chunk keyed `parameters` (an `iTXt` chunk when the text is
//!   not Latin-1), before the image data, with deterministic bytes.
//! * [`output_paths`], [`check_writable`] and [`write_atomically`] turn `--output` into file names, refuse
//!   before any computation what could not be written, and write without ever leaving a partial file.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use ndarray::{Array3, ArrayView3};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The PNG text keyword A1111 writes and reads.
pub const PARAMETERS_KEY: &str = "parameters";

// ---------------------------------------------------------------------------------------------------------
// VAE output -> pixels
// ---------------------------------------------------------------------------------------------------------

fn check_vae_output(image: &ArrayView3<f32>) -> Result<(usize, usize)> {
    let (c, h, w) = image.dim();
    if c != 3 || h == 0 || w == 0 {
        return Err(Error::model(format!(
            "the VAE decoder returned an image of shape [{c}, {h}, {w}], expected [3, height, width]"
        ))
        .with_hint("check that vae_decoder outputs one RGB image per batch item, channels first"));
    }
    if u32::try_from(h).is_err() || u32::try_from(w).is_err() {
        return Err(Error::model(format!(
            "the VAE decoder returned an image of {w}x{h} pixels, too large"
        )));
    }
    let bad = image.iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        let nan = image.iter().filter(|v| v.is_nan()).count();
        return Err(Error::numerics(format!(
            "VAE decode produced {bad} non-finite values ({nan} NaN, {} Inf) out of {}",
            bad - nan,
            image.len()
        ))
        .with_hint(
            "the fp16 VAE decoder overflows on some latents: use an fp32 VAE decoder, or run with \
             another precision or execution provider",
        ));
    }
    Ok((h, w))
}

/// `x * 0.5 + 0.5` clamped to `[0, 1]`, in `f32`: diffusers' `VaeImageProcessor.denormalize`, i.e. the
/// floats `pipe(..., output_type="np")` returns (there in `[H, W, 3]` order; here `[3, H, W]` like the
/// input). NaN or Inf anywhere is an [`ErrorKind::Numerics`](crate::ErrorKind::Numerics) error naming the
/// VAE decode stage.
pub fn to_unit_float(image: ArrayView3<f32>) -> Result<Array3<f32>> {
    check_vae_output(&image)?;
    Ok(image.mapv(denormalize))
}

/// `[-1, 1]` to `[0, 1]`, clamped. x * 0.5 == x / 2 exactly in binary floating point; one rounding for the
/// addition, as in torch.
fn denormalize(x: f32) -> f32 {
    (x * 0.5 + 0.5).clamp(0.0, 1.0)
}

/// One `[0, 1]` float to a byte as numpy does it: `(v * 255).round().astype("uint8")` in `f32`, where
/// numpy's `round` goes half to even (64.5 -> 64, 65.5 -> 66).
fn unit_to_u8(v: f32) -> u8 {
    (v * 255.0).round_ties_even() as u8
}

/// A VAE decoder output `[3, H, W]` in `[-1, 1]` to 8-bit RGB, exactly as diffusers'
/// `VaeImageProcessor.postprocess(output_type="pil")` does: [`to_unit_float`], then
/// `(v * 255).round().astype("uint8")` with numpy's half-to-even `round` (64.5 -> 64, 65.5 -> 66).
pub fn to_rgb8(image: ArrayView3<f32>) -> Result<image::RgbImage> {
    check_vae_output(&image)?;
    let (_, h, w) = image.dim();
    // Walk the three planes side by side (no float copy, no per-pixel indexing: 1024x1024 is 3 M values).
    let planar = image.as_standard_layout();
    let data = planar
        .as_slice()
        .ok_or_else(|| Error::runtime("internal error: VAE output not contiguous"))?;
    let (r, gb) = data.split_at(h * w);
    let (g, b) = gb.split_at(h * w);
    let byte = |x: f32| unit_to_u8(denormalize(x));
    let mut buf = Vec::with_capacity(h * w * 3);
    for ((&r, &g), &b) in r.iter().zip(g).zip(b) {
        buf.extend_from_slice(&[byte(r), byte(g), byte(b)]);
    }
    // Cannot fail: the buffer has exactly w * h * 3 bytes and both fit u32 (checked above).
    image::RgbImage::from_raw(w as u32, h as u32, buf)
        .ok_or_else(|| Error::runtime("internal error: RGB buffer size mismatch"))
}

// ---------------------------------------------------------------------------------------------------------
// Generation parameters, AUTOMATIC1111 style
// ---------------------------------------------------------------------------------------------------------

/// What produced an image; written into the PNG so the image can be reproduced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationParams {
    pub prompt: String,
    /// The T5 prompt when it differs from the CLIP prompt.
    pub prompt_2: Option<String>,
    pub negative_prompt: Option<String>,
    pub steps: usize,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    /// FLUX.1-dev's distilled guidance; `None` for schnell.
    pub guidance: Option<f32>,
    pub model: String,
    pub provider: String,
    /// e.g. `"Euler (flow match)"`.
    pub sampler: String,
    /// e.g. `"fluxrt 0.1.0"`.
    pub version: String,
    /// img2img strength (A1111's `Denoising strength`); `None` for text-to-image.
    #[serde(default)]
    pub denoising_strength: Option<f64>,
    /// Run-time LoRAs, in the order they were stacked.
    #[serde(default)]
    pub loras: Vec<LoraParam>,
}

impl GenerationParams {
    /// The parameters of `req`'s images on `model` run by `provider`, with the seed of the request (each image sets
    /// its own) and the guidance the model used (`None` for schnell).
    pub fn of_request(
        req: &crate::request::Request,
        guidance: Option<f32>,
        model: &str,
        provider: String,
    ) -> GenerationParams {
        GenerationParams {
            prompt: req.prompt.clone(),
            prompt_2: req.prompt_2.clone(),
            negative_prompt: req
                .true_cfg_active()
                .then(|| req.negative_prompt.clone())
                .flatten(),
            steps: req.steps,
            seed: req.seed,
            width: req.width,
            height: req.height,
            guidance,
            model: model.to_string(),
            provider,
            sampler: "Euler (flow match)".into(),
            version: format!("fluxrt {}", env!("CARGO_PKG_VERSION")),
            denoising_strength: req.init_image.is_some().then_some(req.strength),
            loras: LoraParam::from_choices(&req.loras),
        }
    }
}

/// One run-time LoRA of an image: its name (the file name without `.safetensors`), hash and scale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraParam {
    pub name: String,
    /// A1111's "addnet" hash of the file ([`crate::lora::Lora::addnet_hash`]), hex; written shortened to 12
    /// characters, as A1111 writes `Lora hashes`.
    pub addnet_hash: String,
    pub scale: f32,
}

impl LoraParam {
    /// The PNG record of each LoRA a request used.
    pub fn from_choices(choices: &[crate::lora::LoraChoice]) -> Vec<LoraParam> {
        choices
            .iter()
            .map(|c| LoraParam {
                name: c
                    .lora
                    .name
                    .strip_suffix(".safetensors")
                    .unwrap_or(&c.lora.name)
                    .to_string(),
                addnet_hash: c.lora.addnet_hash.clone(),
                scale: c.scale,
            })
            .collect()
    }
}

/// A1111's `infotext_utils.quote`: a value containing `,`, `:` or a newline is written as a JSON string
/// (`json.dumps(v, ensure_ascii=False)`), otherwise as is. We also quote a value containing `"`, which A1111
/// leaves bare: its parser would take a bare value starting with `"` for a quoted one; readers unquote any
/// value that starts and ends with `"`, so this only makes the output safer to read back.
fn quote(value: &str) -> String {
    if value.contains([',', ':', '\n', '"']) {
        // serde_json escapes exactly what Python's json.dumps(ensure_ascii=False) escapes:
        // `"`, `\`, and control characters below U+0020 (\n, \t, ... or \u00XX in lower-case hex).
        serde_json::to_string(value).unwrap_or_else(|_| value.to_string())
    } else {
        value.to_string()
    }
}

/// A float the way Python's `str(float)` writes it for ordinary values: `3.5`, `4.0`.
fn py_float(v: f32) -> String {
    format!("{v:?}")
}

/// The AUTOMATIC1111 infotext, as `processing.create_infotext` builds it:
///
/// ```text
/// a photo of a cat
/// Negative prompt: blurry
/// Steps: 4, Sampler: Euler (flow match), Seed: 42, Size: 512x512, Guidance: 3.5, Model: tiny-flux-schnell, Provider: cpu, Version: fluxrt 0.1.0
/// ```
///
/// The prompt first (as is, possibly over several lines), then `Negative prompt: ...` when there is a
/// non-empty one, then one line of `Key: value` pairs joined by `", "`, values quoted like A1111's
/// `quote()` (a JSON string when the value holds `,`, `:`, a newline, or here also `"`); the whole text
/// trimmed like Python's `.strip()`. Pairs whose value is absent or empty are left out (A1111 leaves out
/// `None`). `Guidance` is FLUX's distilled guidance (Forge calls it `Distilled CFG Scale`);
/// `Prompt 2` is the T5 prompt, written only when given and different from the prompt.
pub fn a1111_parameters(params: &GenerationParams) -> String {
    let mut pairs: Vec<(&str, String)> = vec![
        ("Steps", params.steps.to_string()),
        ("Sampler", params.sampler.clone()),
        ("Seed", params.seed.to_string()),
        ("Size", format!("{}x{}", params.width, params.height)),
    ];
    if let Some(g) = params.guidance {
        pairs.push(("Guidance", py_float(g)));
    }
    if let Some(s) = params.denoising_strength {
        pairs.push(("Denoising strength", format!("{s:?}")));
    }
    pairs.push(("Model", params.model.clone()));
    pairs.push(("Provider", params.provider.clone()));
    if let Some(p2) = params.prompt_2.as_deref() {
        if p2 != params.prompt {
            pairs.push(("Prompt 2", p2.to_string()));
        }
    }
    // A1111's `Lora hashes` (name: first 12 hex digits of the addnet hash), and the scales beside them. Like
    // A1111 (extra_networks_lora.py) we drop `:` and `,` from names, which would break the `name: hash` list.
    let join = |f: &dyn Fn(&str, &LoraParam) -> String| {
        let names = params.loras.iter().map(|l| l.name.replace([':', ','], ""));
        names
            .zip(&params.loras)
            .map(|(n, l)| f(&n, l))
            .collect::<Vec<_>>()
            .join(", ")
    };
    pairs.push((
        "Lora hashes",
        join(&|n, l| format!("{n}: {}", &l.addnet_hash[..l.addnet_hash.len().min(12)])),
    ));
    pairs.push((
        "Lora scales",
        join(&|n, l| format!("{n}: {}", py_float(l.scale))),
    ));
    pairs.push(("Version", params.version.clone()));

    let line = pairs
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{k}: {}", quote(v)))
        .collect::<Vec<_>>()
        .join(", ");

    let mut text = params.prompt.clone();
    if let Some(neg) = params.negative_prompt.as_deref().filter(|n| !n.is_empty()) {
        text.push_str("\nNegative prompt: ");
        text.push_str(neg);
    }
    text.push('\n');
    text.push_str(&line);
    text.trim().to_string()
}

// ---------------------------------------------------------------------------------------------------------
// PNG
// ---------------------------------------------------------------------------------------------------------

fn is_latin1(text: &str) -> bool {
    text.chars().all(|c| (c as u32) <= 0xFF)
}

/// Encodes `img` as an 8-bit RGB PNG with `parameters` in a text chunk keyed `parameters`, written before
/// the image data (where PIL, and so A1111, looks): `tEXt` when the text is Latin-1, otherwise an
/// uncompressed UTF-8 `iTXt` (e.g. a CJK prompt); A1111 reads both. An empty `parameters` writes no chunk.
/// The bytes depend only on the inputs: no time stamp, fixed compression and filter settings.
pub fn encode_png(img: &image::RgbImage, parameters: &str) -> Result<Vec<u8>> {
    let (w, h) = img.dimensions();
    let fail = |e: png::EncodingError| Error::io(format!("cannot encode the {w}x{h} PNG: {e}"));
    let mut out = Vec::with_capacity(img.as_raw().len() / 2 + parameters.len() + 1024);
    {
        let mut encoder = png::Encoder::new(&mut out, w, h);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        // fdeflate instead of zlib's default level: 1024x1024 photo 9 ms vs 261 ms at the same size (noise-like
        // random-weight images: 14x faster, ~20 % larger). At GPU speeds zlib was 40 % of an image's time.
        encoder.set_compression(png::Compression::Fast);
        encoder.set_filter(png::Filter::Adaptive);
        if !parameters.is_empty() {
            if is_latin1(parameters) {
                encoder
                    .add_text_chunk(PARAMETERS_KEY.to_string(), parameters.to_string())
                    .map_err(fail)?;
            } else {
                encoder
                    .add_itxt_chunk(PARAMETERS_KEY.to_string(), parameters.to_string())
                    .map_err(fail)?;
            }
        }
        let mut writer = encoder.write_header().map_err(fail)?;
        writer.write_image_data(img.as_raw()).map_err(fail)?;
        writer.finish().map_err(fail)?;
    }
    Ok(out)
}

/// How a finished image is written for a client: PNG (with its `parameters` chunk), JPEG at a quality, or
/// lossless WebP (the `image` crate's WebP encoder is lossless only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    #[default]
    Png,
    /// Quality 1-100 (100: best and largest).
    Jpeg {
        quality: u8,
    },
    Webp,
}

impl Encoding {
    /// The name OpenAI's `output_format` uses.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Png => "png",
            Encoding::Jpeg { .. } => "jpeg",
            Encoding::Webp => "webp",
        }
    }
}

/// Encodes `img` as `encoding`; `parameters` goes into PNGs only (JPEG and WebP carry no metadata here).
pub fn encode(img: &image::RgbImage, encoding: Encoding, parameters: &str) -> Result<Vec<u8>> {
    let (w, h) = img.dimensions();
    let fail = |e: image::ImageError| {
        Error::io(format!(
            "cannot encode the {w}x{h} {}: {e}",
            encoding.name()
        ))
    };
    let mut out = Vec::new();
    match encoding {
        Encoding::Png => return encode_png(img, parameters),
        Encoding::Jpeg { quality } => {
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality.clamp(1, 100))
                .encode_image(img)
                .map_err(fail)?
        }
        Encoding::Webp => image::codecs::webp::WebPEncoder::new_lossless(&mut out)
            .encode(img.as_raw(), w, h, image::ExtendedColorType::Rgb8)
            .map_err(fail)?,
    }
    Ok(out)
}

fn find_parameters(info: &png::Info) -> Option<String> {
    if let Some(t) = info
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == PARAMETERS_KEY)
    {
        return Some(t.text.clone());
    }
    if let Some(t) = info.utf8_text.iter().find(|t| t.keyword == PARAMETERS_KEY) {
        return t.get_text().ok();
    }
    if let Some(t) = info
        .compressed_latin1_text
        .iter()
        .find(|t| t.keyword == PARAMETERS_KEY)
    {
        return t.get_text().ok();
    }
    None
}

/// The text stored under the `parameters` keyword (`tEXt`, `iTXt` or `zTXt`) of a PNG, or `None` when there
/// is none or the bytes are not a readable PNG. Chunks after the image data are found too.
pub fn read_png_parameters(bytes: &[u8]) -> Option<String> {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().ok()?;
    if let Some(text) = find_parameters(reader.info()) {
        return Some(text);
    }
    // Some writers put text chunks after IDAT: read the image through to the end.
    let mut buf = vec![0; reader.output_buffer_size()?];
    reader.next_frame(&mut buf).ok()?;
    reader.finish().ok()?;
    find_parameters(reader.info())
}

// ---------------------------------------------------------------------------------------------------------
// Output paths
// ---------------------------------------------------------------------------------------------------------

/// The file names for `count` images from the `--output` pattern.
///
/// * `{i}` (0-based index) and `{seed}` (that image's seed, from `seeds`) are replaced in the pattern;
///   any other `{name}` is refused so that a typo such as `{index}` does not silently become a file name.
/// * Without a placeholder, one image is written to the pattern itself and several to `out-0.png`,
///   `out-1.png`, ... (the index goes before the extension).
/// * Extension (decided here): a pattern without one gets `.png` appended (`out` -> `out.png`); any
///   other extension than `.png` (any case) is refused with a hint, since only PNG is written and a
///   `.jpg` holding PNG bytes would mislead.
/// * A pattern that yields the same path twice (e.g. `{seed}` with repeated seeds) is refused, as is a
///   pattern naming a folder (`out/`, `.`).
pub fn output_paths(pattern: &str, count: usize, seeds: &[u64]) -> Result<Vec<PathBuf>> {
    if pattern.trim().is_empty() {
        return Err(
            Error::input("the output file name is empty").with_hint("give a name such as out.png")
        );
    }
    if pattern.ends_with('/') || pattern.ends_with(std::path::MAIN_SEPARATOR) {
        return Err(Error::input(format!(
            "the output \"{pattern}\" names a folder, not a file"
        ))
        .with_hint(format!("give a file name inside it, e.g. {pattern}out.png")));
    }
    let file_name = Path::new(pattern)
        .file_name()
        .map(|s| s.to_string_lossy().into_owned());
    let Some(file_name) = file_name else {
        return Err(Error::input(format!(
            "the output \"{pattern}\" names a folder, not a file"
        ))
        .with_hint(format!(
            "give a file name inside it, e.g. {pattern}/out.png"
        )));
    };

    // Extension: taken from the file-name part only ("dir.v2/out" has none).
    let pattern: String = match Path::new(&file_name).extension().and_then(|e| e.to_str()) {
        Some(ext) if ext.eq_ignore_ascii_case("png") => pattern.to_string(),
        Some(ext) => {
            return Err(Error::input(format!(
                "the output \"{pattern}\" has the extension .{ext}, but fluxrt writes PNG images only"
            ))
            .with_hint(format!("use a .png name, e.g. {pattern}.png")));
        }
        None => format!("{pattern}.png"),
    };

    let parts = parse_pattern(&pattern)?;
    let uses_index = parts.iter().any(|p| matches!(p, Part::Index));
    let uses_seed = parts.iter().any(|p| matches!(p, Part::Seed));
    if uses_seed && seeds.len() < count {
        return Err(Error::input(format!(
            "the output pattern uses {{seed}} but there are {} seeds for {count} images",
            seeds.len()
        )));
    }

    let mut paths = Vec::with_capacity(count);
    for i in 0..count {
        let mut s = String::with_capacity(pattern.len() + 8);
        for part in &parts {
            match part {
                Part::Text(t) => s.push_str(t),
                Part::Index => s.push_str(&i.to_string()),
                // Present: checked above that there are `count` seeds.
                Part::Seed => s.push_str(&seeds.get(i).copied().unwrap_or_default().to_string()),
            }
        }
        if count > 1 && !uses_index && !uses_seed {
            // out.png -> out-0.png: the index goes before the 4-byte ".png" (kept in its own case).
            let (stem, ext) = s.split_at(s.len() - 4);
            s = format!("{stem}-{i}{ext}");
        }
        paths.push(PathBuf::from(s));
    }

    let mut seen = HashSet::with_capacity(paths.len());
    for p in &paths {
        if !seen.insert(p) {
            return Err(Error::input(format!(
                "the output pattern \"{pattern}\" gives the file name {} more than once",
                p.display()
            ))
            .with_hint("add {i} to the pattern, e.g. out-{seed}-{i}.png"));
        }
    }
    Ok(paths)
}

enum Part<'a> {
    Text(&'a str),
    Index,
    Seed,
}

fn parse_pattern(pattern: &str) -> Result<Vec<Part<'_>>> {
    let mut parts = Vec::new();
    let mut rest = pattern;
    while let Some(open) = rest.find('{') {
        let Some(len) = rest[open..].find('}') else {
            break;
        };
        let name = &rest[open + 1..open + len];
        let part = match name {
            "i" => Part::Index,
            "seed" => Part::Seed,
            _ => {
                return Err(Error::input(format!(
                    "the output pattern \"{pattern}\" contains the unknown placeholder {{{name}}}"
                ))
                .with_hint("the placeholders are {i} (image index from 0) and {seed}"));
            }
        };
        if open > 0 {
            parts.push(Part::Text(&rest[..open]));
        }
        parts.push(part);
        rest = &rest[open + len + 1..];
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest));
    }
    Ok(parts)
}

// ---------------------------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------------------------

/// The folder a file goes into: its parent, or `.` for a bare file name.
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// To be called before any computation: fails if one of `paths` could not be written.
///
/// * an existing file, unless `overwrite` -> [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput)
///   naming it, with the hint `--overwrite`; an existing folder -> invalid input, always;
/// * a parent folder that is missing, is not a folder, or where a file cannot be created -> invalid input too (the
///   user's path is wrong: exit code 2) naming the folder. Writability is tested by creating and
///   removing a temporary file there, which is what [`write_atomically`] will do (permission bits alone
///   say nothing for root, ACLs or read-only mounts).
pub fn check_writable(paths: &[PathBuf], overwrite: bool) -> Result<()> {
    for path in paths {
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.is_dir() {
                return Err(Error::input(format!(
                    "the output {} is an existing folder",
                    path.display()
                ))
                .with_hint("give a file name, e.g. out.png"));
            }
            if !overwrite {
                return Err(Error::input(format!(
                    "the output file {} already exists",
                    path.display()
                ))
                .with_hint("pass --overwrite to replace it, or choose another output name"));
            }
        }
    }
    let mut checked = HashSet::new();
    for path in paths {
        let dir = parent_dir(path);
        if !checked.insert(dir) {
            continue;
        }
        match std::fs::metadata(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::input(format!(
                    "the output folder {} does not exist",
                    dir.display()
                ))
                .with_hint("create it first, or choose another output path"));
            }
            Err(e) => {
                return Err(Error::input(format!(
                    "cannot access the output folder {}: {e}",
                    dir.display()
                )))
            }
            Ok(meta) if !meta.is_dir() => {
                return Err(Error::input(format!(
                    "the output folder {} is not a folder",
                    dir.display()
                ))
                .with_hint("choose another output path"));
            }
            Ok(_) => {}
        }
        // Created and removed again (on drop).
        tempfile::Builder::new()
            .prefix(".fluxrt-write-check-")
            .tempfile_in(dir)
            .map_err(|e| {
                Error::input(format!(
                    "cannot write to the output folder {}: {e}",
                    dir.display()
                ))
                .with_hint("choose a folder you can write to")
            })?;
    }
    Ok(())
}

/// Writes `bytes` to `path` all at once: into a temporary file in the same folder, flushed to disk, then
/// renamed onto `path`. With `overwrite == false` the rename refuses to replace a file (also one that
/// appeared after [`check_writable`]); the error is then invalid input with the hint `--overwrite`. On any
/// failure the temporary file is removed and nothing is left at `path`. The file gets the usual
/// permissions of a new file (0666 less the umask), not the temporary file's 0600.
pub fn write_atomically(path: &Path, bytes: &[u8], overwrite: bool) -> Result<()> {
    let dir = parent_dir(path);
    let mut builder = tempfile::Builder::new();
    builder.prefix(".fluxrt-").suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let mut tmp = builder
        .tempfile_in(dir)
        .map_err(|e| Error::io_at("create a file in", dir, e))?;
    tmp.write_all(bytes)
        .and_then(|()| tmp.as_file().sync_all())
        .map_err(|e| Error::io_at("write", tmp.path(), e))?;
    let persisted = if overwrite {
        tmp.persist(path)
    } else {
        tmp.persist_noclobber(path)
    };
    // On error the PersistError owns the temporary file; dropping it deletes the file.
    persisted.map(drop).map_err(|e| {
        if e.error.kind() == std::io::ErrorKind::AlreadyExists {
            Error::input(format!("the output file {} already exists", path.display()))
                .with_hint("pass --overwrite to replace it, or choose another output name")
        } else {
            Error::io_at("write", path, e.error)
        }
    })
}

// ---------------------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use ndarray::Array3;

    fn chw(values: &[f32]) -> Array3<f32> {
        // One row of pixels, each value broadcast to the three channels.
        let w = values.len();
        Array3::from_shape_fn((3, 1, w), |(_, _, x)| values[x])
    }

    fn bytes_of(values: &[f32]) -> Vec<u8> {
        let img = to_rgb8(chw(values).view()).unwrap();
        img.pixels().map(|p| p.0[0]).collect()
    }

    #[test]
    fn jpeg_and_webp_decode_to_the_image() {
        let img = image::RgbImage::from_fn(32, 16, |x, y| {
            image::Rgb([(x * 8) as u8, (y * 16) as u8, 128])
        });
        let webp = encode(&img, Encoding::Webp, "ignored").unwrap();
        let back = image::load_from_memory_with_format(&webp, image::ImageFormat::WebP)
            .unwrap()
            .to_rgb8();
        assert_eq!(back, img, "lossless");
        let sizes: Vec<usize> = [95, 20]
            .map(|q| {
                let jpg = encode(&img, Encoding::Jpeg { quality: q }, "").unwrap();
                let back = image::load_from_memory_with_format(&jpg, image::ImageFormat::Jpeg)
                    .unwrap()
                    .to_rgb8();
                assert_eq!(back.dimensions(), (32, 16));
                // A smooth ramp: every channel within a few levels at quality 95.
                if q == 95 {
                    let worst = back
                        .as_raw()
                        .iter()
                        .zip(img.as_raw())
                        .map(|(a, b)| a.abs_diff(*b))
                        .max();
                    assert!(worst.unwrap() <= 8, "{worst:?}");
                }
                jpg.len()
            })
            .into();
        assert!(
            sizes[1] < sizes[0],
            "lower quality, smaller file: {sizes:?}"
        );
        assert_eq!(
            encode(&img, Encoding::Png, "p").unwrap(),
            encode_png(&img, "p").unwrap()
        );
    }

    #[test]
    fn rgb_plain_values_and_clamping() {
        // -1 -> 0, 1 -> 255, 0.5 -> 191.25 -> 191, -0.5 -> 63.75 -> 64; outside [-1, 1] clamps.
        assert_eq!(
            bytes_of(&[
                -1.0,
                1.0,
                0.5,
                -0.5,
                -3.0,
                1.5,
                1.0001,
                -1.0001,
                f32::MAX,
                f32::MIN
            ]),
            vec![0, 255, 191, 64, 0, 255, 255, 0, 255, 0]
        );
        let unit = to_unit_float(chw(&[-2.0, -1.0, 0.0, 0.5, 2.0]).view()).unwrap();
        assert_eq!(unit.shape(), &[3, 1, 5]);
        for c in 0..3 {
            let plane: Vec<f32> = unit
                .index_axis(ndarray::Axis(0), c)
                .iter()
                .copied()
                .collect();
            assert_eq!(plane, vec![0.0, 0.0, 0.5, 0.75, 1.0]);
        }
    }

    #[test]
    fn rgb_rounds_half_to_even_like_numpy() {
        // Inputs whose f32 product (x*0.5+0.5)*255 is exactly k + 0.5.
        let cases = [
            (0.0f32, 127.5f32, 128u8),               // 127.5 -> 128 (even)
            (f32::from_bits(0xbefc_fcfc), 64.5, 64), // -0.49411762: 64.5 -> 64, not 65
            (f32::from_bits(0xbef8_f8f8), 65.5, 66), // -0.48627448: 65.5 -> 66
            (f32::from_bits(0xbecc_cccc), 76.5, 76), // -0.39999998: 76.5 -> 76, not 77
        ];
        for (x, product, want) in cases {
            assert_eq!((x * 0.5 + 0.5) * 255.0, product, "test premise for {x:?}");
            assert_eq!(bytes_of(&[x]), vec![want], "x = {x:?}");
        }
        // Round-half-away would differ on the even cases; make sure the test can tell.
        assert_eq!(64.5f32.round(), 65.0);
    }

    #[test]
    fn rgb_layout_is_chw_to_hwc() {
        // Pixel (y, x) gets channels (r, g, b) from planes 0, 1, 2.
        let a = Array3::from_shape_fn((3, 2, 3), |(c, y, x)| match c {
            0 => -1.0 + (x as f32) * 0.5,
            1 => -1.0 + (y as f32),
            _ => 1.0,
        });
        let img = to_rgb8(a.view()).unwrap();
        assert_eq!(img.dimensions(), (3, 2));
        assert_eq!(img.get_pixel(0, 0).0, [0, 0, 255]);
        assert_eq!(img.get_pixel(2, 0).0, [128, 0, 255]); // 0.0 -> 127.5 -> 128
        assert_eq!(img.get_pixel(1, 1).0, [64, 128, 255]); // -0.5 -> 63.75 -> 64
    }

    #[test]
    fn non_finite_vae_output_is_a_numerics_error() {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut a = Array3::<f32>::zeros((3, 4, 4));
            a[[2, 3, 1]] = bad;
            let e = to_rgb8(a.view()).unwrap_err();
            assert_eq!(e.kind, ErrorKind::Numerics);
            assert!(e.message.contains("VAE decode"), "{e}");
            assert!(e.hint.as_deref().unwrap().contains("fp32"), "{e}");
            assert_eq!(
                to_unit_float(a.view()).unwrap_err().kind,
                ErrorKind::Numerics
            );
        }
        let e = to_rgb8(Array3::<f32>::zeros((4, 2, 2)).view()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Model);
    }

    fn params() -> GenerationParams {
        GenerationParams {
            prompt: "a photo of a cat".into(),
            prompt_2: None,
            negative_prompt: None,
            steps: 4,
            seed: 42,
            width: 512,
            height: 512,
            guidance: Some(3.5),
            model: "tiny-flux-schnell".into(),
            provider: "cpu".into(),
            sampler: "Euler".into(),
            version: "fluxrt 0.1.0".into(),
            denoising_strength: None,
            loras: Vec::new(),
        }
    }

    #[test]
    fn a1111_parameters_record_loras_and_denoising_strength() {
        let mut p = params();
        p.denoising_strength = Some(0.6);
        p.loras = vec![
            LoraParam {
                name: "style".into(),
                addnet_hash: "0123456789abcdef0123".into(),
                scale: 0.8,
            },
            LoraParam {
                name: "de:tail, v2".into(),
                addnet_hash: "fedcba9876543210".into(),
                scale: -0.5,
            },
        ];
        assert_eq!(
            a1111_parameters(&p),
            "a photo of a cat\nSteps: 4, Sampler: Euler, Seed: 42, Size: 512x512, Guidance: 3.5, \
             Denoising strength: 0.6, Model: tiny-flux-schnell, Provider: cpu, \
             Lora hashes: \"style: 0123456789ab, detail v2: fedcba987654\", \
             Lora scales: \"style: 0.8, detail v2: -0.5\", Version: fluxrt 0.1.0"
        );
    }

    #[test]
    fn a1111_parameters_format() {
        assert_eq!(
            a1111_parameters(&params()),
            "a photo of a cat\nSteps: 4, Sampler: Euler, Seed: 42, Size: 512x512, Guidance: 3.5, \
             Model: tiny-flux-schnell, Provider: cpu, Version: fluxrt 0.1.0"
        );

        let mut p = params();
        p.prompt = "a cat,\nin the rain".into();
        p.negative_prompt = Some("blurry, low quality".into());
        p.guidance = Some(4.0);
        p.width = 1024;
        p.height = 768;
        p.seed = u64::MAX;
        p.sampler = "Euler (flow match)".into();
        p.model = "models/flux: \"dev\", q8".into();
        assert_eq!(
            a1111_parameters(&p),
            "a cat,\nin the rain\nNegative prompt: blurry, low quality\nSteps: 4, Sampler: Euler (flow match), \
             Seed: 18446744073709551615, Size: 1024x768, Guidance: 4.0, \
             Model: \"models/flux: \\\"dev\\\", q8\", Provider: cpu, Version: fluxrt 0.1.0"
        );

        // schnell: no guidance; empty negative prompt left out; prompt_2 only when different.
        let mut p = params();
        p.guidance = None;
        p.negative_prompt = Some(String::new());
        p.prompt_2 = Some("detailed, 8k".into());
        assert_eq!(
            a1111_parameters(&p),
            "a photo of a cat\nSteps: 4, Sampler: Euler, Seed: 42, Size: 512x512, \
             Model: tiny-flux-schnell, Provider: cpu, Prompt 2: \"detailed, 8k\", Version: fluxrt 0.1.0"
        );
        p.prompt_2 = Some(p.prompt.clone());
        assert!(!a1111_parameters(&p).contains("Prompt 2"));
    }

    #[test]
    fn quote_matches_python_json_dumps() {
        assert_eq!(quote("plain value"), "plain value");
        assert_eq!(quote("a, b"), "\"a, b\"");
        assert_eq!(quote("k: v"), "\"k: v\"");
        assert_eq!(quote("l1\nl2\t\\"), "\"l1\\nl2\\t\\\\\"");
        assert_eq!(quote("猫, 雨"), "\"猫, 雨\""); // ensure_ascii=False
        assert_eq!(quote("a,\u{1}"), "\"a,\\u0001\"");
    }

    fn test_image() -> image::RgbImage {
        image::RgbImage::from_fn(7, 5, |x, y| {
            image::Rgb([(x * 30) as u8, (y * 50) as u8, (x * y) as u8])
        })
    }

    #[test]
    fn png_round_trip_latin1_and_utf8() {
        let img = test_image();
        for text in [
            a1111_parameters(&params()),
            "café crème, ½ size\nSteps: 4".to_string(), // Latin-1, not ASCII: tEXt
            "一只猫在雨中\nNegative prompt: 模糊\nSteps: 4, Seed: 1".to_string(), // iTXt
        ] {
            let bytes = encode_png(&img, &text).unwrap();
            let decoded =
                image::load_from_memory_with_format(&bytes, image::ImageFormat::Png).unwrap();
            assert_eq!(decoded.color(), image::ColorType::Rgb8);
            assert_eq!(decoded.to_rgb8(), img);
            assert_eq!(read_png_parameters(&bytes).as_deref(), Some(text.as_str()));

            let chunk = if is_latin1(&text) { b"tEXt" } else { b"iTXt" };
            let at = bytes
                .windows(4)
                .position(|w| w == chunk)
                .expect("text chunk");
            let idat = bytes.windows(4).position(|w| w == b"IDAT").unwrap();
            assert!(at < idat, "text chunk before the image data");
            assert_eq!(&bytes[at + 4..at + 15], b"parameters\0");
        }
        assert_eq!(read_png_parameters(&encode_png(&img, "").unwrap()), None);
        assert_eq!(read_png_parameters(b"not a png"), None);
    }

    #[test]
    fn png_bytes_are_deterministic() {
        let img = test_image();
        let text = a1111_parameters(&params());
        assert_eq!(
            encode_png(&img, &text).unwrap(),
            encode_png(&img, &text).unwrap()
        );
        assert_ne!(
            encode_png(&img, &text).unwrap(),
            encode_png(&img, "other").unwrap()
        );
    }

    fn strs(paths: &[PathBuf]) -> Vec<String> {
        paths
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn output_paths_patterns() {
        assert_eq!(
            strs(&output_paths("out.png", 1, &[7]).unwrap()),
            ["out.png"]
        );
        assert_eq!(
            strs(&output_paths("out.png", 3, &[7, 8, 9]).unwrap()),
            ["out-0.png", "out-1.png", "out-2.png"]
        );
        assert_eq!(
            strs(&output_paths("dir/Out.PNG", 2, &[]).unwrap()),
            ["dir/Out-0.PNG", "dir/Out-1.PNG"]
        );
        assert_eq!(strs(&output_paths("out", 1, &[7]).unwrap()), ["out.png"]);
        assert_eq!(
            strs(&output_paths("a.b/out", 2, &[]).unwrap()),
            ["a.b/out-0.png", "a.b/out-1.png"]
        );
        assert_eq!(
            strs(&output_paths("img_{seed}.png", 2, &[42, 43]).unwrap()),
            ["img_42.png", "img_43.png"]
        );
        assert_eq!(
            strs(&output_paths("{i}/x-{seed}-{i}", 2, &[5, 5]).unwrap()),
            ["0/x-5-0.png", "1/x-5-1.png"]
        );
        assert_eq!(
            strs(&output_paths("one-{i}.png", 1, &[]).unwrap()),
            ["one-0.png"]
        );
        assert_eq!(
            strs(&output_paths("{weird.png", 2, &[]).unwrap()),
            ["{weird-0.png", "{weird-1.png"]
        );
        assert!(output_paths("out.png", 0, &[]).unwrap().is_empty());
    }

    #[test]
    fn output_paths_refusals() {
        let input = |p: &str, n: usize, s: &[u64]| {
            let e = output_paths(p, n, s).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidInput, "{p}");
            e
        };
        let e = input("out.jpg", 1, &[1]);
        assert!(e.hint.unwrap().contains(".png"));
        let e = input("img_{seed}.png", 3, &[1, 2, 1]);
        assert!(e.message.contains("img_1.png"), "{}", e.message);
        assert!(e.hint.unwrap().contains("{i}"));
        let e = input("img_{index}.png", 2, &[]);
        assert!(e.message.contains("{index}"));
        input("img_{seed}.png", 2, &[1]);
        input("", 1, &[]);
        input("outdir/", 1, &[]);
        input(".", 1, &[]);
        input("..", 1, &[]);
    }

    #[test]
    fn check_writable_existing_file_and_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let existing = dir.path().join("out.png");
        std::fs::write(&existing, b"old").unwrap();
        let fresh = dir.path().join("new.png");

        let e = check_writable(&[fresh.clone(), existing.clone()], false).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput);
        assert!(e.message.contains(&existing.display().to_string()), "{e}");
        assert!(e.hint.unwrap().contains("--overwrite"));
        check_writable(&[fresh.clone(), existing.clone()], true).unwrap();
        check_writable(std::slice::from_ref(&fresh), false).unwrap();
        // The probe leaves nothing behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // A folder in the way is refused even with --overwrite.
        let e = check_writable(&[dir.path().to_path_buf()], true).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput);
    }

    #[test]
    fn check_writable_bad_parent_folders() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no/such/dir");
        let e = check_writable(&[missing.join("out.png")], false).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput);
        assert!(e.message.contains(&missing.display().to_string()), "{e}");

        // A parent that is a regular file cannot be written into, even by root.
        let file = dir.path().join("plain-file");
        std::fs::write(&file, b"x").unwrap();
        let e = check_writable(&[file.join("out.png")], true).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput);
        assert!(e.message.contains(&file.display().to_string()), "{e}");
    }

    #[cfg(unix)]
    #[test]
    fn check_writable_read_only_folder_follows_the_probe() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ro = dir.path().join("ro");
        std::fs::create_dir(&ro).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        // Root ignores the mode bits; the answer must match what a real write does either way.
        let can_write = std::fs::write(ro.join("probe"), b"").is_ok();
        let _ = std::fs::remove_file(ro.join("probe"));
        let result = check_writable(&[ro.join("out.png")], false);
        assert_eq!(result.is_ok(), can_write, "{result:?}");
        if let Err(e) = result {
            assert_eq!(e.kind, ErrorKind::InvalidInput);
            assert!(e.message.contains(&ro.display().to_string()), "{e}");
        }
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn write_atomically_never_clobbers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.png");
        write_atomically(&path, b"first", false).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"first");

        let e = write_atomically(&path, b"second", false).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput);
        assert!(e.hint.unwrap().contains("--overwrite"));
        assert_eq!(std::fs::read(&path).unwrap(), b"first");

        write_atomically(&path, b"third", true).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"third");
        // No temporary files left behind, success or failure.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("out.png")]);

        // A missing folder fails and creates nothing.
        let e = write_atomically(&dir.path().join("missing/out.png"), b"x", true).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Io);
        assert!(!dir.path().join("missing").exists());
    }

    #[cfg(unix)]
    #[test]
    fn write_atomically_gives_normal_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.png");
        write_atomically(&path, b"x", false).unwrap();
        // Not the 0600 of a temporary file: readable by group/others unless the umask forbids it,
        // compared with what a plain File::create gives under the same umask.
        let plain = dir.path().join("plain");
        std::fs::File::create(&plain).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), mode(&plain));
    }
}
