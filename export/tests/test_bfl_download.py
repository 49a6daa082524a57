"""`python -m export layout bfl-download` and `python -m export hub-cache`: the download-shaped copies the runtime's
download tests use look like the published files (../shared/WORLD_NOTES.md), and their bf16 weights are the fp32
export's, rounded."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from .conftest import MODELS, run_cli, run_cli_many
from export.fixtures.bfl_download import bf16_bits

SCHNELL, DEV = MODELS / "tiny-flux-schnell", MODELS / "tiny-flux-dev"
FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE}


@pytest.fixture(scope="session")
def downloads(tmp_path_factory):
    root = tmp_path_factory.mktemp("downloads")
    runs = {
        "schnell": ("layout", "bfl-download", SCHNELL, root / "schnell"),
        "kontext": ("layout", "bfl-download", DEV, root / "kontext", "--kontext"),
    }
    out = {}
    for key, fut in run_cli_many(runs).items():
        proc = fut.result()
        assert proc.returncode == 0, proc.stderr
        out[key] = runs[key][3]
    return out


def load(path, external=False):
    return onnx.load(str(path), load_external_data=external)


def elem(v):
    return v.type.tensor_type.elem_type


def dims(v):
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]


def test_the_folders_are_the_published_ones(downloads):
    files = {p.relative_to(downloads["schnell"]).as_posix() for p in downloads["schnell"].rglob("*") if p.is_file()}
    assert files == {
        "clip.opt/model.onnx", "t5.opt/model.onnx", "t5.opt/backbone.onnx_data", "vae.opt/model.onnx",
        *(f"transformer.opt/{p}/{f}" for p in ("bf16", "fp8", "fp4") for f in ("model.onnx", "backbone.onnx_data")),
        "t5-fp8.opt/model.onnx", "t5-fp8.opt/backbone.onnx_data",
    }, "no fp32 folder, no tokenizers, no manifest"
    kontext = downloads["kontext"]
    assert {p.name for p in (kontext / "transformer.opt").iterdir()} == {"bf16", "fp8", "fp4_svd32"}
    assert (kontext / "vae_encoder.opt" / "model.onnx").is_file()


def test_every_float_is_bf16_except_the_ids_and_guidance(downloads):
    for key, folder in downloads.items():
        for rel in ("clip.opt", "t5.opt", "transformer.opt/bf16", "vae.opt"):
            m = load(folder / rel / "model.onnx")
            assert not [i.name for i in m.graph.initializer if i.data_type in FLOATS], rel
            for n in m.graph.node:
                for a in n.attribute:
                    if a.type == onnx.AttributeProto.TENSOR:
                        assert a.t.data_type not in FLOATS, (rel, n.name)
            for v in list(m.graph.input) + list(m.graph.output):
                want = {"input_ids": TensorProto.INT32, "img_ids": TensorProto.FLOAT, "txt_ids": TensorProto.FLOAT,
                        "guidance": TensorProto.FLOAT}.get(v.name, TensorProto.BFLOAT16)
                assert elem(v) == want, (key, rel, v.name)
            assert not any(i.name.endswith((".lora_A", ".lora_B")) for i in m.graph.input), "no LoRA slots"
    dev = load(downloads["kontext"] / "transformer.opt/bf16/model.onnx")
    assert "guidance" in [i.name for i in dev.graph.input]


def test_the_text_length_is_fixed_and_only_batch_is_dynamic(downloads):
    for key, length in (("schnell", 256), ("kontext", 512)):
        t5 = load(downloads[key] / "t5.opt/model.onnx")
        assert dims(t5.graph.input[0]) == ["B", length] and dims(t5.graph.output[0])[:2] == ["B", length]
        tr = {i.name: dims(i) for i in load(downloads[key] / "transformer.opt/bf16/model.onnx").graph.input}
        assert tr["encoder_hidden_states"][:2] == ["B", length]
        assert tr["txt_ids"] == [length, 3]
        assert tr["img_ids"] == ["S", 3], "the image size stays free"


def test_the_bf16_weights_are_the_fp32_exports_rounded(downloads):
    src = {i.name: onnx.numpy_helper.to_array(i) for i in load(SCHNELL / "transformer.onnx").graph.initializer}
    got = load(downloads["schnell"] / "transformer.opt/bf16/model.onnx", external=True)
    checked = 0
    for init in got.graph.initializer:
        if init.data_type == TensorProto.BFLOAT16 and init.name in src:
            bits = np.frombuffer(init.raw_data, np.uint16).reshape(src[init.name].shape)
            np.testing.assert_array_equal(bits, bf16_bits(src[init.name]), err_msg=init.name)
            checked += 1
    assert checked > 20
    # Rounding to nearest even, as torch's bf16 cast: 1 + 2^-8 is a tie (to 1.0), 1 + 3 * 2^-9 rounds up.
    x = np.array([1.0, 1 + 2 ** -8, 1 + 3 * 2 ** -9, -2.5], np.float32)
    assert bf16_bits(x).tolist() == [0x3F80, 0x3F80, 0x3F81, 0xC020]


def test_modelopt_graphs_carry_trt_domain_ops(downloads):
    want = {"fp8": {"TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear"},
            "fp4": {"TRT_FP4DynamicQuantize", "TRT_FP8DequantizeLinear"}, "fp4_svd32": {"TRT_FP4DynamicQuantize"}}
    for key, folder in downloads.items():
        for path in [*folder.glob("transformer.opt/fp*/model.onnx"), folder / "t5-fp8.opt/model.onnx"]:
            m = load(path)
            kind = path.parent.name if path.parent.parent.name == "transformer.opt" else "fp8"
            ops = {n.op_type for n in m.graph.node if n.domain == "trt"}
            assert want[kind] <= ops, (path, ops)
            assert "trt" in {o.domain for o in m.opset_import}
            assert (path.parent / "backbone.onnx_data").is_file()
    svd = load(downloads["kontext"] / "transformer.opt/fp4_svd32/model.onnx")
    assert any(n.name.endswith("/svd_up") for n in svd.graph.node)


def test_hub_cache_is_laid_out_as_hf_download_leaves_it(tmp_path, downloads):
    cache = tmp_path / "hub"
    proc = run_cli("hub-cache", cache, "black-forest-labs/FLUX.1-schnell-onnx", downloads["schnell"])
    assert proc.returncode == 0, proc.stderr
    repo = cache / "models--black-forest-labs--FLUX.1-schnell-onnx"
    commit = (repo / "refs" / "main").read_text()
    assert len(commit) == 40 and "\n" not in commit
    snap = repo / "snapshots" / commit
    link = snap / "transformer.opt" / "bf16" / "backbone.onnx_data"
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))
    assert link.resolve().parent == (repo / "blobs").resolve()
    assert link.read_bytes() == (downloads["schnell"] / "transformer.opt/bf16/backbone.onnx_data").read_bytes()
    proc = run_cli("hub-cache", cache, "black-forest-labs/FLUX.1-schnell", "--tokenizers-from", SCHNELL)
    assert proc.returncode == 0, proc.stderr
    base = cache / "models--black-forest-labs--FLUX.1-schnell"
    snap = base / "snapshots" / (base / "refs" / "main").read_text()
    assert (snap / "tokenizer" / "vocab.json").is_file() and (snap / "tokenizer_2" / "tokenizer.json").is_file()
    proc = run_cli("hub-cache", cache, "a/b")
    assert proc.returncode == 2 and "SRC or --tokenizers-from" in proc.stderr
