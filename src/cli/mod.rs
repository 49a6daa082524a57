//! The `fluxrt` command line: one file per subcommand, each a thin layer over the library.

mod bench;
mod build_engines;
mod common;
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
}

pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Info(a) => info::run(a),
        Command::Providers(a) => providers::run(a),
        Command::Tokenize(a) => tokenize::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Serve(a) => serve::run(a),
        Command::BuildEngines(a) => build_engines::run(a),
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
