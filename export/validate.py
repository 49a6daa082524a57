"""Run every exported graph in onnxruntime against PyTorch at two shapes; report max abs and relative error."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import onnx_export as ox
from .graph_io import cpu_session
from .wrappers import wrap

# Pass when max_abs <= atol, or (for graphs whose outputs are large) max_abs <= rtol * max|reference|.
TOLERANCES = {"fp32": (1e-4, 1e-5), "fp16": (5e-2, 2e-2), "bf16": (1e-1, 5e-2)}


@dataclass
class Result:
    graph: str
    shape: ox.Shape
    max_abs: float
    max_rel: float
    ok: bool
    note: str = ""

    def line(self) -> str:
        s = self.shape
        where = f"B={s.batch} {s.width}x{s.height} L={s.text_len}"
        verdict = "ok" if self.ok else "FAIL"
        return f"{self.graph:12s} {where:22s} max_abs={self.max_abs:.3e} max_rel={self.max_rel:.3e} {verdict} {self.note}"




def validate_graph(graph: str, path: Path, parts, precision: str) -> list[Result]:
    d = ox.dims(parts)
    module = wrap(graph, parts).float()
    atol, rtol = TOLERANCES[precision]
    results = []
    try:
        sess = cpu_session(path)
    except Exception as e:  # onnxruntime raises its own exception types
        first = str(e).splitlines()[0]
        return [Result(graph, s, float("nan"), float("nan"), False, f"onnxruntime cannot load it: {first}")
                for s in ox.VALIDATION_SHAPES]
    for s in ox.VALIDATION_SHAPES:
        example = ox.example_inputs(graph, d, s, seed=1234)
        with torch.no_grad():
            ref = module(*example)
        ref = ref if isinstance(ref, tuple) else (ref,)
        try:
            got = sess.run(None, ox.numpy_inputs(graph, path, example))
        except Exception as e:
            results.append(Result(graph, s, float("nan"), float("nan"), False, str(e).splitlines()[0]))
            continue
        max_abs = max_rel = 0.0
        finite = True
        for g, r in zip(got, ref):
            r = r.float().numpy()
            g = np.asarray(g, dtype=np.float32)
            if g.shape != r.shape:
                results.append(Result(graph, s, float("inf"), float("inf"), False, f"shape {g.shape} != {r.shape}"))
                break
            finite &= bool(np.isfinite(g).all())
            diff = float(np.abs(g - r).max()) if g.size else 0.0
            max_abs = max(max_abs, diff)
            max_rel = max(max_rel, diff / max(float(np.abs(r).max()), 1e-12))
        else:
            ok = finite and (max_abs <= atol or max_rel <= rtol)
            results.append(Result(graph, s, max_abs, max_rel, ok, "" if finite else "non-finite output"))
    return results


def validate_model(model_dir: Path, manifest: dict, parts) -> list[Result]:
    results = []
    for name, g in manifest["graphs"].items():
        results += validate_graph(name, Path(model_dir) / g["file"], parts, g["precision"])
    return results
