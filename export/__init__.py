"""fluxrt export step: Flux diffusers checkpoints to ONNX graphs plus a manifest the Rust runtime reads.

Run `python -m export --help`. Modules, one concern each:
  checkpoint  load and check a diffusers-format Flux checkpoint folder
  presets     small random-weight pipelines with the real architecture (tiny, bench)
  wrappers    torch modules whose forward() is exactly one ONNX graph's contract
  onnx_export torch -> ONNX (dynamic axes, external data, fp16 islands)
  tokenizers  tokenizer.json files for the Rust side, real tokenizers from offline sources
  manifest    the manifest.json schema
  validate    onnxruntime vs PyTorch at two shapes
  goldens     reference outputs from diffusers' FluxPipeline (text-to-image), FluxImg2ImgPipeline and true CFG
  lora        fuse Flux LoRA safetensors (diffusers or kohya naming) into the weights before export
  layouts     re-save a model in the official BFL or optimum-onnx layout
  lora_slots  run-time LoRA inputs on the transformer graph (and lora_goldens, their diffusers references)
  quantize    int8/int4 transformer weights, int8 VAE decoder convolutions; optimize: transformer fusions
  graph_io    writing graphs (external data past the protobuf limit)
  ort_flow    the sampling steps around the graphs in numpy, for driving a model from Python onnxruntime
"""

__version__ = "0.1.0"
