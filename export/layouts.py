"""Re-save an exported model in the official BFL ONNX layout or in optimum-onnx's layout and names.

The runtime must load both without a manifest; its compatibility tests generate these from the tiny models.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx

from . import manifest as mf

# BFL FLUX.1-*-onnx repos: one folder per graph, big weights in backbone.onnx_data. No VAE encoder is published.
BFL = {
    "clip": ("clip.opt/model.onnx", {}),
    "t5": ("t5.opt/model.onnx", {}),
    "transformer": ("transformer.opt/{precision}/model.onnx", {}),
    "vae_decoder": ("vae.opt/model.onnx", {}),
}

# optimum-onnx: diffusers component folders and transformers-style names.
OPTIMUM = {
    "clip": ("text_encoder/model.onnx", {"text_embeddings": "last_hidden_state", "pooled_embeddings": "pooler_output"}),
    "t5": ("text_encoder_2/model.onnx", {"text_embeddings": "last_hidden_state"}),
    "transformer": ("transformer/model.onnx", {"latent": "out_hidden_states"}),
    "vae_decoder": ("vae_decoder/model.onnx", {"latent": "latent_sample", "images": "sample"}),
    "vae_encoder": ("vae_encoder/model.onnx", {"images": "sample", "latent": "latent_parameters"}),
}

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
    _copy_tokenizers(model_dir, out_dir, manifest)
    return written
