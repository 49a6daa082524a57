//! TensorRT optimization profiles as the provider takes them (min/opt/max shapes of every dynamic input), and the
//! free-dimension values a static profile gives. The layer above derives them from what the dimensions mean.

use super::types::{Dim, IoInfo};
use crate::{Error, Result};

/// The min/opt/max shape of one input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputProfile {
    pub name: String,
    pub min: Vec<i64>,
    pub opt: Vec<i64>,
    pub max: Vec<i64>,
}

/// A graph's optimization profile: every dynamic input, in declared order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Profile {
    pub inputs: Vec<InputProfile>,
}

impl Profile {
    fn join(&self, pick: impl Fn(&InputProfile) -> &Vec<i64>) -> String {
        self.inputs
            .iter()
            .map(|i| {
                let dims: Vec<String> = pick(i).iter().map(i64::to_string).collect();
                format!("{}:{}", i.name, dims.join("x"))
            })
            .collect::<Vec<_>>()
            .join(",")
    }
    /// `trt_profile_min_shapes`
    pub fn min_shapes(&self) -> String {
        self.join(|i| &i.min)
    }
    /// `trt_profile_opt_shapes`
    pub fn opt_shapes(&self) -> String {
        self.join(|i| &i.opt)
    }
    /// `trt_profile_max_shapes`
    pub fn max_shapes(&self) -> String {
        self.join(|i| &i.max)
    }
    /// No dynamic input: TensorRT needs no profile.
    pub fn is_empty(&self) -> bool {
        self.inputs.is_empty()
    }
}

/// The value of every symbolic dimension that `profile` fixes (min equal to max), in declared order, for ONNX
/// Runtime's free-dimension overrides: with them its optimizer folds a graph's shape arithmetic, which the CUDA
/// provider would otherwise leave on the CPU (graph capture needs every node on the GPU). `label` names the graph in
/// the error when two inputs give one dimension two values.
pub fn static_dimensions(
    label: &str,
    profile: &Profile,
    inputs: &[IoInfo],
) -> Result<Vec<(String, i64)>> {
    let mut dims: Vec<(String, i64)> = Vec::new();
    for p in &profile.inputs {
        let Some(io) = inputs.iter().find(|io| io.name == p.name) else {
            continue;
        };
        for ((d, &lo), &hi) in io.shape.iter().zip(&p.min).zip(&p.max) {
            let Dim::Symbolic(sym) = d else { continue };
            if lo != hi {
                continue;
            }
            match dims.iter().find(|(s, _)| s == sym) {
                None => dims.push((sym.clone(), lo)),
                Some((_, w)) if *w == lo => {}
                Some((_, w)) => {
                    return Err(Error::model(format!(
                        "{label} graph: dimension {sym} would be {w} for one input and {lo} for input {}",
                        io.name
                    ))
                    .with_hint(
                        "export the graph with distinct names for distinct dimensions, or turn CUDA graphs off",
                    ))
                }
            }
        }
    }
    Ok(dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::types::ElemType;

    fn io(name: &str, shape: &[&str]) -> IoInfo {
        IoInfo {
            name: name.into(),
            dtype: ElemType::F32,
            shape: shape
                .iter()
                .map(|d| {
                    d.parse()
                        .map_or_else(|_| Dim::Symbolic(d.to_string()), Dim::Fixed)
                })
                .collect(),
        }
    }

    fn input(name: &str, min: &[i64], max: &[i64]) -> InputProfile {
        InputProfile {
            name: name.into(),
            min: min.to_vec(),
            opt: min.to_vec(),
            max: max.to_vec(),
        }
    }

    #[test]
    fn shape_strings_and_static_dimensions() {
        let inputs = [io("x", &["B", "S", "64"]), io("ids", &["S", "3"])];
        let p = Profile {
            inputs: vec![
                input("x", &[2, 1536, 64], &[2, 1536, 64]),
                input("ids", &[1536, 3], &[1536, 3]),
            ],
        };
        assert_eq!(p.min_shapes(), "x:2x1536x64,ids:1536x3");
        assert_eq!(
            static_dimensions("t", &p, &inputs).unwrap(),
            [("B".to_string(), 2), ("S".to_string(), 1536)]
        );
        // A range fixes nothing it spans.
        let range = Profile {
            inputs: vec![input("x", &[1, 1024, 64], &[4, 4096, 64])],
        };
        assert!(static_dimensions("t", &range, &inputs).unwrap().is_empty());
        // One name, two values: refused.
        let clash = Profile {
            inputs: vec![
                input("x", &[2, 1536, 64], &[2, 1536, 64]),
                input("ids", &[1024, 3], &[1024, 3]),
            ],
        };
        let e = static_dimensions("t", &clash, &inputs).unwrap_err();
        assert!(e.message.contains("dimension S would be 1536"), "{e}");
    }
}
