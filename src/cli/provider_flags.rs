//! The execution provider flags (docs/providers.md), shared by every subcommand that loads a model. Each flag has a
//! key in the `[providers]` section of a `--config` file; a flag given on the command line wins over the file.

use std::path::PathBuf;

use clap::builder::BoolishValueParser;
use clap::Args;
use fluxrt::config::ProvidersLayer;
use fluxrt::model::shapes::{BatchRange, SizeRange};
use fluxrt::runtime::ep::{
    ArenaExtend, ByteSize, ComputeUnits, ConvSearch, CoreMlFormat, CoreMlLayer, CudaLayer,
    DirectMlLayer, DmlDeviceFilter, DmlPerformance, TensorRtLayer,
};

#[derive(Args, Debug, Clone, Default)]
#[command(
    next_help_heading = "Execution provider settings (also [providers] in --config; see docs/providers.md)"
)]
// Each provider's own flags under its heading, shown by --help only (-h keeps the short list).
pub struct ProviderFlags {
    /// GPU index for CUDA and TensorRT (default 0); the adapter index for DirectML.
    #[arg(long, value_name = "N")]
    pub device_id: Option<u32>,
    /// Image sizes the TensorRT engines serve: MIN-MAX pixels (width and height), e.g. 512-1024, or
    /// 512x768-1024x1344, optionally @OPT; one size makes shapes static (CUDA graphs). Requests outside are refused.
    #[arg(long, value_name = "RANGE")]
    pub trt_sizes: Option<SizeRange>,
    /// Images per call the TensorRT engines serve, e.g. 1-4 (default 1), optionally @OPT.
    #[arg(long, value_name = "RANGE")]
    pub trt_batch: Option<BatchRange>,
    /// The BFL transformer folder: auto, fp32, fp16, bf16, fp8 or fp4 (fp8/fp4 need TensorRT).
    #[arg(long, value_name = "PRECISION")]
    pub transformer_precision: Option<String>,

    /// TensorRT: allow fp16 kernels [default: false].
    #[arg(long, help_heading = "TensorRT provider ([providers.tensorrt] in --config)", hide_short_help = true, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub trt_fp16: Option<bool>,
    /// TensorRT: allow bf16 kernels [default: false].
    #[arg(long, help_heading = "TensorRT provider ([providers.tensorrt] in --config)", hide_short_help = true, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub trt_bf16: Option<bool>,
    /// TensorRT: keep LayerNorm in fp32 when fp16 is on [default: true].
    #[arg(long, help_heading = "TensorRT provider ([providers.tensorrt] in --config)", hide_short_help = true, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub trt_layer_norm_fp32: Option<bool>,
    /// TensorRT: cache built engines, keyed by model, ONNX Runtime, GPU and shape range [default: true].
    #[arg(long, help_heading = "TensorRT provider ([providers.tensorrt] in --config)", hide_short_help = true, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub trt_engine_cache: Option<bool>,
    /// TensorRT: root folder of the engine and timing caches [default: ~/.cache/fluxrt/tensorrt].
    #[arg(
        long,
        help_heading = "TensorRT provider ([providers.tensorrt] in --config)",
        hide_short_help = true,
        value_name = "DIR"
    )]
    pub trt_cache_dir: Option<PathBuf>,
    /// TensorRT: keep a timing cache to speed up later engine builds [default: true].
    #[arg(long, help_heading = "TensorRT provider ([providers.tensorrt] in --config)", hide_short_help = true, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub trt_timing_cache: Option<bool>,
    /// TensorRT: builder optimization level 0-5 [default: 3].
    #[arg(
        long,
        help_heading = "TensorRT provider ([providers.tensorrt] in --config)",
        hide_short_help = true,
        value_name = "0-5"
    )]
    pub trt_opt_level: Option<u8>,
    /// TensorRT: builder workspace limit, e.g. 8GiB [default: TensorRT's].
    #[arg(
        long,
        help_heading = "TensorRT provider ([providers.tensorrt] in --config)",
        hide_short_help = true,
        value_name = "BYTES"
    )]
    pub trt_workspace: Option<ByteSize>,
    /// TensorRT: capture CUDA graphs of the transformer (static shapes only; runs the device loop) [default: false].
    #[arg(long, help_heading = "TensorRT provider ([providers.tensorrt] in --config)", hide_short_help = true, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub trt_cuda_graph: Option<bool>,

    /// CUDA: cuDNN convolution algorithm search: exhaustive, heuristic or default [default: exhaustive].
    #[arg(
        long,
        help_heading = "CUDA provider ([providers.cuda] in --config)",
        hide_short_help = true,
        value_name = "MODE"
    )]
    pub cuda_conv_search: Option<ConvSearch>,
    /// CUDA: memory arena growth: next-power-of-two or same-as-requested [default: same-as-requested].
    #[arg(
        long,
        help_heading = "CUDA provider ([providers.cuda] in --config)",
        hide_short_help = true,
        value_name = "STRATEGY"
    )]
    pub cuda_arena_extend: Option<ArenaExtend>,
    /// CUDA: memory arena limit, e.g. 40GiB [default: none].
    #[arg(
        long,
        help_heading = "CUDA provider ([providers.cuda] in --config)",
        hide_short_help = true,
        value_name = "BYTES"
    )]
    pub cuda_mem_limit: Option<ByteSize>,
    /// CUDA: TF32 math for fp32 matmuls and convolutions [default: true].
    #[arg(long, help_heading = "CUDA provider ([providers.cuda] in --config)", hide_short_help = true, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub cuda_tf32: Option<bool>,
    /// CUDA: capture CUDA graphs of the transformer (static shapes only; runs the device loop) [default: false].
    #[arg(long, help_heading = "CUDA provider ([providers.cuda] in --config)", hide_short_help = true, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub cuda_graph: Option<bool>,

    /// DirectML: adapter preference without --device-id: default, high-performance, minimum-power
    /// [default: high-performance].
    #[arg(
        long,
        help_heading = "DirectML provider ([providers.directml] in --config)",
        hide_short_help = true,
        value_name = "PREF"
    )]
    pub dml_performance: Option<DmlPerformance>,
    /// DirectML: adapters to choose from without --device-id: gpu, npu, any [default: gpu].
    #[arg(
        long,
        help_heading = "DirectML provider ([providers.directml] in --config)",
        hide_short_help = true,
        value_name = "KIND"
    )]
    pub dml_device_filter: Option<DmlDeviceFilter>,

    /// CoreML: model format: mlprogram or neuralnetwork [default: mlprogram].
    #[arg(
        long,
        help_heading = "CoreML provider ([providers.coreml] in --config)",
        hide_short_help = true,
        value_name = "FORMAT"
    )]
    pub coreml_format: Option<CoreMlFormat>,
    /// CoreML: compute units: all, cpu-and-gpu, cpu-and-ne, cpu-only [default: all].
    #[arg(
        long,
        help_heading = "CoreML provider ([providers.coreml] in --config)",
        hide_short_help = true,
        value_name = "UNITS"
    )]
    pub coreml_compute_units: Option<ComputeUnits>,
    /// CoreML: cache compiled models [default: true].
    #[arg(long, help_heading = "CoreML provider ([providers.coreml] in --config)", hide_short_help = true, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub coreml_cache: Option<bool>,
    /// CoreML: compiled model cache folder [default: ~/.cache/fluxrt/coreml].
    #[arg(
        long,
        help_heading = "CoreML provider ([providers.coreml] in --config)",
        hide_short_help = true,
        value_name = "DIR"
    )]
    pub coreml_cache_dir: Option<PathBuf>,
    /// CoreML: only hand Core ML inputs of static shape [default: false].
    #[arg(long, help_heading = "CoreML provider ([providers.coreml] in --config)", hide_short_help = true, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", value_parser = BoolishValueParser::new())]
    pub coreml_static_shapes: Option<bool>,
}

impl ProviderFlags {
    /// The flags as a settings layer (unset flags leave the config file's value).
    pub fn layer(&self) -> ProvidersLayer {
        ProvidersLayer {
            order: None,
            device_id: self.device_id,
            sizes: self.trt_sizes,
            batch: self.trt_batch,
            transformer_precision: self.transformer_precision.clone(),
            tensorrt: TensorRtLayer {
                fp16: self.trt_fp16,
                bf16: self.trt_bf16,
                layer_norm_fp32_fallback: self.trt_layer_norm_fp32,
                engine_cache: self.trt_engine_cache,
                cache_dir: self.trt_cache_dir.clone(),
                timing_cache: self.trt_timing_cache,
                builder_optimization_level: self.trt_opt_level,
                max_workspace_size: self.trt_workspace,
                cuda_graph: self.trt_cuda_graph,
            },
            cuda: CudaLayer {
                conv_algorithm_search: self.cuda_conv_search,
                arena_extend_strategy: self.cuda_arena_extend,
                memory_limit: self.cuda_mem_limit,
                tf32: self.cuda_tf32,
                cuda_graph: self.cuda_graph,
            },
            directml: DirectMlLayer {
                performance_preference: self.dml_performance,
                device_filter: self.dml_device_filter,
            },
            coreml: CoreMlLayer {
                model_format: self.coreml_format,
                compute_units: self.coreml_compute_units,
                model_cache: self.coreml_cache,
                cache_dir: self.coreml_cache_dir.clone(),
                static_input_shapes: self.coreml_static_shapes,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use fluxrt::config::ProvidersLayer;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        f: ProviderFlags,
    }

    fn layer(args: &[&str]) -> ProvidersLayer {
        let mut all = vec!["fluxrt"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all)
            .unwrap_or_else(|e| panic!("{e}"))
            .f
            .layer()
    }

    #[test]
    fn no_flags_leave_everything_to_the_file() {
        assert_eq!(layer(&[]), ProvidersLayer::default());
    }

    #[test]
    fn flags_fill_their_keys() {
        let l = layer(&[
            "--device-id",
            "2",
            "--trt-sizes",
            "512-1024",
            "--trt-batch",
            "1-4",
            "--trt-fp16",
            "--trt-bf16=false",
            "--trt-engine-cache",
            "off",
            "--trt-opt-level",
            "5",
            "--trt-workspace",
            "8GiB",
            "--cuda-conv-search",
            "heuristic",
            "--cuda-arena-extend",
            "next-power-of-two",
            "--cuda-mem-limit",
            "20G",
            "--cuda-tf32=no",
            "--dml-performance",
            "minimum-power",
            "--coreml-compute-units",
            "cpu-and-gpu",
            "--coreml-format",
            "neuralnetwork",
            "--transformer-precision",
            "fp8",
        ]);
        assert_eq!(l.device_id, Some(2));
        assert_eq!(l.sizes.unwrap().to_string(), "512-1024");
        assert_eq!(l.batch.unwrap().to_string(), "1-4");
        assert_eq!(l.tensorrt.fp16, Some(true));
        assert_eq!(l.tensorrt.bf16, Some(false));
        assert_eq!(l.tensorrt.engine_cache, Some(false));
        assert_eq!(l.tensorrt.builder_optimization_level, Some(5));
        assert_eq!(l.tensorrt.max_workspace_size, Some(ByteSize(8 << 30)));
        assert_eq!(l.tensorrt.timing_cache, None);
        assert_eq!(l.cuda.conv_algorithm_search, Some(ConvSearch::Heuristic));
        assert_eq!(
            l.cuda.arena_extend_strategy,
            Some(ArenaExtend::NextPowerOfTwo)
        );
        assert_eq!(l.cuda.memory_limit, Some(ByteSize(20 << 30)));
        assert_eq!(l.cuda.tf32, Some(false));
        assert_eq!(
            l.directml.performance_preference,
            Some(DmlPerformance::MinimumPower)
        );
        assert_eq!(l.coreml.compute_units, Some(ComputeUnits::CpuAndGpu));
        assert_eq!(l.coreml.model_format, Some(CoreMlFormat::NeuralNetwork));
        assert_eq!(l.transformer_precision.as_deref(), Some("fp8"));
    }

    #[test]
    fn flags_override_the_config_file() {
        let file: ProvidersLayer = fluxrt::config::parse_config(
            "[providers]\ndevice_id = 1\n[providers.tensorrt]\nfp16 = true\ntiming_cache = false\n",
            "f.toml",
        )
        .unwrap();
        let c =
            ProvidersLayer::resolve(&[&file, &layer(&["--device-id", "3", "--trt-fp16=false"])])
                .unwrap();
        assert_eq!(c.ep.device_id, Some(3));
        assert!(!c.ep.tensorrt.fp16);
        assert!(!c.ep.tensorrt.timing_cache, "kept from the file");
    }

    #[test]
    fn bad_values_are_refused_by_the_parser() {
        for args in [
            &["--trt-sizes", "1000"][..],
            &["--trt-batch", "0"],
            &["--cuda-conv-search", "fastest"],
            &["--trt-workspace", "lots"],
            &["--trt-fp16=maybe"],
        ] {
            let mut all = vec!["fluxrt"];
            all.extend_from_slice(args);
            assert!(Cli::try_parse_from(all).is_err(), "{args:?}");
        }
    }
}
