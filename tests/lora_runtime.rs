//! Run-time LoRA (src/lora.rs, issue 6) on the bundled tiny models, whose transformers have LoRA slots, against
//! the goldens export/fixtures/lora_goldens.py made with diffusers (tests/goldens/<model>/lora): the stacked factors, the
//! images (one pipeline switching LoRAs between requests, both denoising loops), the CLI, the server, and the
//! errors a user can cause.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use common::*;
use fluxrt::lora::{self, LoraChoice};
use fluxrt::pipeline::{LoadOptions, Pipeline, Quiet, Request};
use fluxrt::runtime::Canceller;
use safetensors::SafeTensors;
use serde_json::{json, Value};
use std::ffi::OsStr;

/// How a case's golden image was computed (docs/testing.md): the text encoders, every step and the VAE decode.
fn image_computed(case: &LoraCase) -> Computed {
    Computed::Evaluations(case.steps + 2)
}

#[derive(Debug, Clone, serde::Deserialize)]
struct LoraFile {
    file: String,
    scale: f32,
}

#[derive(Debug, Clone, serde::Deserialize)]
struct LoraCase {
    name: String,
    prompt: String,
    width: u32,
    height: u32,
    seed: u64,
    steps: usize,
    guidance: Option<f32>,
    loras: Vec<LoraFile>,
    file: String,
    delta_file: String,
    /// True CFG cases (diffusers' negative_prompt + true_cfg_scale with the LoRAs loaded).
    #[serde(default)]
    negative_prompt: Option<String>,
    #[serde(default)]
    true_cfg_scale: Option<f32>,
}

fn lora_dir(m: &str) -> PathBuf {
    root().join("tests/goldens").join(m).join("lora")
}

fn lora_cases(m: &str) -> Vec<LoraCase> {
    let path = lora_dir(m).join("index.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let v: Value = serde_json::from_str(&text).unwrap();
    let cases: Vec<LoraCase> = serde_json::from_value(v["cases"].clone()).unwrap();
    assert!(
        cases.len() >= 3,
        "{m}: lora goldens list {} cases",
        cases.len()
    );
    cases
}

/// The f32 tensors of a safetensors file (ids and other types left out): name -> (shape, values).
fn tensors(path: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .iter()
        .filter(|(_, t)| t.dtype() == safetensors::Dtype::F32)
        .map(|(n, t)| {
            let v = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (n.to_string(), t.shape().to_vec(), v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn golden_image(m: &str, file: &str) -> (Vec<usize>, Vec<f32>) {
    let all = tensors(&lora_dir(m).join(file));
    all.into_iter()
        .find(|(n, _, _)| n == "image")
        .map(|(_, s, v)| (s, v))
        .expect("the golden has an image")
}

fn load(m: &str) -> Pipeline {
    let mut o = LoadOptions::new(model(m));
    o.threads = Some(1);
    Pipeline::load(&o).unwrap_or_else(|e| panic!("{m}: {e}"))
}

fn choices(pipe: &Pipeline, case: &LoraCase) -> Vec<LoraChoice> {
    case.loras
        .iter()
        .map(|l| {
            let lora = pipe
                .load_lora(&root().join(&l.file))
                .unwrap_or_else(|e| panic!("{}: {e}", l.file));
            LoraChoice::new(lora, l.scale)
        })
        .collect()
}

fn request(pipe: &Pipeline, case: &LoraCase, loras: Vec<LoraChoice>) -> Request {
    let mut r = Request::new(&pipe.engine().spec, case.prompt.clone(), case.seed);
    r.width = case.width;
    r.height = case.height;
    r.steps = case.steps;
    r.guidance = case.guidance;
    r.loras = loras;
    if let Some(n) = &case.negative_prompt {
        r.negative_prompt = Some(n.clone());
        r.true_cfg = case.true_cfg_scale.expect("a true CFG case has its scale");
    }
    r
}

/// The float image [1, 3, H, W] in [0, 1] of one run.
fn run(pipe: &mut Pipeline, req: &Request) -> Vec<f32> {
    let out = pipe
        .generate(req, &mut Quiet, &Canceller::new(), true)
        .unwrap_or_else(|e| panic!("{e}"));
    out.trace
        .unwrap()
        .images
        .unwrap()
        .as_slice()
        .unwrap()
        .to_vec()
}

/// The plain text-to-image golden with the LoRA cases' prompt, seed and size.
fn plain_golden(m: &str, case: &LoraCase) -> Vec<f32> {
    let c = cases(m)
        .into_iter()
        .find(|c| {
            c.prompt == case.prompt
                && c.seed == case.seed
                && (c.width, c.height) == (case.width, case.height)
        })
        .expect("a txt2img golden with the LoRA cases' settings");
    Golden::load(m, &c).f32("image").1
}

#[test]
fn stacked_factors_match_the_golden_deltas() {
    for m in MODELS {
        let pipe = load(m);
        assert!(
            !pipe.engine().lora_slots().is_empty(),
            "{m} has no LoRA slots"
        );
        for case in lora_cases(m) {
            let stacked = lora::stack(&choices(&pipe, &case));
            let want = tensors(&lora_dir(m).join(&case.delta_file));
            let got_modules: Vec<&String> = stacked.keys().collect();
            let want_modules: Vec<&String> = want.iter().map(|(n, _, _)| n).collect();
            assert_eq!(
                got_modules, want_modules,
                "{m}/{}: touched slots",
                case.name
            );
            for (module, shape, values) in &want {
                let d = stacked[module].delta();
                assert_eq!(d.shape(), &shape[..], "{m}/{}: {module}", case.name);
                // one f32 reduction over the rank here, f64 in the golden
                assert_fixture(
                    &format!("{m}/{}: {module} A @ B", case.name),
                    d.as_slice().unwrap(),
                    values,
                    Computed::Evaluations(1),
                );
            }
        }
    }
}

#[test]
fn images_match_the_goldens_with_both_denoising_loops() {
    for m in MODELS {
        let mut pipe = load(m);
        for case in lora_cases(m) {
            let req = request(&pipe, &case, choices(&pipe, &case));
            let (shape, want) = golden_image(m, &case.file);
            assert_eq!(shape, [1, 3, case.height as usize, case.width as usize]);
            for bound in [true, false] {
                pipe.set_io_binding(bound);
                let got = run(&mut pipe, &req);
                // Every conditioning runs on the host-bound loop too, true CFG included.
                assert_eq!(pipe.io_binding_used(), bound, "{m}/{}", case.name);
                assert_fixture(
                    &format!("{m}/{} image (io binding {bound})", case.name),
                    &got,
                    &want,
                    image_computed(&case),
                );
            }
        }
    }
}

#[test]
fn one_pipeline_switches_loras_between_requests() {
    for m in MODELS {
        let mut pipe = load(m);
        let cases = lora_cases(m);
        let (a, b) = (&cases[0], &cases[1]);
        let (ca, cb) = (choices(&pipe, a), choices(&pipe, b));
        let plain = plain_golden(m, a);
        let steps: [(&str, Vec<LoraChoice>, Vec<f32>); 4] = [
            ("A", ca.clone(), golden_image(m, &a.file).1),
            ("none", Vec::new(), plain.clone()),
            ("B", cb, golden_image(m, &b.file).1),
            ("A again", ca, golden_image(m, &a.file).1),
        ];
        for (what, loras, want) in steps {
            let req = request(&pipe, a, loras);
            let got = run(&mut pipe, &req);
            assert_fixture(&format!("{m}: {what}"), &got, &want, image_computed(a));
        }
        // A LoRA changes the picture: the goldens are not all the same image.
        assert!(max_abs_diff("A vs none", &golden_image(m, &a.file).1, &plain) > 1e-3);
    }
}

#[test]
fn a_batch_mixes_only_requests_with_the_same_loras() {
    let m = MODELS[0];
    let mut pipe = load(m);
    let case = &lora_cases(m)[0];
    let with = request(&pipe, case, choices(&pipe, case));
    let without = request(&pipe, case, Vec::new());
    assert!(!with.batches_with(&without));
    let e = pipe
        .generate_batch(
            &[with.clone(), without],
            &mut Quiet,
            &Canceller::new(),
            false,
        )
        .unwrap_err();
    assert!(e.message.contains("LoRAs"), "{e}");
    // Two requests with the same set run as one batch and both get the LoRA image.
    let mut second = with.clone();
    second.seed += 1;
    let outs = pipe
        .generate_batch(
            &[with.clone(), second],
            &mut Quiet,
            &Canceller::new(),
            false,
        )
        .unwrap();
    let alone = pipe
        .generate(&with, &mut Quiet, &Canceller::new(), false)
        .unwrap();
    assert_eq!(outs[0].images[0].rgb, alone.images[0].rgb);
}

#[test]
fn low_memory_and_true_cfg_runs_apply_loras() {
    let m = MODELS[0];
    let case = &lora_cases(m)[0];
    let mut o = LoadOptions::new(model(m));
    o.threads = Some(1);
    o.low_memory = true;
    let mut pipe = Pipeline::load(&o).unwrap();
    let req = request(&pipe, case, choices(&pipe, case));
    let got = run(&mut pipe, &req);
    assert_fixture(
        "low memory",
        &got,
        &golden_image(m, &case.file).1,
        image_computed(case),
    );
    // True CFG runs the transformer on prompt and negative rows (the plain loop): the LoRA acts on both, as
    // diffusers' true_cfg_scale run with the LoRA loaded (the `true_cfg` golden).
    let cfg_case = lora_cases(m)
        .into_iter()
        .find(|c| c.negative_prompt.is_some())
        .expect("a true CFG lora golden");
    let with = request(&pipe, &cfg_case, choices(&pipe, &cfg_case));
    let a = run(&mut pipe, &with);
    assert_fixture(
        "true CFG with the LoRA",
        &a,
        &golden_image(m, &cfg_case.file).1,
        image_computed(&cfg_case),
    );
    let without = request(&pipe, &cfg_case, Vec::new());
    let b = run(&mut pipe, &without);
    assert!(max_abs_diff("true CFG with and without the LoRA", &a, &b) > 1e-3);
}

/// Minimum PSNR (dB, images in [0, 1]) of the int8 tiny model with a LoRA against the fp32 LoRA image (the
/// plain int8 bound of tests/bench.rs; measured 65 dB).
const INT8_LORA_MIN_PSNR_DB: f64 = 45.0;

#[test]
fn loras_apply_on_the_int8_transformer() {
    // The quantizer leaves the slots float (they reach their MatMuls through Identity nodes), so a quantized
    // model takes LoRAs on top of its int8 weights.
    let m = "tiny-flux-schnell";
    let case = &lora_cases(m)[0];
    let dir = tempfile::tempdir().unwrap();
    let mut o = LoadOptions::new(quantized_model(dir.path(), "int8"));
    o.threads = Some(1);
    let mut q = Pipeline::load(&o).unwrap();
    assert_eq!(
        q.engine().lora_slots().len(),
        load(m).engine().lora_slots().len()
    );
    let (with, without) = (
        request(&q, case, choices(&q, case)),
        request(&q, case, Vec::new()),
    );
    let (with, without) = (run(&mut q, &with), run(&mut q, &without));
    let fp32_lora = golden_image(m, &case.file).1;
    let db = fluxrt::bench::psnr(&with, &fp32_lora, 1.0);
    let db_without = fluxrt::bench::psnr(&without, &fp32_lora, 1.0);
    eprintln!(
        "int8 + LoRA: PSNR {db:.1} dB against fp32 + LoRA ({db_without:.1} dB without the LoRA)"
    );
    assert!(
        db >= INT8_LORA_MIN_PSNR_DB,
        "int8 + LoRA: PSNR {db:.1} dB < {INT8_LORA_MIN_PSNR_DB} dB"
    );
    assert!(
        max_abs_diff("int8 with and without the LoRA", &with, &without) > 0.05,
        "the LoRA changes the int8 image"
    );
    assert!(db > db_without + 10.0, "{db:.1} vs {db_without:.1} dB");
}

// ------------------------------------------------------------------------------------------------------
// CLI
// ------------------------------------------------------------------------------------------------------

#[test]
fn cli_img2img_png_records_the_denoising_strength() {
    let m = MODELS[0];
    let case = &lora_cases(m)[0];
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("i2i.png");
    let mut args = case_args(m, case, &out);
    let init = root().join("tests/goldens/inputs/init_64x64.png");
    args.extend([
        "--init-image".into(),
        init.display().to_string(),
        "--strength".into(),
        "0.75".into(),
    ]);
    let o = run_cli(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let params = fluxrt::image_out::read_png_parameters(&std::fs::read(&out).unwrap()).unwrap();
    assert!(params.contains("Denoising strength: 0.75"), "{params}");
    assert!(!params.contains("Lora"), "{params}");
}

fn case_args(m: &str, case: &LoraCase, out: &Path) -> Vec<String> {
    let mut args = generate_args(
        &model(m),
        &case.prompt,
        (case.width, case.height),
        case.steps,
        case.seed,
        case.guidance,
        out,
    );
    args.extend(["--threads".into(), "1".into()]);
    if let (Some(n), Some(s)) = (&case.negative_prompt, case.true_cfg_scale) {
        args.extend([
            "--negative-prompt".into(),
            n.clone(),
            "--true-cfg".into(),
            s.to_string(),
        ]);
    }
    args
}

fn run_cli(args: &[String]) -> std::process::Output {
    fluxrt().args(args).output().expect("fluxrt runs")
}

#[test]
fn cli_generate_with_loras_matches_the_goldens_within_one_level() {
    for m in MODELS {
        for case in lora_cases(m) {
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join("img.png");
            let mut args = case_args(m, &case, &out);
            for l in &case.loras {
                let path = root().join(&l.file);
                args.extend(["--lora".into(), format!("{}:{}", path.display(), l.scale)]);
            }
            args.push("--json".into());
            let o = run_cli(&args);
            assert!(o.status.success(), "{m}/{}: {}", case.name, stderr(&o));
            // --json gives each scale as it was written (0.8, not 0.800000011920929).
            let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
            for (l, got) in case.loras.iter().zip(v["loras"].as_array().unwrap()) {
                let written: f64 = format!("{}", l.scale).parse().unwrap();
                assert_eq!(
                    got["scale"].as_f64(),
                    Some(written),
                    "{m}/{}: {got}",
                    case.name
                );
            }
            let png = decode_png(&out);
            let worst = levels_off(&png, &golden_image(m, &case.file).1);
            assert!(worst <= 1.0, "{m}/{}: PNG is {worst} levels off", case.name);
            // The PNG says which LoRAs made it.
            let text = String::from_utf8_lossy(&std::fs::read(&out).unwrap()).to_string();
            assert!(text.contains("Lora hashes: "), "{m}/{}", case.name);
            for l in &case.loras {
                let stem = Path::new(&l.file)
                    .file_stem()
                    .unwrap()
                    .to_string_lossy()
                    .to_string();
                assert!(
                    text.contains(&format!("{stem}: {:?}", l.scale)),
                    "{m}/{}: {stem}",
                    case.name
                );
                // A1111's addnet hash: sha256 of the bytes after the 8-byte length and the JSON header.
                let bytes = std::fs::read(root().join(&l.file)).unwrap();
                let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
                let digest = <sha2::Sha256 as sha2::Digest>::digest(&bytes[8 + n..]);
                let short: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
                assert!(
                    text.contains(&format!("{stem}: {short}")),
                    "{m}/{}: {stem}: {short} not in the PNG's Lora hashes",
                    case.name
                );
            }
        }
    }
}

/// A LoRA safetensors file of f32 tensors.
fn write_lora(path: &Path, tensors: &[(&str, Vec<usize>)]) {
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s)| {
            let len: usize = s.iter().product();
            let bytes = (0..len)
                .flat_map(|i| (0.01 * i as f32).to_le_bytes())
                .collect();
            (n.to_string(), s.clone(), bytes)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// The tiny schnell model exported without LoRA slots, by the export step itself.
fn model_without_slots(dir: &Path) -> PathBuf {
    let out = dir.join("no-slots");
    let work = dir.join("work");
    python_ok(
        "export without slots",
        [
            OsStr::new("-m"),
            OsStr::new("export"),
            OsStr::new("preset"),
            OsStr::new("tiny-schnell"),
            out.as_os_str(),
            OsStr::new("--work"),
            work.as_os_str(),
            OsStr::new("--no-lora-slots"),
        ],
    );
    out
}

#[test]
fn cli_errors_are_clear_and_write_nothing() {
    let m = "tiny-flux-schnell";
    let case = &lora_cases(m)[0];
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = root().join(&case.loras[0].file);

    let malformed = d.join("malformed.safetensors");
    std::fs::write(
        &malformed,
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all",
    )
    .unwrap();
    // A LoRA for a wider model: x_embedder takes 128 features there, 64 here.
    let other = d.join("other-model.safetensors");
    write_lora(
        &other,
        &[
            ("transformer.x_embedder.lora_A.weight", vec![2, 128]),
            ("transformer.x_embedder.lora_B.weight", vec![32, 2]),
        ],
    );
    let te = d.join("te.safetensors");
    write_lora(
        &te,
        &[
            (
                "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
                vec![2, 8],
            ),
            (
                "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight",
                vec![8, 2],
            ),
            ("lora_unet_img_in.lora_down.weight", vec![2, 64]),
            ("lora_unet_img_in.lora_up.weight", vec![32, 2]),
        ],
    );
    let plain = model_without_slots(d);

    let cases: Vec<(&str, Option<&Path>, String, &[&str])> = vec![
        (
            "malformed",
            None,
            malformed.display().to_string(),
            &["not a valid safetensors file"],
        ),
        (
            "another model",
            None,
            other.display().to_string(),
            &["x_embedder", "[64 -> 32]", "[128 -> 32]"],
        ),
        (
            "text encoder",
            None,
            te.display().to_string(),
            &["text-encoder", "--lora FILE:SCALE"],
        ),
        (
            "no slots",
            Some(&plain),
            good.display().to_string(),
            &["no LoRA slots", "--lora-slots"],
        ),
        (
            "bad scale",
            None,
            format!("{}:strong", good.display()),
            &["not a number"],
        ),
        (
            "infinite scale",
            None,
            format!("{}:inf", good.display()),
            &["finite"],
        ),
        (
            "missing file",
            None,
            d.join("nope.safetensors").display().to_string(),
            &["does not exist"],
        ),
    ];
    for (what, model_dir, spec, needles) in cases {
        let out = d.join(format!("{}.png", what.replace(' ', "-")));
        let mut args = case_args(m, case, &out);
        if let Some(p) = model_dir {
            args[2] = p.display().to_string();
        }
        args.extend(["--lora".into(), spec]);
        let o = run_cli(&args);
        let err = stderr(&o);
        assert!(!o.status.success(), "{what}: succeeded\n{err}");
        assert!(!err.contains("panicked"), "{what}: {err}");
        for n in needles {
            assert!(err.contains(n), "{what}: no {n:?} in\n{err}");
        }
        assert!(!out.exists(), "{what}: wrote {}", out.display());
    }
}

// ------------------------------------------------------------------------------------------------------
// Server
// ------------------------------------------------------------------------------------------------------

fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let status = String::from_utf8_lossy(&raw[..end])
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let body = serde_json::from_slice(&raw[end + 4..]).unwrap_or(Value::Null);
    (status, body)
}

fn png_of(v: &Value) -> image::RgbImage {
    let b64 = v["images"][0]["png_base64"].as_str().expect("an image");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    image::load_from_memory(&bytes).unwrap().to_rgb8()
}

#[test]
fn server_applies_loras_per_request() {
    let m = "tiny-flux-schnell";
    let case = lora_cases(m).into_iter().next().unwrap();
    let mut config = fluxrt::serve::Config::new(model(m));
    config.warmup = false;
    config.load.threads = Some(1);
    config.loras = vec![("style".into(), root().join(&case.loras[0].file))];
    let server = TestServer::start(config);
    let addr = server.addr;

    let (status, models) = http(addr, "GET", "/v1/models", b"");
    assert_eq!(status, 200);
    assert_eq!(models["data"][0]["loras"][0]["name"], "style");
    assert!(
        !models.to_string().contains("tests/data"),
        "no server paths: {models}"
    );

    let base = json!({"prompt": case.prompt, "width": case.width, "height": case.height,
                      "steps": case.steps, "seed": case.seed});
    let mut with = base.clone();
    with["loras"] = json!([{"name": "style", "scale": case.loras[0].scale}]);
    let (s1, r1) = http(addr, "POST", "/v1/generate", with.to_string().as_bytes());
    assert_eq!(s1, 200, "{r1}");
    assert_eq!(r1["loras"][0]["name"], "style");
    let (s2, r2) = http(addr, "POST", "/v1/generate", base.to_string().as_bytes());
    assert_eq!(s2, 200, "{r2}");
    let (img1, img2) = (png_of(&r1), png_of(&r2));
    assert_ne!(img1, img2, "the LoRA changes the image");
    assert!(levels_off(&img1, &golden_image(m, &case.file).1) <= 1.0);
    assert!(levels_off(&img2, &plain_golden(m, &case)) <= 1.0);
    // The same pixels as the library (and so as `fluxrt generate`).
    let mut pipe = load(m);
    let lib = pipe
        .generate(
            &request(&pipe, &case, choices(&pipe, &case)),
            &mut Quiet,
            &Canceller::new(),
            false,
        )
        .unwrap();
    assert_eq!(lib.images[0].rgb, img1);

    // Unknown names and bad scales: 422 on `loras`, naming what the server has.
    let mut bad = base.clone();
    bad["loras"] = json!([{"name": "nope"}]);
    let (s, r) = http(addr, "POST", "/v1/generate", bad.to_string().as_bytes());
    assert_eq!(s, 422, "{r}");
    assert_eq!(r["error"]["param"], "loras");
    assert!(
        r["error"]["message"].as_str().unwrap().contains("style"),
        "{r}"
    );
    bad["loras"] = json!([{"name": "style", "scale": "x"}]);
    assert_eq!(
        http(addr, "POST", "/v1/generate", bad.to_string().as_bytes()).0,
        422
    );

    server.shutdown().0.unwrap();
}

#[test]
fn server_refuses_to_start_with_a_bad_lora() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.safetensors");
    std::fs::write(&bad, b"garbage").unwrap();
    let o = fluxrt()
        .args([
            "serve",
            "--port",
            "0",
            "--no-warmup",
            "--threads",
            "1",
            "--lora",
        ])
        .arg(format!("style={}", bad.display()))
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("not a valid safetensors file") && err.contains("style"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let o = fluxrt()
        .args(["serve", "--lora", "no-equals-sign"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("NAME=FILE"), "{}", stderr(&o));
}
