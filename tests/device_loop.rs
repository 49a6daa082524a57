//! The device-resident denoising loop (issue 7): on CPU the "device" is host memory and the same code path runs, so
//! it must give the plain loop's image (and the host-bound loop's) for schnell and dev, batch 2, and true CFG; the
//! CLI reports which loop ran.

mod common;

use common::*;
use fluxrt::pipeline::{LoadOptions, Pipeline, Quiet, Request};
use fluxrt::runtime::{Canceller, DeviceLoop, LoopKind};

/// The tolerance; on CPU the step graph computes the same f32 operations, so it is usually exactly 0.
const TOL: f32 = 1e-6;

fn load(name: &str) -> Pipeline {
    load_dir(model(name))
}

fn load_dir(dir: std::path::PathBuf) -> Pipeline {
    let mut o = LoadOptions::new(dir);
    o.threads = Some(1);
    Pipeline::load(&o).expect("the model loads")
}

fn request(pipe: &Pipeline, images: usize, cfg: bool) -> Request {
    let mut r = Request::new(&pipe.engine().spec, "a red fox in the snow", 11);
    r.width = 128;
    r.height = 128;
    r.steps = 3;
    r.num_images = images;
    if cfg {
        r.negative_prompt = Some("blurry".into());
        r.true_cfg = 3.0;
    }
    r
}

/// Runs `req` with each loop; returns (loop that ran, final latents, images as floats).
fn generate_with(
    pipe: &mut Pipeline,
    req: &Request,
    mode: DeviceLoop,
    io_binding: bool,
) -> (LoopKind, Vec<f32>, Vec<f32>) {
    pipe.set_device_loop(mode);
    pipe.set_io_binding(io_binding);
    let out = pipe
        .generate(req, &mut Quiet, &Canceller::new(), true)
        .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
    let tr = out.trace.unwrap();
    assert_eq!(tr.latents.len(), req.steps, "one latent trace per step");
    let last = tr.latents.last().unwrap().as_slice().unwrap().to_vec();
    let img = tr.images.unwrap().as_slice().unwrap().to_vec();
    (pipe.denoise_loop(), last, img)
}

/// Runs `req` with each loop and no trace, the normal path (the latents come back to the host once, at the end);
/// returns the loop that ran and each image's RGB bytes.
fn images_with(
    pipe: &mut Pipeline,
    req: &Request,
    mode: DeviceLoop,
    io_binding: bool,
) -> (LoopKind, Vec<Vec<u8>>) {
    pipe.set_device_loop(mode);
    pipe.set_io_binding(io_binding);
    let out = pipe
        .generate(req, &mut Quiet, &Canceller::new(), false)
        .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
    assert!(out.trace.is_none());
    let rgb = out.images.into_iter().map(|i| i.rgb.into_raw()).collect();
    (pipe.denoise_loop(), rgb)
}

fn check(name: &str, images: usize, cfg: bool) {
    check_pipe(load(name), name, images, cfg);
}

fn check_pipe(mut pipe: Pipeline, name: &str, images: usize, cfg: bool) {
    let f32_graph = name != "fp16";
    let req = request(&pipe, images, cfg);
    let (plain_kind, plain_x, plain_img) = generate_with(&mut pipe, &req, DeviceLoop::Off, false);
    assert_eq!(plain_kind, LoopKind::Plain);
    let (dev_kind, dev_x, dev_img) = generate_with(&mut pipe, &req, DeviceLoop::On, false);
    assert_eq!(dev_kind, LoopKind::Device, "{name}: the device loop ran");
    assert_eq!(pipe.device_loop_fallback(), None);
    let what = format!("{name} batch {images} cfg {cfg}");
    let dx = max_abs_diff(&format!("{what}: latents"), &dev_x, &plain_x);
    let di = max_abs_diff(&format!("{what}: image"), &dev_img, &plain_img);
    assert!(dx <= TOL && di <= TOL, "{what}: latents {dx}, image {di}");
    // Auto is off on CPU: the host-bound loop runs, true CFG included (plain runs for a graph whose latents are not
    // f32: the host binding updates f32 buffers in place).
    let (auto_kind, _, auto_img) = generate_with(&mut pipe, &req, DeviceLoop::Auto, true);
    let want = if !f32_graph {
        LoopKind::Plain
    } else {
        LoopKind::HostBound
    };
    assert_eq!(auto_kind, want);
    assert!(max_abs_diff(&what, &auto_img, &plain_img) <= TOL);
    // Every step's trace matches too (the latents come back per step only with a trace).
    let (_, again_x, _) = generate_with(&mut pipe, &req, DeviceLoop::On, false);
    assert_eq!(
        again_x, dev_x,
        "{what}: the cached step graph gives the same result"
    );
}

#[test]
fn schnell_device_loop_matches_plain_loop() {
    check("tiny-flux-schnell", 1, false);
    check("tiny-flux-schnell", 2, false);
}

#[test]
fn dev_device_loop_matches_plain_loop() {
    check("tiny-flux-dev", 2, false);
}

#[test]
fn true_cfg_runs_in_the_device_loop() {
    check("tiny-flux-dev", 2, true);
}

#[test]
fn fp16_transformer_runs_in_the_device_loop() {
    // An fp16 export takes fp16 latents and an fp16 timestep: the step graph casts both, as the host loop converts
    // them (round to nearest even), and the velocity back to f32.
    let dir = tempfile::tempdir().unwrap();
    let fp16 = quantized_model(dir.path(), "fp16");
    check_pipe(load_dir(fp16.clone()), "fp16", 1, false);
    check_pipe(load_dir(fp16), "fp16", 1, true);
}

#[test]
fn untraced_device_loop_matches_plain_loop() {
    // Without a trace only the last step's latents come back: the images must still be the plain loop's, exactly.
    for name in ["tiny-flux-schnell", "tiny-flux-dev"] {
        let mut pipe = load(name);
        let lora = pipe
            .load_lora(&root().join(format!("tests/data/lora/{name}-diffusers.safetensors")))
            .expect("the LoRA fixture loads");
        for (images, cfg, with_lora) in [
            (1, false, false),
            (2, false, false),
            (1, true, false),
            (2, true, false),
            (2, false, true),
            (2, true, true),
        ] {
            let what = format!("{name} batch {images} cfg {cfg} lora {with_lora}");
            let mut req = request(&pipe, images, cfg);
            if with_lora {
                req.loras = vec![fluxrt::lora::LoraChoice::new(lora.clone(), 0.8)];
            }
            let (kind, plain) = images_with(&mut pipe, &req, DeviceLoop::Off, false);
            assert_eq!(kind, LoopKind::Plain, "{what}");
            assert_eq!(plain.len(), images, "{what}");
            let (kind, dev) = images_with(&mut pipe, &req, DeviceLoop::On, false);
            assert_eq!(kind, LoopKind::Device, "{what}");
            assert!(dev == plain, "{what}: the device loop's images differ");
            // The host-bound loop also copies its latents back once (true CFG: the first half of its [x; x]).
            let (kind, bound) = images_with(&mut pipe, &req, DeviceLoop::Off, true);
            assert_eq!(kind, LoopKind::HostBound, "{what}");
            assert!(
                bound == plain,
                "{what}: the host-bound loop's images differ"
            );
        }
    }
}

#[test]
fn generate_json_reports_the_loop() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let o = generate_cli(&out, &["--device-loop", "on", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("JSON on stdout");
    assert_eq!(v["device_loop"], "on", "{v}");
    assert_eq!(v["denoise_loop"], "device", "{v}");

    let o = generate_cli(&dir.path().join("y.png"), &["--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["device_loop"], "auto", "{v}");
    assert_eq!(v["denoise_loop"], "host-bound", "{v}");

    let o = generate_cli(&out, &["--device-loop", "sometimes"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("auto, on or off"), "{}", stderr(&o));
}

/// `fluxrt generate` of a 64x64 schnell image into `out`, with `extra` flags.
fn generate_cli(out: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let m = model("tiny-flux-schnell");
    let mut args = vec![
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        "a fox",
        "--width",
        "64",
        "--height",
        "64",
        "--output",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run(&args)
}

#[test]
fn nan_guard_names_the_step() {
    // A guidance of 3e38 overflows the guidance embedding (g * 1000), so the velocity is NaN at the first step.
    let mut pipe = load("tiny-flux-dev");
    let mut req = request(&pipe, 1, false);
    req.guidance = Some(3e38);
    for mode in [DeviceLoop::On, DeviceLoop::Off] {
        pipe.set_device_loop(mode);
        let e = pipe
            .generate(&req, &mut Quiet, &Canceller::new(), false)
            .unwrap_err();
        assert_eq!(e.kind, fluxrt::ErrorKind::Numerics, "{mode:?}: {e}");
        assert!(e.message.contains("NaN/Inf"), "{e}");
        if mode == DeviceLoop::On {
            assert_eq!(pipe.denoise_loop(), LoopKind::Device);
            assert!(
                e.message
                    .starts_with("transformer output (velocity) at step 1 contains"),
                "{e}"
            );
        }
    }
}

#[test]
fn bench_json_reports_the_loop() {
    let m = model("tiny-flux-schnell");
    let o = run(&[
        "bench",
        "--model",
        m.to_str().unwrap(),
        "--sizes",
        "64x64",
        "--steps",
        "2",
        "--warmup",
        "0",
        "--runs",
        "1",
        "--device-loop",
        "on",
        "--no-optimized-cache",
        "--quiet",
        "--json",
        "-",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("JSON on stdout");
    assert_eq!(v["settings"]["device_loop"], "on", "{v}");
    assert_eq!(v["results"][0]["sizes"][0]["denoise_loop"], "device", "{v}");
}

#[test]
fn device_loop_with_a_lora_and_in_low_memory_mode() {
    // Run-time LoRA factors are extra transformer inputs: bound once with the embeddings.
    let mut pipe = load("tiny-flux-schnell");
    let lora = pipe
        .load_lora(&root().join("tests/data/lora/tiny-flux-schnell-diffusers.safetensors"))
        .expect("the LoRA fixture loads");
    let mut req = request(&pipe, 2, false);
    req.loras = vec![fluxrt::lora::LoraChoice::new(lora, 0.8)];
    let (_, _, plain) = generate_with(&mut pipe, &req, DeviceLoop::Off, false);
    let (kind, _, dev) = generate_with(&mut pipe, &req, DeviceLoop::On, false);
    assert_eq!(kind, LoopKind::Device);
    assert!(max_abs_diff("lora", &dev, &plain) <= TOL);
    let bare = request(&pipe, 2, false);
    let (_, _, no_lora) = generate_with(&mut pipe, &bare, DeviceLoop::On, false);
    // The fixture at 0.8 moves image values by ~0.7 (of 2, the [-1, 1] range); any bound-at-all change passes 0.
    let effect = max_abs_diff("lora effect", &no_lora, &plain);
    assert!(effect > 1e-2, "the LoRA changes the image: {effect}");

    // Low-memory mode loads the transformer for the loop only; the device loop runs the same.
    let mut o = LoadOptions::new(model("tiny-flux-schnell"));
    o.threads = Some(1);
    o.low_memory = true;
    let mut low = Pipeline::load(&o).unwrap();
    let req = request(&low, 1, false);
    let (_, _, plain) = generate_with(&mut low, &req, DeviceLoop::Off, false);
    let (kind, _, dev) = generate_with(&mut low, &req, DeviceLoop::On, false);
    assert_eq!(kind, LoopKind::Device);
    assert!(max_abs_diff("low memory", &dev, &plain) <= TOL);
}

#[test]
fn later_generations_reuse_the_same_transformer_buffers() {
    // CUDA graphs replay the device addresses of their capture run, so the loop keeps the transformer's buffers
    // (latents, timestep, velocity, embeddings, ids, guidance) between generations and rewrites them in place.
    // On CPU the addresses are host memory, checked the same way; every image still equals the plain loop's.
    let mut pipe = load("tiny-flux-dev");
    assert!(!pipe.engine().transformer_cuda_graphs());
    assert_eq!(pipe.device_loop_buffers(), None);
    for (images, cfg) in [(2, false), (1, true)] {
        let req = request(&pipe, images, cfg);
        let mut other = req.clone();
        other.prompt = "a blue bird on a branch".into();
        other.seed = 5;
        let (_, plain_x, plain_img) = generate_with(&mut pipe, &req, DeviceLoop::Off, false);
        let (_, other_x, other_img) = generate_with(&mut pipe, &other, DeviceLoop::Off, false);
        let (kind, x, img) = generate_with(&mut pipe, &req, DeviceLoop::On, false);
        assert_eq!(kind, LoopKind::Device);
        let buffers = pipe.device_loop_buffers().expect("the device loop is kept");
        assert!(
            buffers.iter().any(|(n, _)| n == "encoder_hidden_states"),
            "{buffers:?}"
        );
        assert_eq!(
            (x, img),
            (plain_x.clone(), plain_img.clone()),
            "images {images} cfg {cfg}"
        );
        // Another prompt and seed in the same buffers, then the first request again.
        let (_, x, img) = generate_with(&mut pipe, &other, DeviceLoop::On, false);
        assert_eq!(pipe.device_loop_buffers().as_ref(), Some(&buffers));
        assert_eq!(
            (x, img),
            (other_x, other_img),
            "images {images} cfg {cfg}: second prompt"
        );
        let (_, x, img) = generate_with(&mut pipe, &req, DeviceLoop::Auto, false);
        assert_eq!(pipe.denoise_loop(), LoopKind::Plain, "auto is off on CPU");
        assert_eq!((x, img), (plain_x.clone(), plain_img.clone()));
        let (_, x, _) = generate_with(&mut pipe, &req, DeviceLoop::On, false);
        assert_eq!(pipe.device_loop_buffers().as_ref(), Some(&buffers));
        assert_eq!(x, plain_x);
    }
}
