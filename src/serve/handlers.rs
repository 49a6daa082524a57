//! The endpoint handlers: health and readiness, the model list, metrics, and the two generation endpoints (the
//! OpenAI-compatible one and the native one), which parse with [`super::api`], queue on [`super::scheduler`] and
//! encode the PNGs.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde_json::json;

use super::scheduler::Refused;
use super::{api, unavailable, ApiError, App, ModelInfo};
use crate::image_out::{self, GenerationParams};
use crate::json::ms;
use crate::pipeline::{Output, Request};
use crate::Error;

pub(super) async fn index() -> Json<serde_json::Value> {
    Json(json!({
        "service": "fluxrt",
        "version": env!("CARGO_PKG_VERSION"),
        "endpoints": {
            "POST /v1/images/generations": "OpenAI Images API (b64_json; png, jpeg or webp)",
            "POST /v1/generate": "native generation: JSON, or one PNG with Accept: image/png",
            "GET /v1/models": "the loaded model",
            "GET /health": "alive",
            "GET /ready": "model loaded and warmed up",
            "GET /v1/health/live": "alive (as /health)",
            "GET /v1/health/ready": "ready (as /ready)",
            "GET /metrics": "Prometheus metrics",
        }
    }))
}

pub(super) async fn health() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

pub(super) async fn ready(State(app): State<Arc<App>>) -> Response {
    let cfg = &app.config;
    let status = if app.shutting_down.load(Ordering::SeqCst) {
        "shutting_down"
    } else if app.ready.load(Ordering::SeqCst) {
        "ready"
    } else {
        "loading"
    };
    let body = json!({
        "status": status,
        "model": app.model.get().map(|m| m.name.clone()),
        "variant": app.model.get().map(|m| m.variant.name()),
        "providers": app.model.get().map(|m| m.providers.clone()),
        "graph_providers": app.graph_providers.get(),
        "workers": cfg.workers,
        "workers_ready": app.workers_ready.load(Ordering::SeqCst),
        "max_batch": cfg.max_batch,
        "max_queue": cfg.max_queue,
        "queue_depth": app.sched.queue_depth(),
        "loras": app.loras.get().map(|c| c.describe()),
    });
    let code = if status == "ready" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

pub(super) async fn models(State(app): State<Arc<App>>) -> Response {
    let Some(m) = app.model.get() else {
        return unavailable("the model is still loading", 2).into_response();
    };
    Json(json!({
        "object": "list",
        "data": [{
            "id": m.name,
            "object": "model",
            "created": 0,
            "owned_by": "fluxrt",
            "variant": m.variant.name(),
            "default_size": format!("{}x{}", m.width, m.height),
            "default_steps": m.steps,
            "providers": m.providers,
            "loras": app.loras.get().map(|c| c.describe()).unwrap_or_default(),
        }]
    }))
    .into_response()
}

pub(super) async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    let text = app.metrics.render(&app.gauges());
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static(super::metrics::CONTENT_TYPE),
        )],
        text,
    )
        .into_response()
}

/// Reads the whole body: 413 past the size cap (at once when Content-Length says so), 408 when it does not
/// arrive within the body timeout, 400 when the connection breaks.
async fn read_body(
    app: &App,
    headers: &HeaderMap,
    body: Body,
) -> std::result::Result<Vec<u8>, ApiError> {
    let limit = app.config.max_body_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body is larger than {limit} bytes (the server's --max-body)"),
        )
        .code("body_too_large")
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(too_large());
        }
    }
    match tokio::time::timeout(app.config.body_timeout, axum::body::to_bytes(body, limit)).await {
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            format!(
                "the request body did not arrive within {}s",
                app.config.body_timeout.as_secs_f64()
            ),
        )
        .code("body_timeout")),
        Ok(Ok(b)) => Ok(b.to_vec()),
        Ok(Err(e)) => {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(s) = source {
                if s.is::<http_body_util::LengthLimitError>() {
                    return Err(too_large());
                }
                source = s.source();
            }
            Err(
                ApiError::bad_request("the request body could not be read to its end")
                    .code("body_incomplete"),
            )
        }
    }
}

fn random_seed() -> u64 {
    let mut b = [0u8; 4];
    if getrandom::fill(&mut b).is_err() {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        return t.subsec_nanos() as u64;
    }
    u32::from_le_bytes(b) as u64
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// A finished generation: the run's output and how it went.
struct Done {
    output: Output,
    queue_wait: Duration,
    batch_requests: usize,
    batch_images: usize,
    /// The images, encoded as asked (PNG unless the OpenAI endpoint's output_format says otherwise).
    files: Vec<Vec<u8>>,
    png_time: Duration,
}

/// Queues `req`, waits for its run (up to the request timeout) and encodes the images as `encoding` off the async
/// threads.
async fn generate(
    app: &Arc<App>,
    model: &ModelInfo,
    req: Request,
    encoding: image_out::Encoding,
) -> std::result::Result<Done, ApiError> {
    let (mut ticket, rx) = app.sched.submit(req.clone()).map_err(|r| match r {
        Refused::Full { retry_after } => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            format!(
                "the queue is full ({} requests waiting); retry after {retry_after}s",
                app.config.max_queue
            ),
        )
        .code("queue_full")
        .retry_after(retry_after),
        Refused::Closing => unavailable("the server is shutting down", 5),
    })?;
    let res = match tokio::time::timeout(app.config.request_timeout, rx).await {
        Err(_) => {
            ticket.timed_out = true;
            drop(ticket);
            app.metrics.timeout();
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "server_error",
                format!(
                    "the request did not finish within the server's {}s timeout",
                    app.config.request_timeout.as_secs_f64()
                ),
            )
            .code("timeout"));
        }
        Ok(Err(_)) => return Err(unavailable("the server is shutting down", 5)),
        Ok(Ok(r)) => r,
    };
    drop(ticket);
    let output = res.result.map_err(|e| ApiError::from_error(&e))?;
    let params =
        GenerationParams::of_request(&req, req.guidance, &model.name, model.providers.join(","));
    let metrics = app.metrics.clone();
    let encoded = tokio::task::spawn_blocking(move || {
        let t0 = Instant::now();
        let mut files = Vec::with_capacity(output.images.len());
        for img in &output.images {
            let t = Instant::now();
            let p = GenerationParams {
                seed: img.seed,
                ..params.clone()
            };
            files.push(image_out::encode(
                &img.rgb,
                encoding,
                &image_out::a1111_parameters(&p),
            )?);
            metrics.stage("png_encode", t.elapsed());
        }
        Ok::<_, Error>((output, files, t0.elapsed()))
    })
    .await
    .map_err(|_| ApiError::from_error(&Error::runtime("image encoding panicked")))?;
    let (output, files, png_time) = encoded.map_err(|e| ApiError::from_error(&e))?;
    Ok(Done {
        output,
        queue_wait: res.queue_wait,
        batch_requests: res.batch_requests,
        batch_images: res.batch_images,
        files,
        png_time,
    })
}

pub(super) async fn openai_generate(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match openai_inner(&app, &headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn openai_inner(
    app: &Arc<App>,
    headers: &HeaderMap,
    body: Body,
) -> std::result::Result<Response, ApiError> {
    let model = app.serving_model()?.clone();
    let bytes = read_body(app, headers, body).await?;
    let (parsed, out) = api::parse_openai(&bytes, &app.config.limits, &model, random_seed())?;
    let size = format!("{}x{}", parsed.request.width, parsed.request.height);
    let done = generate(app, &model, parsed.request, out.encoding).await?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let data: Vec<_> = done
        .output
        .images
        .iter()
        .zip(&done.files)
        .map(|(img, file)| json!({"b64_json": b64.encode(file), "seed": img.seed}))
        .collect();
    // The echo fields of OpenAI's ImagesResponse (no `usage`: FLUX's text encoders are not billed by token).
    Ok(Json(json!({
        "created": unix_now(),
        "data": data,
        "background": "opaque",
        "output_format": out.encoding.name(),
        "quality": out.quality,
        "size": size,
    }))
    .into_response())
}

pub(super) async fn native_generate(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match native_inner(&app, &headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// Whether the client asked for a PNG rather than JSON.
fn wants_png(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("image/png"))
}

async fn native_inner(
    app: &Arc<App>,
    headers: &HeaderMap,
    body: Body,
) -> std::result::Result<Response, ApiError> {
    let arrived = Instant::now();
    let model = app.serving_model()?.clone();
    let bytes = read_body(app, headers, body).await?;
    let empty = api::LoraCatalog::default();
    let loras = app.loras.get().unwrap_or(&empty);
    let parsed = api::parse_native_with(&bytes, &app.config.limits, &model, random_seed(), loras)?;
    let png = wants_png(headers);
    if png && parsed.request.num_images != 1 {
        return Err(ApiError::bad_request(
            "Accept: image/png returns one image; ask for num_images 1, or accept application/json",
        )
        .param("num_images"));
    }
    let req = parsed.request.clone();
    let mut done = generate(app, &model, parsed.request, image_out::Encoding::Png).await?;
    let mut warnings = parsed.warnings;
    warnings.append(&mut done.output.warnings);
    if png {
        let seed = done.output.images[0].seed;
        let mut resp = done.files.swap_remove(0).into_response();
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/png"));
        h.insert("x-fluxrt-seed", HeaderValue::from(seed));
        if let Ok(v) = HeaderValue::from_str(&warnings.join("; ")) {
            if !warnings.is_empty() {
                h.insert("x-fluxrt-warnings", v);
            }
        }
        return Ok(resp);
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let t = &done.output.timings;
    let seeds: Vec<u64> = done.output.images.iter().map(|i| i.seed).collect();
    Ok(Json(json!({
        "created": unix_now(),
        "model": model.name,
        "images": done.output.images.iter().zip(&done.files).map(|(img, png)| json!({
            "seed": img.seed,
            "png_base64": b64.encode(png),
        })).collect::<Vec<_>>(),
        "seeds": seeds,
        "prompt": req.prompt,
        "prompt_2": req.prompt_2,
        "width": req.width,
        "height": req.height,
        "steps": req.steps,
        "guidance": crate::json::opt_f32_number(req.guidance),
        "loras": req.loras.iter().map(|c| json!({
            "name": loras.name_of(&c.lora),
            "scale": crate::json::f32_number(c.scale),
        })).collect::<Vec<_>>(),
        "providers": model.providers,
        "batch": {"requests": done.batch_requests, "images": done.batch_images},
        "warnings": warnings,
        "timings_ms": {
            "queue_wait": ms(done.queue_wait),
            "tokenize": ms(t.tokenize),
            "clip": ms(t.clip),
            "t5": ms(t.t5),
            "denoise_steps": t.denoise.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
            "denoise": ms(t.denoise.iter().sum()),
            "vae_decode": ms(t.vae_decode),
            "to_rgb": ms(t.to_rgb),
            "generate_total": ms(t.total),
            "in_onnxruntime": ms(t.in_ort),
            "png_encode": ms(done.png_time),
            "request_total": ms(arrived.elapsed()),
        },
    }))
    .into_response())
}
