//! `fluxrt bench` and the performance paths: the JSON report against docs/bench.schema.json, bad input, the
//! I/O-binding denoising loop against the plain loop, the optimized-graph cache, and quantized tiny models.
//! No timing is asserted anywhere: speed is measured by the benchmarks, not by tests.

mod common;

use std::path::Path;

use common::*;
use fluxrt::pipeline::{LoadOptions, Output, Pipeline, Quiet, Request};
use fluxrt::runtime::{CacheUse, Canceller};
use serde_json::Value;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

// ---- a small JSON Schema validator for the subset docs/bench.schema.json uses ----

fn schema() -> Value {
    let path = root().join("docs/bench.schema.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn resolve<'a>(root: &'a Value, s: &'a Value) -> &'a Value {
    match s.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let name = r.strip_prefix("#/$defs/").expect("local refs only");
            &root["$defs"][name]
        }
        None => s,
    }
}

fn type_ok(t: &str, v: &Value) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        "integer" => v.is_u64() || v.is_i64(),
        "number" => v.is_number(),
        other => panic!("schema type {other} not supported"),
    }
}

/// Every violation of `s` by `v`, as `path: problem`.
fn validate(root: &Value, s: &Value, v: &Value, path: &str, errs: &mut Vec<String>) {
    let s = resolve(root, s);
    if let Some(t) = s.get("type") {
        let ok = match t {
            Value::String(t) => type_ok(t, v),
            Value::Array(ts) => ts.iter().any(|t| type_ok(t.as_str().unwrap(), v)),
            _ => panic!("bad type in schema"),
        };
        if !ok {
            errs.push(format!("{path}: {v} is not of type {t}"));
            return;
        }
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            errs.push(format!("{path}: {v} not in {e:?}"));
        }
    }
    if let (Some(m), Some(x)) = (s.get("minimum").and_then(Value::as_f64), v.as_f64()) {
        if x < m {
            errs.push(format!("{path}: {x} < minimum {m}"));
        }
    }
    if let Some(obj) = v.as_object() {
        for r in s
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if !obj.contains_key(r.as_str().unwrap()) {
                errs.push(format!("{path}: missing {r}"));
            }
        }
        let props = s.get("properties").and_then(Value::as_object);
        for (k, x) in obj {
            let sub = props
                .and_then(|p| p.get(k))
                .or_else(|| s.get("additionalProperties"));
            if let Some(sub) = sub.filter(|s| s.is_object()) {
                validate(root, sub, x, &format!("{path}.{k}"), errs);
            }
        }
    }
    if let Some(arr) = v.as_array() {
        if let Some(min) = s.get("minItems").and_then(Value::as_u64) {
            if (arr.len() as u64) < min {
                errs.push(format!("{path}: fewer than {min} items"));
            }
        }
        if let Some(items) = s.get("items") {
            for (i, x) in arr.iter().enumerate() {
                validate(root, items, x, &format!("{path}[{i}]"), errs);
            }
        }
    }
}

fn assert_schema_valid(report: &Value) {
    let s = schema();
    let mut errs = Vec::new();
    validate(&s, &s, report, "$", &mut errs);
    assert!(
        errs.is_empty(),
        "report violates the schema:\n{}",
        errs.join("\n")
    );
}

/// One step at 64x64, one run and no warmup: the quickest `bench` that still writes a full report.
const QUICK: [&str; 8] = [
    "--sizes", "64x64", "--steps", "1", "--warmup", "0", "--runs", "1",
];

#[test]
fn schema_validator_catches_problems() {
    let s = schema();
    let mut errs = Vec::new();
    validate(
        &s,
        &s,
        &serde_json::json!({"schema_version": 2}),
        "$",
        &mut errs,
    );
    assert!(
        errs.iter().any(|e| e.contains("missing \"results\"")),
        "{errs:?}"
    );
    assert!(errs.iter().any(|e| e.contains("not in")), "{errs:?}");
}

fn stat_ok(v: &Value, n: u64, what: &str) {
    let (min, med, max) = (
        v["min"].as_f64().unwrap(),
        v["median"].as_f64().unwrap(),
        v["max"].as_f64().unwrap(),
    );
    assert!(min <= med && med <= max, "{what}: {v}");
    assert_eq!(v["n"].as_u64(), Some(n), "{what}: {v}");
}

#[test]
fn memory_pattern_is_off_unless_asked_for() {
    for (flag, want) in [
        (None, false),
        (Some("--memory-pattern"), true),
        (Some("--no-memory-pattern"), false), // the old flag, kept for scripts
    ] {
        let dir = tmp();
        let json = dir.path().join("report.json");
        let mut args = vec!["bench"];
        args.extend(QUICK);
        args.extend([
            "--no-optimized-cache",
            "-q",
            "--json",
            json.to_str().unwrap(),
        ]);
        args.extend(flag);
        let o = run(&args);
        assert!(o.status.success(), "{flag:?}: {}", stderr(&o));
        let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        assert_eq!(r["settings"]["memory_pattern"], want, "{flag:?}");
    }
}

#[test]
fn bench_json_report_is_schema_valid_with_every_stage() {
    let dir = tmp();
    let json = dir.path().join("report.json");
    let cache = dir.path().join("cache");
    let images = dir.path().join("images");
    let model_dir = model("tiny-flux-schnell");
    let o = run(&[
        "bench",
        "--model",
        model_dir.to_str().unwrap(),
        "--sizes",
        "64x64,128x96",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--runs",
        "2",
        "--json",
        json.to_str().unwrap(),
        "--optimized-cache",
        cache.to_str().unwrap(),
        "--save-images",
        images.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "bench failed:\n{}", stderr(&o));
    // The terminal table names every stage.
    let table = stdout(&o);
    for stage in [
        "tokenize",
        "clip",
        "t5",
        "step 1",
        "step 3",
        "vae decode",
        "png encode",
        "end-to-end",
        "outside ORT",
        "images/minute",
        "session creation",
        "peak RSS",
    ] {
        assert!(table.contains(stage), "table lacks {stage}:\n{table}");
    }

    let text = std::fs::read_to_string(&json).unwrap();
    assert!(
        text.trim_start().starts_with("{\n  \"schema_version\": 1"),
        "schema_version comes first"
    );
    let r: Value = serde_json::from_str(&text).unwrap();
    assert_schema_valid(&r);
    assert_eq!(r["settings"]["steps"], 3);
    // ONNX Runtime's memory pattern is off unless asked for (`--memory-pattern`).
    assert_eq!(r["settings"]["memory_pattern"], false);
    let results = r["results"].as_array().unwrap();
    assert_eq!(results.len(), 1);
    let cpu = &results[0];
    assert_eq!(cpu["provider"], "cpu");
    assert_eq!(cpu["status"], "ok");
    for g in ["clip", "t5", "transformer", "vae_decoder"] {
        assert_eq!(cpu["graph_providers"][g], serde_json::json!(["cpu"]), "{g}");
        // ONNX Runtime's placement report: every node of the optimized graph on the CPU.
        let nodes = cpu["graph_nodes"][g].as_object().unwrap();
        assert_eq!(nodes.keys().collect::<Vec<_>>(), ["cpu"], "{g}");
        assert!(nodes["cpu"].as_u64().unwrap() > 10, "{g}: {nodes:?}");
        assert_eq!(
            cpu["optimized_cache"][g], "cold",
            "{g}: a fresh cache folder"
        );
        assert!(cpu["graph_session_ms"][g].as_f64().unwrap() > 0.0);
    }
    assert!(cpu["session_creation_ms"].as_f64().unwrap() > 0.0);
    assert!(cpu["peak_rss_bytes"].as_u64().unwrap() > 1 << 20);
    let sizes = cpu["sizes"].as_array().unwrap();
    assert_eq!(sizes.len(), 2);
    for (z, (w, h)) in sizes.iter().zip([(64, 64), (128, 96)]) {
        assert_eq!(
            (z["width"].as_u64(), z["height"].as_u64()),
            (Some(w), Some(h))
        );
        let st = &z["stages_ms"];
        for k in [
            "tokenize",
            "clip",
            "t5",
            "denoise_total",
            "vae_decode",
            "to_rgb",
            "png_encode",
        ] {
            stat_ok(&st[k], 2, k);
        }
        assert_eq!(st["denoise_steps"].as_array().unwrap().len(), 3);
        for s in st["denoise_steps"].as_array().unwrap() {
            stat_ok(s, 2, "step");
        }
        stat_ok(&z["end_to_end_ms"], 2, "end_to_end");
        let share = &z["outside_ort_share"];
        stat_ok(share, 2, "outside_ort_share");
        assert!(share["max"].as_f64().unwrap() < 1.0);
        assert!(z["images_per_minute"].as_f64().unwrap() > 0.0);
        let runs = z["runs"].as_array().unwrap();
        assert_eq!(runs.len(), 2);
        for run in runs {
            // In-ORT time is part of the end-to-end time.
            assert!(run["in_ort"].as_f64().unwrap() <= run["end_to_end"].as_f64().unwrap());
        }
        let png = images.join(format!("cpu-{w}x{h}-0.png"));
        assert_eq!(decode_png(&png).dimensions(), (w as u32, h as u32));
    }

    // Second run with the same cache: every graph comes from it; `--json -` prints the report on stdout.
    let o = run(&[
        &["bench", "--model", model_dir.to_str().unwrap()][..],
        &QUICK,
        &["--json", "-", "--optimized-cache", cache.to_str().unwrap()],
    ]
    .concat());
    assert!(o.status.success(), "bench failed:\n{}", stderr(&o));
    let r: Value = serde_json::from_str(&stdout(&o)).expect("stdout is the JSON report");
    assert_schema_valid(&r);
    for g in ["clip", "t5", "transformer", "vae_decoder"] {
        assert_eq!(r["results"][0]["optimized_cache"][g], "warm", "{g}");
    }
    assert!(
        stderr(&o).contains("end-to-end"),
        "the table goes to stderr"
    );
}

/// Runs `fluxrt bench ARGS` and expects a clean failure naming each needle, before any model is loaded.
fn bench_fails(args: &[&str], needles: &[&str]) {
    let mut all = vec!["bench", "--no-optimized-cache"];
    all.extend_from_slice(args);
    let o = run(&all);
    let err = stderr(&o);
    assert!(!o.status.success(), "fluxrt {all:?} should fail");
    assert_eq!(
        o.status.code(),
        Some(2),
        "an input error: exit code 2\n{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.starts_with("error: "), "{err}");
    for n in needles {
        assert!(
            err.contains(n),
            "fluxrt {all:?}: message lacks {n:?}:\n{err}"
        );
    }
    assert!(stdout(&o).is_empty(), "no table for bad input");
}

#[test]
fn bench_bad_input_is_a_clear_error() {
    bench_fails(&["--provider", "cpu,warp9"], &["warp9", "valid providers"]);
    bench_fails(&["--provider", ""], &["empty execution provider list"]);
    bench_fails(
        &["--sizes", "250x256"],
        &["width 250 is not a multiple of 16", "240 or 256"],
    );
    bench_fails(
        &["--sizes", "256x100"],
        &["height 100 is not a multiple of 16"],
    );
    bench_fails(
        &["--sizes", "256by256"],
        &["cannot read image size", "WIDTHxHEIGHT"],
    );
    bench_fails(&["--runs", "0"], &["runs must be at least 1"]);
    bench_fails(&["--batch", "0"], &["batch must be at least 1"]);
    bench_fails(&["--steps", "0"], &["steps must be between 1"]);
    bench_fails(
        &["--optimization", "turbo"],
        &["unknown optimization level"],
    );
}

#[test]
fn bench_unavailable_provider_is_reported_and_fails() {
    // CUDA is not compiled into a default build (or its libraries are missing): the report says why, exit != 0.
    let dir = tmp();
    let json = dir.path().join("r.json");
    let o = run(&[
        &["bench", "--no-optimized-cache", "--provider", "cuda,cpu"][..],
        &QUICK,
        &["--json", json.to_str().unwrap()],
    ]
    .concat());
    let r = || -> Value { serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap() };
    if o.status.success() {
        // A machine where CUDA really works: both providers were measured.
        let r = r();
        assert_schema_valid(&r);
        assert_eq!(r["results"][0]["status"], "ok");
        assert_eq!(r["results"][1]["status"], "ok");
        return;
    }
    let err = stderr(&o);
    assert!(
        err.contains("cuda") && err.contains("could not be benchmarked"),
        "{err}"
    );
    let r = r();
    assert_schema_valid(&r);
    assert_eq!(r["results"][0]["status"], "skipped");
    assert!(r["results"][0]["error"].as_str().unwrap().contains("cuda"));
    assert_eq!(r["results"][1]["status"], "ok");
}

// ---- the I/O-binding loop and the optimized-graph cache ----

fn load(model_dir: &Path, cache: Option<&Path>, io_binding: bool) -> Pipeline {
    let mut o = LoadOptions::new(model_dir);
    o.threads = Some(1);
    o.optimized_cache = cache.map(Path::to_path_buf);
    o.io_binding = io_binding;
    Pipeline::load(&o).unwrap_or_else(|e| panic!("{e}"))
}

fn generate(p: &mut Pipeline, w: u32, h: u32, n: usize) -> Output {
    let mut req = Request::new(&p.engine().spec, "a red fox in the snow", 7);
    req.width = w;
    req.height = h;
    req.num_images = n;
    req.steps = 3;
    if p.engine().variant() == fluxrt::model::Variant::Dev {
        req.guidance = Some(4.0);
    }
    p.generate(&req, &mut Quiet, &Canceller::new(), true)
        .unwrap_or_else(|e| panic!("{e}"))
}

fn max_diff(a: &Output, b: &Output) -> f32 {
    let (ta, tb) = (a.trace.as_ref().unwrap(), b.trace.as_ref().unwrap());
    assert_eq!(ta.latents.len(), tb.latents.len());
    let mut d = 0.0f32;
    for (x, y) in ta.latents.iter().zip(&tb.latents) {
        d = d.max(max_abs_diff(
            "latents",
            x.as_slice().unwrap(),
            y.as_slice().unwrap(),
        ));
    }
    let (ia, ib) = (
        ta.images.as_ref().unwrap().as_standard_layout().to_owned(),
        tb.images.as_ref().unwrap().as_standard_layout().to_owned(),
    );
    d.max(max_abs_diff(
        "images",
        ia.as_slice().unwrap(),
        ib.as_slice().unwrap(),
    ))
}

#[test]
fn io_binding_loop_equals_the_plain_loop() {
    for m in MODELS {
        let mut p = load(&model(m), None, true);
        for (w, h, n) in [(64, 64, 1), (128, 96, 2)] {
            p.set_io_binding(true);
            let bound = generate(&mut p, w, h, n);
            assert!(p.io_binding_used(), "{m}: the bound loop ran");
            p.set_io_binding(false);
            let plain = generate(&mut p, w, h, n);
            assert!(!p.io_binding_used());
            let d = max_diff(&bound, &plain);
            assert!(d <= 1e-6, "{m} {w}x{h}x{n}: max abs {d:e} > 1e-6");
            assert_eq!(bound.timings.denoise.len(), 3);
            for (a, b) in bound.images.iter().zip(&plain.images) {
                assert_eq!(a.rgb, b.rgb, "{m}: same pixels");
            }
            // Time in ORT is counted in both loops and stays within the total.
            assert!(bound.timings.in_ort > std::time::Duration::ZERO);
            assert!(bound.timings.in_ort <= bound.timings.total);
        }
    }
}

#[test]
fn io_binding_works_in_low_memory_mode() {
    let mut o = LoadOptions::new(model("tiny-flux-schnell"));
    o.threads = Some(1);
    o.optimized_cache = None;
    o.low_memory = true;
    let mut low = Pipeline::load(&o).unwrap();
    let mut full = load(&model("tiny-flux-schnell"), None, false);
    let d = max_diff(
        &generate(&mut low, 64, 64, 1),
        &generate(&mut full, 64, 64, 1),
    );
    assert!(d <= 1e-6, "max abs {d:e}");
}

#[test]
fn optimized_cache_cold_then_warm_gives_the_same_image() {
    let dir = tmp();
    let cache = dir.path().join("opt");
    let m = model("tiny-flux-dev");
    let mut cold = load(&m, Some(&cache), true);
    assert!(cold
        .engine()
        .graph_cache_use()
        .values()
        .all(|c| *c == CacheUse::Cold));
    let entries = std::fs::read_dir(&cache).unwrap().count();
    assert_eq!(entries, 4, "one entry per graph");
    let mut warm = load(&m, Some(&cache), true);
    assert!(warm
        .engine()
        .graph_cache_use()
        .values()
        .all(|c| *c == CacheUse::Warm));
    let mut off = load(&m, None, true);
    assert!(off
        .engine()
        .graph_cache_use()
        .values()
        .all(|c| *c == CacheUse::Off));
    let (a, b, c) = (
        generate(&mut cold, 64, 64, 1),
        generate(&mut warm, 64, 64, 1),
        generate(&mut off, 64, 64, 1),
    );
    assert!(max_diff(&a, &b) <= 1e-6);
    assert!(max_diff(&a, &c) <= 1e-6);

    // A damaged entry is replaced, not fatal.
    for e in std::fs::read_dir(&cache).unwrap() {
        std::fs::write(e.unwrap().path().join("model.onnx"), b"garbage").unwrap();
    }
    let mut again = load(&m, Some(&cache), true);
    assert!(again
        .engine()
        .graph_cache_use()
        .values()
        .all(|c| *c == CacheUse::Cold));
    assert!(max_diff(&a, &generate(&mut again, 64, 64, 1)) <= 1e-6);

    // A changed model file gets a new key.
    let copy = dir.path().join("copy");
    copy_dir(&m, &copy);
    let before = std::fs::read_dir(&cache).unwrap().count();
    let _ = load(&copy, Some(&cache), true);
    let t = copy.join("transformer.onnx");
    let bytes = std::fs::read(&t).unwrap();
    std::fs::write(&t, &bytes).unwrap(); // same content, new mtime
    let p = load(&copy, Some(&cache), true);
    assert_eq!(p.engine().graph_cache_use()["transformer"], CacheUse::Cold);
    assert!(std::fs::read_dir(&cache).unwrap().count() > before);
}

// ---- quantized tiny models ----

/// Minimum PSNR (dB, images in [0,1]) of each quantized tiny model against the fp32 image at the same seed.
const QUANT_MIN_PSNR_DB: [(&str, f64); 2] = [("int8", 45.0), ("int4", 35.0)];

#[test]
fn quantized_tiny_models_run_within_the_stated_psnr() {
    let dir = tmp();
    let mut fp32 = load(&model("tiny-flux-schnell"), None, true);
    for (method, min_db) in QUANT_MIN_PSNR_DB {
        let qdir = quantized_model(dir.path(), method);
        let mut q = load(&qdir, None, true);
        for (w, h) in [(64, 64), (128, 96)] {
            let a = generate(&mut fp32, w, h, 1);
            let b = generate(&mut q, w, h, 1);
            assert!(
                q.io_binding_used(),
                "the quantized transformer keeps f32 I/O"
            );
            let ia = a.trace.unwrap().images.unwrap();
            let ib = b.trace.unwrap().images.unwrap();
            let db = fluxrt::bench::psnr(
                ia.as_standard_layout().as_slice().unwrap(),
                ib.as_standard_layout().as_slice().unwrap(),
                1.0,
            );
            eprintln!("{method} {w}x{h}: PSNR {db:.1} dB against fp32");
            assert!(
                db >= min_db,
                "{method} {w}x{h}: PSNR {db:.1} dB < {min_db} dB"
            );
            assert!(
                db.is_finite(),
                "{method}: the quantized graph should differ from fp32"
            );
        }
    }
}

#[test]
fn optimized_cache_stays_within_its_budget() {
    // With a 0 MB budget only the entry just written survives each cold load.
    let dir = tmp();
    let cache = dir.path().join("opt");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fluxrt"))
        .arg("bench")
        .args(QUICK)
        .args(["--optimized-cache", cache.to_str().unwrap()])
        .env("FLUXRT_OPTIMIZED_CACHE_MAX_MB", "0")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let left: Vec<_> = std::fs::read_dir(&cache).unwrap().collect();
    assert_eq!(left.len(), 1, "only the last entry written is kept");
}
