"""Graph fusions for the transformer (ONNX Runtime's CPU provider; attention also for fp16 graphs on GPUs).

`python -m export optimize MODEL_DIR OUT_DIR [--fusions attention,layernorm,gelu]` (default: all three) copies an
exported model folder (fp32, or already quantized with `python -m export quantize`) and rewrites its transformer graph:

- attention: each scaled-dot-product attention of the TorchScript export (Q·Kᵀ, Softmax, ·V on the RoPE'd
  [B, S, H, D] tensors, with the 1/sqrt(D) scale split over Q and K) becomes one com.microsoft MultiHeadAttention
  node (ONNX Runtime's CPU kernel: MLAS flash attention, no S x S score matrix in memory). onnxruntime's own MMDiT
  fusion (`optimizer.optimize_model(model_type="mmdit")`) does not match this export's RoPE, so fluxrt matches the
  pattern itself. In an fp16 export the Softmax sits in an fp32 island (Cast, Softmax, Cast): the match goes through
  the Casts, which on a GPU replaces an fp32 S x S score matrix per head with the provider's fused kernel
  (H200, bench model at 1024x1024: 37.9 -> 18.4 ms per step).
- layernorm, gelu: onnxruntime.transformers' MMDiT fusions (LayerNormalization, SimplifiedLayerNormalization
  for the q/k RMSNorms, FastGelu for the tanh-GELU of the feed-forwards).

Run it after quantizing: quantize_dynamic cannot type the fused Gelu outputs, but the fusions run on a quantized
graph (its attention core is fp32 either way). The manifest records the fusions under the transformer's
`optimization` entry; the graph's inputs and outputs are unchanged. Bench preset, one step at 512x512, 2 threads:
all three fusions cut the step's CPU time by ~14 % (fp32) and ~20 % (int8), attention alone by ~7-8 %; the output
stays within 1.6e-6 of PyTorch (export/validate.py's check) - see benches/NOTES.md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .checkpoint import ExportError
from .graph_io import const_value, save_graph, topological
from .quantize import derived_model

FUSIONS = ("attention", "layernorm", "gelu")
DEFAULT_FUSIONS = ("attention", "layernorm", "gelu")


def _const(idx: dict, name: str):
    return const_value(idx["prod"], idx["init"], name)


def _skip_casts(idx: dict, name: str) -> str:
    """Up through Cast-to-float nodes (the export's no-op Casts around RoPE)."""
    while True:
        n = idx["prod"].get(name)
        if n is None or n.op_type != "Cast":
            return name
        name = n.input[0]


def _perm(n) -> list[int] | None:
    import onnx

    for a in n.attribute:
        if a.name == "perm":
            return list(onnx.helper.get_attribute_value(a))
    return None


def _heads_from_v(idx: dict, v_bshd: str) -> tuple[int, int] | None:
    """(num_heads, head_dim) from V's Reshape [.., -1, D] and its projection bias [H*D]."""
    name = v_bshd
    for _ in range(4):
        n = idx["prod"].get(name)
        if n is None:
            return None
        if n.op_type == "Reshape":
            shape_src = idx["prod"].get(n.input[1])
            d = None
            if shape_src is not None and shape_src.op_type == "Concat":
                for i in shape_src.input:
                    c = _const(idx, i)
                    if c is not None and c.ndim == 1 and len(c) == 2 and c[0] == -1 and c[1] > 0:
                        d = int(c[1])
            else:
                c = _const(idx, n.input[1])
                if c is not None and len(c) == 4 and c[-1] > 0:
                    d = int(c[-1])
            if d is None:
                return None
            # The projection: Add(bias, MatMul) (fp32 or quantized), maybe under a LoRA slot's Add; the bias is H*D.
            frontier = [n.input[0]]
            for _ in range(3):
                nxt = []
                for t in frontier:
                    add = idx["prod"].get(t)
                    if add is None or add.op_type != "Add":
                        continue
                    for i in add.input:
                        b = _const(idx, i)
                        if b is not None and b.ndim == 1 and b.size % d == 0:
                            return b.size // d, d
                    nxt.extend(add.input)
                frontier = nxt
            return None
        if n.op_type == "Concat":
            name = n.input[0]
        else:
            return None
    return None


def fuse_attention(model) -> int:
    """Replaces every `Transpose(Q)·s @ Transpose(K)·s -> Softmax -> @ Transpose(V) -> Transpose -> Reshape`
    subgraph (s = sqrt(1/sqrt(D)), the TorchScript export of F.scaled_dot_product_attention) with one
    com.microsoft MultiHeadAttention on [B, S, H*D] tensors. Returns how many were fused."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    g = model.graph
    idx = {"prod": {o: n for n in g.node for o in n.output},
           "init": {i.name: i for i in g.initializer}, "cons": {}}
    for n in g.node:
        for i in n.input:
            idx["cons"].setdefault(i, []).append(n)
    prod, cons = idx["prod"], idx["cons"]
    shape3 = "fluxrt_mha_shape_bs_hidden"
    new_nodes, replaced = [], {}
    fused = 0
    def past_cast(n, step):  # an fp16 export's fp32 Softmax island: Cast -> Softmax -> Cast
        return step(n) if n is not None and n.op_type == "Cast" else n

    for sm in [n for n in g.node if n.op_type == "Softmax"]:
        qk = past_cast(prod.get(sm.input[0]), lambda c: prod.get(c.input[0]))
        users = cons.get(sm.output[0], [])
        if len(users) == 1 and users[0].op_type == "Cast":
            users = cons.get(users[0].output[0], [])
        if qk is None or qk.op_type != "MatMul" or len(users) != 1 or users[0].op_type != "MatMul":
            continue
        av = users[0]
        mq, mk = prod.get(qk.input[0]), prod.get(qk.input[1])
        if mq is None or mk is None or mq.op_type != "Mul" or mk.op_type != "Mul":
            continue
        tq = prod.get(mq.input[0])
        tk = prod.get(mk.input[0])
        tv = prod.get(av.input[1])
        if not all(t is not None and t.op_type == "Transpose" for t in (tq, tk, tv)):
            continue
        if _perm(tq) != [0, 2, 1, 3] or _perm(tk) != [0, 2, 3, 1] or _perm(tv) != [0, 2, 1, 3]:
            continue
        out_users = cons.get(av.output[0], [])
        to = [n for n in out_users if n.op_type == "Transpose"]
        if len(to) != 1 or _perm(to[0]) != [0, 2, 1, 3]:
            continue
        rs = [n for n in cons.get(to[0].output[0], []) if n.op_type == "Reshape"]
        if len(rs) != 1:
            continue
        hd = _heads_from_v(idx, tv.input[0])
        if hd is None:
            continue
        heads, d = hd
        # The scale: both Muls multiply by the same sqrt(1/sqrt(D)) (computed from shapes); check it when constant.
        for m in (mq, mk):
            c = _const(idx, m.input[1])
            if c is not None and not np.allclose(float(np.asarray(c).reshape(-1)[0]) ** 2, 1 / np.sqrt(d), rtol=1e-4):
                break
        else:
            q, k, v = _skip_casts(idx, tq.input[0]), _skip_casts(idx, tk.input[0]), tv.input[0]
            base = sm.name.rsplit("/", 1)[0] + "/fluxrt_mha" if "/" in sm.name else f"fluxrt_mha_{fused}"
            flat = []
            for tag, src in (("q", q), ("k", k), ("v", v)):
                o = f"{base}/{tag}_bsh"
                new_nodes.append(helper.make_node("Reshape", [src, shape3], [o], name=f"{base}/Reshape_{tag}"))
                flat.append(o)
            replaced[rs[0].output[0]] = helper.make_node(
                "MultiHeadAttention", flat, [rs[0].output[0]], name=f"{base}/MultiHeadAttention",
                domain="com.microsoft", num_heads=heads, scale=float(1 / np.sqrt(d)))
            fused += 1
    if not fused:
        return 0
    g.initializer.append(numpy_helper.from_array(np.array([0, 0, -1], np.int64), shape3))
    nodes = []
    for n in g.node:
        if len(n.output) == 1 and n.output[0] in replaced:
            continue
        nodes.append(n)
    nodes += new_nodes + list(replaced.values())
    # Drop what nothing reads any more (the old attention), then restore a topological order.
    needed = {o.name for o in g.output}
    live = []
    by_out = {o: n for n in nodes for o in n.output}
    stack = list(needed)
    seen = set()
    while stack:
        t = stack.pop()
        n = by_out.get(t)
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        live.append(n)
        stack.extend(i for i in n.input if i)
        for a in n.attribute:  # subgraphs: keep their outer-scope inputs alive
            if a.type == onnx.AttributeProto.GRAPH:
                for sn in a.g.node:
                    stack.extend(i for i in sn.input if i)
    live_ids = {id(n) for n in live}
    ordered = topological([n for n in nodes if id(n) in live_ids], g)
    if ordered is None:
        raise ExportError("attention fusion left a cycle or a dangling input")
    del g.node[:]
    g.node.extend(ordered)
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used or i.name in {x.name for x in g.input}]
    del g.initializer[:]
    g.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return fused


def ort_fusions(model, layernorm: bool, gelu: bool):
    """onnxruntime.transformers' MMDiT LayerNorm / RMSNorm / Gelu fusions (no attention: fuse_attention does it)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.onnx_model_mmdit import MmditOnnxModel

    opts = FusionOptions("mmdit")
    opts.enable_attention = False
    # Its symbolic shape inference fails on this export's dynamic Reshapes (and then only prints so); without it
    # the fusions are the same.
    opts.enable_shape_inference = False
    opts.enable_layer_norm = layernorm
    opts.enable_gelu = gelu
    m = MmditOnnxModel(model)
    m._optimize(opts, None)
    stats = m.get_fused_operator_statistics()
    return m.model, {k: v for k, v in stats.items() if k != "MultiHeadAttention"}


def optimize_graph(src: Path, dst: Path, fusions: tuple[str, ...] = DEFAULT_FUSIONS) -> dict:
    import logging

    import onnx

    unknown = [f for f in fusions if f not in FUSIONS]
    if unknown or not fusions:
        raise ExportError(f"unknown fusion(s) {unknown}; choose from {', '.join(FUSIONS)}")
    model = onnx.load(str(src), load_external_data=True)
    info: dict = {"fusions": list(fusions), "nodes_before": len(model.graph.node)}
    if "layernorm" in fusions or "gelu" in fusions:
        logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
        model, stats = ort_fusions(model, "layernorm" in fusions, "gelu" in fusions)
        info.update(stats)
    if "attention" in fusions:
        info["MultiHeadAttention"] = fuse_attention(model)
        if info["MultiHeadAttention"] == 0:
            raise ExportError(f"{src.name}: no attention matched the export's pattern")
    info["nodes_after"] = len(model.graph.node)
    info["external_data"] = save_graph(model, dst)
    return info


def optimize_model(model_dir: Path, out_dir: Path, fusions: tuple[str, ...] = DEFAULT_FUSIONS, force: bool = False,
                   log=print) -> dict:
    """Writes out_dir: model_dir with its transformer's attention (and optionally LayerNorm / Gelu) fused."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    mf_path = model_dir / "manifest.json"
    if not mf_path.is_file():
        raise ExportError(f"{model_dir} has no manifest.json; pass a model folder written by python -m export")
    unknown = [f for f in fusions if f not in FUSIONS]
    if unknown or not fusions:
        raise ExportError(f"unknown fusion(s) {unknown}; choose from {', '.join(FUSIONS)}")
    manifest = json.loads(mf_path.read_text())
    entry = manifest.get("graphs", {}).get("transformer")
    if entry is None:
        raise ExportError(f"{model_dir} has no transformer graph to optimize")
    if entry.get("optimization"):
        raise ExportError(f"{model_dir}: the transformer is already optimized ({entry['optimization']['fusions']})")
    skip = {entry["file"], entry.get("external_data")} - {None}
    with derived_model(model_dir, out_dir, manifest, skip, force, "optimized_from", log) as staging:
        t0 = time.time()
        info = optimize_graph(model_dir / entry["file"], staging / entry["file"], tuple(fusions))
        entry["external_data"] = info.pop("external_data")
        entry["optimization"] = info
        log(f"optimized transformer: {', '.join(fusions)} "
            f"({', '.join(f'{k} {v}' for k, v in info.items() if isinstance(v, int) and k[0].isupper())}), "
            f"{info['nodes_before']} -> {info['nodes_after']} nodes, {time.time() - t0:.1f}s")
    return manifest
