//! The ONNX I/O contract of each graph (the official BFL / demoDiffusion names), read from `contract/flux-onnx.json`
//! (which the export step reads too), and the check of a loaded graph against it. Pure data: the runtime layer
//! supplies what a session declares.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::OnceLock;

use crate::runtime::{ElemType, IoInfo};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Clip,
    T5,
    Transformer,
    VaeDecoder,
    VaeEncoder,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Clip,
        Role::T5,
        Role::Transformer,
        Role::VaeDecoder,
        Role::VaeEncoder,
    ];

    /// The name used in manifests and messages.
    pub fn name(self) -> &'static str {
        match self {
            Role::Clip => "clip",
            Role::T5 => "t5",
            Role::Transformer => "transformer",
            Role::VaeDecoder => "vae_decoder",
            Role::VaeEncoder => "vae_encoder",
        }
    }

    pub fn from_name(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == name)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// f32, f16 or bf16: the runtime converts.
    Float,
    /// i32 or i64: the runtime converts.
    Int,
}

/// One input or output the pipeline relies on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Port {
    pub name: &'static str,
    pub kind: Kind,
    pub rank: usize,
}

/// One dimension of a contract shape: a number every FLUX.1 model has, or a symbol (`B`, `S`, `L`, `h`, `w`, `H`,
/// `W`, or a model width such as `t5_dim`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(untagged)]
pub enum ContractDim {
    Fixed(i64),
    Symbol(String),
}

/// One input or output of the contract file.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct IoSpec {
    pub name: String,
    /// `float32` (any float type) or `int32` (any integer type).
    pub dtype: String,
    pub shape: Vec<ContractDim>,
    /// Only guidance-distilled (dev) transformers have it.
    #[serde(default)]
    pub dev_only: bool,
    /// Written by the export step but not read by the runtime when `false`.
    #[serde(default = "yes")]
    pub required: bool,
}

fn yes() -> bool {
    true
}

impl IoSpec {
    fn port(&'static self) -> Port {
        Port {
            name: &self.name,
            kind: if self.dtype.starts_with("int") {
                Kind::Int
            } else {
                Kind::Float
            },
            rank: self.shape.len(),
        }
    }
}

/// Where a graph's file sits in the official layouts.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct GraphFiles {
    /// Relative to the model folder; the transformer's has a `{precision}` folder.
    pub bfl: String,
    pub optimum: String,
}

/// One graph of the contract file.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct GraphContract {
    pub inputs: Vec<IoSpec>,
    pub outputs: Vec<IoSpec>,
    pub files: GraphFiles,
    /// optimum-onnx's name of an input or output, by contract name.
    pub optimum_names: BTreeMap<String, String>,
}

#[derive(serde::Deserialize)]
struct ContractFile {
    graphs: BTreeMap<String, GraphContract>,
}

/// The contract file both the export step and the runtime read (`contract/flux-onnx.json`), compiled in.
const CONTRACT_JSON: &str = include_str!("../../contract/flux-onnx.json");

/// The contract of `role`'s graph.
pub fn graph(role: Role) -> &'static GraphContract {
    static CONTRACT: OnceLock<ContractFile> = OnceLock::new();
    let c = CONTRACT.get_or_init(|| {
        serde_json::from_str(CONTRACT_JSON).expect("contract/flux-onnx.json is valid (tested)")
    });
    &c.graphs[role.name()]
}

/// The contract's declaration of `role`'s input `name` (the contract name), if it has one.
pub fn input(role: Role, name: &str) -> Option<&'static IoSpec> {
    graph(role).inputs.iter().find(|i| i.name == name)
}

/// Inputs the pipeline feeds. `guidance` only for a guidance-distilled (dev) transformer.
pub fn inputs(role: Role, guidance: bool) -> Vec<Port> {
    graph(role)
        .inputs
        .iter()
        .filter(|i| guidance || !i.dev_only)
        .map(IoSpec::port)
        .collect()
}

/// Outputs the pipeline reads.
pub fn outputs(role: Role) -> Vec<Port> {
    graph(role)
        .outputs
        .iter()
        .filter(|o| o.required)
        .map(IoSpec::port)
        .collect()
}

/// Graph-side names for a layout whose names differ from the contract (optimum-onnx), contract name first.
pub fn optimum_names(role: Role) -> Vec<(&'static str, &'static str)> {
    graph(role)
        .optimum_names
        .iter()
        .map(|(c, a)| (c.as_str(), a.as_str()))
        .collect()
}

/// The run-time LoRA slot inputs of a transformer graph (export/lora_slots.py): `M.lora_A` `[in, r]` and `M.lora_B`
/// `[r, out]` for a Linear layer `M`, each rank a dimension named `lora_rank_<i>`.
pub const LORA_A_SUFFIX: &str = ".lora_A";
pub const LORA_B_SUFFIX: &str = ".lora_B";
pub const LORA_RANK_PREFIX: &str = "lora_rank_";

/// Whether a graph input is a LoRA slot factor (optional, fed whole, never sliced per image).
pub fn is_lora_slot_input(name: &str) -> bool {
    name.ends_with(LORA_A_SUFFIX) || name.ends_with(LORA_B_SUFFIX)
}

fn kind_of(t: &ElemType) -> Option<Kind> {
    match t {
        ElemType::F32 | ElemType::F16 | ElemType::BF16 => Some(Kind::Float),
        ElemType::I32 | ElemType::I64 => Some(Kind::Int),
        ElemType::Other(_) => None,
    }
}

/// Every way the graph's declared I/O departs from the contract, one readable line each (empty = fits).
/// `actual_name` maps a contract name to the graph's own name (identity except for optimum graphs).
pub fn check(
    role: Role,
    guidance: bool,
    graph_inputs: &[IoInfo],
    graph_outputs: &[IoInfo],
    actual_name: &dyn Fn(&str) -> String,
) -> Vec<String> {
    let mut problems = Vec::new();
    let mut side = |what: &str, want: Vec<Port>, have: &[IoInfo]| {
        for p in want {
            let name = actual_name(p.name);
            match have.iter().find(|io| io.name == name) {
                None => {
                    let names: Vec<&str> = have.iter().map(|io| io.name.as_str()).collect();
                    problems.push(format!(
                        "{role}: {what} `{name}` is missing (the graph has: {})",
                        names.join(", ")
                    ))
                }
                Some(io) => {
                    if kind_of(&io.dtype) != Some(p.kind) {
                        problems.push(format!(
                            "{role}: {what} `{name}` has type {}, expected {}",
                            io.dtype,
                            match p.kind {
                                Kind::Float => "a float (f32/f16/bf16)",
                                Kind::Int => "an integer (i32/i64)",
                            }
                        ));
                    }
                    if io.shape.len() != p.rank {
                        problems.push(format!(
                            "{role}: {what} `{name}` has rank {}, expected {}",
                            io.shape.len(),
                            p.rank
                        ));
                    }
                }
            }
        }
    };
    side("input", inputs(role, guidance), graph_inputs);
    side("output", outputs(role), graph_outputs);
    // An input the pipeline does not know would be left unfed: refuse it before the first run.
    let known: Vec<String> = inputs(role, true)
        .iter()
        .map(|p| actual_name(p.name))
        .collect();
    for io in graph_inputs {
        // Run-time LoRA slots (crate::lora) are fed only when a LoRA is active.
        if role == Role::Transformer && is_lora_slot_input(&io.name) {
            continue;
        }
        if !known.contains(&io.name) {
            problems.push(format!("{role}: unexpected input `{}` ({io})", io.name));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Dim;

    fn io(name: &str, dtype: ElemType, rank: usize) -> IoInfo {
        IoInfo {
            name: name.into(),
            dtype,
            shape: vec![Dim::Symbolic("d".into()); rank],
        }
    }

    fn same(n: &str) -> String {
        n.to_string()
    }

    #[test]
    fn a_conforming_transformer_has_no_problems() {
        let ins: Vec<IoInfo> = inputs(Role::Transformer, true)
            .iter()
            .map(|p| {
                io(
                    p.name,
                    if p.kind == Kind::Float {
                        ElemType::F16
                    } else {
                        ElemType::I32
                    },
                    p.rank,
                )
            })
            .collect();
        let outs = vec![io("latent", ElemType::F16, 3)];
        assert!(check(Role::Transformer, true, &ins, &outs, &same).is_empty());
    }

    #[test]
    fn renamed_input_wrong_dtype_and_rank_are_each_reported() {
        let ins = vec![io("input_idz", ElemType::I32, 2)];
        let outs = vec![io("text_embeddings", ElemType::I64, 2)];
        let p = check(Role::T5, false, &ins, &outs, &same);
        assert!(
            p.iter().any(|m| m.contains("input `input_ids` is missing")),
            "{p:?}"
        );
        assert!(
            p.iter().any(|m| m.contains("unexpected input `input_idz`")),
            "{p:?}"
        );
        assert!(p.iter().any(|m| m.contains("has type i64")), "{p:?}");
        assert!(
            p.iter().any(|m| m.contains("has rank 2, expected 3")),
            "{p:?}"
        );
    }

    #[test]
    fn guidance_is_required_only_for_dev() {
        let ins: Vec<IoInfo> = inputs(Role::Transformer, false)
            .iter()
            .map(|p| io(p.name, ElemType::F32, p.rank))
            .collect();
        let outs = vec![io("latent", ElemType::F32, 3)];
        assert!(check(Role::Transformer, false, &ins, &outs, &same).is_empty());
        let p = check(Role::Transformer, true, &ins, &outs, &same);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].contains("guidance"));
    }

    #[test]
    fn lora_slot_inputs_are_accepted_on_the_transformer_only() {
        let mut ins: Vec<IoInfo> = inputs(Role::Transformer, false)
            .iter()
            .map(|p| io(p.name, ElemType::F32, p.rank))
            .collect();
        ins.push(io("x_embedder.lora_A", ElemType::F32, 2));
        ins.push(io("x_embedder.lora_B", ElemType::F32, 2));
        let outs = vec![io("latent", ElemType::F32, 3)];
        assert!(check(Role::Transformer, false, &ins, &outs, &same).is_empty());
        let ins = vec![
            io("latent", ElemType::F32, 4),
            io("conv.lora_A", ElemType::F32, 2),
        ];
        let p = check(
            Role::VaeDecoder,
            false,
            &ins,
            &[io("images", ElemType::F32, 4)],
            &same,
        );
        assert!(
            p.iter()
                .any(|m| m.contains("unexpected input `conv.lora_A`")),
            "{p:?}"
        );
    }

    #[test]
    fn optimum_names_are_mapped() {
        let map = |n: &str| {
            optimum_names(Role::VaeDecoder)
                .iter()
                .find(|(c, _)| *c == n)
                .map_or(n.to_string(), |(_, a)| a.to_string())
        };
        let ins = vec![io("latent_sample", ElemType::F32, 4)];
        let outs = vec![io("sample", ElemType::F32, 4)];
        assert!(check(Role::VaeDecoder, false, &ins, &outs, &map).is_empty());
    }

    #[test]
    fn the_contract_file_describes_every_role() {
        for role in Role::ALL {
            let g = graph(role);
            assert!(!g.inputs.is_empty() && !outputs(role).is_empty(), "{role}");
            for (c, _) in optimum_names(role) {
                assert!(
                    g.inputs.iter().chain(&g.outputs).any(|io| io.name == c),
                    "{role}: optimum renames unknown {c}"
                );
            }
        }
        assert_eq!(
            inputs(Role::Transformer, true).len(),
            inputs(Role::Transformer, false).len() + 1
        );
        assert_eq!(outputs(Role::Clip)[0].name, "pooled_embeddings");
        assert_eq!(input(Role::T5, "input_ids").unwrap().port().kind, Kind::Int);
        assert!(graph(Role::Transformer).files.bfl.contains("{precision}"));
    }

    /// The bundled models' manifests (what the export step wrote) declare the contract file's I/O.
    #[test]
    fn the_bundled_models_follow_the_contract_file() {
        for model in ["tiny-flux-schnell", "tiny-flux-dev"] {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("models")
                .join(model);
            let m = crate::model::Manifest::read(&dir.join("manifest.json")).unwrap();
            for (name, g) in &m.graphs {
                let role = Role::from_name(name).unwrap();
                let want: Vec<&str> = graph(role)
                    .inputs
                    .iter()
                    .filter(|i| m.guidance_embeds || !i.dev_only)
                    .map(|i| i.name.as_str())
                    .collect();
                let got: Vec<&str> = g.inputs.iter().map(|i| i.name.as_str()).collect();
                assert_eq!(got, want, "{model}/{name}");
                for i in &g.inputs {
                    let spec = input(role, &i.name).unwrap();
                    assert_eq!(i.shape.len(), spec.shape.len(), "{model}/{name}/{}", i.name);
                    for (d, c) in i.shape.iter().zip(&spec.shape) {
                        match c {
                            ContractDim::Fixed(n) => assert_eq!(d, &serde_json::json!(n)),
                            ContractDim::Symbol(s) if s.ends_with("_dim") => assert!(d.is_number()),
                            ContractDim::Symbol(s) => assert_eq!(d, &serde_json::json!(s)),
                        }
                    }
                }
            }
        }
    }
}
