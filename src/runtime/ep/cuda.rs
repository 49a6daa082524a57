//! The CUDA execution provider: its `[providers.cuda]` settings, a session's options (CUDA graphs only for the graphs
//! whose options allow it) and `ort`'s builder.

use serde::Deserialize;

use super::values::{de_parsed, string_enum, ByteSize};
use super::{flag, GraphOptions};

string_enum! {
    /// cuDNN's convolution algorithm search (CUDA `cudnn_conv_algo_search`).
    pub enum ConvSearch("cuDNN convolution algorithm search") {
        /// Benchmark every algorithm on the first run of each shape (ONNX Runtime's default; fastest once warm).
        Exhaustive = "exhaustive",
        /// cuDNN's heuristics: no benchmarking, quick first runs at new shapes.
        Heuristic = "heuristic",
        /// The implicit-precomputed-GEMM algorithm: least memory.
        Default = "default",
    }
}

string_enum! {
    /// How the CUDA memory arena grows (`arena_extend_strategy`).
    pub enum ArenaExtend("arena extend strategy") {
        NextPowerOfTwo = "next_power_of_two" | "knextpoweroftwo",
        /// Grow by exactly what is asked: less waste with multi-GB weights.
        SameAsRequested = "same_as_requested" | "ksameasrequested",
    }
}

/// `[providers.cuda]`
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CudaLayer {
    pub conv_algorithm_search: Option<ConvSearch>,
    pub arena_extend_strategy: Option<ArenaExtend>,
    #[serde(default, deserialize_with = "de_parsed")]
    pub memory_limit: Option<ByteSize>,
    pub tf32: Option<bool>,
    pub cuda_graph: Option<bool>,
}

impl CudaLayer {
    pub fn overlay(&mut self, top: &CudaLayer) {
        overlay!(self, top; conv_algorithm_search, arena_extend_strategy, memory_limit, tf32, cuda_graph);
    }

    pub fn resolve(&self) -> CudaSettings {
        let d = CudaSettings::default();
        CudaSettings {
            conv_algorithm_search: self
                .conv_algorithm_search
                .unwrap_or(d.conv_algorithm_search),
            arena_extend_strategy: self
                .arena_extend_strategy
                .unwrap_or(d.arena_extend_strategy),
            memory_limit: self.memory_limit.map(|b| b.0),
            tf32: self.tf32.unwrap_or(d.tf32),
            cuda_graph: self.cuda_graph.unwrap_or(d.cuda_graph),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct CudaSettings {
    pub conv_algorithm_search: ConvSearch,
    pub arena_extend_strategy: ArenaExtend,
    pub memory_limit: Option<u64>,
    pub tf32: bool,
    /// Capture CUDA graphs, for the graphs whose options allow it.
    pub cuda_graph: bool,
}

impl Default for CudaSettings {
    fn default() -> Self {
        CudaSettings {
            conv_algorithm_search: ConvSearch::Exhaustive,
            arena_extend_strategy: ArenaExtend::SameAsRequested,
            memory_limit: None,
            tf32: true,
            cuda_graph: false,
        }
    }
}

impl CudaSettings {
    /// The options of one session on GPU `device_id`; CUDA graphs only when `graph` allows them.
    pub fn options(&self, device_id: i32, graph: &GraphOptions) -> CudaOptions {
        CudaOptions {
            device_id,
            conv_algorithm_search: self.conv_algorithm_search,
            arena_extend_strategy: self.arena_extend_strategy,
            memory_limit: self.memory_limit,
            tf32: self.tf32,
            cuda_graph: self.cuda_graph && graph.capture_cuda_graphs,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct CudaOptions {
    pub device_id: i32,
    pub conv_algorithm_search: ConvSearch,
    pub arena_extend_strategy: ArenaExtend,
    pub memory_limit: Option<u64>,
    pub tf32: bool,
    pub cuda_graph: bool,
}

impl CudaOptions {
    pub(super) fn ort_options(&self) -> Vec<(&'static str, String)> {
        let mut v = vec![
            ("device_id", self.device_id.to_string()),
            (
                "cudnn_conv_algo_search",
                self.conv_algorithm_search.name().to_ascii_uppercase(),
            ),
            (
                "arena_extend_strategy",
                match self.arena_extend_strategy {
                    ArenaExtend::NextPowerOfTwo => "kNextPowerOfTwo",
                    ArenaExtend::SameAsRequested => "kSameAsRequested",
                }
                .to_string(),
            ),
        ];
        if let Some(m) = self.memory_limit {
            v.push(("gpu_mem_limit", m.to_string()));
        }
        v.push(("use_tf32", flag(self.tf32)));
        v.push(("enable_cuda_graph", flag(self.cuda_graph)));
        v
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn to_ort(&self) -> ort::ep::CUDA {
        use ort::ep::cuda::ConvAlgorithmSearch as S;
        use ort::ep::ArenaExtendStrategy as A;
        let mut e = ort::ep::CUDA::default()
            .with_device_id(self.device_id)
            .with_conv_algorithm_search(match self.conv_algorithm_search {
                ConvSearch::Exhaustive => S::Exhaustive,
                ConvSearch::Heuristic => S::Heuristic,
                ConvSearch::Default => S::Default,
            })
            .with_arena_extend_strategy(match self.arena_extend_strategy {
                ArenaExtend::NextPowerOfTwo => A::NextPowerOfTwo,
                ArenaExtend::SameAsRequested => A::SameAsRequested,
            });
        if let Some(m) = self.memory_limit {
            e = e.with_memory_limit(usize::try_from(m).unwrap_or(usize::MAX));
        }
        e.with_tf32(self.tf32).with_cuda_graph(self.cuda_graph)
    }
}
