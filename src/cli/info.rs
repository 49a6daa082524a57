//! `fluxrt info MODEL`: the model, its settings, and each graph's inputs and outputs.

use std::path::PathBuf;

use clap::Args as ClapArgs;
use fluxrt::model::{contract, ModelSpec, Variant};
use fluxrt::runtime::onnx_io::{self, GraphSummary};
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
    /// Not needed any more: info reads the graph files without ONNX Runtime (kept so older scripts still run).
    #[arg(long, value_name = "PATH", hide = true)]
    ort_lib: Option<PathBuf>,
    /// Tokenizers for a model folder without them (BFL's ONNX downloads): a folder holding tokenizer/ and
    /// tokenizer_2/, or a repo id in the Hugging Face cache. Default: the model folder, then the cache.
    #[arg(long, value_name = "DIR|REPO", env = "FLUXRT_TOKENIZERS")]
    tokenizers: Option<PathBuf>,
    /// Print the same as JSON on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let mut spec =
        ModelSpec::resolve_with(&model_path(a.model.or(a.folder)), a.tokenizers.as_deref())?;
    // Read from the files, without sessions: a graph the CPU provider cannot run (bf16) is still described.
    let mut graphs = Vec::new();
    for (role, g) in spec.graphs.clone() {
        let summary = onnx_io::check_complete(&g.path)?;
        if role == contract::Role::Transformer {
            let guidance = g.actual_name("guidance");
            let dev = summary.inputs.iter().any(|i| i.name == guidance);
            spec.set_variant(if dev { Variant::Dev } else { Variant::Schnell });
        }
        graphs.push((role, g, summary));
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
                    "inputs": graph.inputs.iter().filter(|i| !contract::is_lora_slot_input(&i.name)).map(|i| i.to_string()).collect::<Vec<_>>(),
                    "outputs": graph.outputs.iter().map(|o| o.to_string()).collect::<Vec<_>>(),
                    "precision": precision(graph),
                    "external_data": graph.external.keys().collect::<Vec<_>>(),
                    "custom_ops": graph.custom_ops,
                    "contract_problems": problems(*role, dev, g, graph),
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
            "fixed_text_length": spec.fixed_text_len,
            "tokenizers": {"clip": spec.clip_tokenizer.path, "t5": spec.t5_tokenizer.path},
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
    text += &format!(
        "tokenizers CLIP {}, T5 {}\n",
        spec.clip_tokenizer.path.display(),
        spec.t5_tokenizer.path.display()
    );
    for (role, g, graph) in &graphs {
        text += &format!(
            "\n{} ({}, {})\n",
            role.name(),
            g.path.display(),
            precision(graph)
        );
        let (slots, inputs): (Vec<_>, Vec<_>) = graph
            .inputs
            .iter()
            .partition(|i| contract::is_lora_slot_input(&i.name));
        for i in inputs {
            text += &format!("  in   {i}\n");
        }
        if !slots.is_empty() {
            text += &format!(
                "  in   {} run-time LoRA slot inputs (optional)\n",
                slots.len()
            );
        }
        for o in &graph.outputs {
            text += &format!("  out  {o}\n");
        }
        for (domain, ops) in &graph.custom_ops {
            let ops: Vec<&str> = ops.iter().map(String::as_str).collect();
            text += &format!("  ops  {domain}: {}\n", ops.join(", "));
        }
        for p in problems(*role, dev, g, graph) {
            text += &format!("  PROBLEM {p}\n");
        }
    }
    print_out(&text)
}

/// The graph's float I/O type (`bf16` for BFL's downloads), or `fp32` when it has none.
fn precision(s: &GraphSummary) -> String {
    use fluxrt::runtime::ElemType;
    s.inputs
        .iter()
        .chain(&s.outputs)
        .find_map(|io| match io.dtype {
            ElemType::F32 => Some("fp32"),
            ElemType::F16 => Some("fp16"),
            ElemType::BF16 => Some("bf16"),
            _ => None,
        })
        .unwrap_or("fp32")
        .to_string()
}

fn problems(
    role: contract::Role,
    dev: bool,
    g: &fluxrt::model::GraphSpec,
    s: &GraphSummary,
) -> Vec<String> {
    contract::check(role, dev, &s.inputs, &s.outputs, &|n| g.actual_name(n))
}
