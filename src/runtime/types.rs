//! The vocabulary of the runtime layer, shared by every module in it and by the layers above: execution providers by
//! name, element types, declared shapes, input arrays and the optimization level. Pure: nothing here runs ONNX
//! Runtime.

use std::fmt;
use std::str::FromStr;

use ndarray::{ArrayD, ArrayViewD};
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{TensorElementType, ValueType};

use crate::{Error, Result};

/// An ONNX Runtime execution provider that fluxrt knows how to register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Provider {
    Cpu,
    Cuda,
    TensorRt,
    /// NV TensorRT RTX (`NvTensorRTRTXExecutionProvider`): the provider that runs ModelOpt's fp8/fp4 graphs.
    NvTensorRtRtx,
    DirectMl,
    CoreMl,
    Rocm,
    MiGraphX,
    OpenVino,
}

impl Provider {
    pub const ALL: [Provider; 9] = [
        Provider::Cpu,
        Provider::Cuda,
        Provider::TensorRt,
        Provider::NvTensorRtRtx,
        Provider::DirectMl,
        Provider::CoreMl,
        Provider::Rocm,
        Provider::MiGraphX,
        Provider::OpenVino,
    ];

    /// The short name used on the command line (`cuda`, `tensorrt`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Provider::Cpu => "cpu",
            Provider::Cuda => "cuda",
            Provider::TensorRt => "tensorrt",
            Provider::NvTensorRtRtx => "tensorrt-rtx",
            Provider::DirectMl => "directml",
            Provider::CoreMl => "coreml",
            Provider::Rocm => "rocm",
            Provider::MiGraphX => "migraphx",
            Provider::OpenVino => "openvino",
        }
    }

    /// ONNX Runtime's name (`CUDAExecutionProvider`, ...), as `GetAvailableProviders` lists it.
    pub fn ort_name(self) -> &'static str {
        match self {
            Provider::Cpu => "CPUExecutionProvider",
            Provider::Cuda => "CUDAExecutionProvider",
            Provider::TensorRt => "TensorrtExecutionProvider",
            Provider::NvTensorRtRtx => "NvTensorRTRTXExecutionProvider",
            Provider::DirectMl => "DmlExecutionProvider",
            Provider::CoreMl => "CoreMLExecutionProvider",
            Provider::Rocm => "ROCMExecutionProvider",
            Provider::MiGraphX => "MIGraphXExecutionProvider",
            Provider::OpenVino => "OpenVINOExecutionProvider",
        }
    }

    /// The cargo feature that compiles the provider into fluxrt (`None` for CPU, which is always there).
    pub fn feature(self) -> Option<&'static str> {
        match self {
            Provider::Cpu => None,
            Provider::NvTensorRtRtx => Some("nvrtx"),
            other => Some(other.name()),
        }
    }

    /// The ONNX Runtime package that contains the provider.
    pub(crate) fn package(self) -> &'static str {
        match self {
            Provider::Cpu => "onnxruntime",
            Provider::Cuda | Provider::TensorRt => "onnxruntime-gpu",
            Provider::NvTensorRtRtx => {
                "an ONNX Runtime built with the NV TensorRT RTX provider (Windows ML, or a source build with \
                 --use_nv_tensorrt_rtx; not in the onnxruntime-gpu wheel)"
            }
            Provider::DirectMl => "onnxruntime-directml (Windows)",
            Provider::CoreMl => "onnxruntime (the macOS build)",
            Provider::Rocm => "onnxruntime-rocm",
            Provider::MiGraphX => "onnxruntime-migraphx",
            Provider::OpenVino => "onnxruntime-openvino",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Provider {
    type Err = Error;

    /// Case-insensitive; accepts aliases (`trt`, `dml`, `ov`, ...) and ONNX Runtime's names (`CUDAExecutionProvider`).
    fn from_str(s: &str) -> Result<Provider> {
        let key = s.trim().to_ascii_lowercase().replace(['-', '_', ' '], "");
        let key = key.strip_suffix("executionprovider").unwrap_or(&key);
        let p = match key {
            "cpu" => Provider::Cpu,
            "cuda" => Provider::Cuda,
            "tensorrt" | "trt" | "nvtensorrt" => Provider::TensorRt,
            "tensorrtrtx" | "nvtensorrtrtx" | "nvrtx" | "trtrtx" => Provider::NvTensorRtRtx,
            "directml" | "dml" => Provider::DirectMl,
            "coreml" => Provider::CoreMl,
            "rocm" => Provider::Rocm,
            "migraphx" => Provider::MiGraphX,
            "openvino" | "ov" => Provider::OpenVino,
            _ => {
                return Err(
                    Error::input(format!("unknown execution provider {:?}", s.trim())).with_hint(
                        format!(
                            "valid providers: {} (aliases: trt, nvrtx, dml, ov)",
                            Provider::ALL.map(Provider::name).join(", ")
                        ),
                    ),
                )
            }
        };
        Ok(p)
    }
}

/// Parses a comma-separated list like `tensorrt,cuda,cpu`, in priority order. Duplicates are dropped.
pub fn parse_list(s: &str) -> Result<Vec<Provider>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let p: Provider = part.parse()?;
        if !out.contains(&p) {
            out.push(p);
        }
    }
    if out.is_empty() {
        return Err(
            Error::input(format!("empty execution provider list {s:?}")).with_hint(format!(
                "give one or more of: {}",
                Provider::ALL.map(Provider::name).join(", ")
            )),
        );
    }
    Ok(out)
}

/// ONNX Runtime's graph optimization level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Optimization {
    /// No graph rewrites.
    Disable,
    /// Constant folding and redundant node removal.
    Basic,
    /// Plus fusions (attention, GELU, LayerNorm, ...).
    Extended,
    /// Everything, including layout changes (ONNX Runtime's default).
    #[default]
    All,
}

impl From<Optimization> for GraphOptimizationLevel {
    fn from(o: Optimization) -> Self {
        match o {
            Optimization::Disable => GraphOptimizationLevel::Disable,
            Optimization::Basic => GraphOptimizationLevel::Level1,
            Optimization::Extended => GraphOptimizationLevel::Level2,
            Optimization::All => GraphOptimizationLevel::All,
        }
    }
}

impl FromStr for Optimization {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "disable" | "disabled" | "none" | "off" | "0" => Ok(Optimization::Disable),
            "basic" | "1" => Ok(Optimization::Basic),
            "extended" | "2" => Ok(Optimization::Extended),
            "all" | "3" | "99" => Ok(Optimization::All),
            _ => Err(Error::input(format!("unknown optimization level {s:?}"))
                .with_hint("use one of: disable, basic, extended, all")),
        }
    }
}

/// An input or output element type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ElemType {
    F32,
    F16,
    BF16,
    I32,
    I64,
    /// Anything else, by ONNX Runtime's name (`bool`, `u8`, `f64`, `sequence<...>`, ...).
    Other(String),
}

impl ElemType {
    pub(crate) fn from_ort(ty: TensorElementType) -> ElemType {
        match ty {
            TensorElementType::Float32 => ElemType::F32,
            TensorElementType::Float16 => ElemType::F16,
            TensorElementType::Bfloat16 => ElemType::BF16,
            TensorElementType::Int32 => ElemType::I32,
            TensorElementType::Int64 => ElemType::I64,
            other => ElemType::Other(other.to_string()),
        }
    }
}

impl fmt::Display for ElemType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ElemType::F32 => "f32",
            ElemType::F16 => "f16",
            ElemType::BF16 => "bf16",
            ElemType::I32 => "i32",
            ElemType::I64 => "i64",
            ElemType::Other(s) => s,
        })
    }
}

/// One dimension of a declared shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dim {
    Fixed(i64),
    /// A dynamic dimension, by its name in the graph (`batch`, `seq`, ...), or `?` when it has none.
    Symbolic(String),
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Symbolic(s) => f.write_str(s),
        }
    }
}

/// A graph input or output as the model declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoInfo {
    pub name: String,
    pub dtype: ElemType,
    pub shape: Vec<Dim>,
}

impl IoInfo {
    pub(crate) fn from_outlet(name: &str, ty: &ValueType) -> IoInfo {
        match ty {
            ValueType::Tensor {
                ty,
                shape,
                dimension_symbols,
            } => IoInfo {
                name: name.to_string(),
                dtype: ElemType::from_ort(*ty),
                shape: shape
                    .iter()
                    .enumerate()
                    .map(|(i, &d)| {
                        if d >= 0 {
                            Dim::Fixed(d)
                        } else {
                            match dimension_symbols.get(i).filter(|s| !s.is_empty()) {
                                Some(s) => Dim::Symbolic(s.clone()),
                                None => Dim::Symbolic("?".to_string()),
                            }
                        }
                    })
                    .collect(),
            },
            other => IoInfo {
                name: name.to_string(),
                dtype: ElemType::Other(other.to_string()),
                shape: Vec::new(),
            },
        }
    }
}

impl fmt::Display for IoInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}{}", self.name, self.dtype, shape_str(&self.shape))
    }
}

pub(crate) fn shape_str(dims: &[Dim]) -> String {
    format!(
        "[{}]",
        dims.iter()
            .map(Dim::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    )
}

pub(crate) fn given_str(shape: &[usize]) -> String {
    format!(
        "[{}]",
        shape
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// An input array. It is converted to the element type the graph declares: f32 to f16/bf16 (or kept), i64 to i32 (or
/// kept). Contiguous arrays already in the declared type are passed without a copy.
#[derive(Debug, Clone)]
pub enum TensorIn<'a> {
    F32(ArrayViewD<'a, f32>),
    I64(ArrayViewD<'a, i64>),
}

impl TensorIn<'_> {
    pub(crate) fn shape(&self) -> &[usize] {
        match self {
            TensorIn::F32(a) => a.shape(),
            TensorIn::I64(a) => a.shape(),
        }
    }
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            TensorIn::F32(_) => "f32",
            TensorIn::I64(_) => "i64",
        }
    }
}

impl<'a> From<ArrayViewD<'a, f32>> for TensorIn<'a> {
    fn from(a: ArrayViewD<'a, f32>) -> Self {
        TensorIn::F32(a)
    }
}

impl<'a> From<ArrayViewD<'a, i64>> for TensorIn<'a> {
    fn from(a: ArrayViewD<'a, i64>) -> Self {
        TensorIn::I64(a)
    }
}

impl<'a> From<&'a ArrayD<f32>> for TensorIn<'a> {
    fn from(a: &'a ArrayD<f32>) -> Self {
        TensorIn::F32(a.view())
    }
}

impl<'a> From<&'a ArrayD<i64>> for TensorIn<'a> {
    fn from(a: &'a ArrayD<i64>) -> Self {
        TensorIn::I64(a.view())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn parse_names_and_aliases() {
        assert_eq!("CPU".parse::<Provider>().unwrap(), Provider::Cpu);
        assert_eq!(" Cuda ".parse::<Provider>().unwrap(), Provider::Cuda);
        assert_eq!("trt".parse::<Provider>().unwrap(), Provider::TensorRt);
        assert_eq!("TensorRT".parse::<Provider>().unwrap(), Provider::TensorRt);
        assert_eq!("dml".parse::<Provider>().unwrap(), Provider::DirectMl);
        assert_eq!("CoreML".parse::<Provider>().unwrap(), Provider::CoreMl);
        assert_eq!("MIGraphX".parse::<Provider>().unwrap(), Provider::MiGraphX);
        assert_eq!("open-vino".parse::<Provider>().unwrap(), Provider::OpenVino);
        assert_eq!(
            "CUDAExecutionProvider".parse::<Provider>().unwrap(),
            Provider::Cuda
        );
        for p in Provider::ALL {
            assert_eq!(p.name().parse::<Provider>().unwrap(), p);
            assert_eq!(p.ort_name().parse::<Provider>().unwrap(), p);
        }
    }

    #[test]
    fn unknown_name_lists_valid_ones() {
        let err = "vulkan".parse::<Provider>().unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidInput);
        assert!(err.message.contains("vulkan"), "{err}");
        let hint = err.hint.unwrap();
        for p in Provider::ALL {
            assert!(hint.contains(p.name()), "{hint}");
        }
    }

    #[test]
    fn parse_lists() {
        assert_eq!(
            parse_list("tensorrt,cuda,cpu").unwrap(),
            vec![Provider::TensorRt, Provider::Cuda, Provider::Cpu]
        );
        assert_eq!(
            parse_list(" cuda , cuda,cpu,").unwrap(),
            vec![Provider::Cuda, Provider::Cpu]
        );
        assert_eq!(
            parse_list("cuda,gpu").unwrap_err().kind,
            ErrorKind::InvalidInput
        );
        assert_eq!(parse_list(" , ").unwrap_err().kind, ErrorKind::InvalidInput);
    }
}
