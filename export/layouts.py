"""Re-save an exported model in the official BFL ONNX layout or in optimum-onnx's layout and names.

The runtime must load both without a manifest; its compatibility tests generate these from the tiny models.
BFL's repositories carry no tokenizers: users add the base repository's ``tokenizer/`` and ``tokenizer_2/``,
so the BFL layout writes those in the hub's form (see :func:`_write_hub_tokenizers`).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import onnx

from . import contract
from . import manifest as mf

# BFL FLUX.1-*-onnx repos: one folder per graph, big weights in backbone.onnx_data, no renames. The text-to-image
# downloads publish no VAE encoder (Kontext's does); the copies made here follow the text-to-image ones.
BFL = {g: (contract.FILES[g]["bfl"], {}) for g in ("clip", "t5", "transformer", "vae_decoder")}

# optimum-onnx: diffusers component folders and transformers-style names.
OPTIMUM = {g: (contract.FILES[g]["optimum"], contract.OPTIMUM_NAMES[g]) for g in contract.FILES}

LAYOUTS = {"bfl": BFL, "optimum": OPTIMUM}


def rename_io(model: onnx.ModelProto, names: dict[str, str]) -> onnx.ModelProto:
    """Renames graph inputs/outputs and every reference to them."""
    if not names:
        return model
    g = model.graph
    for v in list(g.input) + list(g.output):
        if v.name in names:
            v.name = names[v.name]
    for n in g.node:
        n.input[:] = [names.get(i, i) for i in n.input]
        n.output[:] = [names.get(o, o) for o in n.output]
    return model


def _save_graph(src: Path, dst: Path, names: dict[str, str], external: bool) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    model = rename_io(onnx.load(str(src), load_external_data=True), names)
    if external:
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="backbone.onnx_data", size_threshold=1024)
    else:
        onnx.save_model(model, str(dst))


def _copy_tokenizers(model_dir: Path, out_dir: Path, manifest: dict) -> None:
    for kind, folder in (("clip", "tokenizer"), ("t5", "tokenizer_2")):
        if kind in manifest["tokenizers"]:
            shutil.copytree(model_dir / folder, out_dir / folder, dirs_exist_ok=True)


# The old (pre-transformers-5) pipeline of the hub's T5 tokenizer.json, for when the raw file is unavailable.
_HUB_T5_METASPACE = {"type": "Metaspace", "replacement": "\u2581", "add_prefix_space": True}


def _same_unigram_vocab(a: list, b: list) -> bool:
    """Same pieces in the same order, same scores up to float re-serialization noise."""
    return len(a) == len(b) and all(pa == pb and abs(sa - sb) <= 1e-9 * max(1.0, abs(sa))
                                    for (pa, sa), (pb, sb) in zip(a, b))


def _hub_t5_json(model_json: dict) -> bytes:
    """T5's tokenizer.json as the hub ships it (google/t5-v1_1-xxl, FLUX.1's ``tokenizer_2/``): the raw file from
    :func:`export.tokenizers.fetch_sources` when its vocabulary is the model's, else the model's own file with
    the hub's old pipeline put back (Precompiled + Replace normalizer, lone Metaspace, no WhitespaceSplit)."""
    from . import tokenizers as tk

    try:
        raw_path = tk.fetch_sources()["t5_tokenizer_json"]
        raw = raw_path.read_bytes()
        if _same_unigram_vocab(json.loads(raw)["model"]["vocab"], model_json["model"]["vocab"]):
            return raw
        reason = f"{raw_path} has another vocabulary"
    except RuntimeError as e:
        reason = str(e).splitlines()[0]
    print(f"warning: writing a hub-style T5 tokenizer.json from the model's own ({reason})", file=sys.stderr)
    hub = dict(model_json)
    normalizer = hub.get("normalizer") or {}
    parts = normalizer.get("normalizers", [normalizer]) if normalizer else []
    precompiled = [n for n in parts if n.get("type") == "Precompiled"]
    hub["normalizer"] = {"type": "Sequence", "normalizers": precompiled + [
        {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]}
    hub["pre_tokenizer"] = dict(_HUB_T5_METASPACE)
    hub["decoder"] = dict(_HUB_T5_METASPACE)
    hub["model"] = {k: v for k, v in hub["model"].items() if k != "byte_fallback"}
    return (json.dumps(hub, ensure_ascii=False, indent=2) + "\n").encode("utf-8")


def _write_hub_tokenizers(model_dir: Path, out_dir: Path, manifest: dict) -> None:
    """The tokenizer folders as FLUX.1's base repositories ship them, which users put next to BFL's ONNX files:
    ``tokenizer/`` (CLIP) as vocab.json + merges.txt + configs and NO tokenizer.json; ``tokenizer_2/`` (T5) as
    the hub's raw tokenizer.json (old pipeline, no WhitespaceSplit) + configs (spiece.model is on no PyPI
    package, so it is left out). The vocabularies are the model's own."""
    from . import tokenizers as tk

    entries = manifest["tokenizers"]
    if "clip" in entries:
        model = json.loads((model_dir / entries["clip"]["file"]).read_text(encoding="utf-8"))["model"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        dst = out_dir / "tokenizer"
        dst.mkdir(parents=True, exist_ok=True)
        (dst / "tokenizer.json").unlink(missing_ok=True)
        (dst / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False) + "\n", encoding="utf-8")
        (dst / "merges.txt").write_bytes(("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8"))
        config, special_map = tk._clip_configs(entries["clip"]["max_length"])
        tk._write_json(dst / "tokenizer_config.json", config)
        tk._write_json(dst / "special_tokens_map.json", special_map)
    if "t5" in entries:
        model_json = json.loads((model_dir / entries["t5"]["file"]).read_text(encoding="utf-8"))
        dst = out_dir / "tokenizer_2"
        dst.mkdir(parents=True, exist_ok=True)
        (dst / "tokenizer.json").write_bytes(_hub_t5_json(model_json))
        extra_ids = sum(1 for t in model_json.get("added_tokens", []) if t["content"].startswith("<extra_id_"))
        config, special_map = tk._t5_configs(entries["t5"]["max_length"], extra_ids)
        tk._write_json(dst / "tokenizer_config.json", config)
        tk._write_json(dst / "special_tokens_map.json", special_map)


def resave(model_dir: Path, out_dir: Path, layout: str) -> list[Path]:
    """Writes the model in `layout` ("bfl" or "optimum") into out_dir; returns the graph files written."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    manifest = mf.read(model_dir)
    spec = LAYOUTS[layout]
    written = []
    for graph, entry in manifest["graphs"].items():
        if graph not in spec:
            continue
        rel, names = spec[graph]
        dst = out_dir / rel.format(precision=entry["precision"])
        _save_graph(model_dir / entry["file"], dst, names, external=entry["external_data"] is not None)
        written.append(dst)
    if layout == "bfl":
        _write_hub_tokenizers(model_dir, out_dir, manifest)
    else:
        _copy_tokenizers(model_dir, out_dir, manifest)
    return written
