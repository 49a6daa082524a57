"""LoRA slots: run-time LoRA inputs on the transformer graph (`python -m export ... --lora-slots`).

Graph contract. For EVERY `torch.nn.Linear` of the diffusers FluxTransformer2DModel, with module path `M` relative
to the transformer (`transformer_blocks.0.attn.to_q`, `single_transformer_blocks.0.proj_out`, `x_embedder`,
`norm_out.linear`, `time_text_embed.timestep_embedder.linear_1`, ...), the transformer graph has two optional inputs

    M.lora_A  [in_features, lora_rank_<i>]     M.lora_B  [lora_rank_<i>, out_features]

(`lora_rank_<i>` a symbolic dim of its own per slot, i = the slot's index in the manifest list), each with an
initializer of the same name (an overridable initializer, so a run may leave it out) holding the zero-rank default
`[in, 0]` / `[0, out]`, and the layer computes `y = linear(x) + (x @ A) @ B`. No alpha and no scale input: whoever
feeds the slot folds alpha / rank and the user's scale into B (`slot_factors` below does exactly that). Several LoRAs
stack by concatenating their factors along the rank. The element type is the one of the layer's weight in the
exported graph: float32 in fp32 exports, float16 / bfloat16 in fp16 / bf16 exports (no Linear of the transformer is
in an fp32 island; `check_slot_dtypes` checks it on every export).

ONNX Runtime 1.31.1 (CPU) computes a MatMul with K = 0 as exact zeros, so a run that feeds no slot gives bit for
bit what the plain graph gives (`y + 0`).

Each slot input reaches its MatMul through an Identity node, so weight-only quantizers (quantize_dynamic with
MatMulConstBOnly, MatMulNBits), which treat a MatMul whose second input is an initializer as a weight, leave the
slots alone: a quantized model keeps float LoRA slots on top of its quantized weights.

The manifest's transformer entry lists the slots: `"lora_slots": [{"module": M, "in": in_features,
"out": out_features}, ...]`, in graph-input order.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from .checkpoint import ExportError
from .contract import Io
from .wrappers import TransformerGraph

SUFFIX_A, SUFFIX_B = ".lora_A", ".lora_B"
RANK_DIM = "lora_rank_{}"
# rank of the example factors the graph is traced with (any rank > 0; the rank dim is symbolic in the graph)
EXAMPLE_RANK = 2
_ONNX_DTYPE = {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
               "bfloat16": onnx.TensorProto.BFLOAT16}


@dataclass(frozen=True)
class Slot:
    module: str
    in_features: int
    out_features: int
    index: int

    @property
    def a_name(self) -> str:
        return self.module + SUFFIX_A

    @property
    def b_name(self) -> str:
        return self.module + SUFFIX_B

    @property
    def rank_dim(self) -> str:
        return RANK_DIM.format(self.index)

    def manifest(self) -> dict:
        return {"module": self.module, "in": self.in_features, "out": self.out_features}


def slots_for(transformer: nn.Module) -> list[Slot]:
    """One slot per nn.Linear of the transformer, in named_modules() order (blocks first, as diffusers builds them)."""
    linears = [(n, m) for n, m in transformer.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ExportError("--lora-slots: the transformer has no Linear layers")
    return [Slot(n, m.in_features, m.out_features, i) for i, (n, m) in enumerate(linears)]


def slot_ios(slots: list[Slot]) -> list[Io]:
    """The slot inputs as contract entries (appended after the transformer's ordinary inputs)."""
    out = []
    for s in slots:
        out += [Io(s.a_name, "float32", (s.in_features, s.rank_dim)),
                Io(s.b_name, "float32", (s.rank_dim, s.out_features))]
    return out


def example_factors(slots: list[Slot], dtype=torch.float32, rank: int = EXAMPLE_RANK, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in slots:
        out += [(torch.randn(s.in_features, rank, generator=g) * 0.1).to(dtype),
                (torch.randn(rank, s.out_features, generator=g) * 0.1).to(dtype)]
    return out


def zero_factors(slots: list[Slot], dtype=torch.float32) -> list:
    out = []
    for s in slots:
        out += [torch.zeros(s.in_features, 0, dtype=dtype), torch.zeros(0, s.out_features, dtype=dtype)]
    return out


@contextlib.contextmanager
def slot_hooks(transformer: nn.Module, slots: list[Slot], factors: list):
    """While active, every slotted Linear returns linear(x) + (x @ A) @ B with its (A, B) from `factors`
    (flat list A0, B0, A1, B1, ... in slot order)."""
    modules = dict(transformer.named_modules())
    handles = []

    def hook_for(a, b):
        def hook(_module, inputs, output):
            return output + torch.matmul(torch.matmul(inputs[0], a), b)
        return hook

    try:
        for i, s in enumerate(slots):
            handles.append(modules[s.module].register_forward_hook(hook_for(factors[2 * i], factors[2 * i + 1])))
        yield
    finally:
        for h in handles:
            h.remove()


class SlottedTransformerGraph(TransformerGraph):
    """TransformerGraph whose forward takes the slot factors after the ordinary inputs. A subclass (not a wrapper
    module) so the traced node names are the plain graph's (`/transformer/...`), which the fp16 islands match."""

    def __init__(self, transformer: nn.Module, slots: list[Slot]):
        super().__init__(transformer)
        self.slots = slots
        self.n_inputs = 7 if self.guidance_embeds else 6

    def forward(self, *args):
        base, factors = args[: self.n_inputs], args[self.n_inputs:]
        assert len(factors) == 2 * len(self.slots), "one (A, B) pair per slot"
        with slot_hooks(self.transformer, self.slots, list(factors)):
            return super().forward(*base)


# ------------------------------------------------------------------ ONNX side


def finish_graph(model: onnx.ModelProto, slots: list[Slot]) -> None:
    """After tracing (and the precision pass): routes each slot input through an Identity node and gives it an
    initializer of its own name holding the zero-rank default, which makes the input optional."""
    inputs = {v.name: v for v in model.graph.input}
    missing = [s.a_name for s in slots if s.a_name not in inputs] + [s.b_name for s in slots if s.b_name not in inputs]
    if missing:
        raise ExportError(f"--lora-slots: the traced transformer has no input {missing[0]} (the layer is unused?)")
    names = {n for s in slots for n in (s.a_name, s.b_name)}
    renamed = {n: f"{n}/value" for n in names}
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            if name in renamed:
                node.input[k] = renamed[name]
    identities, inits = [], []
    for s in slots:
        for name, shape in ((s.a_name, [s.in_features, 0]), (s.b_name, [0, s.out_features])):
            elem = inputs[name].type.tensor_type.elem_type
            identities.append(onnx.helper.make_node("Identity", [name], [renamed[name]], name=f"/lora_slots/{name}"))
            inits.append(onnx.helper.make_tensor(name, elem, shape, []))
    # Identity nodes first: the graph stays topologically sorted.
    nodes = identities + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(inits)


def check_slot_dtypes(model: onnx.ModelProto, slots: list[Slot]) -> str:
    """The contract's element type: every slot input has the type of the weights of the graph's MatMul / Gemm nodes
    (the Linear layers; an fp16 export keeping one of them in an fp32 island would break it); returns its name."""
    by_name = {v.name: v.type.tensor_type.elem_type for v in model.graph.input}
    names = {n for s in slots for n in (s.a_name, s.b_name)}
    elems = {by_name[n] for n in names}
    if len(elems) != 1:
        raise ExportError(f"--lora-slots: the slot inputs have mixed element types {sorted(elems)}")
    elem = elems.pop()
    inits = {t.name: t.data_type for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            for name in node.input:
                if name in inits and inits[name] != elem:
                    raise ExportError(
                        f"--lora-slots: weight {name} of {node.name} is {onnx.TensorProto.DataType.Name(inits[name])} "
                        f"but the slot inputs are {onnx.TensorProto.DataType.Name(elem)}; a Linear layer sits in an "
                        "fp32 island, which the slot contract does not allow")
    return {v: k for k, v in _ONNX_DTYPE.items()}.get(elem, str(elem))


def manifest_field(slots: list[Slot]) -> list[dict]:
    return [s.manifest() for s in slots]


# ------------------------------------------------------------------ LoRA files -> slot factors


def peft_alphas(sd: dict, pairs: dict) -> dict[str, float]:
    """{layer: alpha} as diffusers 0.42.1 configures PEFT for a diffusers-named file (converted `sd`, `pairs` its
    {layer: (lora_A, lora_B)}): diffusers' own get_peft_kwargs and PEFT's pattern lookup, so quirks match exactly.
    No `.alpha` key: alpha = rank. Otherwise a layer without one gets the default, which diffusers means to be the
    most common alpha but, counting tensors by identity, is the first one in key order; `alpha_pattern` keys
    match as suffixes of module paths (`proj_out` also hits `single_transformer_blocks.N.proj_out`)."""
    alphas = {k[len("transformer."):]: torch.as_tensor(v) for k, v in sd.items()
              if k.startswith("transformer.") and k.endswith(".alpha")}
    if not alphas:
        return {name: float(down.shape[0]) for name, (down, _up) in pairs.items()}
    from diffusers.utils.peft_utils import get_peft_kwargs
    from peft.utils.other import get_pattern_key

    ranks = {f"^{name}.lora_B.weight": up.shape[1] for name, (_down, up) in pairs.items()}
    kw = get_peft_kwargs(ranks, alphas, {f"{name}.lora_A.weight": None for name in pairs})
    pattern = kw["alpha_pattern"]
    return {name: float(torch.as_tensor(pattern.get(get_pattern_key(pattern.keys(), name), kw["lora_alpha"])))
            for name in pairs}


def lora_pairs(spec, transformer) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One LoRA file (LoraSpec) as {module path: (A [in, r], B [r, out])} in float32, alpha / r and the spec's scale
    folded into B; the key conversion and checks are export/lora.py's (diffusers/PEFT and kohya namings)."""
    from . import lora

    raw = lora.read_lora_file(spec.path)
    sd, missing = lora.to_diffusers(raw, transformer, spec.path)
    tr, _te = lora.check_fits(sd, transformer, None, spec.path, missing)
    if not tr:
        raise ExportError(f"LoRA file {spec.path} has no transformer layers")
    pairs = lora._pairs(sd, "transformer.", spec.path)
    alphas = peft_alphas(sd, pairs)
    out = {}
    for name, target in tr.items():
        down, up = pairs[name]  # lora_A.weight [r, in], lora_B.weight [out, r]
        scale = alphas[name] / down.shape[0] * float(spec.scale)
        out[target] = (down.float().t().contiguous(), (up.float() * scale).t().contiguous())
    return out


def slot_factors(specs, transformer) -> dict[str, np.ndarray]:
    """The slot inputs for a list of LoraSpec (file + scale), in order: {"M.lora_A": [in, r], "M.lora_B": [r, out]}
    float32 arrays for every slot some LoRA touches; several LoRAs are concatenated along r in the given order.
    Slots no LoRA touches are left out (they keep their zero-rank defaults)."""
    from .lora import LoraSpec

    specs = [s if isinstance(s, LoraSpec) else LoraSpec(Path(s[0]), float(s[1])) for s in specs]
    slot_names = {s.module for s in slots_for(transformer)}
    stacked: dict[str, list] = {}
    for spec in specs:
        for module, (a, b) in lora_pairs(spec, transformer).items():
            if module not in slot_names:
                raise ExportError(f"LoRA file {spec.path}: layer {module} is not a Linear slot of the transformer")
            stacked.setdefault(module, []).append((a, b))
    out = {}
    for module, ab in stacked.items():
        out[module + SUFFIX_A] = torch.cat([a for a, _ in ab], dim=1).numpy().astype(np.float32)
        out[module + SUFFIX_B] = torch.cat([b for _, b in ab], dim=0).numpy().astype(np.float32)
    return out


def slot_deltas(factors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{module path: A @ B} [in, out] float32 for every slot in `factors` (what the LoRAs add to x @ W^T)."""
    out = {}
    for key, a in factors.items():
        if key.endswith(SUFFIX_A):
            module = key[: -len(SUFFIX_A)]
            b = factors[module + SUFFIX_B]
            out[module] = (torch.from_numpy(a).double() @ torch.from_numpy(b).double()).float().numpy()
    return out
