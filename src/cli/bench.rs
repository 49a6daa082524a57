//! `fluxrt bench`: per-stage timings over repeated runs, for each execution provider in turn.

use std::path::PathBuf;

use clap::Args as ClapArgs;
use fluxrt::bench::{self, BenchOptions};
use fluxrt::pipeline::DEFAULT_MAX_PIXELS;
use fluxrt::runtime;
use fluxrt::{Error, Result};

use super::common::{model_path, print_out, SessionArgs};

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Model folder. Default: the bundled tiny-flux-schnell.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Execution providers to benchmark, each in turn, e.g. `cuda,cpu`.
    #[arg(long, default_value = "cpu", value_name = "LIST")]
    provider: String,
    /// Image sizes, e.g. `256x256,512x512` (multiples of 16). Default: the model's size.
    #[arg(long, value_name = "WxH,...")]
    sizes: Option<String>,
    /// Denoising steps (default: the model's).
    #[arg(long)]
    steps: Option<usize>,
    /// Images per generation, batched into one call per graph.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Untimed runs before the timed ones (per provider and size).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Timed runs per provider and size.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Write the report as JSON to FILE (`-` for stdout; the table then goes to stderr). See docs/bench.md.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// The prompt of every run.
    #[arg(long, default_value = "a photo of a cat")]
    prompt: String,
    /// The seed of every run (the same seed each time, so runs are comparable).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Run the denoising loop with plain runs instead of an I/O binding.
    #[arg(long)]
    no_io_binding: bool,
    /// Save the images of the last timed run of each provider and size into DIR.
    #[arg(long, value_name = "DIR")]
    save_images: Option<PathBuf>,
    /// Load one graph at a time for its stage (less memory; sessions are re-created in every run).
    #[arg(long)]
    low_memory: bool,
    /// Largest accepted image, in pixels.
    #[arg(long, default_value_t = DEFAULT_MAX_PIXELS)]
    max_pixels: u64,
    /// No per-run progress lines on stderr.
    #[arg(long, short)]
    quiet: bool,
    #[command(flatten)]
    session: SessionArgs,
}

pub fn run(a: Args) -> Result<()> {
    let mut o = BenchOptions::new(model_path(a.model.clone()));
    o.providers = runtime::parse_list(&a.provider)?;
    if let Some(s) = &a.sizes {
        o.sizes = bench::parse_sizes(s)?;
    }
    o.steps = a.steps;
    o.batch = a.batch;
    o.warmup = a.warmup;
    o.runs = a.runs;
    o.prompt = a.prompt.clone();
    o.seed = a.seed;
    a.session.apply(&mut o.load)?;
    o.load.io_binding = !a.no_io_binding;
    o.load.low_memory = a.low_memory;
    o.save_images = a.save_images.clone();
    o.max_pixels = a.max_pixels;
    // Bad input fails here, before anything is loaded.
    o.validate()?;

    let quiet = a.quiet;
    let report = bench::run(&o, &mut |line| {
        if !quiet {
            eprintln!("{line}");
        }
    })?;
    // Serialized from the struct, so fields keep the documented order (schema_version first).
    let json = serde_json::to_string_pretty(&report).expect("the report serializes");
    let to_stdout = a.json.as_deref().is_some_and(|p| p.as_os_str() == "-");
    match &a.json {
        Some(_) if to_stdout => print_out(&(json + "\n"))?,
        Some(path) => std::fs::write(path, json + "\n")
            .map_err(|e| Error::io(format!("cannot write {}: {e}", path.display())))?,
        None => {}
    }
    if to_stdout {
        eprint!("{}", report.table());
    } else {
        print_out(&report.table())?;
    }
    let skipped: Vec<String> = report
        .results
        .iter()
        .filter(|r| r.status != "ok")
        .map(|r| format!("{}: {}", r.provider, r.error.as_deref().unwrap_or("")))
        .collect();
    if !skipped.is_empty() {
        return Err(Error::provider(format!(
            "{} of {} providers could not be benchmarked:\n  {}",
            skipped.len(),
            report.results.len(),
            skipped.join("\n  ")
        ))
        .with_hint("`fluxrt providers` shows what this ONNX Runtime and this binary support"));
    }
    Ok(())
}
