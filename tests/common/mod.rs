//! Shared helpers for the integration tests: bundled models, goldens, the fluxrt binary.

#![allow(dead_code)]

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

/// One golden case, as export/goldens.py wrote it.
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

pub fn fluxrt() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fluxrt"))
}

pub fn run(args: &[&str]) -> Output {
    fluxrt().args(args).output().expect("fluxrt runs")
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
