//! `fluxrt info MODEL`: the model, its settings, and each graph's inputs and outputs.

use std::path::PathBuf;

use clap::Args as ClapArgs;
use fluxrt::model::{contract, ModelSpec, Variant};
use fluxrt::runtime::{self, Graph, SessionConfig};
use fluxrt::Result;
use serde_json::json;

use super::common::{model_path, print_json, print_out};

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Model folder, as `--model` or positionally. Default: the bundled tiny-flux-schnell.
    #[arg(value_name = "MODEL", conflicts_with = "model")]
    folder: Option<PathBuf>,
    /// Model folder (the same as the positional MODEL, as on every other subcommand).
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// ONNX Runtime library (file or folder).
    #[arg(long, value_name = "PATH")]
    ort_lib: Option<PathBuf>,
    /// Print the same as JSON on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let mut spec = ModelSpec::resolve(&model_path(a.model.or(a.folder)))?;
    runtime::init(a.ort_lib.as_deref())?;
    let cfg = SessionConfig {
        threads: Some(1),
        ..Default::default()
    };
    let mut graphs = Vec::new();
    for (role, g) in spec.graphs.clone() {
        let graph = Graph::load(&g.path, role.name(), &cfg)?;
        if role == contract::Role::Transformer {
            let dev = graph.input(&g.actual_name("guidance")).is_some();
            spec.set_variant(if dev { Variant::Dev } else { Variant::Schnell });
        }
        graphs.push((role, g, graph));
    }
    let dev = spec.variant == Some(Variant::Dev);
    let d = spec.defaults();
    let sched = spec.scheduler();
    if a.json {
        let gj: Vec<_> = graphs
            .iter()
            .map(|(role, g, graph)| {
                json!({
                    "graph": role.name(),
                    "file": g.path,
                    "inputs": graph.inputs().iter().map(|i| i.to_string()).collect::<Vec<_>>(),
                    "outputs": graph.outputs().iter().map(|o| o.to_string()).collect::<Vec<_>>(),
                    "contract_problems": contract::check(*role, dev, graph.inputs(), graph.outputs(), &|n| g.actual_name(n)),
                })
            })
            .collect();
        print_json(&json!({
            "name": spec.name,
            "root": spec.root,
            "layout": spec.layout.name(),
            "variant": spec.variant.map(|v| v.name()),
            "defaults": d,
            "scheduler": sched,
            "vae": spec.vae,
            "graphs": gj,
        }))?;
        return Ok(());
    }
    let mut text = String::new();
    text += &format!("model     {} ({})\n", spec.name, spec.root.display());
    text += &format!("layout    {}\n", spec.layout.name());
    text += &format!(
        "variant   {}\n",
        spec.variant.map_or("unknown", |v| v.name())
    );
    text += &format!(
        "defaults  {}x{}, {} steps, guidance {}, T5 length {}\n",
        d.width,
        d.height,
        d.steps,
        d.guidance.map_or("none".to_string(), |g| g.to_string()),
        d.t5_max_length
    );
    text += &format!(
        "scheduler shift {}, dynamic shifting {} (base {} / max {}, seq {}..{})\n",
        sched.shift,
        sched.use_dynamic_shifting,
        sched.base_shift,
        sched.max_shift,
        sched.base_image_seq_len,
        sched.max_image_seq_len
    );
    text += &format!(
        "vae       scale {}, shift {}, downsample {}\n",
        spec.vae.scaling_factor, spec.vae.shift_factor, spec.vae.downsample_factor
    );
    for (role, g, graph) in &graphs {
        text += &format!("\n{} ({})\n", role.name(), g.path.display());
        for i in graph.inputs() {
            text += &format!("  in   {i}\n");
        }
        for o in graph.outputs() {
            text += &format!("  out  {o}\n");
        }
        for p in contract::check(*role, dev, graph.inputs(), graph.outputs(), &|n| {
            g.actual_name(n)
        }) {
            text += &format!("  PROBLEM {p}\n");
        }
    }
    print_out(&text)
}
