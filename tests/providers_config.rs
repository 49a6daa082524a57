//! Execution provider settings as users give them: the `[providers]` config file and the flags, the options each
//! provider receives, TensorRT profiles of the bundled models, the out-of-profile refusal, the fp8/fp4 rule, the
//! engine cache report for the server, and `fluxrt build-engines` on a machine without TensorRT.

mod common;

use std::path::Path;

use common::*;
use fluxrt::config::{load_config, ProvidersLayer};
use fluxrt::model::shapes::{self, engine_cache_status, ModelShapes, ShapePlan, ShapeRange};
use fluxrt::model::{Layout, ModelSpec};
use fluxrt::pipeline::{LoadOptions, Pipeline};
use fluxrt::runtime::ep::{GraphInfo, HostInfo, ProviderOptions};
use fluxrt::runtime::{EpSettings, Provider};
use fluxrt::ErrorKind;

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn get(list: &[(String, String)], key: &str) -> Option<String> {
    list.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
}

#[test]
fn config_file_then_flags_give_each_provider_its_options() {
    let d = tempfile::tempdir().unwrap();
    let file = load_config(&write(
        d.path(),
        "fluxrt.toml",
        r#"
[server]
port = 8080

[providers]
order = "tensorrt,cuda,cpu"
device_id = 1
sizes = "512-1024"
batch = "1-4"

[providers.tensorrt]
fp16 = true
cache_dir = "engines"
builder_optimization_level = 4

[providers.cuda]
conv_algorithm_search = "heuristic"
memory_limit = "40GiB"
"#,
    ))
    .unwrap();
    // Flags win: device 0, CUDA TF32 off, engine cache off.
    let flags = ProvidersLayer {
        device_id: Some(0),
        cuda: fluxrt::runtime::ep::CudaLayer {
            tf32: Some(false),
            ..Default::default()
        },
        ..Default::default()
    };
    let c = ProvidersLayer::resolve(&[&file, &flags]).unwrap();
    assert_eq!(
        c.order,
        Some(vec![Provider::TensorRt, Provider::Cuda, Provider::Cpu])
    );
    let spec = ModelSpec::resolve(&model("tiny-flux-schnell")).unwrap();
    let ep = c.ep.clone();
    let host = HostInfo {
        ort_version: "1.31.1".into(),
        gpus: vec![],
    };
    let path = &spec.graphs[&fluxrt::model::Role::Transformer].path;
    let g = GraphInfo::read("transformer", path).unwrap();
    let plan = ShapePlan::new(&spec, c.shapes).unwrap();
    let opts = plan
        .graph_options_of(fluxrt::model::Role::Transformer, path)
        .unwrap();
    let trt = ep
        .provider_options(Provider::TensorRt, Some((&g, &opts)), &host)
        .ort_options();
    assert_eq!(get(&trt, "device_id").as_deref(), Some("0"));
    assert_eq!(get(&trt, "trt_fp16_enable").as_deref(), Some("true"));
    assert_eq!(
        get(&trt, "trt_builder_optimization_level").as_deref(),
        Some("4")
    );
    let cache = get(&trt, "trt_engine_cache_path").unwrap();
    assert!(
        cache.starts_with(
            &d.path()
                .join("engines")
                .join("transformer-")
                .display()
                .to_string()
        ),
        "{cache}"
    );
    // The tiny model: 512-1024 px is S 1024..4096, T5 length 256, batch 1..4, opt at its 256 px default clamped.
    assert_eq!(
        get(&trt, "trt_profile_max_shapes").as_deref(),
        Some(
            "hidden_states:4x4096x64,encoder_hidden_states:4x256x16,pooled_projections:4x8,timestep:4,\
             img_ids:4096x3,txt_ids:256x3"
        )
    );
    assert_eq!(
        get(&trt, "trt_profile_opt_shapes").as_deref(),
        Some(
            "hidden_states:1x1024x64,encoder_hidden_states:1x256x16,pooled_projections:1x8,timestep:1,\
             img_ids:1024x3,txt_ids:256x3"
        )
    );
    let cuda = ep
        .provider_options(Provider::Cuda, None, &host)
        .ort_options();
    assert_eq!(
        cuda,
        [
            ("device_id", "0"),
            ("cudnn_conv_algo_search", "HEURISTIC"),
            ("arena_extend_strategy", "kSameAsRequested"),
            ("gpu_mem_limit", "42949672960"),
            ("use_tf32", "false"),
            ("enable_cuda_graph", "false"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
    );
    assert!(matches!(
        ep.provider_options(Provider::Cpu, None, &host),
        ProviderOptions::Defaults(Provider::Cpu)
    ));
}

#[test]
fn unknown_keys_and_bad_values_are_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let e = load_config(&write(
        d.path(),
        "a.toml",
        "[providers.tensorrt]\nfp16 = true\nengine_cach = false\n",
    ))
    .unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidInput);
    assert!(e.message.contains("a.toml"), "{e}");
    assert!(e.message.contains("engine_cach"), "{e}");
    assert!(e.message.contains("line 3"), "{e}");
    let e = load_config(&write(d.path(), "b.toml", "[providers]\ngpu = 1\n")).unwrap_err();
    assert!(e.message.contains("unknown field `gpu`"), "{e}");
    let e = load_config(&write(
        d.path(),
        "c.toml",
        "[providers.coreml]\ncompute_units = \"gpu_only\"\n",
    ))
    .unwrap_err();
    assert!(
        e.message.contains("gpu_only") && e.message.contains("cpu_and_gpu"),
        "{e}"
    );
}

#[test]
fn the_documented_example_config_parses() {
    let c = ProvidersLayer::resolve(&[
        &load_config(&root().join("docs/providers.example.toml")).unwrap()
    ])
    .unwrap();
    let defaults = EpSettings::default();
    assert_eq!(c.ep.tensorrt, defaults.tensorrt);
    assert_eq!(c.ep.cuda, defaults.cuda);
    assert_eq!(c.ep.directml, defaults.directml);
    assert_eq!(c.ep.coreml, defaults.coreml);
}

#[test]
fn profiles_for_every_graph_of_the_bundled_models() {
    let range = ShapeRange {
        sizes: "128-256".parse().unwrap(),
        batch: "1-2".parse().unwrap(),
    };
    for (m, t5) in [("tiny-flux-schnell", 256), ("tiny-flux-dev", 512)] {
        let spec = ModelSpec::resolve(&model(m)).unwrap();
        let model_shapes = ModelShapes::of(&spec).unwrap();
        assert_eq!(model_shapes.t5_len, t5, "{m}");
        let all = shapes::model_profiles(&spec, &range, &model_shapes).unwrap();
        assert_eq!(all.len(), spec.graphs.len());
        for (role, p) in &all {
            assert!(!p.is_empty(), "{m} {role}");
            let dims = |s: String| s.matches(':').count();
            assert_eq!(dims(p.min_shapes()), p.inputs.len());
            for i in &p.inputs {
                assert!(
                    i.min
                        .iter()
                        .zip(&i.opt)
                        .zip(&i.max)
                        .all(|((a, b), c)| a <= b && b <= c),
                    "{m} {role} {i:?}"
                );
            }
        }
        let vae = &all
            .iter()
            .find(|(r, _)| *r == fluxrt::model::Role::VaeDecoder)
            .unwrap()
            .1;
        assert_eq!(
            [vae.min_shapes(), vae.opt_shapes(), vae.max_shapes()],
            [
                "latent:1x16x16x16",
                "latent:1x16x32x32",
                "latent:2x16x32x32"
            ]
            .map(String::from)
        );
        if m == "tiny-flux-dev" {
            let t = &all
                .iter()
                .find(|(r, _)| *r == fluxrt::model::Role::Transformer)
                .unwrap()
                .1;
            assert!(
                t.max_shapes().ends_with(",guidance:2"),
                "{}",
                t.max_shapes()
            );
        }
    }
}

#[test]
fn requests_outside_the_built_profile_are_refused() {
    let ep = EpSettings::default();
    let plan = ShapePlan {
        range: Some(ShapeRange {
            sizes: "512-1024".parse().unwrap(),
            batch: "1-4".parse().unwrap(),
        }),
        model: ModelShapes::default(),
    };
    let trt = [Provider::TensorRt, Provider::Cuda, Provider::Cpu];
    assert!(plan.check_request(&ep, &trt, 768, 1024, 2).is_ok());
    for (w, h, n) in [(1280, 1024, 1), (512, 496, 1), (1024, 1024, 5)] {
        let e = plan.check_request(&ep, &trt, w, h, n).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput, "{w}x{h}x{n}");
        assert!(
            e.message
                .contains("width and height 512-1024 px, batch 1-4"),
            "{e}"
        );
    }
    // Not on TensorRT: the range does not restrict requests.
    assert!(plan
        .check_request(&ep, &[Provider::Cpu], 1280, 1024, 9)
        .is_ok());
}

/// A BFL-layout copy of the tiny schnell model whose transformer folder is named `precision`.
fn bfl_copy(dir: &Path, precisions: &[&str]) -> std::path::PathBuf {
    let src = model("tiny-flux-schnell");
    let out = dir.join("bfl");
    for (graph, to) in [
        ("clip.onnx", "clip.opt"),
        ("t5.onnx", "t5.opt"),
        ("vae_decoder.onnx", "vae.opt"),
    ] {
        std::fs::create_dir_all(out.join(to)).unwrap();
        std::fs::copy(src.join(graph), out.join(to).join("model.onnx")).unwrap();
    }
    for p in precisions {
        let t = out.join("transformer.opt").join(p);
        std::fs::create_dir_all(&t).unwrap();
        std::fs::copy(src.join("transformer.onnx"), t.join("model.onnx")).unwrap();
    }
    for tok in ["tokenizer", "tokenizer_2"] {
        std::fs::create_dir_all(out.join(tok)).unwrap();
        for f in std::fs::read_dir(src.join(tok)).unwrap().flatten() {
            std::fs::copy(f.path(), out.join(tok).join(f.file_name())).unwrap();
        }
    }
    out
}

#[test]
fn fp8_and_fp4_transformers_need_tensorrt() {
    let d = tempfile::tempdir().unwrap();
    let only_fp8 = bfl_copy(d.path(), &["fp8"]);
    let spec = ModelSpec::resolve(&only_fp8).unwrap();
    assert_eq!(spec.layout, Layout::Bfl);
    let e = Pipeline::load(&LoadOptions::new(&only_fp8))
        .err()
        .expect("fp8 without TensorRT must be refused");
    assert_eq!(e.kind, ErrorKind::Provider, "{e}");
    assert!(
        e.message.contains("fp8") && e.message.contains("TensorRT"),
        "{e}"
    );

    let d = tempfile::tempdir().unwrap();
    let both = bfl_copy(d.path(), &["bf16", "fp4"]);
    // CPU takes the bf16 folder...
    let pipe = Pipeline::load(&LoadOptions::new(&both)).unwrap();
    assert_eq!(pipe.engine().spec.transformer_precision(), Some("bf16"));
    // ...and refuses the fp4 one when asked for it.
    let mut opts = LoadOptions::new(&both);
    opts.transformer_precision = Some("fp4".into());
    let e = Pipeline::load(&opts)
        .err()
        .expect("fp4 without TensorRT must be refused");
    assert_eq!(e.kind, ErrorKind::Provider, "{e}");
    assert!(e.hint.as_deref().unwrap().contains("bf16"), "{e:?}");
}

#[test]
fn engine_cache_report_for_the_server() {
    let d = tempfile::tempdir().unwrap();
    let spec = ModelSpec::resolve(&model("tiny-flux-schnell")).unwrap();
    let mut ep = EpSettings::default();
    ep.tensorrt.cache_dir = Some(d.path().to_path_buf());
    let mut range = Some(ShapeRange {
        sizes: "128-256".parse().unwrap(),
        batch: "1-2".parse().unwrap(),
    });
    let host = HostInfo::detect("1.31.1");
    let before = engine_cache_status(&spec, &ep, range, &host).unwrap();
    assert_eq!(before.len(), spec.graphs.len());
    assert!(before.iter().all(|s| !s.hit && s.engines == 0));
    // An engine file appears where the TensorRT provider writes it: a hit for that graph only.
    let t = before.iter().find(|s| s.graph == "transformer").unwrap();
    std::fs::create_dir_all(&t.dir).unwrap();
    std::fs::write(t.dir.join("TensorrtExecutionProvider_x_sm90.engine"), b"e").unwrap();
    let after = engine_cache_status(&spec, &ep, range, &host).unwrap();
    let hits: Vec<&str> = after
        .iter()
        .filter(|s| s.hit)
        .map(|s| s.graph.as_str())
        .collect();
    assert_eq!(hits, ["transformer"]);
    // Another range is another engine.
    range = Some(ShapeRange {
        sizes: "128-512".parse().unwrap(),
        batch: "1-2".parse().unwrap(),
    });
    assert!(engine_cache_status(&spec, &ep, range, &host)
        .unwrap()
        .iter()
        .all(|s| !s.hit));
    ep.tensorrt.engine_cache = false;
    assert!(engine_cache_status(&spec, &ep, range, &host)
        .unwrap()
        .is_empty());
}

fn fails(args: &[&str], code: i32, needles: &[&str]) -> String {
    let o = run(args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(code), "fluxrt {args:?}:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    for n in needles {
        assert!(err.contains(n), "fluxrt {args:?}: lacks {n:?}:\n{err}");
    }
    err
}

#[test]
fn build_engines_without_tensorrt_says_it_is_not_usable() {
    let m = model("tiny-flux-schnell");
    let m = m.to_str().unwrap();
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().to_str().unwrap();
    let args = [
        "build-engines",
        "--model",
        m,
        "--provider",
        "tensorrt",
        "--trt-sizes",
        "128-256",
        "--trt-batch",
        "1-2",
        "--trt-cache-dir",
        cache,
    ];
    let o = run(&args);
    let written = || std::fs::read_dir(d.path()).unwrap().count();
    if o.status.success() {
        // A machine where TensorRT works: the engines are in the cache folder.
        assert!(
            written() > 0,
            "build-engines succeeded without writing an engine"
        );
    } else {
        fails(
            &args,
            1,
            &["error: ", "tensorrt is not usable here", "no engines"],
        );
        // Nothing was written.
        assert_eq!(written(), 0);
    }
    // No range: an input error before anything is loaded.
    fails(
        &["build-engines", "--model", m, "--provider", "tensorrt"],
        2,
        &["shape range", "--trt-sizes"],
    );
    fails(
        &["build-engines", "--model", m, "--trt-sizes", "256"],
        2,
        &["--provider tensorrt"],
    );
}

#[test]
fn cli_rejects_bad_settings_naming_them() {
    let d = tempfile::tempdir().unwrap();
    let bad = write(d.path(), "bad.toml", "[providers.cuda]\ntf33 = true\n");
    let out = d.path().join("x.png");
    let m = model("tiny-flux-schnell");
    fails(
        &[
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--prompt",
            "x",
            "--output",
            out.to_str().unwrap(),
            "--config",
            bad.to_str().unwrap(),
        ],
        2,
        &["bad.toml", "tf33"],
    );
    fails(
        &[
            "generate",
            "--prompt",
            "x",
            "--output",
            out.to_str().unwrap(),
            "--trt-sizes",
            "500-1024",
        ],
        2,
        &["--trt-sizes", "500"],
    );
    fails(
        &[
            "generate",
            "--prompt",
            "x",
            "--output",
            out.to_str().unwrap(),
            "--cuda-conv-search",
            "fastest",
        ],
        2,
        &["fastest", "heuristic"],
    );
    assert!(!out.exists());
}

#[test]
fn config_provider_order_is_used_without_provider_flag() {
    // The config file asks for CUDA first; on this CPU-only machine generate falls back to CPU and says why.
    let d = tempfile::tempdir().unwrap();
    let cfg = write(d.path(), "c.toml", "[providers]\norder = \"cuda\"\n");
    let out = d.path().join("x.png");
    let o = run(&[
        "generate",
        "--model",
        model("tiny-flux-schnell").to_str().unwrap(),
        "--prompt",
        "a red cube",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "1",
        "--seed",
        "1",
        "--output",
        out.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
    ]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    if !err.contains("provider cuda not used") {
        eprintln!("CUDA seems usable here:\n{err}");
    }
    assert!(out.is_file());
}
