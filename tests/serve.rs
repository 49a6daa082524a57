//! `fluxrt serve` end to end, over loopback only, on the bundled tiny model: servers start in-process on
//! port 0 (and once as the real binary, for the signal path). Every client has read and write timeouts, so
//! a hang fails the test instead of stalling it.

mod common;

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{Arc, Barrier, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::http::*;
use common::{model, TestServer};
use fluxrt::image_out;
use fluxrt::pipeline::{LoadOptions, Pipeline, Quiet, Request};
use fluxrt::runtime::Canceller;
use fluxrt::serve::{self, Config};
use serde_json::{json, Value};

// ------------------------------------------------------------------------------------------------------
// A server on its own runtime thread, and a raw HTTP/1.1 client
// ------------------------------------------------------------------------------------------------------

fn config() -> Config {
    let mut c = Config::new(model("tiny-flux-schnell"));
    c.load.threads = Some(1);
    c.limits.max_pixels = 1024 * 1024;
    c.max_body_bytes = 1024 * 1024; // the body tests send 10 MB
    c
}

/// One server for the tests that need no special settings (started once, left to the process exit).
fn shared() -> SocketAddr {
    static SHARED: OnceLock<SocketAddr> = OnceLock::new();
    *SHARED.get_or_init(|| {
        let mut c = config();
        c.body_timeout = Duration::from_secs(1);
        let s = TestServer::start(c);
        let addr = s.addr;
        std::mem::forget(s);
        addr
    })
}

fn decode_png(bytes: &[u8]) -> image::RgbImage {
    image::load_from_memory_with_format(bytes, image::ImageFormat::Png)
        .expect("a PNG")
        .to_rgb8()
}

fn b64(s: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(s.as_str().expect("a base64 string"))
        .expect("valid base64")
}

/// The images `fluxrt generate` makes for these settings, through the library as the CLI calls it.
fn library_images(req: &Request) -> Vec<image::RgbImage> {
    static PIPE: OnceLock<std::sync::Mutex<Pipeline>> = OnceLock::new();
    let pipe = PIPE.get_or_init(|| {
        let mut o = LoadOptions::new(model("tiny-flux-schnell"));
        o.threads = Some(1);
        std::sync::Mutex::new(Pipeline::load(&o).unwrap())
    });
    let mut pipe = pipe.lock().unwrap();
    pipe.generate(req, &mut Quiet, &Canceller::new(), false)
        .unwrap()
        .images
        .into_iter()
        .map(|i| i.rgb)
        .collect()
}

fn req(prompt: &str, w: u32, h: u32, steps: usize, seed: u64, n: usize) -> Request {
    Request {
        prompt: prompt.into(),
        prompt_2: None,
        width: w,
        height: h,
        steps,
        guidance: None,
        seed,
        num_images: n,
        max_pixels: u64::MAX,
        ..Default::default()
    }
}

// ------------------------------------------------------------------------------------------------------
// Tests
// ------------------------------------------------------------------------------------------------------

#[test]
fn both_endpoints_return_the_images_fluxrt_generate_makes() {
    let addr = shared();
    // OpenAI Images API: two images, seeds 7 and 8.
    let r = post(
        addr,
        "/v1/images/generations",
        &json!({"prompt": "a red fox", "size": "64x48", "n": 2, "seed": 7, "model": "dall-e-3"}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    let expected = library_images(&req("a red fox", 64, 48, 4, 7, 2));
    for (i, (d, want)) in data.iter().zip(&expected).enumerate() {
        let png = b64(&d["b64_json"]);
        assert_eq!(&decode_png(&png), want, "openai image {i}");
        assert_eq!(d["seed"], 7 + i as u64);
        let params = image_out::read_png_parameters(&png).unwrap();
        assert!(
            params.starts_with("a red fox\nSteps: 4, Sampler: Euler (flow match), Seed: "),
            "{params}"
        );
        assert!(
            params.contains(&format!(
                "Seed: {}, Size: 64x48, Model: tiny-flux-schnell, Provider: cpu",
                7 + i
            )),
            "{params}"
        );
    }

    // Native JSON: every option, timings and seeds.
    let r = post(
        addr,
        "/v1/generate",
        &json!({"prompt": "a red fox", "prompt_2": "a fox in deep snow", "width": 48, "height": 64,
                "steps": 3, "seed": 11, "num_images": 1}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    let mut want = req("a red fox", 48, 64, 3, 11, 1);
    want.prompt_2 = Some("a fox in deep snow".into());
    let png = b64(&v["images"][0]["png_base64"]);
    assert_eq!(decode_png(&png), library_images(&want)[0]);
    assert_eq!(v["seeds"], json!([11]));
    assert_eq!(
        v["timings_ms"]["denoise_steps"].as_array().unwrap().len(),
        3
    );
    for k in [
        "queue_wait",
        "tokenize",
        "clip",
        "t5",
        "vae_decode",
        "generate_total",
        "png_encode",
        "request_total",
    ] {
        assert!(v["timings_ms"][k].as_f64().is_some(), "timings_ms.{k}");
    }
    assert!(image_out::read_png_parameters(&png)
        .unwrap()
        .contains("Prompt 2: a fox in deep snow"));

    // Native PNG; a guidance for schnell is ignored with a warning, as the CLI does.
    let r = request(
        addr,
        "POST",
        "/v1/generate",
        &[("Accept", "image/png")],
        json!({"prompt": "a small boat", "width": 64, "height": 64, "seed": 3, "guidance": 5})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("image/png"));
    assert_eq!(r.header("x-fluxrt-seed"), Some("3"));
    assert!(r
        .header("x-fluxrt-warnings")
        .unwrap()
        .contains("guidance is ignored"));
    assert_eq!(
        decode_png(&r.body),
        library_images(&req("a small boat", 64, 64, 4, 3, 1))[0]
    );

    // The same prompt again comes from the embedding cache, with the same pixels.
    let r = request(
        addr,
        "POST",
        "/v1/generate",
        &[("Accept", "image/png")],
        json!({"prompt": "a small boat", "width": 64, "height": 64, "seed": 3})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(
        decode_png(&r.body),
        library_images(&req("a small boat", 64, 64, 4, 3, 1))[0]
    );
    assert!(sample(&metrics(addr), "fluxrt_embedding_cache_hits_total") >= 1.0);
}

#[test]
fn health_ready_models_and_metrics_describe_the_server() {
    let addr = shared();
    let r = get(addr, "/health");
    assert_eq!((r.status, r.json()["status"].clone()), (200, json!("ok")));
    // The probe paths serving platforms expect answer as fluxrt's own.
    assert_eq!(get(addr, "/v1/health/live").json(), r.json());
    assert_eq!(get(addr, "/v1/health/ready").json()["status"], "ready");
    let v = get(addr, "/ready").json();
    assert_eq!(v["status"], "ready");
    assert_eq!(v["model"], "tiny-flux-schnell");
    assert_eq!(v["providers"], json!(["cpu"]));
    let v = get(addr, "/v1/models").json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "tiny-flux-schnell");
    let r = get(addr, "/metrics");
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    let text = String::from_utf8(r.body).unwrap();
    for name in [
        "fluxrt_http_requests_total",
        "fluxrt_queue_depth",
        "fluxrt_running_requests",
        "fluxrt_stage_duration_seconds",
        "fluxrt_images_generated_total",
        "fluxrt_batch_requests",
        "fluxrt_ready 1",
    ] {
        assert!(text.contains(name), "metrics lack {name}");
    }
    let r = get(addr, "/no/such/thing");
    assert_eq!(r.status, 404);
    assert!(r.json()["error"]["message"].is_string());
    let r = request(addr, "DELETE", "/v1/generate", &[], b"");
    assert_eq!(r.status, 405);
    assert!(r.json()["error"]["type"].is_string());
}

#[test]
fn openai_output_formats_and_echo_fields() {
    let addr = shared();
    let base = json!({"prompt": "a lighthouse", "size": "64x48", "steps": 2, "seed": 4,
        "quality": "hd", "style": "vivid", "moderation": "low", "background": "opaque", "user": "u"});
    let png = {
        let v = post(addr, "/v1/images/generations", &base).json();
        assert_eq!(
            (
                &v["output_format"],
                &v["quality"],
                &v["size"],
                &v["background"]
            ),
            (
                &json!("png"),
                &json!("hd"),
                &json!("64x48"),
                &json!("opaque")
            )
        );
        assert!(v["created"].is_u64());
        decode_png(&b64(&v["data"][0]["b64_json"]))
    };
    let mut webp = base.clone();
    webp["output_format"] = json!("webp");
    let v = post(addr, "/v1/images/generations", &webp).json();
    assert_eq!(v["output_format"], "webp");
    let got = image::load_from_memory_with_format(
        &b64(&v["data"][0]["b64_json"]),
        image::ImageFormat::WebP,
    )
    .unwrap()
    .to_rgb8();
    assert_eq!(got, png, "lossless WebP: the PNG's pixels");
    let mut sizes = Vec::new();
    for q in [90, 10] {
        let mut jpeg = base.clone();
        jpeg["output_format"] = json!("jpeg");
        jpeg["output_compression"] = json!(q);
        let v = post(addr, "/v1/images/generations", &jpeg).json();
        let bytes = b64(&v["data"][0]["b64_json"]);
        let img = image::load_from_memory_with_format(&bytes, image::ImageFormat::Jpeg)
            .unwrap()
            .to_rgb8();
        assert_eq!(img.dimensions(), (64, 48));
        sizes.push(bytes.len());
    }
    assert!(
        sizes[1] < sizes[0],
        "output_compression is the JPEG quality: {sizes:?}"
    );
    for (field, value, code) in [
        ("background", "transparent", "unsupported_background"),
        ("output_format", "gif", "unsupported_output_format"),
        ("stream", "true", "unsupported_stream"),
    ] {
        let mut body = base.clone();
        body[field] = serde_json::from_str(value).unwrap_or(json!(value));
        let r = post(addr, "/v1/images/generations", &body);
        assert_eq!(
            (r.status, r.json()["error"]["code"].clone()),
            (400, json!(code)),
            "{field}"
        );
        assert_eq!(r.json()["error"]["param"], field);
    }
}

#[test]
fn bad_requests_get_the_right_4xx_quickly_and_the_server_keeps_serving() {
    let addr = shared();
    let big = "9".repeat(30);
    let cases: Vec<(&str, String, u16, Option<&str>)> = vec![
        (
            "/v1/images/generations",
            r#"{"prompt": "a cat","#.into(),
            400,
            None,
        ),
        ("/v1/images/generations", "hello".into(), 400, None),
        ("/v1/images/generations", "".into(), 400, None),
        (
            "/v1/images/generations",
            r#"{"prompt": "a"} {"#.into(),
            400,
            None,
        ),
        ("/v1/images/generations", "[1, 2]".into(), 422, None),
        (
            "/v1/images/generations",
            r#"{"prompt": 5}"#.into(),
            422,
            Some("prompt"),
        ),
        (
            "/v1/images/generations",
            r#"{"prompt": "a", "n": "2"}"#.into(),
            422,
            Some("n"),
        ),
        (
            "/v1/images/generations",
            r#"{"prompt": "a", "n": 0}"#.into(),
            422,
            Some("n"),
        ),
        (
            "/v1/images/generations",
            r#"{"prompt": "a", "n": 1000}"#.into(),
            422,
            Some("n"),
        ),
        (
            "/v1/images/generations",
            r#"{"prompt": "a", "n": -1}"#.into(),
            422,
            Some("n"),
        ),
        (
            "/v1/images/generations",
            r#"{"prompt": "a", "colour": "red"}"#.into(),
            400,
            Some("colour"),
        ),
        (
            "/v1/images/generations",
            r#"{"n": 1}"#.into(),
            422,
            Some("prompt"),
        ),
        (
            "/v1/images/generations",
            r#"{"prompt": "a", "size": "-64x64"}"#.into(),
            422,
            Some("size"),
        ),
        (
            "/v1/images/generations",
            r#"{"prompt": "a", "size": "100000x100000"}"#.into(),
            422,
            Some("size"),
        ),
        (
            "/v1/images/generations",
            r#"{"prompt": "a", "size": "65x64"}"#.into(),
            422,
            Some("size"),
        ),
        (
            "/v1/images/generations",
            r#"{"prompt": "a", "size": "big"}"#.into(),
            422,
            Some("size"),
        ),
        (
            "/v1/images/generations",
            r#"{"prompt": "a", "response_format": "url"}"#.into(),
            400,
            Some("response_format"),
        ),
        (
            "/v1/generate",
            r#"{"prompt": "a", "width": -64}"#.into(),
            422,
            Some("width"),
        ),
        (
            "/v1/generate",
            format!(r#"{{"prompt": "a", "width": {big}}}"#),
            422,
            Some("width"),
        ),
        (
            "/v1/generate",
            r#"{"prompt": "a", "height": 4294967295}"#.into(),
            422,
            Some("height"),
        ),
        (
            "/v1/generate",
            r#"{"prompt": "a", "width": 4096, "height": 4096}"#.into(),
            422,
            Some("width"),
        ),
        (
            "/v1/generate",
            r#"{"prompt": "a", "width": 0}"#.into(),
            422,
            Some("width"),
        ),
        (
            "/v1/generate",
            r#"{"prompt": "a", "steps": 0}"#.into(),
            422,
            Some("steps"),
        ),
        (
            "/v1/generate",
            r#"{"prompt": "a", "steps": 100000}"#.into(),
            422,
            Some("steps"),
        ),
        (
            "/v1/generate",
            r#"{"prompt": "a", "steps": 2.5}"#.into(),
            422,
            Some("steps"),
        ),
        (
            "/v1/generate",
            r#"{"prompt": "a", "num_images": 0}"#.into(),
            422,
            Some("num_images"),
        ),
        (
            "/v1/generate",
            r#"{"prompt": "a", "num_images": 1000}"#.into(),
            422,
            Some("num_images"),
        ),
        (
            "/v1/generate",
            r#"{"prompt": "a", "seed": "x"}"#.into(),
            422,
            Some("seed"),
        ),
        (
            "/v1/generate",
            r#"{"prompt": "a", "sampler": "euler"}"#.into(),
            400,
            Some("sampler"),
        ),
        (
            "/v1/generate",
            r#"{"prompt": "a", "strength": 0.5}"#.into(),
            422,
            Some("strength"),
        ),
        (
            "/v1/generate",
            r#"{"prompt": "a", "guidance": -1}"#.into(),
            422,
            Some("guidance"),
        ),
    ];
    for (path, body, status, param) in &cases {
        let t0 = Instant::now();
        let r = request(
            addr,
            "POST",
            path,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        );
        assert!(t0.elapsed() < Duration::from_secs(3), "{path} {body}: slow");
        assert_eq!(
            r.status,
            *status,
            "{path} {body}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let v = r.json();
        let e = &v["error"];
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
        assert_eq!(e["type"], "invalid_request_error");
        if let Some(p) = param {
            assert_eq!(e["param"], *p, "{path} {body}: {v}");
        }
        let text = v.to_string();
        assert!(
            !text.contains(env!("CARGO_MANIFEST_DIR")) && !text.contains("panicked"),
            "{text}"
        );
    }
    // A PNG holds one image.
    let r = request(
        addr,
        "POST",
        "/v1/generate",
        &[("Accept", "image/png")],
        br#"{"prompt": "a", "num_images": 2, "width": 64, "height": 64}"#,
    );
    assert_eq!(
        (r.status, r.json()["error"]["param"].clone()),
        (400, json!("num_images"))
    );

    // A 10 MB body announced by Content-Length: 413 at once, before the body is read.
    let t0 = Instant::now();
    let mut s = connect(addr);
    s.write_all(request_head("POST", "/v1/generate", &[], Some(10 << 20)).as_bytes())
        .unwrap();
    let r = read_response(&mut s).unwrap();
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"]["code"], "body_too_large");
    assert!(t0.elapsed() < Duration::from_secs(3));

    // A 10 MB chunked body: 413 once 1 MB has arrived, or the connection is closed on the writer.
    let t0 = Instant::now();
    let mut s = connect(addr);
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let head = "POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n";
        w.write_all(head.as_bytes())?;
        let chunk = vec![b' '; 64 * 1024];
        for _ in 0..160 {
            w.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())?;
            w.write_all(&chunk)?;
            w.write_all(b"\r\n")?;
        }
        w.write_all(b"0\r\n\r\n")
    });
    match read_response(&mut s) {
        Ok(r) => assert_eq!(r.status, 413),
        Err(e) => eprintln!("chunked 10 MB body: connection closed ({e})"),
    }
    let _ = writer.join();
    assert!(t0.elapsed() < Duration::from_secs(10));

    // A body that stops half-way and waits: 408 after the body timeout (1 s here).
    let t0 = Instant::now();
    let mut s = connect(addr);
    s.write_all(request_head("POST", "/v1/generate", &[], Some(100)).as_bytes())
        .unwrap();
    s.write_all(br#"{"prompt": "a cat", "#).unwrap();
    let r = read_response(&mut s).unwrap();
    assert_eq!(r.status, 408);
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());

    // A body that stops half-way and closes: a 400 or a plain close, at once.
    let t0 = Instant::now();
    let mut s = connect(addr);
    s.write_all(request_head("POST", "/v1/images/generations", &[], Some(100)).as_bytes())
        .unwrap();
    s.write_all(br#"{"prompt": "#).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    match read_response(&mut s) {
        Ok(r) => assert_eq!(r.status, 400),
        Err(e) => eprintln!("half body then close: connection closed ({e})"),
    }
    assert!(t0.elapsed() < Duration::from_secs(3));

    // Still serving.
    let r = post(
        addr,
        "/v1/images/generations",
        &json!({"prompt": "still here", "size": "64x64"}),
    );
    assert_eq!(r.status, 200);
    assert_eq!(get(addr, "/ready").status, 200);
}

#[test]
fn sixty_four_concurrent_requests_against_a_queue_of_eight() {
    let mut c = config();
    c.max_queue = 8;
    c.max_batch = 4;
    let server = TestServer::start(c);
    let addr = server.addr;
    let clients = 64;
    let barrier = Arc::new(Barrier::new(clients));
    let t0 = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|i| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let (path, body) = if i % 2 == 0 {
                    ("/v1/images/generations", json!({"prompt": format!("client {i}"), "size": "64x64", "steps": 2, "seed": i}))
                } else {
                    ("/v1/generate", json!({"prompt": format!("client {i}"), "width": 64, "height": 64, "steps": 2, "seed": i}))
                };
                let mut s = connect(addr);
                let bytes = body.to_string();
                let head = request_head("POST", path, &[], Some(bytes.len()));
                barrier.wait();
                s.write_all(head.as_bytes()).unwrap();
                s.write_all(bytes.as_bytes()).unwrap();
                (i, read_response(&mut s).expect("every client gets an answer"))
            })
        })
        .collect();
    let (mut ok, mut busy) = (0u64, 0u64);
    for h in handles {
        let (i, r) = h.join().expect("no client hangs or panics");
        match r.status {
            200 => {
                let v = r.json();
                let png = if i % 2 == 0 {
                    b64(&v["data"][0]["b64_json"])
                } else {
                    b64(&v["images"][0]["png_base64"])
                };
                assert_eq!(decode_png(&png).dimensions(), (64, 64));
                ok += 1;
            }
            429 => {
                let secs: u64 = r
                    .header("retry-after")
                    .expect("Retry-After")
                    .parse()
                    .unwrap();
                assert!(secs >= 1);
                assert_eq!(r.json()["error"]["code"], "queue_full");
                busy += 1;
            }
            s => panic!(
                "client {i}: unexpected status {s}: {}",
                String::from_utf8_lossy(&r.body)
            ),
        }
    }
    eprintln!(
        "64 clients: {ok} images, {busy} x 429 in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(ok + busy, clients as u64);
    assert!(ok >= 8, "at least the queue of 8 is served: {ok}");
    assert!(busy > 0, "a queue of 8 cannot take 64 at once");
    assert_eq!(get(addr, "/ready").status, 200);
    let text = metrics(addr);
    let a = requests_by_status(&text, "/v1/images/generations");
    let b = requests_by_status(&text, "/v1/generate");
    let count = |s: u16| a.get(&s).unwrap_or(&0) + b.get(&s).unwrap_or(&0);
    assert_eq!(
        a.values().sum::<u64>() + b.values().sum::<u64>(),
        clients as u64,
        "{text}"
    );
    assert_eq!((count(200), count(429)), (ok, busy));
    assert_eq!(sample(&text, "fluxrt_images_generated_total"), ok as f64);
    assert_eq!(sample(&text, "fluxrt_batch_requests_sum"), ok as f64);
    let runs = sample(&text, "fluxrt_batch_requests_count");
    assert!(
        runs < ok as f64,
        "waiting requests were batched: {runs} runs for {ok}"
    );
    assert_eq!(sample(&text, "fluxrt_queue_depth"), 0.0);
    assert_eq!(sample(&text, "fluxrt_running_requests"), 0.0);
    let (r, took) = server.shutdown();
    r.unwrap();
    assert!(took < Duration::from_secs(10));
}

#[test]
fn batched_requests_give_the_same_pixels_as_single_runs() {
    let mut c = config();
    c.max_batch = 4;
    let server = TestServer::start(c);
    let addr = server.addr;
    // Keep the worker busy so that the next requests wait together in the queue.
    let blocker = std::thread::spawn(move || {
        post(
            addr,
            "/v1/generate",
            &json!({"prompt": "blocker", "width": 512, "height": 512, "steps": 12}),
        )
    });
    wait_for("the blocker to run", Duration::from_secs(30), || {
        sample(&metrics(addr), "fluxrt_running_requests") == 1.0
    });
    let bodies = [
        json!({"prompt": "a lighthouse", "width": 64, "height": 48, "seed": 21, "num_images": 2}),
        json!({"prompt": "ein Boot", "width": 64, "height": 48, "seed": 99}),
        json!({"prompt": "a lighthouse", "width": 64, "height": 48, "seed": 5}),
        json!({"prompt": "other size", "width": 48, "height": 48, "seed": 1}),
    ];
    let handles: Vec<_> = bodies
        .iter()
        .cloned()
        .map(|b| std::thread::spawn(move || post(addr, "/v1/generate", &b)))
        .collect();
    wait_for("four queued requests", Duration::from_secs(30), || {
        sample(&metrics(addr), "fluxrt_queue_depth") == 4.0
    });
    assert_eq!(blocker.join().unwrap().status, 200);
    for (body, h) in bodies.iter().zip(handles) {
        let r = h.join().unwrap();
        assert_eq!(r.status, 200);
        let v = r.json();
        let compatible = body["width"] == 64;
        assert_eq!(
            v["batch"]["requests"],
            if compatible { 3 } else { 1 },
            "{body}: {v}"
        );
        let want = req(
            body["prompt"].as_str().unwrap(),
            body["width"].as_u64().unwrap() as u32,
            body["height"].as_u64().unwrap() as u32,
            4,
            body["seed"].as_u64().unwrap(),
            body["num_images"].as_u64().unwrap_or(1) as usize,
        );
        let images = v["images"].as_array().unwrap();
        for (img, expected) in images.iter().zip(library_images(&want)) {
            assert_eq!(decode_png(&b64(&img["png_base64"])), expected, "{body}");
        }
    }
    server.shutdown().0.unwrap();
}

/// Starts a long run on a raw connection and returns the connection once the run is going.
fn start_long_run(addr: SocketAddr) -> TcpStream {
    let body =
        json!({"prompt": "a long run", "width": 1024, "height": 1024, "steps": 50}).to_string();
    let mut s = connect(addr);
    s.write_all(request_head("POST", "/v1/generate", &[], Some(body.len())).as_bytes())
        .unwrap();
    s.write_all(body.as_bytes()).unwrap();
    wait_for("the long run to start", Duration::from_secs(30), || {
        sample(&metrics(addr), "fluxrt_running_requests") == 1.0
    });
    s
}

#[test]
fn a_client_that_drops_mid_run_frees_its_worker_promptly() {
    let mut c = config();
    c.max_batch = 1;
    let server = TestServer::start(c);
    let addr = server.addr;
    let s = start_long_run(addr);
    std::thread::sleep(Duration::from_millis(300));
    drop(s);
    let t0 = Instant::now();
    let r = post(
        addr,
        "/v1/images/generations",
        &json!({"prompt": "next", "size": "64x64", "steps": 1}),
    );
    let took = t0.elapsed();
    assert_eq!(r.status, 200);
    eprintln!(
        "request after a dropped 1024x1024x50 run answered in {:.2}s",
        took.as_secs_f64()
    );
    // The abandoned run alone takes far longer than this (tens of seconds in a debug build).
    assert!(
        took < Duration::from_secs(5),
        "the worker was not freed: {took:?}"
    );
    let text = metrics(addr);
    assert_eq!(
        sample(&text, "fluxrt_runs_total{outcome=\"cancelled\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(
        sample(&text, "fluxrt_client_disconnects_total{state=\"running\"}"),
        1.0
    );
    assert_eq!(
        requests_by_status(&text, "/v1/generate").get(&499),
        Some(&1)
    );
    server.shutdown().0.unwrap();
}

#[test]
fn a_request_past_its_timeout_gets_504_and_its_run_is_cancelled() {
    let mut c = config();
    c.request_timeout = Duration::from_secs(1);
    let server = TestServer::start(c);
    let addr = server.addr;
    let t0 = Instant::now();
    let r = post(
        addr,
        "/v1/generate",
        &json!({"prompt": "too slow", "width": 1024, "height": 1024, "steps": 50}),
    );
    assert_eq!(r.status, 504);
    assert_eq!(r.json()["error"]["code"], "timeout");
    assert!(t0.elapsed() < Duration::from_secs(3));
    let t0 = Instant::now();
    let r = post(
        addr,
        "/v1/images/generations",
        &json!({"prompt": "quick", "size": "64x64", "steps": 1}),
    );
    assert_eq!(r.status, 200);
    assert!(t0.elapsed() < Duration::from_secs(5));
    let text = metrics(addr);
    assert_eq!(sample(&text, "fluxrt_request_timeouts_total"), 1.0);
    assert_eq!(
        sample(&text, "fluxrt_runs_total{outcome=\"cancelled\"}"),
        1.0
    );
    server.shutdown().0.unwrap();
}

#[test]
fn shutdown_finishes_in_flight_requests_then_stops() {
    let server = TestServer::start(config());
    let addr = server.addr;
    let body = json!({"prompt": "finish me", "width": 512, "height": 512, "steps": 10});
    let in_flight = std::thread::spawn(move || post(addr, "/v1/generate", &body));
    wait_for("the run to start", Duration::from_secs(30), || {
        sample(&metrics(addr), "fluxrt_running_requests") == 1.0
    });
    let (r, took) = server.shutdown();
    r.unwrap();
    let resp = in_flight.join().unwrap();
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    assert!(took < Duration::from_secs(30));
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(),
        "still accepting"
    );
}

#[test]
fn draining_answers_503_while_the_port_stays_open_and_in_flight_work_finishes() {
    let mut c = config();
    c.drain_delay = Duration::from_secs(3);
    let mut server = TestServer::start(c);
    let addr = server.addr;
    let body = json!({"prompt": "finish me", "width": 256, "height": 256, "steps": 6});
    let in_flight = std::thread::spawn(move || post(addr, "/v1/generate", &body));
    wait_for("the run to start", Duration::from_secs(30), || {
        sample(&metrics(addr), "fluxrt_running_requests") == 1.0
    });
    let t0 = Instant::now();
    server.signal_shutdown();
    wait_for("readiness to turn 503", Duration::from_secs(5), || {
        get(addr, "/ready").status == 503
    });
    // Still accepting during the drain: a load balancer sees 503 (retry elsewhere), not a refused connection.
    let r = post(
        addr,
        "/v1/images/generations",
        &json!({"prompt": "late", "size": "64x64", "steps": 1}),
    );
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.header("retry-after").is_some());
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "checked within the drain"
    );
    assert_eq!(sample(&metrics(addr), "fluxrt_ready"), 0.0);
    let resp = in_flight.join().unwrap();
    assert_eq!(resp.status, 200, "{}", String::from_utf8_lossy(&resp.body));
    server.shutdown().0.unwrap();
    assert!(t0.elapsed() >= Duration::from_secs(3), "the drain lasted");
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err(),
        "the port closes after the drain"
    );
}

#[test]
fn shutdown_cancels_what_is_left_after_its_deadline() {
    let mut c = config();
    c.shutdown_timeout = Duration::from_secs(1);
    let server = TestServer::start(c);
    let addr = server.addr;
    let mut s = start_long_run(addr);
    let (r, took) = server.shutdown();
    r.unwrap();
    assert!(took < Duration::from_secs(6), "{took:?}");
    let resp = read_response(&mut s).unwrap();
    assert_eq!(resp.status, 503);
}

#[test]
fn a_too_small_max_body_is_refused_before_anything_loads() {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_fluxrt"))
        .args(["serve", "--port", "0", "--max-body", "10"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--max-body must be at least 1024 bytes"),
        "{err}"
    );
}

#[test]
fn the_binary_serves_and_exits_0_on_sigterm() {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fluxrt"))
        .args([
            "serve",
            "--port",
            "0",
            "--threads",
            "1",
            "--shutdown-timeout",
            "10",
            "--max-body",
            "2000000",
        ])
        .arg("--model")
        .arg(model("tiny-flux-schnell"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let addr: SocketAddr = loop {
        let line = lines.next().expect("a listening line").unwrap();
        if let Some(a) = line.strip_prefix("fluxrt serve: listening on http://") {
            break a.parse().unwrap();
        }
    };
    let log = std::thread::spawn(move || lines.map_while(|l| l.ok()).collect::<Vec<_>>());
    wait_for("ready", Duration::from_secs(60), || {
        TcpStream::connect(addr).is_ok() && get(addr, "/ready").status == 200
    });
    let r = post(
        addr,
        "/v1/images/generations",
        &json!({"prompt": "cli", "size": "64x64"}),
    );
    assert_eq!(r.status, 200);
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "the server did not exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = log.join().unwrap().join("\n");
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("shutting down"), "{log}");
}

#[test]
fn a_model_that_cannot_load_fails_startup_with_its_error() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = Config::new("/nonexistent/fluxrt-model");
        c.port = 0;
        c.log = false;
        let server = serve::start(c, std::future::pending()).await.unwrap();
        let e = tokio::time::timeout(Duration::from_secs(30), server.ready())
            .await
            .expect("startup ends")
            .unwrap_err();
        assert!(e.message.contains("fluxrt-model"), "{e}");
        let e = tokio::time::timeout(Duration::from_secs(30), server.wait())
            .await
            .expect("the server stops by itself")
            .unwrap_err();
        assert!(e.message.contains("fluxrt-model"), "{e}");
    });
}
