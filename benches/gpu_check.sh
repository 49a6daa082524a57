#!/usr/bin/env bash
# The CUDA check and benchmark of fluxrt on one NVIDIA GPU, as one script (benches/NOTES.md, "GPU").
#
#   ORT_DYLIB_PATH=/path/to/onnxruntime-gpu/capi/libonnxruntime.so.1.31.1 \
#   FLUXRT=target/release/fluxrt OUT_DIR=build/gpu bash benches/gpu_check.sh
#
# Needs: a fluxrt built with `--features cuda`, onnxruntime-gpu 1.31's libraries (CUDA 13 + cuDNN 9 on
# LD_LIBRARY_PATH), python3 with torch (CUDA) and diffusers for the PyTorch side. It
#  1. tiny: checks that the CUDA provider runs every graph of the bundled tiny model and that its images agree with
#     the CPU's: plain runs, the device-resident loop, the host loop (--device-loop off), CUDA graphs;
#  2. compare: exports the bench preset (skipped when build/models/bench exists) and runs benches/compare.py
#     --device cuda: diffusers fp32 and bf16 on the GPU against fluxrt's CUDA provider, 4 steps;
#  3. variants: times the bench model with the device loop off and with CUDA graphs;
#  4. fused: fuses the bench transformer's attention (python -m export optimize) and times it in fp32;
#  5. fp16: exports the bench checkpoint in fp16, fuses it, and compares fluxrt fp16 with diffusers bf16.
# STAGES picks some of them (default: "tiny compare variants fused fp16"); SIZES (default 512x512,1024x1024).
# Every result lands in OUT_DIR (log, *.json, RESULTS-gpu*.md, images); nothing is asserted on timings.
set -uo pipefail
cd "$(dirname "$0")/.."
F=${FLUXRT:-target/release/fluxrt}
O=${OUT_DIR:-build/gpu}
SIZES=${SIZES:-512x512,1024x1024}
STAGES=" ${STAGES:-tiny compare variants fused fp16} "
big=${SIZES##*,}
mkdir -p "$O"
T0=$(date +%s)
fail=0
stage() { echo "=== [$(($(date +%s) - T0)) s] $*"; }
want() { [[ "$STAGES" == *" $1 "* ]]; }
check() { "$@" || { echo "FAILED ($?): $*"; fail=1; }; }
bench() { # bench NAME MODEL ARGS...: fluxrt bench on CUDA, its JSON in OUT_DIR/NAME.json
    local name=$1 model=$2
    shift 2
    check "$F" bench --model "$model" --provider cuda --steps 4 --runs 3 --warmup 1 --quiet --json "$O/$name.json" "$@"
}
static() { echo --cuda-graph --trt-sizes "${big%%x*}" --trt-batch 1; } # CUDA graphs at the largest size

stage "GPU and libraries"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
lib=${ORT_DYLIB_PATH:?set ORT_DYLIB_PATH to the libonnxruntime.so of onnxruntime-gpu}
ldd "$(dirname "$lib")/libonnxruntime_providers_cuda.so" | grep "not found" && fail=1

if [ ! -f build/models/bench/manifest.json ]; then
    stage "exporting the bench preset in the background"
    (python3 -m export preset bench build/models/bench > "$O/export.log" 2>&1; echo "export exit $?" >> "$O/export.log") &
    export_pid=$!
fi

if want tiny; then
    stage "tiny model: CPU vs CUDA images (512x512, 4 steps, seed 1)"
    gen() { # gen NAME ARGS...: one image and its JSON report
        local name=$1
        shift
        check "$F" generate --prompt "a photo of a cat" --seed 1 --width 512 --height 512 --json --overwrite \
            -o "$O/tiny-$name.png" "$@" > "$O/tiny-$name.json"
    }
    gen cpu
    gen cuda --provider cuda --no-fallback
    gen cuda-exact --provider cuda --no-fallback --cuda-tf32 false
    gen cuda-hostloop --provider cuda --no-fallback --device-loop off
    gen cuda-graph --provider cuda --no-fallback --cuda-graph --trt-sizes 512 --trt-batch 1
    python3 - "$O" <<'PY'
import json, sys
from pathlib import Path
import numpy as np
from PIL import Image
o = Path(sys.argv[1])
ref = np.asarray(Image.open(o / "tiny-cpu.png").convert("RGB"), dtype=np.float64)
for name in ("cuda", "cuda-exact", "cuda-hostloop", "cuda-graph"):
    p = o / f"tiny-{name}.png"
    if not p.is_file():
        print(f"{name}: no image"); continue
    a = np.asarray(Image.open(p).convert("RGB"), dtype=np.float64)
    mse = ((a - ref) ** 2).mean()
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
    rep = json.loads((o / f"tiny-{name}.json").read_text())
    print(f"{name}: PSNR vs CPU {psnr:.1f} dB, max |diff| {np.abs(a - ref).max():.0f}/255")
    print("   " + json.dumps({k: rep.get(k) for k in ("graph_nodes", "denoise_loop", "device_loop",
                                                     "device_loop_fallback", "warnings", "timings_ms")}))
PY
    stage "tiny model: fluxrt bench, cuda then cpu"
    check "$F" bench --provider cuda,cpu --sizes "$SIZES" --steps 4 --runs 5 --warmup 2 --quiet --json "$O/tiny-bench.json"
fi

if [ -n "${export_pid:-}" ]; then
    stage "waiting for the bench export"
    wait "$export_pid"
    tail -3 "$O/export.log"
fi

if want compare; then
    stage "bench model: diffusers (fp32, bf16) vs fluxrt on CUDA"
    check python3 benches/compare.py --device cuda --engines diffusers,diffusers-bf16,fluxrt --sizes "$SIZES" --steps 4 \
        --runs 3 --warmup 1 --fluxrt "$F" --out "$O/RESULTS-gpu.md" --json "$O/results-gpu.json" --notes /dev/null
fi

if want variants; then
    stage "bench model: the host loop; CUDA graphs"
    bench bench-hostloop build/models/bench --sizes "$big" --device-loop off
    bench bench-cudagraph build/models/bench --sizes "$big" $(static)
fi

if want fused; then
    stage "bench model, attention and norms fused (fp32)"
    [ -f build/models/bench-fused/manifest.json ] ||
        check python3 -m export optimize build/models/bench build/models/bench-fused > "$O/optimize.log" 2>&1
    bench bench-fused build/models/bench-fused --sizes "$SIZES"
fi

if want fp16; then
    stage "bench model in fp16, plain and fused, vs diffusers bf16"
    [ -f build/models/bench-fp16/manifest.json ] ||
        check python3 -m export build/export/bench build/models/bench-fp16 --precision fp16 > "$O/export-fp16.log" 2>&1
    [ -f build/models/bench-fp16-fused/manifest.json ] ||
        check python3 -m export optimize build/models/bench-fp16 build/models/bench-fp16-fused >> "$O/optimize.log" 2>&1
    bench bench-fp16 build/models/bench-fp16 --sizes "$SIZES"
    bench bench-fp16-fused-cudagraph build/models/bench-fp16-fused --sizes "$big" $(static)
    check python3 benches/compare.py --device cuda --engines diffusers-bf16,fluxrt --model build/models/bench-fp16-fused \
        --sizes "$SIZES" --steps 4 --runs 3 --warmup 1 --fluxrt "$F" --out "$O/RESULTS-gpu-fp16.md" \
        --json "$O/results-gpu-fp16.json" --notes /dev/null
fi

stage "done (failures: $fail)"
exit $fail
