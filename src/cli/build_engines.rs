//! `fluxrt build-engines`: builds and caches every graph's TensorRT engine for a declared shape range ahead of
//! deployment (what demoDiffusion's engine build does), so that `fluxrt serve` and `fluxrt generate` with the same
//! settings start warm: their sessions find the engines in the cache instead of building them (minutes per graph).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args as ClapArgs;
use fluxrt::model::shapes::{self, engine_cache_status, ShapePlan};
use fluxrt::model::ModelSpec;
use fluxrt::runtime::ep::HostInfo;
use fluxrt::runtime::{self, Graph, Provider, SessionConfig};
use fluxrt::{Error, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::common::{model_path, print_json, RuntimeArgs};

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Model folder (fluxrt manifest, BFL ONNX or optimum layout). Default: the bundled tiny-flux-schnell.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Print each graph's engine folder, profile and build time as JSON on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

pub fn run(a: Args) -> Result<()> {
    let config = a.runtime.session.provider_config()?;
    let requested = a.runtime.providers()?;
    if !requested.contains(&Provider::TensorRt) {
        return Err(Error::input(
            "build-engines builds TensorRT engines, but TensorRT was not requested",
        )
        .with_hint("pass --provider tensorrt (or tensorrt,cuda as the server will run)"));
    }
    let Some(range) = config.shapes else {
        return Err(Error::input("build-engines needs the shape range the engines will serve").with_hint(
            "give --trt-sizes MIN-MAX and --trt-batch MIN-MAX (default 1), e.g. --trt-sizes 512-1024 --trt-batch 1-4",
        ));
    };
    if !config.ep.tensorrt.engine_cache {
        return Err(Error::input(
            "build-engines fills the TensorRT engine cache, which is turned off",
        )
        .with_hint("drop --trt-engine-cache=false (or engine_cache = false in the config file)"));
    }
    let mut spec = ModelSpec::resolve_with(
        &model_path(a.model.clone()),
        a.runtime.session.tokenizers.as_deref(),
    )?;
    let lib = runtime::init(a.runtime.session.ort_lib.as_deref())?;
    let plan = runtime::probe(&requested, false)?;
    if !plan.active.contains(&Provider::TensorRt) {
        let why = plan
            .rejected
            .iter()
            .find(|(p, _)| *p == Provider::TensorRt)
            .map_or("unknown reason".to_string(), |(_, w)| w.clone());
        return Err(Error::provider(format!(
            "execution provider tensorrt is not usable here, so no engines can be built: {why}"
        ))
        .with_hint(
            "build engines on the deployment GPU type, with fluxrt built with --features tensorrt and an ONNX Runtime \
             that has TensorRT (onnxruntime-gpu) plus TensorRT 10, CUDA and cuDNN installed",
        ));
    }
    for (p, why) in &plan.rejected {
        eprintln!("warning: provider {p} not used: {why}");
    }
    spec.select_transformer_precision(true, config.transformer_precision.as_deref())?;
    let ep = config.ep.clone();
    let shape_plan = ShapePlan::new(&spec, Some(range))?;
    for w in shape_plan.warnings(&ep, &plan.active) {
        eprintln!("warning: {w}");
    }
    let profiles = shapes::model_profiles(&spec, &range, &shape_plan.model)?;
    let host = HostInfo::detect(lib.version());
    let before = engine_cache_status(&spec, &ep, Some(range), &host)?;
    let mut graphs = std::collections::BTreeMap::new();
    for (role, g) in &spec.graphs {
        graphs.insert(
            role.name().to_string(),
            shape_plan.graph_options_of(*role, &g.path)?,
        );
    }
    let session = SessionConfig {
        threads: a.runtime.session.threads,
        providers: plan.clone(),
        ep: ep.clone(),
        graphs,
        ..Default::default()
    };

    eprintln!(
        "building TensorRT engines for {} ({}) on {}, ONNX Runtime {}",
        spec.name,
        range.describe(),
        host.gpu_label(ep.device_id.unwrap_or(0)),
        lib.version()
    );
    let n = spec.graphs.len();
    let bar = ProgressBar::new(n as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{pos}/{len}] {msg} ({elapsed})")
            .expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(250));
    let total = Instant::now();
    let mut rows = Vec::new();
    for (role, g) in &spec.graphs {
        let was_cached = before.iter().any(|s| s.graph == role.name() && s.hit);
        bar.set_message(format!(
            "{role}: {}",
            if was_cached {
                "loading the cached engine"
            } else {
                "building the engine (this can take minutes)"
            }
        ));
        let t0 = Instant::now();
        let graph = Graph::load(&g.path, role.name(), &session);
        let took = t0.elapsed();
        let graph = match graph {
            Ok(g) => g,
            Err(e) => {
                bar.abandon();
                return Err(e);
            }
        };
        drop(graph);
        let status = engine_cache_status(&spec, &ep, Some(range), &host)?
            .into_iter()
            .find(|s| s.graph == role.name());
        let profile = profiles.iter().find(|(r, _)| r == role).map(|(_, p)| p);
        let outcome = match (&status, was_cached) {
            (Some(s), true) if s.hit => "cached",
            (Some(s), _) if s.hit => "built",
            _ => "no engine file",
        };
        bar.println(format!(
            "  {role}: {outcome} in {:.1}s{}",
            took.as_secs_f64(),
            status
                .as_ref()
                .map_or(String::new(), |s| format!(" -> {}", s.dir.display()))
        ));
        if outcome == "no engine file" {
            bar.println(format!(
                "  warning: no engine was written for {role}: TensorRT may have left part of the graph to the first run \
                 (an input without a profile, or nodes TensorRT does not take)"
            ));
        }
        rows.push(json!({
            "graph": role.name(),
            "file": g.path,
            "outcome": outcome,
            "seconds": took.as_secs_f64(),
            "cache_dir": status.as_ref().map(|s| s.dir.clone()),
            "profile": profile.map(|p| json!({
                "min": p.min_shapes(), "opt": p.opt_shapes(), "max": p.max_shapes(),
            })),
        }));
        bar.inc(1);
    }
    bar.finish_and_clear();
    eprintln!(
        "{n} graph(s) done in {:.1}s; run fluxrt serve/generate with the same provider settings to use these engines",
        total.elapsed().as_secs_f64()
    );
    if a.json {
        print_json(&json!({
            "model": spec.name,
            "sizes": range.sizes.to_string(),
            "batch": range.batch.to_string(),
            "onnxruntime": lib.version(),
            "gpu": host.gpu_label(ep.device_id.unwrap_or(0)),
            "seconds": total.elapsed().as_secs_f64(),
            "graphs": rows,
        }))?;
    }
    Ok(())
}
