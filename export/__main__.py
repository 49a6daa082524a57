"""`python -m export`: see --help. Errors a user can fix exit with code 2 and one line naming the problem."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .fixtures import KINDS as GOLDEN_KINDS

SUBCOMMANDS = ("tiny", "preset", "layout", "hub-cache", "goldens", "quantize", "optimize", "convert")
WORK_DIR = Path("build/export")


# The pinned stack (export/requirements.txt) by the names Python imports; scripts/export-env.sh installs it.
STACK = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxscript", "tokenizers", "safetensors",
         "numpy", "sentencepiece", "peft", "accelerate", "PIL")
INSTALL = "bash scripts/export-env.sh"


def missing_stack_message(module: str) -> str:
    venv = Path(os.environ.get("FLUXRT_VENV", Path.home() / ".cache" / "fluxrt" / "venv"))
    return (f"error: the export step needs its pinned Python packages, and this Python ({sys.executable}) has no "
            f"`{module}`: run `{INSTALL}`, then `{venv / 'bin' / 'python'} -m export ...`")


def export_parser() -> argparse.ArgumentParser:
    from . import onnx_export as ox

    p = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a diffusers-format FLUX.1 checkpoint to ONNX graphs + manifest.json for fluxrt. "
        f"Other commands: {', '.join(SUBCOMMANDS)} (python -m export COMMAND --help).",
    )
    p.add_argument("checkpoint", type=Path, help="diffusers-format Flux folder (e.g. a FLUX.1-schnell download)")
    p.add_argument("out_dir", type=Path, help="model folder to create")
    p.add_argument("--precision", choices=ox.PRECISIONS, default="fp32",
                   help="graph precision: fp32 (CPU), fp16 with fp32 islands where fp16 overflows (GPUs), bf16 "
                   "(TensorRT; T5 stays fp32)")
    p.add_argument("--opset", type=int, default=ox.DEFAULT_OPSET, help=f"ONNX opset (default {ox.DEFAULT_OPSET})")
    p.add_argument("--components", nargs="+", choices=ox.GRAPHS, default=None, help="graphs to export (default all)")
    p.add_argument("--validate", action="store_true", help="check every graph against PyTorch at two shapes")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--name", default=None, help="model name in the manifest (default: the folder name)")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="also quantize the transformer's MatMul weights (CPU; see python -m export quantize)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE:SCALE",
                   help="fuse a Flux LoRA .safetensors (diffusers or kohya key naming) into the weights before "
                   "export, scaled by SCALE (default 1); repeat for several, applied in order")
    p.add_argument("--lora-slots", action=argparse.BooleanOptionalAction, default=None,
                   help="give the transformer graph run-time LoRA inputs: for every Linear layer M, optional "
                   "M.lora_A [in, r] and M.lora_B [r, out] (default rank 0 = no LoRA), y = linear(x) + (x @ A) @ B; "
                   "listed in the manifest as lora_slots (default: on for the tiny presets, off otherwise)")
    return p


def sub_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("tiny", help="build, export and validate the bundled tiny models and their goldens")
    t.add_argument("--models", type=Path, default=Path("models"), help="where the model folders go (default models)")
    t.add_argument("--goldens", type=Path, default=Path("tests/goldens"),
                   help="where the diffusers goldens go (default tests/goldens)")
    t.add_argument("--no-goldens", action="store_true", help="export the models only")
    t.add_argument("--work", type=Path, default=WORK_DIR, help="where the random checkpoints are built")
    t.add_argument("--force", action="store_true", help="replace the existing model folders")
    from .fixtures.presets import PRESETS

    pr = sub.add_parser("preset", help="build a random-weight preset (tiny-schnell, tiny-dev, bench, bench-dev, real-width) "
                        "and export it", description="Builds a diffusers checkpoint with a preset's architecture "
                        "and fixed-seed random weights, then exports it like a real checkpoint. Presets: "
                        + "; ".join(f"{name}: {p.summary()}" for name, p in PRESETS.items()))
    pr.add_argument("preset", metavar="PRESET", help="one of: " + ", ".join(PRESETS))
    pr.add_argument("out_dir", type=Path, help="model folder to create")
    pr.add_argument("--checkpoint-only", action="store_true",
                    help="write the diffusers checkpoint into OUT_DIR instead of exporting ONNX")
    pr.add_argument("--work", type=Path, default=WORK_DIR,
                    help=f"the checkpoint goes to WORK/PRESET and stays there for the next export (default "
                    f"{WORK_DIR}; a bench preset's takes about 1.7 GB)")
    pr.add_argument("--validate", action="store_true",
                    help="check every exported graph against PyTorch at two shapes (batch, size, text length)")
    pr.add_argument("--force", action="store_true", help="replace an existing OUT_DIR")
    pr.add_argument("--lora-slots", action=argparse.BooleanOptionalAction, default=None,
                    help="give the transformer run-time LoRA slot inputs, or not (default: only the tiny presets "
                    "have them)")
    lay = sub.add_parser("layout", help="re-save an exported model in the BFL or optimum-onnx layout, or as a "
                         "faithful copy of an official BFL download")
    lay.add_argument("layout", choices=["bfl", "optimum", "bfl-download"],
                     help="bfl: the official black-forest-labs ONNX folders, fp32, with the base repo's tokenizers; "
                     "optimum: optimum-onnx's diffusers-style folders; bfl-download: the folders as published "
                     "(bf16, fixed text length, backbone.onnx_data, ModelOpt fp8/fp4 with trt-domain ops, "
                     "t5-fp8.opt, no fp32, no tokenizers; docs/downloads.md)")
    lay.add_argument("model_dir", type=Path, help="an fp32 model folder written by python -m export")
    lay.add_argument("out_dir", type=Path, help="the folder to create (must not exist or be empty)")
    lay.add_argument("--kontext", action="store_true",
                     help="bfl-download: the Kontext repo's shape (fp4_svd32 instead of fp4, plus vae_encoder.opt)")
    hc = sub.add_parser("hub-cache", help="put a folder into a Hugging Face hub cache as `hf download` leaves it "
                        "(blobs, snapshot symlinks, refs/main)")
    hc.add_argument("cache", type=Path, help="the hub cache folder (what HF_HUB_CACHE names)")
    hc.add_argument("repo_id", help="the repository id, e.g. black-forest-labs/FLUX.1-schnell")
    hc.add_argument("src", type=Path, nargs="?", help="the folder whose files the snapshot holds")
    hc.add_argument("--tokenizers-from", type=Path, metavar="MODEL",
                    help="instead of SRC: the base repo's tokenizer/ and tokenizer_2/ for this exported model, "
                    "in the hub's form")
    g = sub.add_parser("goldens", help="write diffusers FluxPipeline goldens for a checkpoint")
    g.add_argument("checkpoint", type=Path, help="diffusers-format Flux folder")
    g.add_argument("out_dir", type=Path, help="the goldens folder of this model (e.g. tests/goldens/tiny-flux-dev)")
    g.add_argument("--t5-max-length", type=int, default=None, help="T5 length (default 256 schnell, 512 dev)")
    g.add_argument("--kinds", nargs="+", choices=GOLDEN_KINDS, default=list(GOLDEN_KINDS),
                   help="txt2img into OUT_DIR, img2img and true_cfg into OUT_DIR/img2img, OUT_DIR/true_cfg "
                   "(init images in OUT_DIR/../inputs), lora into OUT_DIR/lora (LoRA files in "
                   "OUT_DIR/../../data/lora); files whose values are unchanged are left alone")
    q = sub.add_parser("quantize", help="copy an exported model with its transformer's MatMul weights quantized "
                       "(int8: quantize_dynamic; int4/int8-nbits: MatMulNBits) and/or its VAE decoder's Convs "
                       "(--vae int8: quantize_static, calibrated on the model's own latents)")
    q.add_argument("model_dir", type=Path, help="a model folder written by python -m export")
    q.add_argument("out_dir", type=Path, help="the quantized model folder to create (may equal MODEL_DIR)")
    q.add_argument("--to", dest="method", choices=("int8", "int4", "int8-nbits"), default=None,
                   help="transformer MatMul weights (at least one of --to / --vae)")
    q.add_argument("--vae", choices=("int8",), default=None,
                   help="VAE decoder Convs: static int8 (U8S8, per-channel weights)")
    q.add_argument("--vae-format", choices=("qoperator", "qdq"), default="qoperator",
                   help="int8 VAE graph form: QLinearConv operators (faster on CPU) or QuantizeLinear/"
                   "DequantizeLinear pairs (for providers that fuse them)")
    q.add_argument("--vae-calibration", choices=("minmax", "percentile", "entropy"), default="percentile",
                   help="activation ranges: percentile (99.999th; +2 dB over minmax on the bench preset), minmax, "
                   "entropy")
    q.add_argument("--vae-calibration-count", type=int, default=8, help="calibration latents (prompts x seeds)")
    q.add_argument("--vae-calibration-size", type=int, default=256, help="image side of the calibration latents")
    q.add_argument("--vae-exclude", nargs="+", default=[], metavar="CONV",
                   help="Conv node names to keep fp32 (first / last: the decoder's input / output Conv)")
    q.add_argument("--block-size", type=int, default=32, help="MatMulNBits block size along K (int4, int8-nbits)")
    q.add_argument("--accuracy-level", type=int, default=4, help="MatMulNBits compute type: 4 = int8, 0/1 = fp32")
    q.add_argument("--force", action="store_true", help="replace an existing OUT_DIR")
    o = sub.add_parser("optimize", help="copy an exported (or quantized) model with its transformer's attention fused "
                       "into com.microsoft MultiHeadAttention, plus ORT's LayerNorm / RMSNorm / Gelu fusions")
    o.add_argument("model_dir", type=Path, help="a model folder written by python -m export (or quantize)")
    o.add_argument("out_dir", type=Path, help="the optimized model folder to create")
    o.add_argument("--fusions", default="attention,layernorm,gelu",
                   help="comma-separated subset of attention, layernorm, gelu (default all three)")
    o.add_argument("--force", action="store_true", help="replace an existing OUT_DIR")
    return p


def run_sub(args) -> None:
    from .fixtures import all_goldens, bundle, layouts, presets
    from .checkpoint import ExportError

    if args.command == "tiny":
        bundle.build_tiny(args.models, None if args.no_goldens else args.goldens, args.work, args.force)
    elif args.command == "preset":
        if args.preset not in presets.PRESETS:
            raise ExportError(f"unknown preset {args.preset!r}; choose one of {', '.join(presets.PRESETS)}")
        if args.checkpoint_only:
            bundle.report_checkpoint(presets.build_checkpoint(args.preset, args.out_dir))
        else:
            bundle.build_preset_model(args.preset, args.out_dir, args.work, args.force, args.validate,
                                      lora_slots=args.lora_slots)
    elif args.command == "layout":
        if args.out_dir.exists() and any(args.out_dir.iterdir()):
            raise ExportError(f"output folder {args.out_dir} exists and is not empty; choose a new folder")
        if not (args.model_dir / "manifest.json").is_file():
            raise ExportError(f"{args.model_dir} has no manifest.json; pass a model folder written by python -m export")
        if args.layout == "bfl-download":
            from .fixtures import bfl_download

            written = bfl_download.write(args.model_dir, args.out_dir, kontext=args.kontext)
        else:
            written = layouts.resave(args.model_dir, args.out_dir, args.layout)
        for path in written:
            print(f"wrote {path}")
    elif args.command == "hub-cache":
        hub_cache(args)
    elif args.command == "goldens":
        from .checkpoint import load

        variant = load(args.checkpoint, ["vae_decoder"]).variant
        t5_len = args.t5_max_length or {"schnell": 256, "dev": 512}[variant]
        all_goldens.write_all(args.checkpoint, args.out_dir, variant, t5_len, kinds=args.kinds)
    elif args.command == "optimize":
        from .optimize import optimize_model

        optimize_model(args.model_dir, args.out_dir, tuple(f.strip() for f in args.fusions.split(",") if f.strip()),
                       force=args.force)
    elif args.command == "quantize":
        from .quantize import quantize_model

        quantize_model(args.model_dir, args.out_dir, args.method, force=args.force, block_size=args.block_size,
                       accuracy_level=args.accuracy_level, vae=args.vae, vae_format=args.vae_format,
                       calibration=args.vae_calibration, calibration_count=args.vae_calibration_count,
                       calibration_size=args.vae_calibration_size, vae_exclude=tuple(args.vae_exclude))


def hub_cache(args) -> None:
    import tempfile

    from .checkpoint import ExportError
    from .fixtures import bfl_download

    if (args.src is None) == (args.tokenizers_from is None):
        raise ExportError("hub-cache takes SRC or --tokenizers-from MODEL (one of them)")
    if args.src is not None:
        if not args.src.is_dir():
            raise ExportError(f"{args.src} is not a folder")
        snap = bfl_download.write_hub_cache(args.cache, args.repo_id, args.src)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            bfl_download.write_hub_tokenizers(args.tokenizers_from, Path(tmp))
            snap = bfl_download.write_hub_cache(args.cache, args.repo_id, Path(tmp))
    print(f"wrote {snap}")


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["convert"]:  # bf16 BFL download -> fp32/fp16/int8/int4; needs only onnx and numpy
            from .convert import main as convert_main

            return convert_main(argv[1:], prog="python -m export convert")
        return _main(argv)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] in STACK:
            print(missing_stack_message(e.name), file=sys.stderr)
            return 2
        raise


def _main(argv: list[str]) -> int:
    from .checkpoint import ExportError
    from .console import quiet_libraries

    try:
        if argv and argv[0] in SUBCOMMANDS:
            args = sub_parser().parse_args(argv)
            quiet_libraries()
            run_sub(args)
            return 0
        from .lora import parse_spec
        from .run import export_model

        a = export_parser().parse_args(argv)
        quiet_libraries()
        export_model(a.checkpoint, a.out_dir, precision=a.precision, opset=a.opset, components=a.components,
                     validate=a.validate, force=a.force, name=a.name, loras=[parse_spec(x) for x in a.lora],
                     lora_slots=a.lora_slots)
        if a.quantize:
            from .quantize import quantize_model

            quantize_model(a.out_dir, a.out_dir, a.quantize)
        return 0
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
