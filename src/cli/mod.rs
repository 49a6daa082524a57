//! The `fluxrt` command line: one file per subcommand, each a thin layer over the library.

mod bench;
mod build_engines;
mod cache;
mod common;
mod convert;
mod generate;
mod info;
mod provider_flags;
mod providers;
mod serve;
mod tokenize;

use clap::{Parser, Subcommand};
use fluxrt::{Error, ErrorKind};

#[derive(Parser)]
#[command(
    name = "fluxrt",
    version,
    about = "FLUX.1 text-to-image on ONNX Runtime, on any vendor's GPU or CPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images from a prompt.
    Generate(generate::Args),
    /// Show a model folder: layout, variant, settings and every graph's inputs and outputs.
    Info(info::Args),
    /// List the execution providers of the loaded ONNX Runtime and whether each works here.
    Providers(providers::Args),
    /// Show how both tokenizers split a prompt (JSON).
    Tokenize(tokenize::Args),
    /// Time every stage over repeated runs, for each execution provider in turn (table and JSON).
    Bench(bench::Args),
    /// Serve an HTTP API (OpenAI Images compatible and native) with queueing, batching and metrics.
    Serve(serve::Args),
    /// Build and cache every graph's TensorRT engine for a size and batch range, ahead of deployment.
    BuildEngines(build_engines::Args),
    /// Show or clear the optimized-graph cache (CPU sessions' optimized graphs, kept between runs).
    Cache(cache::Args),
    /// Convert a bf16 BFL ONNX download for providers without bf16 kernels (fp32, fp16, int8, int4).
    Convert(convert::Args),
}

pub fn main() -> std::process::ExitCode {
    // An empty FLUXRT_THREADS (`FLUXRT_THREADS= fluxrt ...`) means unset, as the library reads it; clap would call
    // the empty value invalid. Single-threaded here: nothing else reads the environment yet.
    if std::env::var("FLUXRT_THREADS").is_ok_and(|v| v.trim().is_empty()) {
        std::env::remove_var("FLUXRT_THREADS");
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Info(a) => info::run(a),
        Command::Providers(a) => providers::run(a),
        Command::Tokenize(a) => tokenize::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Serve(a) => serve::run(a),
        Command::BuildEngines(a) => build_engines::run(a),
        Command::Cache(a) => cache::run(a),
        Command::Convert(a) => convert::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            report(&e);
            exit_code(&e)
        }
    }
}

fn report(e: &Error) {
    eprintln!("error: {e}");
}

/// 2 for a request the user can fix, 1 for everything else (as clap does for usage errors).
fn exit_code(e: &Error) -> std::process::ExitCode {
    match e.kind {
        ErrorKind::InvalidInput => std::process::ExitCode::from(2),
        _ => std::process::ExitCode::from(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_option_of_every_subcommand_has_help() {
        let cli = Cli::command();
        let mut missing = Vec::new();
        for sub in cli.get_subcommands() {
            for arg in sub.get_arguments() {
                if arg.get_help().is_none() && !arg.is_hide_set() {
                    missing.push(format!("{} --{}", sub.get_name(), arg.get_id()));
                }
            }
        }
        assert!(missing.is_empty(), "options without help: {missing:?}");
    }

    #[test]
    fn provider_flags_sit_under_their_provider_and_only_in_long_help() {
        let cli = Cli::command();
        let generate = cli.find_subcommand("generate").unwrap();
        for arg in generate.get_arguments() {
            let long = arg.get_long().unwrap_or_default();
            let provider = ["trt-", "cuda-", "dml-", "coreml-"]
                .iter()
                .any(|p| long.starts_with(p))
                && !matches!(long, "trt-sizes" | "trt-batch");
            if provider {
                let heading = arg.get_help_heading().unwrap_or_default();
                assert!(
                    heading.contains(" provider ([providers."),
                    "--{long}: {heading}"
                );
                assert!(arg.is_hide_short_help_set(), "--{long} is in -h");
            }
        }
    }

    #[test]
    fn every_subcommand_takes_the_model_as_model() {
        let cli = Cli::command();
        for name in [
            "generate",
            "info",
            "tokenize",
            "bench",
            "serve",
            "build-engines",
        ] {
            let sub = cli.find_subcommand(name).unwrap();
            assert!(
                sub.get_arguments().any(|a| a.get_long() == Some("model")),
                "{name} has no --model"
            );
        }
    }
}
