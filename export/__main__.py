"""`python -m export`: see --help. Errors a user can fix exit with code 2 and one line naming the problem."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import onnx_export as ox
from .checkpoint import ExportError

SUBCOMMANDS = ("tiny", "preset", "layout", "goldens", "quantize", "optimize")
WORK_DIR = Path("build/export")
GOLDEN_KINDS = ("txt2img", "img2img", "true_cfg", "lora")  # goldens.KINDS


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export",
        description="Export a diffusers-format FLUX.1 checkpoint to ONNX graphs + manifest.json for fluxrt. "
        f"Other commands: {', '.join(SUBCOMMANDS)} (python -m export COMMAND --help).",
    )
    p.add_argument("checkpoint", type=Path, help="diffusers-format Flux folder (e.g. a FLUX.1-schnell download)")
    p.add_argument("out_dir", type=Path, help="model folder to create")
    p.add_argument("--precision", choices=ox.PRECISIONS, default="fp32")
    p.add_argument("--opset", type=int, default=ox.DEFAULT_OPSET)
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
    t.add_argument("--models", type=Path, default=Path("models"))
    t.add_argument("--goldens", type=Path, default=Path("tests/goldens"))
    t.add_argument("--no-goldens", action="store_true")
    t.add_argument("--work", type=Path, default=WORK_DIR, help="where the random checkpoints are built")
    t.add_argument("--force", action="store_true")
    pr = sub.add_parser("preset", help="build a random-weight preset (tiny-schnell, tiny-dev, bench, bench-dev) "
                        "and export it")
    pr.add_argument("preset")
    pr.add_argument("out_dir", type=Path)
    pr.add_argument("--checkpoint-only", action="store_true", help="write the diffusers checkpoint, not ONNX")
    pr.add_argument("--work", type=Path, default=WORK_DIR)
    pr.add_argument("--validate", action="store_true")
    pr.add_argument("--force", action="store_true")
    pr.add_argument("--lora-slots", action=argparse.BooleanOptionalAction, default=None,
                    help="give the transformer run-time LoRA slot inputs, or not (default: only the tiny presets "
                    "have them)")
    lay = sub.add_parser("layout", help="re-save an exported model in the BFL or optimum-onnx layout")
    lay.add_argument("layout", choices=["bfl", "optimum"])
    lay.add_argument("model_dir", type=Path)
    lay.add_argument("out_dir", type=Path)
    g = sub.add_parser("goldens", help="write diffusers FluxPipeline goldens for a checkpoint")
    g.add_argument("checkpoint", type=Path)
    g.add_argument("out_dir", type=Path)
    g.add_argument("--t5-max-length", type=int, default=None)
    g.add_argument("--kinds", nargs="+", choices=GOLDEN_KINDS, default=list(GOLDEN_KINDS),
                   help="txt2img into OUT_DIR, img2img and true_cfg into OUT_DIR/img2img, OUT_DIR/true_cfg "
                   "(init images in OUT_DIR/../inputs), lora into OUT_DIR/lora (LoRA files in "
                   "OUT_DIR/../../data/lora); files whose values are unchanged are left alone")
    q = sub.add_parser("quantize", help="copy an exported model with its transformer's MatMul weights quantized "
                       "(int8: quantize_dynamic; int4/int8-nbits: MatMulNBits) and/or its VAE decoder's Convs "
                       "(--vae int8: quantize_static, calibrated on the model's own latents)")
    q.add_argument("model_dir", type=Path)
    q.add_argument("out_dir", type=Path)
    q.add_argument("--to", dest="method", choices=("int8", "int4", "int8-nbits"), default=None,
                   help="transformer MatMul weights (at least one of --to / --vae)")
    q.add_argument("--vae", choices=("int8",), default=None,
                   help="VAE decoder Convs: static int8 (U8S8, per-channel weights)")
    q.add_argument("--vae-format", choices=("qoperator", "qdq"), default="qoperator")
    q.add_argument("--vae-calibration", choices=("minmax", "percentile", "entropy"), default="percentile",
                   help="activation ranges: percentile (99.999th; +2 dB over minmax on the bench preset), minmax, "
                   "entropy")
    q.add_argument("--vae-calibration-count", type=int, default=8, help="calibration latents (prompts x seeds)")
    q.add_argument("--vae-calibration-size", type=int, default=256, help="image side of the calibration latents")
    q.add_argument("--vae-exclude", nargs="+", default=[], metavar="CONV",
                   help="Conv node names to keep fp32 (first / last: the decoder's input / output Conv)")
    q.add_argument("--block-size", type=int, default=32, help="MatMulNBits block size along K (int4, int8-nbits)")
    q.add_argument("--accuracy-level", type=int, default=4, help="MatMulNBits compute type: 4 = int8, 0/1 = fp32")
    q.add_argument("--force", action="store_true")
    o = sub.add_parser("optimize", help="copy an exported (or quantized) model with its transformer's attention fused "
                       "into com.microsoft MultiHeadAttention, plus ORT's LayerNorm / RMSNorm / Gelu fusions")
    o.add_argument("model_dir", type=Path)
    o.add_argument("out_dir", type=Path)
    o.add_argument("--fusions", default="attention,layernorm,gelu",
                   help="comma-separated subset of attention, layernorm, gelu (default all three)")
    o.add_argument("--force", action="store_true")
    return p


def run_sub(args) -> None:
    from . import bundle, goldens, layouts, presets

    if args.command == "tiny":
        bundle.build_tiny(args.models, None if args.no_goldens else args.goldens, args.work, args.force)
    elif args.command == "preset":
        if args.preset not in presets.PRESETS:
            raise ExportError(f"unknown preset {args.preset!r}; choose one of {', '.join(presets.PRESETS)}")
        if args.checkpoint_only:
            presets.build_checkpoint(args.preset, args.out_dir)
        elif args.lora_slots is not None:
            from .run import export_model

            ck = presets.build_checkpoint(args.preset, args.work / args.preset)
            export_model(ck, args.out_dir, validate=args.validate, force=args.force, lora_slots=args.lora_slots)
        else:
            bundle.build_preset_model(args.preset, args.out_dir, args.work, args.force, args.validate)
    elif args.command == "layout":
        if args.out_dir.exists() and any(args.out_dir.iterdir()):
            raise ExportError(f"output folder {args.out_dir} exists and is not empty; choose a new folder")
        if not (args.model_dir / "manifest.json").is_file():
            raise ExportError(f"{args.model_dir} has no manifest.json; pass a model folder written by python -m export")
        for path in layouts.resave(args.model_dir, args.out_dir, args.layout):
            print(f"wrote {path}")
    elif args.command == "goldens":
        from .checkpoint import load

        variant = load(args.checkpoint, ["vae_decoder"]).variant
        t5_len = args.t5_max_length or {"schnell": 256, "dev": 512}[variant]
        goldens.write_all(args.checkpoint, args.out_dir, variant, t5_len, kinds=args.kinds)
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


def main(argv: list[str]) -> int:
    try:
        if argv and argv[0] in SUBCOMMANDS:
            run_sub(sub_parser().parse_args(argv))
            return 0
        from .run import export_model

        from .lora import parse_spec

        a = export_parser().parse_args(argv)
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
