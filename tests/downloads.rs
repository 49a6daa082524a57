//! The official BFL ONNX downloads as users have them, on faithful small copies made by the export step
//! (`python -m export layout bfl-download`: bf16 graphs, int32 ids, fixed text length, external data, ModelOpt
//! folders, no tokenizers) and a Hugging Face cache tree (`python -m export hub-cache`). docs/downloads.md.
//! Every fluxrt call runs as a process with its own HF_HUB_CACHE, so no test sees the machine's real cache.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;

fn export(args: &[&str]) {
    python_ok(
        &format!("python -m export {args:?}"),
        ["-m", "export"].iter().chain(args),
    );
}

/// A faithful copy of `model`'s BFL download (Kontext-style with `kontext`) in `dir`.
fn download(dir: &Path, model_name: &str, kontext: bool) -> PathBuf {
    let out = dir.join(format!("{model_name}-onnx"));
    let m = model(model_name);
    let mut args = vec![
        "layout",
        "bfl-download",
        m.to_str().unwrap(),
        out.to_str().unwrap(),
    ];
    if kontext {
        args.push("--kontext");
    }
    export(&args);
    out
}

/// A hub cache in `dir` holding FLUX.1-schnell's tokenizers, as `hf download` leaves them.
fn cache_with_tokenizers(dir: &Path) -> PathBuf {
    let cache = dir.join("hub");
    let m = model("tiny-flux-schnell");
    export(&[
        "hub-cache",
        cache.to_str().unwrap(),
        "black-forest-labs/FLUX.1-schnell",
        "--tokenizers-from",
        m.to_str().unwrap(),
    ]);
    cache
}

/// `fluxrt ARGS` with `cache` as the Hugging Face cache (an empty folder: no cache).
fn fluxrt_in(cache: &Path, args: &[&str]) -> Output {
    fluxrt()
        .args(args)
        .env("HF_HUB_CACHE", cache)
        .env_remove("FLUXRT_TOKENIZERS")
        .output()
        .expect("fluxrt runs")
}

fn fails(o: &Output, needles: &[&str]) -> String {
    let err = stderr(o);
    assert!(!o.status.success(), "should fail:\n{err}");
    assert!(!err.contains("panicked"), "panicked:\n{err}");
    for n in needles {
        assert!(err.contains(n), "message lacks {n:?}:\n{err}");
    }
    err
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "failed:\n{}", stderr(o));
    stdout(o)
}

fn generate<'a>(model_dir: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "generate",
        "--model",
        model_dir,
        "--prompt",
        "a lighthouse at dusk",
        "--width",
        "64",
        "--height",
        "48",
        "--steps",
        "3",
        "--seed",
        "8",
        "--output",
        out,
    ]
}

fn info_json(cache: &Path, model_dir: &Path) -> serde_json::Value {
    let out = ok(&fluxrt_in(
        cache,
        &["info", "--json", model_dir.to_str().unwrap()],
    ));
    serde_json::from_str(&out).unwrap()
}

fn psnr(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    let mse = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum::<f64>()
        / a.as_raw().len() as f64;
    if mse == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (255.0f64.powi(2) / mse).log10()
    }
}

#[test]
fn a_download_without_tokenizers_lists_every_place_looked_at() {
    let d = tempfile::tempdir().unwrap();
    let bfl = download(d.path(), "tiny-flux-schnell", false);
    assert!(!bfl.join("tokenizer").exists() && !bfl.join("transformer.opt/fp32").exists());
    let empty = d.path().join("empty-cache");
    std::fs::create_dir_all(&empty).unwrap();
    let out = d.path().join("x.png");
    let err = fails(
        &fluxrt_in(
            &empty,
            &generate(bfl.to_str().unwrap(), out.to_str().unwrap()),
        ),
        &[
            "no CLIP tokenizer found",
            "looked in",
            "FLUX.1-schnell",
            "FLUX.1-dev",
            "clip-vit-large-patch14",
            "hf download",
        ],
    );
    assert!(
        err.contains(&bfl.join("tokenizer").display().to_string()),
        "{err}"
    );
    assert!(!out.exists());
    // An explicit --tokenizers that lacks them is the only place looked at.
    let err = fails(
        &fluxrt_in(
            &empty,
            &[
                "info",
                bfl.to_str().unwrap(),
                "--tokenizers",
                empty.to_str().unwrap(),
            ],
        ),
        &["--tokenizers"],
    );
    assert!(!err.contains("FLUX.1-dev"), "{err}");
}

#[test]
fn tokenizers_from_the_encoders_own_repos_spiece_model_included() {
    // openai/clip-vit-large-patch14 (vocab.json + merges.txt at its root) and google/t5-v1_1-xxl (spiece.model and
    // configs only, no tokenizer.json): the last places looked at, and the T5 one read natively.
    let d = tempfile::tempdir().unwrap();
    let hub_style = d.path().join("hub-style");
    export(&[
        "hub-cache",
        d.path().join("scratch").to_str().unwrap(),
        "x/y",
        "--tokenizers-from",
        model("tiny-flux-schnell").to_str().unwrap(),
    ]);
    let scratch = fluxrt::model::hub::snapshot(&d.path().join("scratch"), "x/y").unwrap();
    copy_dir(&scratch.join("tokenizer"), &hub_style.join("clip"));
    let cache = d.path().join("hub");
    export(&[
        "hub-cache",
        cache.to_str().unwrap(),
        "openai/clip-vit-large-patch14",
        hub_style.join("clip").to_str().unwrap(),
    ]);
    let spiece = root().join("tests/data/tokenizers/t5-spiece");
    export(&[
        "hub-cache",
        cache.to_str().unwrap(),
        "google/t5-v1_1-xxl",
        spiece.to_str().unwrap(),
    ]);
    let t5_snap = fluxrt::model::hub::snapshot(&cache, "google/t5-v1_1-xxl").unwrap();
    assert!(t5_snap.join("spiece.model").is_file() && !t5_snap.join("tokenizer.json").exists());

    let bfl = download(d.path(), "tiny-flux-schnell", false);
    let info = info_json(&cache, &bfl);
    assert!(info["tokenizers"]["t5"]
        .as_str()
        .unwrap()
        .contains("models--google--t5-v1_1-xxl/snapshots/"));
    assert!(info["tokenizers"]["clip"]
        .as_str()
        .unwrap()
        .contains("models--openai--clip-vit-large-patch14/"));
    // The same ids as the model's own tokenizer.json: the vocabulary is the same, read from spiece.model.
    let prompt = "A ｆｕｌｌ-width   sign, <extra_id_3> and ① at dusk ";
    let tokenize = |cache: &Path, m: &Path| -> serde_json::Value {
        let o = ok(&fluxrt_in(
            cache,
            &[
                "tokenize",
                "--model",
                m.to_str().unwrap(),
                "--prompt",
                prompt,
                "--json",
            ],
        ));
        serde_json::from_str(&o).unwrap()
    };
    let got = tokenize(&cache, &bfl);
    let want = tokenize(&cache, &model("tiny-flux-schnell"));
    assert_eq!(
        got["t5"]["ids"].as_array().unwrap().len(),
        256,
        "the graph's text length"
    );
    let ids = |v: &serde_json::Value| v["t5"]["ids"].as_array().unwrap()[..24].to_vec();
    assert_eq!(ids(&got), ids(&want));
    assert_eq!(got["clip"]["ids"], want["clip"]["ids"]);
}

#[test]
fn bf16_on_the_cpu_names_convert_and_modelopt_names_its_provider() {
    let d = tempfile::tempdir().unwrap();
    let cache = cache_with_tokenizers(d.path());
    let bfl = download(d.path(), "tiny-flux-schnell", false);
    // Tokenizers come from the cache; info reads everything without sessions.
    let info = info_json(&cache, &bfl);
    assert_eq!(info["layout"], "BFL ONNX");
    let clip_tok = info["tokenizers"]["clip"].as_str().unwrap();
    assert!(
        clip_tok.contains("models--black-forest-labs--FLUX.1-schnell/snapshots/"),
        "{clip_tok}"
    );
    assert_eq!(info["fixed_text_length"], 256);
    let transformer = info["graphs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["graph"] == "transformer")
        .unwrap();
    assert_eq!(transformer["precision"], "bf16");
    assert_eq!(transformer["external_data"][0], "backbone.onnx_data");

    let out = d.path().join("x.png");
    let o = fluxrt_in(
        &cache,
        &generate(bfl.to_str().unwrap(), out.to_str().unwrap()),
    );
    let err = fails(
        &o,
        &[
            "is bf16",
            "cpu",
            "fluxrt convert",
            "--precision fp32",
            "--provider tensorrt",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("update ONNX Runtime"), "{err}");

    for precision in ["fp8", "fp4"] {
        let mut args = generate(bfl.to_str().unwrap(), out.to_str().unwrap());
        args.extend(["--transformer-precision", precision]);
        fails(
            &fluxrt_in(&cache, &args),
            &[precision, "ModelOpt", "NV TensorRT RTX", "tensorrt-rtx"],
        );
    }
    // The ModelOpt ops are found in the graph itself.
    let fp8 = bfl.join("transformer.opt/fp8/model.onnx");
    let summary = fluxrt::runtime::onnx_io::read_summary(&fp8).unwrap();
    assert!(
        summary.custom_ops["trt"].contains("TRT_FP8QuantizeLinear"),
        "{:?}",
        summary.custom_ops
    );
}

#[test]
fn unfinished_downloads_name_the_file() {
    let d = tempfile::tempdir().unwrap();
    let cache = cache_with_tokenizers(d.path());
    let bfl = download(d.path(), "tiny-flux-schnell", false);
    let data = bfl.join("transformer.opt/bf16/backbone.onnx_data");
    let out = d.path().join("x.png");
    let bytes = std::fs::read(&data).unwrap();
    std::fs::write(&data, &bytes[..bytes.len() / 2]).unwrap();
    fails(
        &fluxrt_in(
            &cache,
            &generate(bfl.to_str().unwrap(), out.to_str().unwrap()),
        ),
        &["backbone.onnx_data", "incomplete"],
    );
    let pointer = format!(
        "version https://git-lfs.github.com/spec/v1\noid sha256:{}\nsize {}\n",
        "0".repeat(64),
        bytes.len()
    );
    std::fs::write(&data, pointer).unwrap();
    fails(
        &fluxrt_in(&cache, &["info", bfl.to_str().unwrap()]),
        &["backbone.onnx_data", "Git LFS pointer", "git lfs pull"],
    );
}

#[test]
fn converted_downloads_run_on_the_cpu_and_follow_the_graphs_text_length() {
    let d = tempfile::tempdir().unwrap();
    let cache = cache_with_tokenizers(d.path());
    for (m, text_len) in [("tiny-flux-schnell", 256), ("tiny-flux-dev", 512)] {
        let bfl = download(d.path(), m, false);
        let fp32 = d.path().join(format!("{m}-fp32"));
        let o = fluxrt_in(
            &cache,
            &[
                "convert",
                bfl.to_str().unwrap(),
                fp32.to_str().unwrap(),
                "--precision",
                "fp32",
            ],
        );
        ok(&o);
        assert!(
            fp32.join("tokenizer").is_dir() && fp32.join("tokenizer_2").is_dir(),
            "tokenizers copied in"
        );
        assert!(fp32.join("transformer.opt/fp32/model.onnx").is_file());
        assert!(!fp32.join("transformer.opt/fp8").exists() && !fp32.join("t5-fp8.opt").exists());
        // A second convert into the same folder is refused; nothing is overwritten without asking.
        fails(
            &fluxrt_in(
                &cache,
                &["convert", bfl.to_str().unwrap(), fp32.to_str().unwrap()],
            ),
            &["already exists", "--overwrite"],
        );
        // The converted folder runs with no cache at all, and pads prompts to the graphs' length.
        let empty = d.path().join("no-cache");
        std::fs::create_dir_all(&empty).unwrap();
        let info = info_json(&empty, &fp32);
        assert_eq!(info["fixed_text_length"], text_len, "{m}");
        assert_eq!(info["defaults"]["t5_max_length"], text_len, "{m}");
        let tok = ok(&fluxrt_in(
            &empty,
            &[
                "tokenize",
                "--model",
                fp32.to_str().unwrap(),
                "--prompt",
                "a cat",
                "--json",
            ],
        ));
        let tok: serde_json::Value = serde_json::from_str(&tok).unwrap();
        assert_eq!(tok["t5"]["ids"].as_array().unwrap().len(), text_len, "{m}");

        let got = d.path().join(format!("{m}-converted.png"));
        ok(&fluxrt_in(
            &empty,
            &generate(fp32.to_str().unwrap(), got.to_str().unwrap()),
        ));
        let want = d.path().join(format!("{m}-manifest.png"));
        let reference = model(m);
        // The manifest model pads T5 to its own default, the same length the download fixes.
        ok(&fluxrt_in(
            &empty,
            &generate(reference.to_str().unwrap(), want.to_str().unwrap()),
        ));
        // The download's weights are bf16 roundings of the manifest model's (8 mantissa bits): the image moves by
        // a fraction of that relative error, not by more than a few levels.
        let p = psnr(&decode_png(&got), &decode_png(&want));
        eprintln!("{m}: converted bf16 download vs the fp32 export: {p:.1} dB");
        assert!(p >= 40.0, "{m}: {p:.1} dB");
    }
}

#[test]
fn a_kontext_style_download_and_a_cached_download_by_repo_id() {
    let d = tempfile::tempdir().unwrap();
    let cache = cache_with_tokenizers(d.path());
    let kontext = download(d.path(), "tiny-flux-dev", true);
    for p in ["bf16", "fp8", "fp4_svd32"] {
        assert!(
            kontext
                .join(format!("transformer.opt/{p}/model.onnx"))
                .is_file(),
            "{p}"
        );
    }
    let info = info_json(&cache, &kontext);
    let roles: Vec<&str> = info["graphs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["graph"].as_str().unwrap())
        .collect();
    assert!(roles.contains(&"vae_encoder"), "{roles:?}");
    let out = d.path().join("x.png");
    let mut gen = generate(kontext.to_str().unwrap(), out.to_str().unwrap());
    gen.extend(["--transformer-precision", "fp4_svd32"]);
    fails(&fluxrt_in(&cache, &gen), &["fp4_svd32", "NV TensorRT RTX"]);

    // The download itself in the cache: --model takes its repo id, and its base repo's tokenizers are found.
    let schnell = download(d.path(), "tiny-flux-schnell", false);
    export(&[
        "hub-cache",
        cache.to_str().unwrap(),
        "black-forest-labs/FLUX.1-schnell-onnx",
        schnell.to_str().unwrap(),
    ]);
    let info = ok(&fluxrt_in(
        &cache,
        &[
            "info",
            "--json",
            "--model",
            "black-forest-labs/FLUX.1-schnell-onnx",
        ],
    ));
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    let root = info["root"].as_str().unwrap();
    assert!(
        root.contains("models--black-forest-labs--FLUX.1-schnell-onnx/snapshots/"),
        "{root}"
    );
    assert!(info["tokenizers"]["t5"]
        .as_str()
        .unwrap()
        .contains("models--black-forest-labs--FLUX.1-schnell/"));
}
