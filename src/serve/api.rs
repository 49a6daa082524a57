//! The HTTP API's request and error types: parsing and validation are pure functions of the body bytes,
//! the server's limits and the loaded model, so they are tested (and fuzzed) without a server.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use crate::model::Variant;
use crate::pipeline::Request;
use crate::{latents, Error, ErrorKind};

/// Longest accepted image side, whatever the pixel limit.
pub const MAX_SIDE: u32 = 65536;

/// What the server accepts; every request is checked against these before it is queued.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest image, width x height.
    pub max_pixels: u64,
    pub max_steps: usize,
    /// Most images per request (`n`, `num_images`).
    pub max_images: usize,
    /// Longest prompt, in characters (the tokenizers truncate anyway; this bounds the work).
    pub max_prompt_chars: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_pixels: 2 * 1024 * 1024,
            max_steps: 50,
            max_images: 4,
            max_prompt_chars: 10_000,
        }
    }
}

/// What the server knows of its model once a worker has loaded it.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub name: String,
    pub variant: Variant,
    pub width: u32,
    pub height: u32,
    pub steps: usize,
    pub guidance: Option<f32>,
    /// The VAE's downsampling factor (8 for FLUX): sides must be multiples of twice this.
    pub vae_factor: usize,
    pub providers: Vec<String>,
}

/// An error as OpenAI's API writes it: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `rate_limit_error`, `server_error`, ...
    pub kind: &'static str,
    /// The request field at fault, when there is one.
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds for a `Retry-After` header (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code: None,
            retry_after: None,
        }
    }
    /// 400: the body cannot be read as JSON, or asks for something this server does not do.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }
    /// 422: well-formed JSON with a wrong, missing or out-of-range field.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request_error",
            message,
        )
        .param(param)
    }
    pub fn param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }
    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }
    pub fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// The HTTP form of a library error. Only messages about the request itself and numerics are passed on:
    /// model, runtime, provider and I/O messages may name files, so the client gets a generic sentence and
    /// the server log gets the details.
    pub fn from_error(e: &Error) -> Self {
        match e.kind {
            ErrorKind::InvalidInput => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request_error",
                e.message.clone(),
            ),
            ErrorKind::Cancelled => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the run was cancelled (timeout or shutdown)",
            )
            .code("cancelled"),
            ErrorKind::Numerics => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                format!("the model produced invalid numbers: {}", e.message),
            )
            .code("numerics"),
            ErrorKind::Model | ErrorKind::Runtime | ErrorKind::Provider | ErrorKind::Io => {
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "the image could not be generated because of a server-side error; the server log has the details",
                )
                .code("internal_error")
            }
        }
    }

    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// `POST /v1/images/generations`: OpenAI's Images API, plus fluxrt's `seed`, `steps` and `guidance`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiRequest {
    pub prompt: String,
    /// Accepted and ignored: this server runs the one model it loaded.
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub n: Option<usize>,
    /// `"WIDTHxHEIGHT"`, or `"auto"` for the model's default.
    #[serde(default)]
    pub size: Option<String>,
    /// `b64_json` (the default here); `url` is refused because the server keeps no files.
    #[serde(default)]
    pub response_format: Option<String>,
    /// Accepted and ignored (an end-user id for abuse tracking in OpenAI's API).
    #[serde(default)]
    pub user: Option<String>,
    /// Accepted and ignored, as `user`.
    #[serde(default)]
    pub safety_identifier: Option<String>,
    /// Accepted and echoed; FLUX has one quality: its steps come from `steps` or the model's default.
    #[serde(default)]
    pub quality: Option<String>,
    /// Accepted and ignored: FLUX has no style switch (the prompt says it).
    #[serde(default)]
    pub style: Option<String>,
    /// Accepted and ignored: this server runs no moderation model.
    #[serde(default)]
    pub moderation: Option<String>,
    /// `opaque` or `auto`; `transparent` is refused (FLUX.1 renders opaque RGB).
    #[serde(default)]
    pub background: Option<String>,
    /// `png` (default, with the generation settings in a `parameters` chunk), `jpeg` or `webp` (lossless).
    #[serde(default)]
    pub output_format: Option<String>,
    /// 0-100, the JPEG quality (100: best, OpenAI's default); WebP here is lossless and ignores it.
    #[serde(default)]
    pub output_compression: Option<u8>,
    /// Streaming is not offered yet: `true` is refused.
    #[serde(default)]
    pub stream: Option<bool>,
    /// 0-3, with `stream` only.
    #[serde(default)]
    pub partial_images: Option<u8>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub steps: Option<usize>,
    #[serde(default)]
    pub guidance: Option<f32>,
}

/// OpenAI's documented values of the generation fields accepted here (openai-python's image_generate_params).
const QUALITIES: &[&str] = &[
    "auto", "low", "medium", "high", "xhigh", "max", "standard", "hd",
];
const STYLES: &[&str] = &["vivid", "natural"];
const MODERATIONS: &[&str] = &["auto", "low"];
const BACKGROUNDS: &[&str] = &["auto", "opaque", "transparent"];
const OUTPUT_FORMATS: &[&str] = &["png", "jpeg", "webp", "gif", "svg"];

/// `value` when it is one of `allowed`, else 422 naming the field and the values.
fn choice<'a>(
    param: &str,
    value: Option<&'a str>,
    allowed: &[&str],
) -> Result<Option<&'a str>, ApiError> {
    match value {
        Some(v) if !allowed.contains(&v) => Err(ApiError::invalid(
            param,
            format!(
                "Invalid value: '{}'. Supported values are: {}.",
                truncate(v, 40),
                allowed
                    .iter()
                    .map(|a| format!("'{a}'"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )
        .code("invalid_value")),
        v => Ok(v),
    }
}

/// What the OpenAI fields ask of the answer: the image encoding and the fields echoed beside `data`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenAiOutput {
    pub encoding: crate::image_out::Encoding,
    pub quality: String,
}

impl OpenAiRequest {
    /// Checks the OpenAI-only fields: refuses what this server cannot do, with the reason.
    pub fn output(&self) -> Result<OpenAiOutput, ApiError> {
        use crate::image_out::Encoding;
        let quality = choice("quality", self.quality.as_deref(), QUALITIES)?.unwrap_or("auto");
        choice("style", self.style.as_deref(), STYLES)?;
        choice("moderation", self.moderation.as_deref(), MODERATIONS)?;
        if choice("background", self.background.as_deref(), BACKGROUNDS)? == Some("transparent") {
            return Err(ApiError::bad_request(
                "background \"transparent\" is not supported: FLUX.1 renders opaque RGB images; use \"opaque\" or \"auto\"",
            )
            .param("background")
            .code("unsupported_background"));
        }
        let compression = self.output_compression.unwrap_or(100);
        if compression > 100 {
            return Err(ApiError::invalid(
                "output_compression",
                format!("output_compression must be between 0 and 100, got {compression}"),
            ));
        }
        let encoding = match choice("output_format", self.output_format.as_deref(), OUTPUT_FORMATS)? {
            None | Some("png") => Encoding::Png,
            Some("jpeg") => Encoding::Jpeg {
                quality: compression.max(1),
            },
            Some("webp") => Encoding::Webp,
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "output_format \"{other}\" is not supported: FLUX.1 makes raster images; use \"png\", \"jpeg\" or \"webp\""
                ))
                .param("output_format")
                .code("unsupported_output_format"))
            }
        };
        if self.stream == Some(true) {
            return Err(ApiError::bad_request(
                "streaming (\"stream\": true) is not supported by this server yet; omit it to get the finished images",
            )
            .param("stream")
            .code("unsupported_stream"));
        }
        if let Some(p) = self.partial_images.filter(|&p| p > 3) {
            return Err(ApiError::invalid(
                "partial_images",
                format!("partial_images must be between 0 and 3, got {p}"),
            ));
        }
        Ok(OpenAiOutput {
            encoding,
            quality: quality.to_string(),
        })
    }
}

/// `POST /v1/generate`: every option of `fluxrt generate`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NativeRequest {
    pub prompt: String,
    #[serde(default)]
    pub prompt_2: Option<String>,
    #[serde(default)]
    pub width: Option<u32>,
    #[serde(default)]
    pub height: Option<u32>,
    #[serde(default)]
    pub steps: Option<usize>,
    #[serde(default)]
    pub guidance: Option<f32>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub num_images: Option<usize>,
    /// True CFG (`--negative-prompt`, `--true-cfg`): runs when true_cfg > 1 and a negative prompt is given.
    #[serde(default)]
    pub negative_prompt: Option<String>,
    #[serde(default)]
    pub true_cfg: Option<f32>,
    /// img2img (`--init-image`): a base64 PNG or JPEG, a `data:image/...;base64,` prefix allowed. Without width
    /// and height the output takes its size, floored to a multiple of 16.
    #[serde(default)]
    pub init_image: Option<String>,
    /// img2img strength in (0, 1] (default 0.6); only with init_image.
    #[serde(default)]
    pub strength: Option<f64>,
    /// `"auto"` (default), `"on"` or `"off"` (`--vae-tiling`).
    #[serde(default)]
    pub vae_tiling: Option<crate::vae_tiling::TilingMode>,
    /// Run-time LoRAs by the names the server was started with (`--lora NAME=FILE`), stacked in order.
    #[serde(default)]
    pub loras: Option<Vec<LoraRequest>>,
}

/// One entry of `"loras"`: a LoRA the server loaded, and its scale (default 1.0).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraRequest {
    pub name: String,
    #[serde(default)]
    pub scale: Option<f32>,
}

/// Most LoRAs one request may stack.
pub const MAX_LORAS: usize = 8;

/// The LoRAs a server offers, by name (loaded once at startup, shared by every request).
#[derive(Debug, Clone, Default)]
pub struct LoraCatalog(pub Vec<(String, std::sync::Arc<crate::lora::Lora>)>);

impl LoraCatalog {
    pub fn names(&self) -> Vec<&str> {
        self.0.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// The catalog name of a loaded LoRA.
    pub fn name_of(&self, lora: &std::sync::Arc<crate::lora::Lora>) -> Option<&str> {
        self.0
            .iter()
            .find(|(_, l)| std::sync::Arc::ptr_eq(l, lora))
            .map(|(n, _)| n.as_str())
    }

    /// What `/v1/models` and `/ready` say about each LoRA (no server paths).
    pub fn describe(&self) -> Vec<serde_json::Value> {
        self.0
            .iter()
            .map(|(name, l)| {
                let mut d = l.describe();
                d["name"] = json!(name);
                d
            })
            .collect()
    }

    /// The request's `"loras"` as choices; 422 on `loras` for an unknown name, a bad scale or too many.
    pub fn resolve(
        &self,
        wanted: &[LoraRequest],
    ) -> Result<Vec<crate::lora::LoraChoice>, ApiError> {
        if wanted.len() > MAX_LORAS {
            return Err(ApiError::invalid(
                "loras",
                format!(
                    "at most {MAX_LORAS} LoRAs may be stacked, got {}",
                    wanted.len()
                ),
            ));
        }
        let mut out = Vec::with_capacity(wanted.len());
        for w in wanted {
            let Some((_, lora)) = self.0.iter().find(|(n, _)| *n == w.name) else {
                let names = self.names();
                return Err(ApiError::invalid(
                    "loras",
                    if names.is_empty() {
                        format!(
                            "unknown LoRA {:?}: this server has no LoRAs (it is started with --lora NAME=FILE)",
                            truncate(&w.name, 60)
                        )
                    } else {
                        format!(
                            "unknown LoRA {:?}; this server has: {}",
                            truncate(&w.name, 60),
                            names.join(", ")
                        )
                    },
                )
                .code("unknown_lora"));
            };
            let scale = w.scale.unwrap_or(1.0);
            if !scale.is_finite() || scale.abs() > 100.0 {
                return Err(ApiError::invalid(
                    "loras",
                    format!(
                        "the scale of LoRA {} must be a number between -100 and 100, got {scale}",
                        w.name
                    ),
                ));
            }
            out.push(crate::lora::LoraChoice::new(lora.clone(), scale));
        }
        Ok(out)
    }
}

/// A checked request, ready to queue, and the notes for the client (e.g. an ignored guidance).
#[derive(Debug, Clone)]
pub struct Parsed {
    pub request: Request,
    pub warnings: Vec<String>,
}

/// Deserializes `body` as `T`: syntax errors are 400; wrong types, unknown and missing fields are 422 with
/// the field in `param`.
pub fn from_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: T = match serde_path_to_error::deserialize(&mut de) {
        Ok(v) => v,
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            return Err(json_error(&inner, &path));
        }
    };
    de.end().map_err(|e| json_error(&e, "."))?;
    Ok(value)
}

/// serde_json's message without its "at line L column C": parser internals, not the client's business.
fn without_position(e: &serde_json::Error) -> String {
    let full = e.to_string();
    full.rsplit_once(" at line ")
        .map_or(full.as_str(), |(m, _)| m)
        .to_string()
}

fn json_error(e: &serde_json::Error, path: &str) -> ApiError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Syntax | Category::Eof | Category::Io => ApiError::bad_request(format!(
            "the request body is not valid JSON: {}",
            without_position(e)
        ))
        .code("invalid_json"),
        Category::Data => {
            // serde_json appends "at line L column C": parser internals, not the client's business.
            let msg = without_position(e);
            if let Some(field) = msg
                .strip_prefix("unknown field `")
                .and_then(|r| r.split_once('`'))
                .map(|(f, _)| f.to_string())
            {
                // As OpenAI answers an unknown field.
                return ApiError::bad_request(format!(
                    "Unknown parameter: '{}'.",
                    truncate(&field, 60)
                ))
                .param(field)
                .code("unknown_parameter");
            }
            // serde names unknown and missing fields in backticks; the path names the field of a wrong type.
            let named = ["unknown field `", "missing field `"]
                .iter()
                .find_map(|p| msg.split_once(p))
                .and_then(|(_, rest)| rest.split_once('`'))
                .map(|(field, _)| field.to_string());
            let param =
                named.or_else(|| (path != "." && !path.is_empty()).then(|| path.to_string()));
            let mut err = ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request_error",
                match &param {
                    Some(p) if !msg.contains('`') => format!("{p}: {msg}"),
                    _ => msg,
                },
            );
            err.param = param;
            err
        }
    }
}

/// Parses `"WIDTHxHEIGHT"` (or `"auto"`).
pub fn parse_size(size: &str, model: &ModelInfo) -> Result<(u32, u32), ApiError> {
    let s = size.trim();
    if s.eq_ignore_ascii_case("auto") {
        return Ok((model.width, model.height));
    }
    let bad = || {
        ApiError::invalid(
            "size",
            format!(
                "size must be \"WIDTHxHEIGHT\" in pixels, e.g. \"{}x{}\", got {:?}",
                model.width,
                model.height,
                truncate(size, 40)
            ),
        )
    };
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    let w: u32 = w.trim().parse().map_err(|_| bad())?;
    let h: u32 = h.trim().parse().map_err(|_| bad())?;
    Ok((w, h))
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}...", s.chars().take(n).collect::<String>())
    }
}

/// The common checks of both endpoints. `names` are the request's field names for (size, steps, count).
#[allow(clippy::too_many_arguments)]
fn build(
    prompt: String,
    prompt_2: Option<String>,
    (width, height): (u32, u32),
    steps: Option<usize>,
    guidance: Option<f32>,
    seed: u64,
    count: Option<usize>,
    names: [&str; 4],
    limits: &Limits,
    model: &ModelInfo,
) -> Result<Parsed, ApiError> {
    let [size_w, size_h, count_name, prompt_name] = names;
    let mut warnings = Vec::new();
    for (name, p) in [
        (prompt_name, Some(&prompt)),
        ("prompt_2", prompt_2.as_ref()),
    ] {
        if let Some(p) = p {
            let chars = p.chars().count();
            if chars > limits.max_prompt_chars {
                return Err(ApiError::invalid(
                    name,
                    format!(
                        "{name} is {chars} characters long; this server accepts at most {}",
                        limits.max_prompt_chars
                    ),
                ));
            }
        }
    }
    // Sides past 65536 px are refused here, before the size arithmetic (and with a plain message).
    for (param, side, v) in [(size_w, "width", width), (size_h, "height", height)] {
        if v > MAX_SIDE {
            return Err(ApiError::invalid(
                param,
                format!("{side} {v} is too large; this server accepts at most {MAX_SIDE} pixels per side and {} pixels in all", limits.max_pixels),
            ));
        }
    }
    if let Err(e) = latents::validate_size(width, height, limits.max_pixels, model.vae_factor) {
        let param = if e.message.starts_with("height") {
            size_h
        } else {
            size_w
        };
        let msg = e
            .message
            .replace("max-pixels limit", "server's --max-pixels limit");
        return Err(ApiError::invalid(param, msg));
    }
    let steps = steps.unwrap_or(model.steps);
    if let Err(e) = crate::schedule::check_steps(steps, limits.max_steps) {
        return Err(ApiError::invalid("steps", e.message));
    }
    let n = count.unwrap_or(1);
    if n == 0 || n > limits.max_images {
        return Err(ApiError::invalid(
            count_name,
            format!(
                "{count_name} must be between 1 and {}, got {n}",
                limits.max_images
            ),
        ));
    }
    let guidance = match (model.variant, guidance) {
        (_, Some(g)) if !g.is_finite() || !(0.0..=100.0).contains(&g) => {
            return Err(ApiError::invalid(
                "guidance",
                format!("guidance must be a number between 0 and 100, got {g}"),
            ))
        }
        (Variant::Schnell, Some(_)) => {
            warnings.push(format!(
                "guidance is ignored: {} is a schnell model without guidance embedding",
                model.name
            ));
            None
        }
        (Variant::Schnell, None) => None,
        (Variant::Dev, g) => g.or(model.guidance).or(Some(3.5)),
    };
    let request = Request {
        prompt,
        prompt_2,
        width,
        height,
        steps,
        guidance,
        seed,
        num_images: n,
        max_pixels: limits.max_pixels,
        ..Default::default()
    };
    // The library's own checks, which the ones above imply; kept as the last word.
    request
        .validate(model.vae_factor)
        .map_err(|e| ApiError::from_error(&e))?;
    Ok(Parsed { request, warnings })
}

/// Parses and validates an OpenAI Images API body. `random_seed` is used when the body has no seed.
pub fn parse_openai(
    body: &[u8],
    limits: &Limits,
    model: &ModelInfo,
    random_seed: u64,
) -> Result<(Parsed, OpenAiOutput), ApiError> {
    let r: OpenAiRequest = from_json(body)?;
    let output = r.output()?;
    match r.response_format.as_deref() {
        None | Some("b64_json") => {}
        Some("url") => {
            return Err(ApiError::bad_request(
                "response_format \"url\" is not supported: this server does not host image files; \
                 use \"b64_json\" (the default here)",
            )
            .param("response_format")
            .code("unsupported_response_format"))
        }
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "response_format must be \"b64_json\", got {:?}",
                truncate(other, 40)
            ))
            .param("response_format"))
        }
    }
    let size = match r.size.as_deref() {
        Some(s) => parse_size(s, model)?,
        None => (model.width, model.height),
    };
    let parsed = build(
        r.prompt,
        None,
        size,
        r.steps,
        r.guidance,
        r.seed.unwrap_or(random_seed),
        r.n,
        ["size", "size", "n", "prompt"],
        limits,
        model,
    )?;
    Ok((parsed, output))
}

/// Parses and validates a native `/v1/generate` body (on a server without LoRAs).
pub fn parse_native(
    body: &[u8],
    limits: &Limits,
    model: &ModelInfo,
    random_seed: u64,
) -> Result<Parsed, ApiError> {
    parse_native_with(body, limits, model, random_seed, &LoraCatalog::default())
}

/// [`parse_native`] on a server offering `loras`.
pub fn parse_native_with(
    body: &[u8],
    limits: &Limits,
    model: &ModelInfo,
    random_seed: u64,
    loras: &LoraCatalog,
) -> Result<Parsed, ApiError> {
    let r: NativeRequest = from_json(body)?;
    let chosen = loras.resolve(r.loras.as_deref().unwrap_or(&[]))?;
    let init = match r.init_image.as_deref() {
        Some(b64) => Some(decode_init_image(b64)?),
        None => None,
    };
    let (w, h) = match &init {
        Some(i) => i
            .default_size(model.vae_factor)
            .map_err(|e| ApiError::invalid("init_image", e.message))?,
        None => (model.width, model.height),
    };
    let mut parsed = build(
        r.prompt,
        r.prompt_2,
        (r.width.unwrap_or(w), r.height.unwrap_or(h)),
        r.steps,
        r.guidance,
        r.seed.unwrap_or(random_seed),
        r.num_images,
        ["width", "height", "num_images", "prompt"],
        limits,
        model,
    )?;
    if let (Some(i), None, None) = (&init, r.width, r.height) {
        parsed.warnings.extend(i.floor_warning(model.vae_factor));
    }
    // img2img, true CFG and VAE tiling (crate::img2img, crate::guidance, crate::vae_tiling).
    if r.strength.is_some() && init.is_none() {
        return Err(ApiError::invalid("strength", "strength needs init_image"));
    }
    if let Some(neg) = &r.negative_prompt {
        let chars = neg.chars().count();
        if chars > limits.max_prompt_chars {
            return Err(ApiError::invalid(
                "negative_prompt",
                format!(
                    "negative_prompt is {chars} characters long; this server accepts at most {}",
                    limits.max_prompt_chars
                ),
            ));
        }
    }
    let req = &mut parsed.request;
    req.init_image = init;
    req.strength = r.strength.unwrap_or(req.strength);
    req.negative_prompt = r.negative_prompt;
    req.true_cfg = r.true_cfg.unwrap_or(req.true_cfg);
    req.vae_tiling.mode = r.vae_tiling.unwrap_or(req.vae_tiling.mode);
    req.loras = chosen;
    req.validate(model.vae_factor).map_err(|e| {
        let param = if e.message.starts_with("strength") {
            "strength"
        } else if e.message.starts_with("true-cfg") {
            "true_cfg"
        } else {
            return ApiError::from_error(&e);
        };
        ApiError::invalid(param, e.message)
    })?;
    Ok(parsed)
}

/// A base64 init image (optionally a data URL) decoded to RGB; 422 on `init_image` when it is not base64 or not
/// a PNG or JPEG.
fn decode_init_image(text: &str) -> Result<crate::img2img::InitImage, ApiError> {
    use base64::Engine as _;
    let data = match text.split_once(";base64,") {
        Some((head, data)) if head.starts_with("data:") => data,
        _ => text,
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| ApiError::invalid("init_image", format!("init_image is not base64: {e}")))?;
    crate::img2img::InitImage::from_bytes(&bytes, "init_image")
        .map_err(|e| ApiError::invalid("init_image", e.message))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> ModelInfo {
        ModelInfo {
            name: "tiny".into(),
            variant: Variant::Schnell,
            width: 256,
            height: 256,
            steps: 4,
            guidance: None,
            vae_factor: 8,
            providers: vec!["cpu".into()],
        }
    }

    fn catalog() -> LoraCatalog {
        let lora = |name: &str| {
            std::sync::Arc::new(crate::lora::Lora {
                name: format!("{name}.safetensors"),
                sha256: "00".into(),
                addnet_hash: "01".into(),
                naming: crate::lora::Naming::Diffusers,
                modules: Default::default(),
            })
        };
        LoraCatalog(vec![
            ("style".into(), lora("s")),
            ("detail".into(), lora("d")),
        ])
    }

    #[test]
    fn native_loras_resolve_by_name_with_scales() {
        let c = catalog();
        let body =
            br#"{"prompt": "x", "loras": [{"name": "detail", "scale": 0.5}, {"name": "style"}]}"#;
        let p = parse_native_with(body, &Limits::default(), &model(), 1, &c).unwrap();
        let r = &p.request;
        assert_eq!(r.loras.len(), 2);
        assert!(std::sync::Arc::ptr_eq(&r.loras[0].lora, &c.0[1].1));
        assert_eq!((r.loras[0].scale, r.loras[1].scale), (0.5, 1.0));
        assert_eq!(c.name_of(&r.loras[1].lora), Some("style"));
        // Without "loras": none; and a request with LoRAs does not batch with one without.
        let plain =
            parse_native_with(br#"{"prompt": "x"}"#, &Limits::default(), &model(), 1, &c).unwrap();
        assert!(plain.request.loras.is_empty());
        assert!(!plain.request.batches_with(r));
        assert!(r.batches_with(&r.clone()));
        let d = c.describe();
        assert_eq!(d[0]["name"], "style");
        assert_eq!(d[0]["file"], "s.safetensors");
    }

    #[test]
    fn native_loras_errors_are_422_on_loras() {
        let c = catalog();
        let parse =
            |b: &[u8]| parse_native_with(b, &Limits::default(), &model(), 1, &c).unwrap_err();
        let e = parse(br#"{"prompt": "x", "loras": [{"name": "nope"}]}"#);
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(e.param.as_deref(), Some("loras"));
        assert!(e.message.contains("style, detail"), "{}", e.message);
        // 1e40 does not fit an f32: infinite.
        let e = parse(br#"{"prompt": "x", "loras": [{"name": "style", "scale": 1e40}]}"#);
        assert_eq!(
            (e.status, e.param.as_deref()),
            (StatusCode::UNPROCESSABLE_ENTITY, Some("loras"))
        );
        let e = parse(br#"{"prompt": "x", "loras": [{"name": "style", "scale": "strong"}]}"#);
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        // An unknown field, even inside: 400 unknown_parameter, as OpenAI answers one.
        let e = parse(br#"{"prompt": "x", "loras": [{"name": "style", "path": "/etc/passwd"}]}"#);
        assert_eq!(
            (e.status, e.code),
            (StatusCode::BAD_REQUEST, Some("unknown_parameter"))
        );
        let e = parse(br#"{"prompt": "x", "loras": "style"}"#);
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        // A server without LoRAs says how to offer them.
        let e = parse_native(
            br#"{"prompt": "x", "loras": [{"name": "style"}]}"#,
            &Limits::default(),
            &model(),
            1,
        )
        .unwrap_err();
        assert!(e.message.contains("--lora NAME=FILE"), "{}", e.message);
    }

    #[test]
    fn openai_defaults_and_size() {
        let (p, out) = parse_openai(
            br#"{"prompt":"a cat","size":"64x32"}"#,
            &Limits::default(),
            &model(),
            9,
        )
        .unwrap();
        assert_eq!(out.encoding, crate::image_out::Encoding::Png);
        assert_eq!(out.quality, "auto");
        assert_eq!((p.request.width, p.request.height), (64, 32));
        assert_eq!(
            (p.request.steps, p.request.seed, p.request.num_images),
            (4, 9, 1)
        );
        let (p, _) = parse_openai(
            br#"{"prompt":"a","size":"auto","n":2,"seed":5}"#,
            &Limits::default(),
            &model(),
            9,
        )
        .unwrap();
        assert_eq!(
            (p.request.width, p.request.num_images, p.request.seed),
            (256, 2, 5)
        );
    }

    #[test]
    fn openai_fields_are_accepted_mapped_or_refused_with_the_reason() {
        use crate::image_out::Encoding;
        let l = Limits::default();
        let all = br#"{"prompt":"a","model":"x","n":1,"size":"64x64","quality":"hd","style":"natural",
            "moderation":"low","background":"opaque","output_format":"jpeg","output_compression":60,
            "response_format":"b64_json","user":"u","safety_identifier":"s","stream":false,"partial_images":0}"#;
        let (_, out) = parse_openai(all, &l, &model(), 0).unwrap();
        assert_eq!(out.encoding, Encoding::Jpeg { quality: 60 });
        assert_eq!(out.quality, "hd");
        let fmt = |f: &str| {
            let body = format!(r#"{{"prompt":"a","output_format":"{f}"}}"#);
            parse_openai(body.as_bytes(), &l, &model(), 0).map(|(_, o)| o.encoding)
        };
        assert_eq!(fmt("webp").unwrap(), Encoding::Webp);
        assert_eq!(fmt("jpeg").unwrap(), Encoding::Jpeg { quality: 100 });
        for (body, status, param, code) in [
            (
                &br#"{"prompt":"a","output_format":"svg"}"#[..],
                400,
                "output_format",
                "unsupported_output_format",
            ),
            (
                br#"{"prompt":"a","output_format":"bmp"}"#,
                422,
                "output_format",
                "invalid_value",
            ),
            (
                br#"{"prompt":"a","background":"transparent"}"#,
                400,
                "background",
                "unsupported_background",
            ),
            (
                br#"{"prompt":"a","quality":"ultra"}"#,
                422,
                "quality",
                "invalid_value",
            ),
            (
                br#"{"prompt":"a","style":"cartoon"}"#,
                422,
                "style",
                "invalid_value",
            ),
            (
                br#"{"prompt":"a","moderation":"high"}"#,
                422,
                "moderation",
                "invalid_value",
            ),
            (
                br#"{"prompt":"a","stream":true}"#,
                400,
                "stream",
                "unsupported_stream",
            ),
        ] {
            let e = parse_openai(body, &l, &model(), 0).unwrap_err();
            assert_eq!(
                (e.status.as_u16(), e.param.as_deref(), e.code),
                (status, Some(param), Some(code)),
                "{}",
                e.message
            );
        }
        for (body, param) in [
            (
                &br#"{"prompt":"a","output_compression":101}"#[..],
                "output_compression",
            ),
            (br#"{"prompt":"a","partial_images":4}"#, "partial_images"),
        ] {
            let e = parse_openai(body, &l, &model(), 0).unwrap_err();
            assert_eq!((e.status.as_u16(), e.param.as_deref()), (422, Some(param)));
        }
    }

    #[test]
    fn errors_name_the_field() {
        let l = Limits::default();
        let e = parse_openai(br#"{"prompt":"a","colour":1}"#, &l, &model(), 0).unwrap_err();
        assert_eq!(
            (e.status.as_u16(), e.param.as_deref(), e.code),
            (400, Some("colour"), Some("unknown_parameter"))
        );
        assert_eq!(e.message, "Unknown parameter: 'colour'.");
        for body in [&br#"{"prompt":"a","n":"two"}"#[..], br#"{"prompt":"a""#] {
            let e = parse_openai(body, &l, &model(), 0).unwrap_err();
            assert!(
                !e.message.contains("line") && !e.message.contains("column"),
                "{}",
                e.message
            );
        }
        let e = parse_openai(br#"{"prompt":"a","n":"two"}"#, &l, &model(), 0).unwrap_err();
        assert_eq!((e.status.as_u16(), e.param.as_deref()), (422, Some("n")));
        let e = parse_openai(br#"{"n":1}"#, &l, &model(), 0).unwrap_err();
        assert_eq!(
            (e.status.as_u16(), e.param.as_deref()),
            (422, Some("prompt"))
        );
        let e = parse_openai(br#"{"prompt":"a""#, &l, &model(), 0).unwrap_err();
        assert_eq!(e.status.as_u16(), 400);
        let e = parse_openai(br#"{"prompt":"a"} x"#, &l, &model(), 0).unwrap_err();
        assert_eq!(e.status.as_u16(), 400);
        let e = parse_openai(
            br#"{"prompt":"a","response_format":"url"}"#,
            &l,
            &model(),
            0,
        )
        .unwrap_err();
        assert_eq!(
            (e.status.as_u16(), e.param.as_deref()),
            (400, Some("response_format"))
        );
        let e = parse_native(br#"{"prompt":"a","width":-64}"#, &l, &model(), 0).unwrap_err();
        assert_eq!(
            (e.status.as_u16(), e.param.as_deref()),
            (422, Some("width"))
        );
        let e = parse_native(br#"{"prompt":"a","height":100}"#, &l, &model(), 0).unwrap_err();
        assert_eq!(
            (e.status.as_u16(), e.param.as_deref()),
            (422, Some("height"))
        );
        let e = parse_native(br#"{"prompt":"a","num_images":1000}"#, &l, &model(), 0).unwrap_err();
        assert_eq!(
            (e.status.as_u16(), e.param.as_deref()),
            (422, Some("num_images"))
        );
        let e = parse_native(br#"{"prompt":"a","steps":51}"#, &l, &model(), 0).unwrap_err();
        assert_eq!(
            (e.status.as_u16(), e.param.as_deref()),
            (422, Some("steps"))
        );
    }

    #[test]
    fn guidance_is_dropped_with_a_warning_for_schnell_and_defaulted_for_dev() {
        let l = Limits::default();
        let p = parse_native(br#"{"prompt":"a","guidance":4}"#, &l, &model(), 0).unwrap();
        assert_eq!(p.request.guidance, None);
        assert_eq!(p.warnings.len(), 1);
        let dev = ModelInfo {
            variant: Variant::Dev,
            guidance: Some(3.5),
            ..model()
        };
        let p = parse_native(br#"{"prompt":"a"}"#, &l, &dev, 0).unwrap();
        assert_eq!(p.request.guidance, Some(3.5));
        let e = parse_native(br#"{"prompt":"a","guidance":1e300}"#, &l, &dev, 0).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("guidance"));
    }

    #[test]
    fn native_img2img_true_cfg_and_tiling_fields() {
        use base64::Engine as _;
        let l = Limits::default();
        let mut png = Vec::new();
        image::DynamicImage::ImageRgb8(image::RgbImage::new(70, 40))
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
        let body = format!(
            r#"{{"prompt":"a","init_image":"data:image/png;base64,{b64}","strength":0.8,"negative_prompt":"b","true_cfg":3,"vae_tiling":"off"}}"#
        );
        let p = parse_native(body.as_bytes(), &l, &model(), 0).unwrap();
        let r = &p.request;
        // The init image's size, floored to a multiple of 16.
        assert_eq!((r.width, r.height, r.strength), (64, 32, 0.8));
        assert_eq!((r.negative_prompt.as_deref(), r.true_cfg), (Some("b"), 3.0));
        assert_eq!(r.vae_tiling.mode, crate::vae_tiling::TilingMode::Off);
        assert_eq!(r.init_image.as_ref().unwrap().width(), 70);
        for (body, param) in [
            (r#"{"prompt":"a","strength":0.5}"#.to_string(), "strength"),
            (
                format!(r#"{{"prompt":"a","init_image":"{b64}","strength":1.5}}"#),
                "strength",
            ),
            (
                r#"{"prompt":"a","init_image":"not base64!"}"#.to_string(),
                "init_image",
            ),
            (
                r#"{"prompt":"a","init_image":"aGVsbG8="}"#.to_string(),
                "init_image",
            ),
            (
                r#"{"prompt":"a","vae_tiling":"sometimes"}"#.to_string(),
                "vae_tiling",
            ),
        ] {
            let e = parse_native(body.as_bytes(), &l, &model(), 0).unwrap_err();
            assert_eq!(
                (e.status.as_u16(), e.param.as_deref()),
                (422, Some(param)),
                "{body}: {}",
                e.message
            );
        }
    }

    #[test]
    fn library_errors_do_not_leak_paths() {
        let e = ApiError::from_error(&Error::runtime("cannot load /secret/path/model.onnx"));
        assert_eq!(e.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!e.message.contains("/secret"));
    }
}
