//! `fluxrt convert MODEL OUT --precision P`: turns a bf16 BFL ONNX folder (as Black Forest Labs publishes it, for
//! TensorRT) into one the CPU, CUDA, DirectML and CoreML providers run: fp32, fp16 with fp32 islands, or an int8 /
//! int4 transformer. The conversion itself is `export/convert.py`, embedded in the binary and run by a Python that
//! has only `onnx` and `numpy` (no PyTorch); it streams tensor by tensor, so memory stays near the largest tensor.
//! This shell finds that Python, checks the folders, adds the tokenizers (the downloads have none) so the result is
//! self-contained, and draws the progress bar.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use clap::Args as ClapArgs;
use fluxrt::model::tokenizer_search;
use fluxrt::{Error, Result};
use indicatif::{ProgressBar, ProgressStyle};

/// The converter, the same file `python -m export convert` runs.
const SCRIPT: &str = include_str!("../../export/convert.py");
/// What the converter needs, installed by one command.
pub const INSTALL: &str = "python3 -m pip install onnx==1.23.2 numpy";

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// The BFL ONNX folder to convert (clip.opt/, t5.opt/, transformer.opt/bf16/, vae.opt/ ...).
    model: PathBuf,
    /// The new model folder (must not exist unless --overwrite).
    out: PathBuf,
    /// fp32 (CPUs), fp16 with fp32 islands (GPUs), int8 or int4 (the transformer's MatMul weights; CPUs).
    #[arg(long, default_value = "fp32", value_parser = ["fp32", "fp16", "int8", "int4"])]
    precision: String,
    /// Replace OUT if it exists.
    #[arg(long)]
    overwrite: bool,
    /// Tokenizers to copy into OUT (a folder with tokenizer/ and tokenizer_2/, or a cached repo id). Default: the
    /// model folder, then the Hugging Face cache.
    #[arg(long, value_name = "DIR|REPO", env = "FLUXRT_TOKENIZERS")]
    tokenizers: Option<PathBuf>,
    /// The Python to run the converter with (needs onnx and numpy). Default: FLUXRT_PYTHON, the fluxrt venv,
    /// python3, python.
    #[arg(long, value_name = "PATH", env = "FLUXRT_PYTHON")]
    python: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    if !a.model.join("transformer.opt").is_dir() {
        return Err(Error::input(format!(
            "{} is not a BFL ONNX folder (no transformer.opt/)",
            a.model.display()
        ))
        .with_hint(
            "convert takes an official FLUX.1-*-onnx download; an export-step model gets its precision at export \
             (`python -m export CHECKPOINT OUT --precision fp16`, `python -m export quantize`)",
        ));
    }
    if a.out.exists() && !a.overwrite {
        return Err(Error::input(format!("{} already exists", a.out.display()))
            .with_hint("choose another output folder, or pass --overwrite to replace it"));
    }
    let python = find_python(a.python.as_deref())?;
    let mut cmd = Command::new(&python);
    cmd.arg("-c").arg(SCRIPT).arg(&a.model).arg(&a.out).args([
        "--precision",
        &a.precision,
        "--progress",
        "json",
    ]);
    if a.overwrite {
        cmd.arg("--overwrite");
    }
    match tokenizer_search::find(&a.model, a.tokenizers.as_deref()) {
        Ok((clip, t5)) => {
            for (name, dir) in [("tokenizer", clip), ("tokenizer_2", t5)] {
                eprintln!("tokenizers: {name}/ from {}", dir.display());
                cmd.arg("--include")
                    .arg(format!("{name}={}", dir.display()));
            }
        }
        // Explicit tokenizers must be there; otherwise the result is still usable (the search runs at load).
        Err(e) if a.tokenizers.is_some() => return Err(e),
        Err(e) => eprintln!(
            "warning: OUT gets no tokenizers ({}); fluxrt looks for them again when it loads OUT",
            e.message.lines().next().unwrap_or_default()
        ),
    }
    let started = Instant::now();
    let status = run_with_progress(cmd)?;
    if !status.0.success() {
        let msg = status
            .1
            .unwrap_or_else(|| format!("the converter failed ({})", status.0));
        return Err(if status.0.code() == Some(2) {
            Error::input(msg)
        } else {
            Error::model(msg)
        });
    }
    eprintln!(
        "converted {} to {} ({}) in {:.1} s; run it with: fluxrt generate --model {} --prompt \"...\"",
        a.model.display(),
        a.out.display(),
        a.precision,
        started.elapsed().as_secs_f64(),
        a.out.display()
    );
    Ok(())
}

/// Runs the converter, turning its JSON progress lines into a progress bar and keeping its last `error:` line.
fn run_with_progress(mut cmd: Command) -> Result<(std::process::ExitStatus, Option<String>)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::model(format!("cannot start the converter's Python: {e}")))?;
    let stderr = child.stderr.take().expect("piped");
    let errors = std::thread::spawn(move || {
        let mut last = None;
        for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
            match line.strip_prefix("error: ") {
                Some(msg) => last = Some(msg.to_string()),
                None => eprintln!("{line}"),
            }
        }
        last
    });
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{msg:12} [{bar:40}] {bytes}/{total_bytes} {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let stdout = child.stdout.take().expect("piped");
    for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
        show(&bar, &line);
    }
    bar.finish_and_clear();
    let status = child
        .wait()
        .map_err(|e| Error::model(format!("the converter did not finish: {e}")))?;
    Ok((status, errors.join().unwrap_or(None)))
}

/// One progress event of the converter on the bar.
fn show(bar: &ProgressBar, line: &str) {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
        bar.println(line);
        return;
    };
    let num = |k: &str| v[k].as_u64();
    match v["event"].as_str() {
        Some("start") => bar.set_length(num("total_bytes").unwrap_or(0)),
        Some("progress") => {
            if let Some(g) = v["graph"].as_str() {
                bar.set_message(g.to_string());
            }
            if let Some(done) = num("done_bytes") {
                bar.set_position(done);
            }
        }
        Some("graph") => bar.println(format!(
            "converted {} ({:.1} s)",
            v["graph"].as_str().unwrap_or("?"),
            v["seconds"].as_f64().unwrap_or(0.0)
        )),
        _ => {}
    }
}

/// The first Python that imports onnx and numpy: `explicit`, the fluxrt venv, python3, python.
fn find_python(explicit: Option<&Path>) -> Result<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    match explicit {
        Some(p) => candidates.push(p.to_path_buf()),
        None => {
            if let Some(home) = std::env::var_os("HOME") {
                let venv = PathBuf::from(home).join(".cache/fluxrt/venv/bin/python");
                if venv.is_file() {
                    candidates.push(venv);
                }
            }
            candidates.extend(["python3", "python"].map(PathBuf::from));
        }
    }
    let mut tried = Vec::new();
    for py in candidates {
        let ok = Command::new(&py)
            .args(["-c", "import onnx, numpy"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        match ok {
            Ok(s) if s.success() => return Ok(py),
            Ok(_) => tried.push(format!("{}: cannot import onnx and numpy", py.display())),
            Err(e) => tried.push(format!("{}: {e}", py.display())),
        }
    }
    Err(Error::input(format!(
        "fluxrt convert needs a Python with the onnx and numpy packages (no PyTorch); tried:\n  {}",
        tried.join("\n  ")
    ))
    .with_hint(format!(
        "install them with `{INSTALL}`, or name a Python with --python"
    )))
}
