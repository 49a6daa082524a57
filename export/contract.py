"""The ONNX I/O contract of FLUX.1's graphs, read from contract/flux-onnx.json: the file the Rust runtime reads too
(src/model/contract.rs), so the names, element types, shapes and layout paths are written down once."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CONTRACT_FILE = Path(__file__).resolve().parents[1] / "contract" / "flux-onnx.json"


@dataclass(frozen=True)
class Io:
    name: str
    dtype: str  # "float32" | "int32"; the precision pass may turn float32 into float16/bfloat16
    shape: tuple  # ints for fixed dims, strings for symbolic ones (B, L, S, h, w, H, W) and model widths (*_dim)
    dev_only: bool = False


_RAW = json.loads(CONTRACT_FILE.read_text())["graphs"]


def _ios(items: list[dict]) -> list[Io]:
    return [Io(i["name"], i["dtype"], tuple(i["shape"]), i.get("dev_only", False)) for i in items]


# graph -> {"inputs": [Io], "outputs": [Io]}, every input a graph may have (dev's guidance included)
CONTRACT: dict[str, dict[str, list[Io]]] = {
    g: {"inputs": _ios(c["inputs"]), "outputs": _ios(c["outputs"])} for g, c in _RAW.items()}
# graph -> its file in the BFL and optimum-onnx layouts (the transformer's BFL path has a {precision} folder)
FILES: dict[str, dict[str, str]] = {g: dict(c["files"]) for g, c in _RAW.items()}
# graph -> optimum-onnx's name of an input or output, by contract name
OPTIMUM_NAMES: dict[str, dict[str, str]] = {g: dict(c["optimum_names"]) for g, c in _RAW.items()}


def contract_for(graph: str, guidance_embeds: bool) -> dict[str, list[Io]]:
    """The I/O of one graph; the dev-only inputs (guidance) only for a guidance-distilled transformer."""
    c = CONTRACT[graph]
    return {"inputs": [i for i in c["inputs"] if guidance_embeds or not i.dev_only], "outputs": c["outputs"]}
