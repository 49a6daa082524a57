//! Shared helpers for the integration tests: bundled models, goldens, the fluxrt binary.

#![allow(dead_code)]

pub mod http;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::{Dtype, SafeTensors};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn model(name: &str) -> PathBuf {
    root().join("models").join(name)
}

pub const MODELS: [&str; 2] = ["tiny-flux-schnell", "tiny-flux-dev"];

/// One golden case, as export/fixtures/goldens.py wrote it.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Case {
    pub name: String,
    pub prompt: String,
    pub width: u32,
    pub height: u32,
    pub seed: u64,
    pub steps: usize,
    pub guidance: Option<f32>,
    pub file: String,
    pub t5_max_length: usize,
}

pub fn cases(model: &str) -> Vec<Case> {
    let path = root().join("tests/goldens").join(model).join("index.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

pub struct Golden {
    bytes: Vec<u8>,
}

impl Golden {
    pub fn load(model: &str, case: &Case) -> Golden {
        let path = root().join("tests/goldens").join(model).join(&case.file);
        Golden {
            bytes: std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        }
    }

    fn view(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("valid safetensors")
    }

    /// (shape, values) of an f32 tensor.
    pub fn f32(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let st = self.view();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("golden has no {name}"));
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        let v = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (t.shape().to_vec(), v)
    }

    pub fn i64(&self, name: &str) -> (Vec<usize>, Vec<i64>) {
        let st = self.view();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("golden has no {name}"));
        assert_eq!(t.dtype(), Dtype::I64, "{name}");
        let v = t
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (t.shape().to_vec(), v)
    }
}

/// Largest |a - b|; panics on a length mismatch.
pub fn max_abs_diff(what: &str, a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(
        a.len(),
        b.len(),
        "{what}: {} values vs {}",
        a.len(),
        b.len()
    );
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let d = max_abs_diff(what, got, want);
    assert!(d <= tol, "{what}: max abs diff {d:e} > {tol:e}");
}

/// How a committed fixture tensor was computed, which sets how far a value computed here may be from it
/// ([`fixture_tol`]; the rule and its reasoning: docs/testing.md, "Floats against committed fixtures").
#[derive(Debug, Clone, Copy)]
pub enum Computed {
    /// One or two transcendentals per element: randn draws, the schedule's exponentials.
    Elementwise,
    /// The output of this many chained graph evaluations: a text encoder or the VAE encoder 1; the latents after
    /// step k (1-based) 1 + k; the image after n steps n + 2.
    Evaluations(usize),
}

#[derive(serde::Deserialize)]
struct ToleranceRule {
    ulps_elementwise: f32,
    ulps_per_evaluation: f32,
}

/// tests/fixture_tolerance.json, which the Python suite reads too.
fn tolerance_rule() -> &'static ToleranceRule {
    static RULE: std::sync::OnceLock<ToleranceRule> = std::sync::OnceLock::new();
    RULE.get_or_init(|| {
        let path = root().join("tests/fixture_tolerance.json");
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    })
}

/// The largest |got - want| allowed against the fixture `want`: `ulps * f32::EPSILON * max|want|`, with `ulps` per
/// element or per chained evaluation from tests/fixture_tolerance.json.
pub fn fixture_tol(want: &[f32], how: Computed) -> f32 {
    let rule = tolerance_rule();
    let ulps = match how {
        Computed::Elementwise => rule.ulps_elementwise,
        Computed::Evaluations(n) => rule.ulps_per_evaluation * n as f32,
    };
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    ulps * f32::EPSILON * scale
}

/// `got` (computed here) against the committed fixture `want`, within [`fixture_tol`].
pub fn assert_fixture(what: &str, got: &[f32], want: &[f32], how: Computed) {
    let d = max_abs_diff(what, got, want);
    let tol = fixture_tol(want, how);
    if std::env::var_os("FLUXRT_FIXTURE_REPORT").is_some() {
        // `cargo test -- --nocapture` shows how much of each tolerance a machine uses.
        eprintln!(
            "fixture {:6.1}% of tolerance  {d:.3e} <= {tol:.3e}  {what}",
            100.0 * d / tol.max(f32::MIN_POSITIVE)
        );
    }
    assert!(
        d <= tol,
        "{what}: max abs diff {d:e} > {tol:e} ({how:?}; docs/testing.md)"
    );
}

/// Every text-to-image stage of a trace against a diffusers golden: token ids exactly; noise, sigmas and timesteps
/// elementwise; the embeddings, the latents after each of the `steps_run` steps and the image by their evaluation
/// counts ([`Computed`]).
pub fn assert_trace_matches(
    what: &dyn Fn(&str) -> String,
    tr: &fluxrt::pipeline::Trace,
    g: &Golden,
    steps_run: usize,
) {
    use Computed::{Elementwise, Evaluations};
    assert_eq!(
        tr.clip_ids[0],
        g.i64("clip_input_ids").1,
        "{}",
        what("CLIP ids")
    );
    assert_eq!(tr.t5_ids[0], g.i64("t5_input_ids").1, "{}", what("T5 ids"));
    let flat =
        |a: &Option<ndarray::ArrayD<f32>>| a.as_ref().expect("traced").as_slice().unwrap().to_vec();
    let (pooled, txt) = (flat(&tr.pooled_embeds), flat(&tr.prompt_embeds));
    assert_fixture(
        &what("pooled embeds"),
        &pooled,
        &g.f32("pooled_prompt_embeds").1,
        Evaluations(1),
    );
    assert_fixture(
        &what("T5 embeds"),
        &txt,
        &g.f32("prompt_embeds").1,
        Evaluations(1),
    );
    let noise = tr.noise.as_ref().expect("traced");
    assert_fixture(
        &what("noise"),
        noise.as_slice().unwrap(),
        &g.f32("noise").1,
        Elementwise,
    );
    assert_fixture(&what("sigmas"), &tr.sigmas, &g.f32("sigmas").1, Elementwise);
    assert_fixture(
        &what("timesteps"),
        &tr.timesteps,
        &g.f32("timesteps").1,
        Elementwise,
    );
    let (shape, steps) = g.f32("latents");
    assert_eq!(shape[0], steps_run, "{}", what("golden steps"));
    assert_eq!(tr.latents.len(), steps_run, "{}", what("steps run"));
    let per = steps.len() / steps_run;
    for (i, x) in tr.latents.iter().enumerate() {
        assert_fixture(
            &what(&format!("latents after step {}", i + 1)),
            x.as_slice().unwrap(),
            &steps[i * per..(i + 1) * per],
            Evaluations(i + 2),
        );
    }
    let img = tr.images.as_ref().expect("traced");
    let (ishape, want) = g.f32("image");
    assert_eq!(img.shape(), &ishape[..], "{}", what("image shape"));
    assert_fixture(
        &what("image"),
        img.as_slice().unwrap(),
        &want,
        Evaluations(steps_run + 2),
    );
}

/// The export stack's Python: FLUXRT_PYTHON, else the venv .ci/run makes.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("FLUXRT_PYTHON") {
        return p.into();
    }
    let venv = std::env::var_os("FLUXRT_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/fluxrt/venv")
        });
    let p = venv.join("bin/python");
    assert!(
        p.is_file(),
        "no export-stack Python at {} (set FLUXRT_PYTHON or run .ci/run)",
        p.display()
    );
    p
}

/// The export stack's Python with `args`, run in the repo root; panics with `what` and its stderr unless it
/// succeeds.
pub fn python_ok<I, S>(what: &str, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let o = Command::new(python())
        .args(args)
        .current_dir(root())
        .output()
        .expect("python runs");
    assert!(
        o.status.success(),
        "{what} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

pub fn fluxrt() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fluxrt"))
}

pub fn run(args: &[&str]) -> Output {
    fluxrt().args(args).output().expect("fluxrt runs")
}

/// `fluxrt generate` arguments for one golden case (guidance only when the case has one).
pub fn generate_args(
    model_dir: &Path,
    prompt: &str,
    (width, height): (u32, u32),
    steps: usize,
    seed: u64,
    guidance: Option<f32>,
    out: &Path,
) -> Vec<String> {
    let mut args: Vec<String> = [
        "generate",
        "--model",
        model_dir.to_str().unwrap(),
        "--prompt",
        prompt,
        "--width",
        &width.to_string(),
        "--height",
        &height.to_string(),
        "--steps",
        &steps.to_string(),
        "--seed",
        &seed.to_string(),
        "--output",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(g) = guidance {
        args.extend(["--guidance".into(), g.to_string()]);
    }
    args
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn decode_png(path: &Path) -> image::RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

/// Worst difference, in 8-bit levels, between a PNG and a float image [1, 3, H, W] in [0, 1] of its size.
pub fn levels_off(png: &image::RgbImage, want: &[f32]) -> f32 {
    let (w, h) = (png.width() as usize, png.height() as usize);
    let mut worst = 0.0f32;
    for c in 0..3 {
        for y in 0..h {
            for x in 0..w {
                let got = png.get_pixel(x as u32, y as u32)[c] as f32;
                worst = worst.max((got - want[c * h * w + y * w + x] * 255.0).abs());
            }
        }
    }
    worst
}

/// A `fluxrt serve` server on its own runtime thread, on 127.0.0.1 and a free port, stopped when dropped.
pub struct TestServer {
    pub addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<fluxrt::Result<()>>>,
}

impl TestServer {
    /// Starts the server and waits until it reports ready (panics if it does not within two minutes).
    pub fn start(mut config: fluxrt::serve::Config) -> TestServer {
        config.host = "127.0.0.1".into();
        config.port = 0;
        config.log = false;
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let server = fluxrt::serve::start(config, async move {
                    let _ = stop_rx.await;
                })
                .await?;
                let ready = server.ready().await.map_err(|e| e.to_string());
                tx.send((server.addr(), ready)).unwrap();
                server.wait().await
            })
        });
        let (addr, ready) = rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .expect("the server starts");
        ready.expect("the server gets ready");
        TestServer {
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// Sends the shutdown signal without waiting.
    pub fn signal_shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    /// Signals shutdown and waits for the server to stop; returns its result and how long that took.
    pub fn shutdown(mut self) -> (fluxrt::Result<()>, std::time::Duration) {
        let t0 = std::time::Instant::now();
        self.signal_shutdown();
        let r = self.thread.take().unwrap().join().expect("no panic");
        (r, t0.elapsed())
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.signal_shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Copies a folder tree.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// The bundled tiny schnell model with its transformer replaced by a quantized or fp16 one. The fixtures were
/// written by `python -m export quantize models/tiny-flux-schnell OUT --to int8|int4`, and for fp16 by
/// `python -m export build/export/tiny-schnell OUT --precision fp16 --components transformer` (OUT/transformer.onnx
/// copied to tests/data/quant/tiny-flux-schnell-transformer-METHOD.onnx); export/tests/test_quantize.py checks that
/// the exporter still writes equivalent graphs.
pub fn quantized_model(dir: &Path, method: &str) -> std::path::PathBuf {
    let out = dir.join(format!("tiny-flux-schnell-{method}"));
    copy_dir(&model("tiny-flux-schnell"), &out);
    std::fs::copy(
        root().join(format!(
            "tests/data/quant/tiny-flux-schnell-transformer-{method}.onnx"
        )),
        out.join("transformer.onnx"),
    )
    .unwrap();
    let mf = out.join("manifest.json");
    let mut m =
        serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&mf).unwrap()).unwrap();
    m["graphs"]["transformer"]["precision"] = serde_json::Value::String(method.into());
    m["name"] = serde_json::Value::String(format!("tiny-flux-schnell-{method}"));
    std::fs::write(&mf, serde_json::to_string_pretty(&m).unwrap()).unwrap();
    out
}
