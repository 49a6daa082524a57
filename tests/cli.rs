//! `fluxrt` as users run it: parity through the CLI, determinism, batching, and every kind of bad input.

mod common;

use std::path::{Path, PathBuf};

use common::*;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn gen_args<'a>(model: &'a str, out: &'a str) -> Vec<&'a str> {
    vec!["generate", "--model", model, "--output", out]
}

/// Runs `fluxrt generate` and expects success.
fn generate_ok(args: &[&str]) -> std::process::Output {
    let o = run(args);
    assert!(
        o.status.success(),
        "fluxrt {args:?} failed:\n{}",
        stderr(&o)
    );
    o
}

/// Runs a command that must fail cleanly: non-zero exit, a message containing each needle, no panic.
fn fails_with(args: &[&str], needles: &[&str]) -> String {
    let o = run(args);
    let err = stderr(&o);
    assert!(!o.status.success(), "fluxrt {args:?} should fail");
    assert!(
        !err.contains("panicked"),
        "fluxrt {args:?} panicked:\n{err}"
    );
    assert!(
        err.starts_with("error: "),
        "fluxrt {args:?}: no error line:\n{err}"
    );
    for n in needles {
        assert!(
            err.contains(n),
            "fluxrt {args:?}: message lacks {n:?}:\n{err}"
        );
    }
    err
}

#[test]
fn cli_png_matches_diffusers_within_one_level() {
    for m in MODELS {
        let model_dir = model(m);
        for case in cases(m) {
            let dir = tmp();
            let out = dir.path().join("img.png");
            let (w, h, steps, seed) = (
                case.width.to_string(),
                case.height.to_string(),
                case.steps.to_string(),
                case.seed.to_string(),
            );
            let mut args = vec![
                "generate",
                "--model",
                model_dir.to_str().unwrap(),
                "--prompt",
                &case.prompt,
                "--width",
                &w,
                "--height",
                &h,
                "--steps",
                &steps,
                "--seed",
                &seed,
                "--output",
                out.to_str().unwrap(),
            ];
            let g;
            if let Some(guidance) = case.guidance {
                g = guidance.to_string();
                args.extend(["--guidance", &g]);
            }
            generate_ok(&args);
            let png = decode_png(&out);
            let (shape, want) = Golden::load(m, &case).f32("image");
            assert_eq!(
                (png.height() as usize, png.width() as usize),
                (shape[2], shape[3])
            );
            let (hh, ww) = (shape[2], shape[3]);
            let mut worst = 0.0f32;
            for c in 0..3 {
                for y in 0..hh {
                    for x in 0..ww {
                        let got = png.get_pixel(x as u32, y as u32)[c] as f32;
                        let exp = want[c * hh * ww + y * ww + x] * 255.0;
                        worst = worst.max((got - exp).abs());
                    }
                }
            }
            assert!(
                worst <= 1.0,
                "{m}/{}: PNG is {worst} levels off the diffusers image",
                case.name
            );
        }
    }
}

#[test]
fn same_seed_same_bytes_other_seed_other_image() {
    let dir = tmp();
    let p = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    for (name, seed) in [("a.png", "5"), ("b.png", "5"), ("c.png", "6")] {
        generate_ok(&[
            "generate",
            "--prompt",
            "a red fox",
            "--width",
            "64",
            "--height",
            "64",
            "--seed",
            seed,
            "--output",
            &p(name),
        ]);
    }
    let a = std::fs::read(p("a.png")).unwrap();
    assert_eq!(
        a,
        std::fs::read(p("b.png")).unwrap(),
        "same seed must give identical PNG bytes"
    );
    assert_ne!(
        decode_png(Path::new(&p("a.png"))),
        decode_png(Path::new(&p("c.png"))),
        "another seed, another image"
    );
    let params = fluxrt::image_out::read_png_parameters(&a).expect("parameters chunk");
    assert!(params.starts_with("a red fox\n"), "{params}");
    for key in [
        "Steps: 4",
        "Seed: 5",
        "Size: 64x64",
        "Model: tiny-flux-schnell",
        "Provider: cpu",
    ] {
        assert!(params.contains(key), "{key} missing in {params}");
    }
}

#[test]
fn num_images_equals_single_runs_with_matching_seeds() {
    let dir = tmp();
    let d = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    generate_ok(&[
        "generate",
        "--prompt",
        "a boat",
        "--width",
        "64",
        "--height",
        "48",
        "--seed",
        "11",
        "--num-images",
        "2",
        "--output",
        &d("batch-{seed}.png"),
    ]);
    for seed in ["11", "12"] {
        generate_ok(&[
            "generate",
            "--prompt",
            "a boat",
            "--width",
            "64",
            "--height",
            "48",
            "--seed",
            seed,
            "--output",
            &d(&format!("single-{seed}.png")),
        ]);
        assert_eq!(
            decode_png(Path::new(&d(&format!("batch-{seed}.png")))),
            decode_png(Path::new(&d(&format!("single-{seed}.png")))),
            "image with seed {seed} differs between the batch and a single run"
        );
    }
}

#[test]
fn json_report_lists_files_seeds_timings_and_providers() {
    let dir = tmp();
    let out = dir.path().join("j.png");
    let o = generate_ok(&[
        "generate",
        "--prompt",
        "x",
        "--width",
        "32",
        "--height",
        "32",
        "--json",
        "--output",
        out.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("JSON on stdout");
    assert_eq!(v["files"][0], out.to_str().unwrap());
    assert!(v["seeds"][0].is_u64(), "a random seed is reported: {v}");
    assert_eq!(v["providers"][0], "cpu");
    assert_eq!(
        v["timings_ms"]["denoise_steps"].as_array().unwrap().len(),
        4
    );
    for k in [
        "load",
        "tokenize",
        "clip",
        "t5",
        "vae_decode",
        "png_encode_write",
        "generate_total",
    ] {
        assert!(v["timings_ms"][k].is_number(), "timing {k} missing: {v}");
    }
}

#[test]
fn existing_output_is_kept_without_overwrite() {
    let dir = tmp();
    let out = dir.path().join("keep.png");
    std::fs::write(&out, b"precious").unwrap();
    let o = out.to_str().unwrap();
    fails_with(
        &[
            "generate", "--prompt", "x", "--width", "32", "--height", "32", "--output", o,
        ],
        &["exists", "--overwrite"],
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    generate_ok(&[
        "generate",
        "--prompt",
        "x",
        "--width",
        "32",
        "--height",
        "32",
        "--output",
        o,
        "--overwrite",
    ]);
    assert_ne!(std::fs::read(&out).unwrap(), b"precious");
}

#[test]
fn bad_sizes_steps_and_providers_are_refused_before_work() {
    let dir = tmp();
    let out = dir.path().join("x.png");
    let o = out.to_str().unwrap();
    let base = |extra: &[&'static str]| {
        let mut v: Vec<String> = ["generate", "--prompt", "x", "--output", o]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let check = |extra: &[&'static str], needles: &[&str]| {
        let args = base(extra);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        fails_with(&refs, needles);
        assert!(!out.exists(), "no output file after a failed run");
    };
    check(
        &["--width", "100", "--height", "100"],
        &["multiple of 16", "96", "112"],
    );
    check(&["--width", "0", "--height", "0"], &["width"]);
    check(&["--width", "100000", "--height", "100000"], &["pixels"]);
    check(&["--steps", "0"], &["steps"]);
    check(&["--provider", "warp-drive"], &["unknown", "cpu"]);
    check(&["--provider", "cuda", "--no-fallback"], &["cuda"]);
    check(&["--num-images", "0"], &["num-images"]);
}

#[test]
fn unavailable_provider_falls_back_to_cpu_with_a_warning() {
    let dir = tmp();
    let out = dir.path().join("f.png");
    let o = generate_ok(&[
        "generate",
        "--prompt",
        "x",
        "--width",
        "32",
        "--height",
        "32",
        "--provider",
        "cuda,cpu",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(
        stderr(&o).contains("warning: provider cuda not used"),
        "{}",
        stderr(&o)
    );
    assert!(out.exists());
}

#[test]
fn prompts_long_and_empty() {
    let dir = tmp();
    let long = "a very long prompt about foxes ".repeat(400); // > 10,000 characters
    let out = dir.path().join("long.png");
    let o = generate_ok(&[
        "generate",
        "--prompt",
        &long,
        "--width",
        "32",
        "--height",
        "32",
        "--output",
        out.to_str().unwrap(),
    ]);
    let err = stderr(&o);
    assert!(
        err.contains("warning") && err.contains("CLIP") && err.contains("T5"),
        "truncation warnings: {err}"
    );
    let out = dir.path().join("empty.png");
    generate_ok(&[
        "generate",
        "--prompt",
        "",
        "--width",
        "32",
        "--height",
        "32",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(out.exists());
}

#[test]
fn unwritable_output_folder_is_refused() {
    let dir = tmp();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let out = file.join("img.png");
    fails_with(
        &[
            "generate",
            "--prompt",
            "x",
            "--output",
            out.to_str().unwrap(),
        ],
        &["not-a-dir"],
    );
    let missing = dir.path().join("missing/img.png");
    fails_with(
        &[
            "generate",
            "--prompt",
            "x",
            "--output",
            missing.to_str().unwrap(),
        ],
        &["missing"],
    );
}

#[test]
fn ort_library_missing_or_unusable() {
    let dir = tmp();
    let out = dir.path().join("x.png");
    let o = out.to_str().unwrap();
    fails_with(
        &[
            "generate",
            "--prompt",
            "x",
            "--output",
            o,
            "--ort-lib",
            "/nonexistent/libonnxruntime.so",
        ],
        &["pip install onnxruntime"],
    );
    let fake = dir.path().join("libonnxruntime.so.1.31.1");
    std::fs::write(&fake, b"not a library").unwrap();
    fails_with(
        &[
            "generate",
            "--prompt",
            "x",
            "--output",
            o,
            "--ort-lib",
            fake.to_str().unwrap(),
        ],
        &["libonnxruntime"],
    );
    assert!(!out.exists());
}

/// A full copy of a bundled model (symlinks resolved) that a test may damage.
fn copy_model(name: &str, dst: &Path) -> PathBuf {
    let src = model(name);
    let to = dst.join(name);
    copy_dir(&src, &to);
    to
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        let target = dst.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &target);
        } else {
            std::fs::copy(&p, &target).unwrap();
        }
    }
}

fn damaged_model_fails(damage: impl Fn(&Path), needles: &[&str]) {
    let dir = tmp();
    let m = copy_model("tiny-flux-schnell", dir.path());
    damage(&m);
    let out = dir.path().join("out.png");
    fails_with(
        &gen_args(m.to_str().unwrap(), out.to_str().unwrap())
            .iter()
            .copied()
            .chain(["--prompt", "x"])
            .collect::<Vec<_>>(),
        needles,
    );
    assert!(!out.exists(), "no partial output");
}

#[test]
fn missing_model_folder() {
    let dir = tmp();
    let out = dir.path().join("o.png");
    fails_with(
        &[
            "generate",
            "--prompt",
            "x",
            "--model",
            "/nonexistent/model",
            "--output",
            out.to_str().unwrap(),
        ],
        &["does not exist", "hint"],
    );
}

#[test]
fn missing_empty_truncated_or_corrupt_graphs() {
    damaged_model_fails(
        |m| std::fs::remove_file(m.join("transformer.onnx")).unwrap(),
        &["transformer", "missing"],
    );
    damaged_model_fails(
        |m| std::fs::write(m.join("vae_decoder.onnx"), b"").unwrap(),
        &["vae_decoder", "empty"],
    );
    damaged_model_fails(
        |m| {
            let p = m.join("t5.onnx");
            let bytes = std::fs::read(&p).unwrap();
            std::fs::write(&p, &bytes[..bytes.len() / 3]).unwrap();
        },
        &["t5.onnx"],
    );
    damaged_model_fails(
        |m| std::fs::write(m.join("clip.onnx"), b"this is not a protobuf at all").unwrap(),
        &["clip.onnx"],
    );
}

#[test]
fn missing_tokenizer() {
    damaged_model_fails(
        |m| std::fs::remove_file(m.join("tokenizer_2/tokenizer.json")).unwrap(),
        &["T5 tokenizer", "tokenizer_2"],
    );
}

/// Replaces every occurrence of `from` with `to` (same length) in a protobuf file: renames a graph input
/// consistently without a protobuf library.
fn rename_in_file(path: &Path, from: &[u8], to: &[u8]) {
    assert_eq!(from.len(), to.len());
    let mut bytes = std::fs::read(path).unwrap();
    let mut n = 0;
    let mut i = 0;
    while i + from.len() <= bytes.len() {
        if &bytes[i..i + from.len()] == from {
            bytes[i..i + from.len()].copy_from_slice(to);
            n += 1;
            i += from.len();
        } else {
            i += 1;
        }
    }
    assert!(
        n > 0,
        "{} has no {:?}",
        path.display(),
        String::from_utf8_lossy(from)
    );
    std::fs::write(path, bytes).unwrap();
}

/// Sets the element type of graph input `name` (ValueInfoProto -> TypeProto.tensor_type.elem_type).
fn set_input_elem_type(path: &Path, name: &str, elem: u8) {
    let mut bytes = std::fs::read(path).unwrap();
    let mut key = vec![0x0a, name.len() as u8];
    key.extend_from_slice(name.as_bytes());
    let at = bytes
        .windows(key.len())
        .rposition(|w| w == key)
        .expect("input name in the graph");
    // name, then field 2 (type): 0x12 len, TypeProto field 1 (tensor_type): 0x0a len, field 1 (elem_type): 0x08 v
    let mut i = at + key.len();
    assert_eq!(bytes[i], 0x12);
    i += 2;
    assert_eq!(bytes[i], 0x0a);
    i += 2;
    assert_eq!(bytes[i], 0x08);
    bytes[i + 1] = elem;
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn a_graph_with_a_renamed_input_or_wrong_dtype_is_reported_before_inference() {
    damaged_model_fails(
        |m| {
            rename_in_file(
                &m.join("transformer.onnx"),
                b"pooled_projections",
                b"pooled_projectionz",
            )
        },
        &[
            "contract",
            "pooled_projections",
            "missing",
            "pooled_projectionz",
        ],
    );
    damaged_model_fails(
        |m| set_input_elem_type(&m.join("t5.onnx"), "input_ids", 1),
        &["contract", "input_ids", "f32"],
    );
}

#[test]
fn tokenize_prints_both_tokenizers() {
    let o = run(&["tokenize", "--prompt", "a photo of a cat", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let clip: Vec<i64> = serde_json::from_value(v["clip"]["ids"].clone()).unwrap();
    assert_eq!(&clip[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
    assert_eq!(clip.len(), 77);
    assert_eq!(v["clip"]["tokens"][2], "photo</w>");
    assert_eq!(v["clip"]["padding"], 70);
    let t5: Vec<i64> = serde_json::from_value(v["t5"]["ids"].clone()).unwrap();
    assert_eq!(&t5[..8], &[3, 9, 1202, 13, 3, 9, 1712, 1]);
    assert_eq!(t5.len(), 256);
    assert_eq!(v["t5"]["tokens"].as_array().unwrap().len(), 8);
    assert_eq!(v["clip"]["truncated"], false);
    // Without --json: one line per token with its string, the padding counted, not listed.
    let o = run(&["tokenize", "--prompt", "a photo of a cat"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains("CLIP: 7 of 77 tokens used, 70 padding"),
        "{text}"
    );
    assert!(
        text.contains("T5: 8 of 256 tokens used, 248 padding"),
        "{text}"
    );
    assert!(
        text.contains("1125  photo</w>") && text.contains("1202  ▁photo"),
        "{text}"
    );
    assert!(text.lines().count() < 25, "padding is not listed:\n{text}");
    let long = "word ".repeat(80);
    let text = stdout(&run(&["tokenize", "--prompt", &long]));
    assert!(
        text.contains("truncated: the last 5 token(s) do not fit"),
        "{text}"
    );
}

#[test]
fn info_and_providers_describe_the_setup() {
    let o = run(&["info", model("tiny-flux-dev").to_str().unwrap()]);
    let out = stdout(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    for needle in [
        "variant   dev",
        "guidance f32[B]",
        "hidden_states f32[B, S, 64]",
        "images f32[B, 3, H, W]",
    ] {
        assert!(out.contains(needle), "{needle} missing:\n{out}");
    }
    assert!(!out.contains("PROBLEM"), "{out}");
    let o = run(&["providers", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let cpu = v["providers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "cpu")
        .unwrap();
    assert_eq!(cpu["usable"], true);
    let cuda = v["providers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "cuda")
        .unwrap();
    assert_eq!(cuda["usable"], false);
    assert!(cuda["reason"].as_str().unwrap().len() > 5);
}

/// The README's promise: a request the user can fix exits with 2 (as clap's usage errors do), anything else with 1.
#[test]
fn bad_requests_exit_with_code_2_and_a_broken_model_with_1() {
    let dir = tmp();
    let out = dir.path().join("o.png");
    let o = out.to_str().unwrap();
    let missing = dir.path().join("missing");
    let m = missing.to_str().unwrap();
    let missing_out = missing.join("o.png");
    let lora = missing.join("l.safetensors");
    let config = missing.join("fluxrt.toml");
    let cases: Vec<Vec<&str>> = vec![
        vec!["generate", "--prompt", "x", "--model", m, "--output", o],
        vec![
            "generate",
            "--prompt",
            "x",
            "--init-image",
            m,
            "--output",
            o,
        ],
        vec![
            "generate",
            "--prompt",
            "x",
            "--output",
            missing_out.to_str().unwrap(),
        ],
        vec![
            "generate",
            "--prompt",
            "x",
            "--lora",
            lora.to_str().unwrap(),
            "--output",
            o,
        ],
        vec![
            "generate",
            "--prompt",
            "x",
            "--config",
            config.to_str().unwrap(),
            "--output",
            o,
        ],
        vec!["generate", "--prompt", "x", "--width", "100", "--output", o],
        vec!["generate", "--prompt", "x", "--threads", "0", "--output", o],
        vec!["info", "--model", m],
        vec!["tokenize", "--prompt", "x", "--model", m],
    ];
    for args in cases {
        let r = run(&args);
        assert_eq!(r.status.code(), Some(2), "fluxrt {args:?}: {}", stderr(&r));
        assert!(!stderr(&r).contains("panicked"), "{}", stderr(&r));
    }
    assert!(!out.exists());
    // A model folder whose graph is damaged is not the request's fault.
    let broken = copy_model("tiny-flux-schnell", &dir.path().join("broken"));
    std::fs::write(broken.join("t5.onnx"), b"not a graph").unwrap();
    let r = run(&[
        "generate",
        "--prompt",
        "x",
        "--model",
        broken.to_str().unwrap(),
        "--output",
        o,
    ]);
    assert_eq!(r.status.code(), Some(1), "{}", stderr(&r));
}

/// `fluxrt info MODEL | head`: a reader that stops early is not an error, and never a panic.
#[test]
fn a_closed_stdout_is_not_a_panic() {
    use std::process::Stdio;
    let dir = tmp();
    let out = dir.path().join("o.png");
    let model_dir = model("tiny-flux-dev");
    let m = model_dir.to_str().unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["info", m],
        vec!["info", "--json", "--model", m],
        vec!["providers"],
        vec!["providers", "--json"],
        vec!["tokenize", "--prompt", "a photo of a cat"],
        vec!["tokenize", "--json", "--prompt", "a photo of a cat"],
        vec!["cache", "--dir", dir.path().to_str().unwrap()],
        vec![
            "generate",
            "--prompt",
            "x",
            "--width",
            "64",
            "--height",
            "64",
            "--json",
            "--output",
            out.to_str().unwrap(),
        ],
        vec![
            "bench", "--sizes", "64x64", "--runs", "1", "--warmup", "0", "--quiet",
        ],
        vec![
            "bench", "--sizes", "64x64", "--runs", "1", "--warmup", "0", "--quiet", "--json", "-",
        ],
    ];
    for args in cases {
        let mut child = fluxrt()
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take()); // the reader is gone before anything is written
        let o = child.wait_with_output().unwrap();
        let err = stderr(&o);
        assert!(
            !err.contains("panicked"),
            "fluxrt {args:?} panicked:\n{err}"
        );
        assert!(o.status.success(), "fluxrt {args:?}: {:?}\n{err}", o.status);
        let _ = std::fs::remove_file(&out);
    }
}

#[test]
fn an_empty_fluxrt_threads_is_unset_and_a_bad_one_is_named() {
    let dir = tmp();
    let out = dir.path().join("x.png");
    let args = [
        "generate", "--prompt", "x", "--width", "64", "--height", "64", "--steps", "1",
    ];
    let o = fluxrt()
        .args(args)
        .arg("--output")
        .arg(&out)
        .env("FLUXRT_THREADS", "")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.is_file());
    let o = fluxrt()
        .args(args)
        .arg("--output")
        .arg(dir.path().join("y.png"))
        .env("FLUXRT_THREADS", "many")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--threads"), "{}", stderr(&o));
}
