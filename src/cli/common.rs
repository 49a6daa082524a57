//! Options and helpers shared by the subcommands.

use std::path::PathBuf;

use clap::Args;
use fluxrt::config::{self, ProviderConfig, ProvidersLayer};
use fluxrt::pipeline::LoadOptions;
use fluxrt::runtime::{self, Provider};
use fluxrt::Result;

use super::provider_flags::ProviderFlags;

/// The bundled default model, looked up where a checkout or an install keeps it.
pub const DEFAULT_MODEL: &str = "tiny-flux-schnell";

/// The model and the prompts, as `generate` and `tokenize` take them.
#[derive(Args, Debug, Clone)]
pub struct PromptArgs {
    /// Model folder (fluxrt manifest, BFL ONNX or optimum layout). Default: the bundled tiny-flux-schnell.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// The prompt (CLIP; also T5 unless --prompt-2). May be empty.
    #[arg(long)]
    pub prompt: String,
    /// A separate prompt for T5 (default: --prompt).
    #[arg(long)]
    pub prompt_2: Option<String>,
}

/// Session settings shared by every subcommand that loads graphs: the ONNX Runtime library, threads, the
/// provider settings (config file and flags) and the denoising loop.
#[derive(Args, Debug, Clone)]
pub struct SessionArgs {
    /// ONNX Runtime library (file or folder). Default: ORT_DYLIB_PATH, beside the executable, the Python
    /// onnxruntime package, system paths.
    #[arg(long, value_name = "PATH", global = true)]
    pub ort_lib: Option<PathBuf>,
    /// Intra-op threads per graph (default: the physical cores).
    #[arg(long, value_name = "N", env = "FLUXRT_THREADS", value_parser = positive)]
    pub threads: Option<usize>,
    /// Graph optimization level: disable, basic, extended, all.
    #[arg(long, default_value = "all")]
    pub optimization: runtime::Optimization,
    /// Turn ONNX Runtime's memory pattern planning on (off by default: it raised the peak memory by ~0.9 GB at
    /// 512x512 on the bench model with no speed gain).
    #[arg(long)]
    pub memory_pattern: bool,
    /// The default now (kept so that older scripts still run).
    #[arg(long, hide = true, conflicts_with = "memory_pattern")]
    pub no_memory_pattern: bool,
    /// Turn the CPU arena allocator off: a lower peak memory (about 0.7x at 512x512 on the bench model), slower
    /// (about 1.2x).
    #[arg(long)]
    pub no_cpu_arena: bool,
    /// Do not read or write the optimized-graph cache (CPU sessions then optimize every graph at every load).
    #[arg(long, conflicts_with = "optimized_cache")]
    pub no_optimized_cache: bool,
    /// Optimized-graph cache folder (default: FLUXRT_OPTIMIZED_CACHE, else ~/.cache/fluxrt/optimized; see
    /// `fluxrt cache`).
    #[arg(long, value_name = "DIR")]
    pub optimized_cache: Option<PathBuf>,
    /// A TOML file whose [providers] section holds the execution provider settings (docs/providers.md);
    /// flags given here override it.
    #[arg(long, value_name = "FILE", env = "FLUXRT_CONFIG")]
    pub config: Option<PathBuf>,
    /// The device-resident denoising loop (latents, embeddings and ids stay in GPU memory; the Euler step runs
    /// there): auto (on for GPU providers), on, off.
    #[arg(long, default_value = "auto", value_name = "auto|on|off")]
    pub device_loop: runtime::DeviceLoop,
    /// Tokenizers for a model folder without them (BFL's ONNX downloads): a folder holding tokenizer/ and
    /// tokenizer_2/, or a repo id in the Hugging Face cache. Default: the model folder, then the cache.
    #[arg(
        long,
        global = true,
        value_name = "DIR|REPO",
        env = "FLUXRT_TOKENIZERS"
    )]
    pub tokenizers: Option<PathBuf>,
    #[command(flatten)]
    pub ep: ProviderFlags,
}

impl SessionArgs {
    /// The provider settings: defaults, then the config file, then the flags.
    pub fn provider_config(&self) -> Result<ProviderConfig> {
        let file = match &self.config {
            Some(path) => config::load_config(path)?,
            None => ProvidersLayer::default(),
        };
        ProvidersLayer::resolve(&[&file, &self.ep.layer()])
    }

    /// Puts these settings (library, threads, session tuning, provider settings, transformer precision, loop)
    /// into `opts`.
    pub fn apply(&self, opts: &mut LoadOptions) -> Result<()> {
        let c = self.provider_config()?;
        opts.ort_lib = self.ort_lib.clone();
        opts.threads = self.threads;
        opts.optimization = self.optimization;
        opts.memory_pattern = self.memory_pattern;
        opts.cpu_arena = !self.no_cpu_arena;
        opts.ep = c.ep;
        opts.shapes = c.shapes;
        opts.transformer_precision = c.transformer_precision;
        opts.tokenizers = self.tokenizers.clone();
        opts.device_loop = self.device_loop;
        if self.no_optimized_cache {
            opts.optimized_cache = None;
        } else if let Some(dir) = &self.optimized_cache {
            opts.optimized_cache = Some(dir.clone());
        }
        Ok(())
    }
}

/// [`SessionArgs`] plus the provider priority list of one pipeline.
#[derive(Args, Debug, Clone)]
pub struct RuntimeArgs {
    /// Execution providers in priority order, e.g. `tensorrt,cuda,cpu`. CPU is appended as a fallback.
    /// Default: `order` in the config file's [providers], else cpu.
    #[arg(long, value_name = "LIST")]
    pub provider: Option<String>,
    /// Fail instead of falling back to CPU when a requested provider cannot be used.
    #[arg(long)]
    pub no_fallback: bool,
    #[command(flatten)]
    pub session: SessionArgs,
}

impl RuntimeArgs {
    /// `--provider`, else the config file's `order`, else CPU.
    pub fn providers(&self) -> Result<Vec<Provider>> {
        match &self.provider {
            Some(list) => runtime::parse_list(list),
            None => Ok(self
                .session
                .provider_config()?
                .order
                .unwrap_or_else(|| vec![Provider::Cpu])),
        }
    }

    /// Load options for `model` with every runtime setting applied.
    pub fn load_options(&self, model: PathBuf) -> Result<LoadOptions> {
        let mut opts = LoadOptions::new(model);
        opts.providers = self.providers()?;
        opts.no_fallback = self.no_fallback;
        self.session.apply(&mut opts)?;
        Ok(opts)
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

/// A whole number of at least 1 (clap value parser).
pub fn positive(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("expected a whole number of at least 1, got `{s}`")),
    }
}

/// Prints a JSON value to stdout ([`print_out`]).
pub fn print_json(v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("JSON values serialize");
    print_out(&(text + "\n"))
}

/// Writes `text` to stdout. A reader that has gone away (`fluxrt info | head`) is not an error: the rest of the
/// output is simply not wanted. Any other write failure (a full disk behind a redirect) is.
pub fn print_out(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(fluxrt::Error::io(format!(
            "cannot write to standard output: {e}"
        ))),
        _ => Ok(()),
    }
}
