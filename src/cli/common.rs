//! Options and helpers shared by the subcommands.

use std::path::PathBuf;

use clap::Args;
use fluxrt::runtime::{self, Provider};
use fluxrt::Result;

/// The bundled default model, looked up where a checkout or an install keeps it.
pub const DEFAULT_MODEL: &str = "tiny-flux-schnell";

#[derive(Args, Debug, Clone)]
pub struct RuntimeArgs {
    /// ONNX Runtime library (file or folder). Default: ORT_DYLIB_PATH, beside the executable, the Python
    /// onnxruntime package, system paths.
    #[arg(long, value_name = "PATH", global = true)]
    pub ort_lib: Option<PathBuf>,
    /// Execution providers in priority order, e.g. `tensorrt,cuda,cpu`. CPU is appended as a fallback.
    #[arg(long, default_value = "cpu", value_name = "LIST")]
    pub provider: String,
    /// Fail instead of falling back to CPU when a requested provider cannot be used.
    #[arg(long)]
    pub no_fallback: bool,
    /// Threads per graph (default: physical cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

impl RuntimeArgs {
    pub fn providers(&self) -> Result<Vec<Provider>> {
        runtime::parse_list(&self.provider)
    }
}

/// `--model`, or the bundled tiny schnell model: next to the current folder, the executable, or the source tree.
pub fn model_path(explicit: Option<PathBuf>) -> PathBuf {
    if let Some(p) = explicit {
        return p;
    }
    let mut candidates = vec![PathBuf::from("models").join(DEFAULT_MODEL)];
    if let Ok(exe) = std::env::current_exe() {
        for up in exe.ancestors().skip(1).take(4) {
            candidates.push(up.join("models").join(DEFAULT_MODEL));
        }
    }
    candidates.push(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("models")
            .join(DEFAULT_MODEL),
    );
    candidates
        .iter()
        .find(|p| p.join("manifest.json").is_file())
        .cloned()
        .unwrap_or_else(|| candidates[0].clone())
}

/// Prints a JSON value to stdout.
pub fn print_json(v: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("JSON values serialize")
    );
}
