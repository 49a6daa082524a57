"""Side by side, in one run on one machine: diffusers FluxPipeline (PyTorch, CPU, fp32), the same ONNX graphs driven
from Python onnxruntime, and fluxrt, on the same bench model, prompt, seed, sizes and steps.

    /root/.cache/fluxrt/venv/bin/python benches/compare.py            # 256x256 and 512x512, 4 steps
    python benches/compare.py --sizes 256x256 --runs 2 --engines ort,fluxrt
    # what benches/RESULTS.md holds (about 25 minutes on 2 cores):
    python benches/compare.py --engines diffusers,ort,fluxrt,ort-int8,fluxrt-int8,fluxrt-int4,fluxrt-lowmem \
        --rounds 3 --runs 1 --warmup 1
    python benches/compare.py --render benches/results.json              # re-render after editing NOTES.md
    # on an NVIDIA GPU (fluxrt built --features cuda, onnxruntime-gpu; benches/gpu_check.sh runs it):
    python benches/compare.py --device cuda --engines diffusers,diffusers-bf16,fluxrt --sizes 512x512,1024x1024
    # int8 VAE decoder and fused transformer variants (see benches/NOTES.md):
    python benches/compare.py --engines diffusers,ort,fluxrt,fluxrt-fused,fluxrt-int8,fluxrt-int8vae,\
fluxrt-int8vae-fused --sizes 512x512 --rounds 3 --runs 1 --warmup 1

Prerequisites (see docs/bench.md):
    python -m export preset bench build/models/bench --validate        # checkpoint in build/export/bench
    python -m export quantize build/models/bench build/models/bench-int8 --to int8
    python -m export quantize build/models/bench build/models/bench-int4 --to int4     # for fluxrt-int4
    python -m export quantize build/models/bench build/models/bench-int8-vae8 --to int8 --vae int8   # *-int8vae
    python -m export optimize build/models/bench build/models/bench-fused                # *-fused
    python -m export optimize build/models/bench-int8 build/models/bench-int8-fused
    python -m export optimize build/models/bench-int8-vae8 build/models/bench-int8-vae8-fused
    cargo build --release

Every engine runs in its own subprocess, so its peak RSS (wait4's ru_maxrss) is its own: model, runtime and
interpreter included. Each engine loads once, then runs `warmup` untimed and `runs` timed generations per size;
end-to-end = text encoding + denoising + VAE decode + conversion + PNG encoding (in memory), model loading
excluded (reported apart). Images are compared by PSNR against fluxrt fp32 (8-bit RGB).
Writes benches/RESULTS.md (and --json) with the machine description and the ratios against the issue's targets.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENGINES = ("diffusers", "ort", "fluxrt", "ort-int8", "fluxrt-int8", "fluxrt-int4", "fluxrt-lowmem", "fluxrt-fused",
           "fluxrt-int8-fused", "fluxrt-int8vae", "fluxrt-int8vae-fused", "ort-int8vae-fused", "diffusers-bf16")
DEFAULT_ENGINES = ENGINES[:5]
# Which model folder (compare.py option) each engine variant runs: the part of the engine name after "fluxrt-"/"ort-".
VARIANT_MODEL = {"": "model", "lowmem": "model", "bf16": "model", "int8": "int8", "int4": "int4", "fused": "fused",
                 "int8-fused": "int8_fused", "int8vae": "int8vae", "int8vae-fused": "int8vae_fused"}
# Extra `fluxrt bench` options per engine.
ENGINE_ARGS = {"fluxrt-lowmem": ["--low-memory"]}


# ---------------------------------------------------------------------------------------------------- helpers

def stat(values: list[float]) -> dict:
    if not values:
        return {"min": 0.0, "median": 0.0, "max": 0.0, "n": 0}
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def parse_sizes(s: str) -> list[tuple[int, int]]:
    out = []
    for part in s.split(","):
        w, _, h = part.strip().lower().partition("x")
        out.append((int(w), int(h or w)))
    return out


def peak_rss_self() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def png_bytes(rgb) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------- workers

def worker_diffusers(cfg: dict) -> dict:
    """diffusers FluxPipeline, PyTorch eager (fp32, or bf16 for diffusers-bf16) on the CPU or CUDA; per-stage times
    by wrapping each module's forward (synchronizing CUDA, so that a stage's time is its own)."""
    import numpy as np
    import torch

    torch.set_num_threads(cfg["threads"])
    cuda = cfg["device"] == "cuda"
    if cuda:  # as fluxrt's CUDA provider does by default (--cuda-tf32)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    dtype = torch.bfloat16 if cfg["engine"].endswith("-bf16") else torch.float32
    t0 = time.perf_counter()
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(cfg["checkpoint"], torch_dtype=dtype, local_files_only=True).to(cfg["device"])
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t0
    times: dict[str, list[float]] = {}
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def timed(name, fn):
        def wrapper(*a, **k):
            sync()
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                sync()
                times.setdefault(name, []).append(time.perf_counter() - t)
        return wrapper

    pipe.text_encoder.forward = timed("clip", pipe.text_encoder.forward)
    pipe.text_encoder_2.forward = timed("t5", pipe.text_encoder_2.forward)
    pipe.transformer.forward = timed("step", pipe.transformer.forward)
    pipe.vae.decode = timed("vae_decode", pipe.vae.decode)

    results = []
    for (w, h) in cfg["sizes"]:
        runs = []
        for i in range(cfg["warmup"] + cfg["runs"]):
            times.clear()
            gen = torch.Generator("cpu").manual_seed(cfg["seed"])
            t = time.perf_counter()
            with torch.inference_mode():
                img = pipe(cfg["prompt"], height=h, width=w, num_inference_steps=cfg["steps"], guidance_scale=0.0,
                           max_sequence_length=cfg["t5_max_length"], generator=gen, output_type="np").images[0]
            rgb = (img.astype(np.float32) * 255).round().astype(np.uint8)
            tp = time.perf_counter()
            png = png_bytes(rgb)
            end = time.perf_counter()
            if i < cfg["warmup"]:
                continue
            runs.append({"end_to_end": end - t, "png_encode": end - tp, "clip": sum(times.get("clip", [])),
                         "t5": sum(times.get("t5", [])), "steps": times.get("step", []),
                         "vae_decode": sum(times.get("vae_decode", []))})
        Path(cfg["image_dir"], f"{cfg['engine']}-{w}x{h}.png").write_bytes(png)
        results.append({"width": w, "height": h, "runs": runs})
    return {"load_s": load_s, "sizes": results, "versions": {"torch": torch.__version__,
                                                              "diffusers": __import__("diffusers").__version__},
            "gpu_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None}


def worker_ort(cfg: dict) -> dict:
    """The exported ONNX graphs driven from Python onnxruntime: the same loop as fluxrt (and diffusers)."""
    import numpy as np
    import onnxruntime as ort

    sys.path.insert(0, str(REPO))
    from export import ort_flow as flow

    model = Path(cfg["model"])
    t0 = time.perf_counter()
    m = json.loads((model / "manifest.json").read_text())
    so = ort.SessionOptions()
    so.intra_op_num_threads = cfg["threads"]
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_mem_pattern = False  # fluxrt's default (the same session options on both sides)
    sess = {g: ort.InferenceSession(str(model / m["graphs"][g]["file"]), so, providers=["CPUExecutionProvider"])
            for g in ("clip", "t5", "transformer", "vae_decoder")}
    toks = flow.tokenizers(model, m)
    load_s = time.perf_counter() - t0
    np_types = {"tensor(int32)": np.int32, "tensor(int64)": np.int64, "tensor(float)": np.float32}
    in_ort = [0.0]

    def run(g, feeds):
        t = time.perf_counter()
        out = sess[g].run(None, feeds)
        in_ort[0] += time.perf_counter() - t
        return out

    def ids(g, ids_list):
        i = sess[g].get_inputs()[0]
        return {i.name: np.asarray([ids_list], dtype=np_types[i.type])}

    vae = m["vae"]
    sched = m["scheduler"]
    results = []
    for (w, h) in cfg["sizes"]:
        noise = np.load(Path(cfg["noise_dir"]) / f"noise-{w}x{h}.npy")
        runs = []
        for i in range(cfg["warmup"] + cfg["runs"]):
            in_ort[0] = 0.0
            t = time.perf_counter()
            clip_ids = toks["clip"].encode(cfg["prompt"]).ids
            t5_ids = toks["t5"].encode(cfg["prompt"]).ids
            t_tok = time.perf_counter()
            pooled = run("clip", ids("clip", clip_ids))[1]
            t_clip = time.perf_counter()
            txt = run("t5", ids("t5", t5_ids))[0]
            t_t5 = time.perf_counter()
            b, c, lh, lw = noise.shape
            x = flow.pack(noise)
            img_ids = flow.img_ids(lh, lw)
            txt_ids = np.zeros((txt.shape[1], 3), np.float32)
            n = cfg["steps"]
            sigmas = flow.sigmas(sched, n, x.shape[1])
            steps = []
            for j in range(n):
                ts = time.perf_counter()
                feeds = {"hidden_states": x, "encoder_hidden_states": txt, "pooled_projections": pooled,
                         "timestep": np.full((b,), sigmas[j], np.float32), "img_ids": img_ids, "txt_ids": txt_ids}
                v = run("transformer", feeds)[0]
                x = x + (sigmas[j + 1] - sigmas[j]) * v
                steps.append(time.perf_counter() - ts)
            tv = time.perf_counter()
            z = flow.vae_input(flow.unpack(x, c, lh, lw), vae)
            image = run("vae_decoder", {"latent": z})[0]
            t_vae = time.perf_counter()
            rgb = (np.clip(image[0] / 2 + 0.5, 0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8)
            tp = time.perf_counter()
            png = png_bytes(rgb)
            end = time.perf_counter()
            if i < cfg["warmup"]:
                continue
            runs.append({"end_to_end": end - t, "tokenize": t_tok - t, "clip": t_clip - t_tok, "t5": t_t5 - t_clip,
                         "steps": steps, "vae_decode": t_vae - tv, "to_rgb": tp - t_vae, "png_encode": end - tp,
                         "in_ort": in_ort[0]})
        Path(cfg["image_dir"], f"{cfg['engine']}-{w}x{h}.png").write_bytes(png)
        results.append({"width": w, "height": h, "runs": runs, "clip_ids": clip_ids[:20], "t5_ids": t5_ids[:20]})
    return {"load_s": load_s, "sizes": results, "versions": {"onnxruntime": ort.__version__}}


def run_fluxrt(cfg: dict, tmp: Path) -> tuple[dict, int]:
    """`fluxrt bench --json`; returns the converted result and the process's peak RSS."""
    sizes = ",".join(f"{w}x{h}" for w, h in cfg["sizes"])
    imgs = tmp / f"{cfg['engine']}-images"
    r, rss = fluxrt_bench(cfg, tmp / f"{cfg['engine']}.json", "--sizes", sizes, "--steps", str(cfg["steps"]),
                          "--warmup", str(cfg["warmup"]), "--runs", str(cfg["runs"]), "--seed", str(cfg["seed"]),
                          "--prompt", cfg["prompt"], "--save-images", str(imgs))
    res = r["results"][0]
    sizes_out = []
    for z in res["sizes"]:
        runs = [{"end_to_end": x["end_to_end"] / 1e3, "tokenize": x["tokenize"] / 1e3, "clip": x["clip"] / 1e3,
                 "t5": x["t5"] / 1e3, "steps": [s / 1e3 for s in x["denoise_steps"]],
                 "vae_decode": x["vae_decode"] / 1e3, "to_rgb": x["to_rgb"] / 1e3, "png_encode": x["png_encode"] / 1e3,
                 "in_ort": x["in_ort"] / 1e3} for x in z["runs"]]
        w, h = z["width"], z["height"]
        (Path(cfg["image_dir"]) / f"{cfg['engine']}-{w}x{h}.png").write_bytes((imgs / f"{cfg['device']}-{w}x{h}-0.png").read_bytes())
        sizes_out.append({"width": w, "height": h, "runs": runs})
    out = {"load_s": res["session_creation_ms"] / 1e3, "sizes": sizes_out, "optimized_cache": res["optimized_cache"],
           "versions": {"onnxruntime": r["onnxruntime"]["version"], "fluxrt": r["fluxrt_version"]},
           "fluxrt_peak_rss_bytes": res["peak_rss_bytes"]}
    return out, rss


def engine_model(a, engine: str) -> str:
    """The model folder an engine runs (VARIANT_MODEL: by the part of its name after the first '-')."""
    return getattr(a, VARIANT_MODEL[engine.partition("-")[2]])


def fluxrt_bench(cfg: dict, report: Path, *args: str) -> tuple[dict, int]:
    """`fluxrt bench` with the engine's model, threads, provider and extra options plus `args`; returns its JSON
    report and the process's peak RSS."""
    cmd = [cfg["fluxrt"], "bench", "--model", cfg["model"], "--threads", str(cfg["threads"]), "--json", str(report),
           "--quiet", "--provider", cfg["device"], *args, *cfg["fluxrt_args"], *ENGINE_ARGS.get(cfg["engine"], [])]
    rc, rss, log = spawn(cmd)
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{log}")
    return json.loads(report.read_text()), rss


def prime_fluxrt_cache(cfg: dict, tmp: Path) -> dict:
    """One small `fluxrt bench` run so that the timed rounds start with a warm optimized-graph cache, as every start
    but the first after a model changes does (the first one optimizes and writes the graphs: slower, and more memory).
    Returns that cold start's load time, cache states and peak RSS."""
    print(f"[compare] {cfg['engine']}: priming the optimized-graph cache", file=sys.stderr, flush=True)
    r, rss = fluxrt_bench(cfg, tmp / f"{cfg['engine']}.prime.json", "--sizes", "64x64", "--steps", "1", "--warmup",
                          "0", "--runs", "1")
    res = r["results"][0]
    return {"load_s": res["session_creation_ms"] / 1e3, "optimized_cache": res["optimized_cache"],
            "peak_rss_bytes": rss}


def spawn(cmd: list[str]) -> tuple[int, int, str]:
    """Runs cmd; returns (exit code, peak RSS in bytes of that process, its stderr+stdout)."""
    with tempfile.TemporaryFile() as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        return p.returncode, ru.ru_maxrss * 1024, log.read().decode(errors="replace")


# ---------------------------------------------------------------------------------------------------- parent

def machine() -> dict:
    info = {}
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            k, _, v = line.partition(":")
            info[k.strip()] = v.strip()
    except OSError:
        pass
    mem = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) * 1024
    flags = info.get("Flags", "").split()
    gpu = None
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"gpu": gpu, "cpu": info.get("Model name", platform.processor()), "cpus": info.get("CPU(s)"),
            "threads_per_core": info.get("Thread(s) per core"), "cores_per_socket": info.get("Core(s) per socket"),
            "l3": info.get("L3 cache"), "memory_gib": round(mem / 2**30, 1),
            "isa": " ".join(f for f in flags if f.startswith(("avx512f", "avx512_vnni", "avx512_bf16", "amx", "avx2")))
            or "n/a", "kernel": platform.release(), "python": platform.python_version()}


def summarize(res: dict) -> dict:
    out = {}
    for z in res["sizes"]:
        runs = z["runs"]
        key = f"{z['width']}x{z['height']}"
        n_steps = len(runs[0]["steps"])
        out[key] = {
            "end_to_end": stat([r["end_to_end"] for r in runs]),
            "clip": stat([r["clip"] for r in runs]),
            "t5": stat([r["t5"] for r in runs]),
            "step": stat([s for r in runs for s in r["steps"]]),
            "denoise": stat([sum(r["steps"]) for r in runs]),
            "vae_decode": stat([r["vae_decode"] for r in runs]),
            "png_encode": stat([r["png_encode"] for r in runs]),
            "in_ort": stat([r["in_ort"] for r in runs]) if "in_ort" in runs[0] else None,
            "steps": n_steps,
        }
    return out


def psnr(a_path: Path, b_path: Path) -> float | None:
    import numpy as np
    from PIL import Image

    if not (a_path.is_file() and b_path.is_file()):
        return None
    a = np.asarray(Image.open(a_path).convert("RGB"), dtype=np.float64)
    b = np.asarray(Image.open(b_path).convert("RGB"), dtype=np.float64)
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="build/models/bench")
    ap.add_argument("--checkpoint", default="build/export/bench")
    ap.add_argument("--int8", default="build/models/bench-int8", help="quantized model folder for *-int8 engines")
    ap.add_argument("--int4", default="build/models/bench-int4", help="quantized model folder for *-int4 engines")
    ap.add_argument("--fused", default="build/models/bench-fused", help="model folder for *-fused engines "
                    "(python -m export optimize)")
    ap.add_argument("--int8-fused", default="build/models/bench-int8-fused", help="for *-int8-fused engines")
    ap.add_argument("--int8vae", default="build/models/bench-int8-vae8",
                    help="int8 transformer + int8 VAE decoder (quantize --to int8 --vae int8) for *-int8vae engines")
    ap.add_argument("--int8vae-fused", default="build/models/bench-int8-vae8-fused",
                    help="the --int8vae folder optimized, for *-int8vae-fused engines")
    ap.add_argument("--fluxrt", default="target/release/fluxrt")
    ap.add_argument("--sizes", default="256x256,512x512")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompt", default="a photo of a cat")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per size, per round")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat every engine this many times, rotating their order, so that load from other "
                         "processes on a shared machine hits every engine alike; runs are pooled")
    ap.add_argument("--threads", type=int, default=None, help="default: physical cores")
    ap.add_argument("--engines", default=",".join(DEFAULT_ENGINES), help=f"any of {','.join(ENGINES)}")
    ap.add_argument("--fluxrt-args", default="", help="extra `fluxrt bench` options, e.g. '--no-io-binding'")
    ap.add_argument("--out", default="benches/RESULTS.md")
    ap.add_argument("--json", default="benches/results.json")
    ap.add_argument("--notes", default="benches/NOTES.md", help="appended to RESULTS.md when it exists")
    ap.add_argument("--render", metavar="RESULTS_JSON",
                    help="only rewrite --out from an earlier run's JSON (e.g. after editing --notes)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cuda: diffusers on the GPU and fluxrt with --provider cuda (needs onnxruntime-gpu; the "
                    "Python onnxruntime engines run on the CPU only)")
    a = ap.parse_args(argv)

    if a.worker:
        cfg = json.loads(a.config)
        res = {"diffusers": worker_diffusers, "ort": worker_ort}[a.worker](cfg)
        res["worker_peak_rss_bytes"] = peak_rss_self()
        Path(cfg["result"]).write_text(json.dumps(res))
        return 0

    os.chdir(REPO)
    if a.render:
        out = json.loads(Path(a.render).read_text())
        engines = list(out["summary"])
        sizes = [tuple(map(int, k.split("x"))) for k in out["summary"][engines[0]]]
        Path(a.out).write_text(render(out, engines, sizes, Path(a.notes)))
        print(f"[compare] wrote {a.out}", file=sys.stderr)
        return 0
    engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    bad = [e for e in engines if e not in ENGINES]
    if bad:
        ap.error(f"unknown engine(s) {bad}; choose from {ENGINES}")
    if a.device == "cuda" and any(e.startswith("ort") for e in engines):
        ap.error("the ort engines run on the CPU only; leave them out with --device cuda")
    sizes = parse_sizes(a.sizes)
    threads = a.threads
    if threads is None:
        m = machine()
        threads = int(m["cpus"] or os.cpu_count() or 1) // max(1, int(m["threads_per_core"] or 1))
    manifest = json.loads((Path(a.model) / "manifest.json").read_text())
    base = {"sizes": sizes, "steps": a.steps, "seed": a.seed, "prompt": a.prompt, "warmup": a.warmup,
            "runs": a.runs, "threads": threads, "t5_max_length": manifest["defaults"]["t5_max_length"],
            "fluxrt": str(Path(a.fluxrt).resolve()), "fluxrt_args": a.fluxrt_args.split(), "device": a.device}
    tmp = Path(tempfile.mkdtemp(prefix="fluxrt-compare-"))
    image_dir = tmp / "images"
    image_dir.mkdir()
    noise_dir = tmp / "noise"
    noise_dir.mkdir()
    # The initial noise of the ORT loop: torch.randn with a CPU generator, as diffusers and fluxrt draw it.
    import torch

    for (w, h) in sizes:
        g = torch.Generator("cpu").manual_seed(a.seed)
        n = torch.randn((1, 16, 2 * (h // 16), 2 * (w // 16)), generator=g, dtype=torch.float32).numpy()
        import numpy as np

        np.save(noise_dir / f"noise-{w}x{h}.npy", n)

    cold = {e: prime_fluxrt_cache(dict(base, engine=e, model=engine_model(a, e)), tmp)
            for e in engines if e.startswith("fluxrt")}
    results, rss = {}, {}
    for rnd in range(a.rounds):
        k = rnd % len(engines)
        order = engines[k:] + engines[:k] if rnd % 2 == 0 else list(reversed(engines[k:] + engines[:k]))
        for e in order:
            cfg = dict(base, engine=e, image_dir=str(image_dir), noise_dir=str(noise_dir),
                       model=engine_model(a, e),
                       checkpoint=a.checkpoint, result=str(tmp / f"{e}.result.json"))
            load = os.getloadavg()[0]
            print(f"[compare] round {rnd + 1}/{a.rounds} {e}: starting (load average {load:.2f})", file=sys.stderr,
                  flush=True)
            t = time.time()
            if e.startswith("fluxrt"):
                res, peak = run_fluxrt(cfg, tmp)
            else:
                worker = e.split("-")[0]
                rc, peak, log = spawn([sys.executable, __file__, "--worker", worker, "--config", json.dumps(cfg)])
                if rc != 0:
                    print(log, file=sys.stderr)
                    raise SystemExit(f"[compare] {e} failed (exit {rc})")
                res = json.loads(Path(cfg["result"]).read_text())
            res["load_average_at_start"] = [load]
            res["load_s"] = [res["load_s"]]
            if e in results:  # pool the runs of every round
                prev = results[e]
                for zp, zn in zip(prev["sizes"], res["sizes"]):
                    zp["runs"] += zn["runs"]
                prev["load_average_at_start"] += res["load_average_at_start"]
                prev["load_s"] += res["load_s"]
            else:
                results[e] = res
            rss[e] = max(rss.get(e, 0), peak)
            print(f"[compare] {e}: done in {time.time() - t:.0f}s, peak RSS {peak / 2**20:.0f} MiB", file=sys.stderr,
                  flush=True)

    summary = {e: summarize(results[e]) for e in engines}
    psnrs = {}
    for (w, h) in sizes:
        key = f"{w}x{h}"
        ref = image_dir / f"fluxrt-{w}x{h}.png"
        psnrs[key] = {e: psnr(ref, image_dir / f"{e}-{w}x{h}.png") for e in engines if e != "fluxrt"}
    versions = {}
    for e in engines:
        versions.update(results[e].get("versions", {}))
    out = {"machine": machine(), "versions": versions, "settings": {k: v for k, v in base.items() if k != "fluxrt"},
           "model": a.model, "int8_model": a.int8, "int4_model": a.int4,
           "variant_models": {e: engine_model(a, e) for e in engines if "-" in e},
           "summary": summary, "peak_rss_bytes": rss, "fluxrt_first_start": cold, "psnr_vs_fluxrt": psnrs,
           "load_s": {e: statistics.median(results[e]["load_s"]) for e in engines}, "raw": results,
           "rounds": a.rounds,
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1, default=str) + "\n")
    text = render(out, engines, sizes, Path(a.notes))
    Path(a.out).write_text(text)
    print(text)
    print(f"[compare] wrote {a.out}" + (f" and {a.json}" if a.json else ""), file=sys.stderr)
    return 0


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def render(out: dict, engines: list[str], sizes, notes: Path) -> str:
    m, s, v = out["machine"], out["settings"], out["versions"]
    device = s.get("device", "cpu")
    L = [f"# fluxrt vs Python onnxruntime vs diffusers (PyTorch), {device.upper()}", "",
         f"Written by `benches/compare.py` on {out['date']}. One run, one machine, every engine in its own process.", "",
         "## Machine", "",
         f"- CPU: {m['cpu']}; {m['cpus']} logical CPUs, {m['cores_per_socket']} cores per socket, "
         f"{m['threads_per_core']} thread(s) per core; L3 {m['l3']}; {m['memory_gib']} GiB RAM",
         *([f"- GPU: {m['gpu']}"] if m.get("gpu") and device == "cuda" else []),
         f"- ISA: {m['isa']}", f"- Linux {m['kernel']}, Python {m['python']}",
         "- Versions: " + ", ".join(f"{k} {val}" for k, val in sorted(v.items())), "",
         "## Settings", "",
         f"- Model `{out['model']}` (bench preset: ~160M-param transformer, real text dims 4096/768, real-size VAE); "
         f"int8: `{out['int8_model']}` (transformer MatMuls quantize_dynamic int8, per channel)"
         + "".join(f"; {e}: `{mdl}`" for e, mdl in out.get("variant_models", {}).items()
                   if e.partition("-")[2] not in ("", "lowmem", "int8", "int4")),
         "- Variants: *-int8vae = int8 transformer + VAE decoder Convs static int8 (QLinearConv, calibrated); "
         "*-fused = transformer attention fused into MultiHeadAttention + LayerNorm/Gelu fusions (python -m export "
         "optimize)",
         f"- Prompt {s['prompt']!r}, seed {s['seed']}, {s['steps']} steps, T5 length {s['t5_max_length']}, "
         f"{s['threads']} threads per engine; {out['rounds']} round(s), engine order rotated each round; per round "
         f"and size {s['warmup']} warmup + {s['runs']} timed run(s); runs pooled over rounds",
         "- End-to-end: prompt to PNG bytes (text encoders, denoising, VAE, RGB, PNG), model loading excluded; "
         "'without PNG' subtracts the median PNG encoding (diffusers: PIL's zlib level 6, fluxrt: fdeflate).",
         "- Peak RSS: the engine's whole process (wait4 ru_maxrss), for all sizes it ran; the largest over rounds. "
         "Load time: median over rounds. fluxrt's optimized-graph cache is primed first (one 64x64 run per engine; "
         "a cold cache optimizes and writes the graphs, which takes longer and more memory): " + ("; ".join(
             f"{e} {c['load_s']:.1f} s, {c['peak_rss_bytes'] / 2**20:.0f} MiB, cache "
             + ("cold" if "cold" in c["optimized_cache"].values() else "already warm")
             for e, c in out.get("fluxrt_first_start", {}).items()) or "n/a"),
         "- Load average at each engine's start: " + "; ".join(
             f"{e} " + "/".join(f"{x:.1f}" for x in out["raw"][e]["load_average_at_start"]) for e in engines), ""]
    for (w, h) in sizes:
        key = f"{w}x{h}"
        L += [f"## {key}, {s['steps']} steps", "",
              "| engine | end-to-end median (min-max) s | without PNG s | per step s | VAE s | T5 s | CLIP s | "
              "outside ORT | peak RSS MiB | load s | PSNR vs fluxrt dB |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
        for e in engines:
            z = out["summary"][e][key]
            e2e = z["end_to_end"]
            outside = "n/a"
            if z["in_ort"]:
                outside = f"{(1 - z['in_ort']['median'] / e2e['median']) * 100:.2f}%"
            p = out["psnr_vs_fluxrt"][key].get(e)
            L.append(f"| {e} | {e2e['median']:.2f} ({e2e['min']:.2f}-{e2e['max']:.2f}) | "
                     f"{e2e['median'] - z['png_encode']['median']:.3f} | {z['step']['median']:.3f} | "
                     f"{z['vae_decode']['median']:.2f} | {z['t5']['median']:.3f} | {z['clip']['median']:.3f} | "
                     f"{outside} | {out['peak_rss_bytes'][e] / 2**20:.0f} | {out['load_s'][e]:.1f} | "
                     f"{'-' if e == 'fluxrt' else ('n/a' if p is None else f'{p:.1f}')} |")
        L.append("")
        med = {e: out["summary"][e][key]["end_to_end"]["median"] for e in engines}
        L.append("Ratios (end-to-end medians):")
        L.append("")
        if "fluxrt" in med and "ort" in med:
            L.append(f"- fluxrt / Python onnxruntime time: {ratio(med['fluxrt'], med['ort'])} (target <= 1.02x)")
        if "fluxrt" in med and "diffusers" in med:
            L.append(f"- diffusers / fluxrt time (fluxrt speedup): {ratio(med['diffusers'], med['fluxrt'])}"
                     f" (target >= 1.3x at 512x512)")
        for v in (e for e in engines if e.startswith("diffusers-") and "fluxrt" in med):
            L.append(f"- {v} / fluxrt time: {ratio(med[v], med['fluxrt'])}")
        for v in (e for e in engines if out["raw"][e].get("gpu_peak_bytes")):
            L.append(f"- {v} peak GPU memory allocated by PyTorch: {out['raw'][v]['gpu_peak_bytes'] / 2**20:.0f} MiB")
        if "fluxrt-int8" in med and "diffusers" in med:
            L.append(f"- diffusers / fluxrt-int8 time: {ratio(med['diffusers'], med['fluxrt-int8'])}"
                     f" (target >= 2.5x at 512x512, PSNR >= 30 dB vs fp32: "
                     f"{out['psnr_vs_fluxrt'][key].get('fluxrt-int8') or 0:.1f} dB)")
        for q in ("int8", "int4"):
            if f"fluxrt-{q}" in med and "fluxrt" in med:
                p = out["psnr_vs_fluxrt"][key].get(f"fluxrt-{q}")
                L.append(f"- fluxrt fp32 / fluxrt {q} time: {ratio(med['fluxrt'], med[f'fluxrt-{q}'])}"
                         f" (PSNR {p or 0:.1f} dB against fp32)")
        if "fluxrt" in out["peak_rss_bytes"] and "diffusers" in out["peak_rss_bytes"]:
            L.append(f"- fluxrt / diffusers peak RSS: "
                     f"{ratio(out['peak_rss_bytes']['fluxrt'], out['peak_rss_bytes']['diffusers'])} (target <= 0.7x)")
            for v in ("fluxrt-lowmem", "fluxrt-int8"):
                if v in out["peak_rss_bytes"]:
                    L.append(f"- {v} / diffusers peak RSS: "
                             f"{ratio(out['peak_rss_bytes'][v], out['peak_rss_bytes']['diffusers'])}")
        if "fluxrt-lowmem" in med and "fluxrt" in med:
            L.append(f"- fluxrt-lowmem / fluxrt time: {ratio(med['fluxrt-lowmem'], med['fluxrt'])}")
        for v in ("fluxrt-fused", "fluxrt-int8-fused", "fluxrt-int8vae", "fluxrt-int8vae-fused", "ort-int8vae-fused"):
            if v in med and "diffusers" in med:
                p = out["psnr_vs_fluxrt"][key].get(v)
                rss_r = ratio(out["peak_rss_bytes"].get(v), out["peak_rss_bytes"].get("diffusers"))
                L.append(f"- diffusers / {v} time: {ratio(med['diffusers'], med[v])} (PSNR {p or 0:.1f} dB against "
                         f"fluxrt fp32; peak RSS {rss_r} of diffusers')")
        L.append("")
    if notes.is_file():
        L += [notes.read_text().rstrip(), ""]
    return "\n".join(L)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
