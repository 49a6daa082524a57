"""export/convert.py (`fluxrt convert`): a bf16 BFL download -> fp32 / fp16 / int8 / int4 folders ONNX Runtime runs.

The download is made here from the committed fp32 tiny model: every float tensor, constant, Cast and graph I/O in
bf16, img_ids / txt_ids kept fp32 and cast inside (as BFL's graphs do), t5 and transformer with external data. The
reference for "the same math" is the fp32 tiny graph with the same bf16-rounded values.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from export import convert

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "models" / "tiny-flux-schnell"
# graph of the tiny model -> its BFL folder; t5 and the transformer keep their weights in backbone.onnx_data
BFL = {"clip": "clip.opt", "t5": "t5.opt", "transformer": "transformer.opt/bf16", "vae_decoder": "vae.opt",
       "vae_encoder": "vae_encoder.opt"}
EXTERNAL = {"t5", "transformer"}
F32_INPUTS = {"img_ids", "txt_ids", "guidance"}  # fp32 in BFL's graphs, cast to bf16 inside
FLOAT_ONLY = {("Resize", 2)}  # node inputs ONNX types tensor(float) only: they stay fp32 in a bf16 graph
BF16_EPS = 2.0 ** -8  # bf16: 8 significant bits
FP16_EPS = 2.0 ** -11  # fp16: 11
B, L, H, W = 2, 16, 32, 32  # batch, text length, image size: latents 4x4, 16 image tokens
ort.set_default_logger_severity(3)  # the tiny transformer's LoRA-slot defaults are initializers and inputs: no noise


# ---------------------------------------------------------------- the fixture download

def _bf16_tensor(t: TensorProto, bf16: bool) -> TensorProto:
    """A float tensor in bf16, or fp32 holding the same bf16-rounded values."""
    a = numpy_helper.to_array(t).astype(ml_dtypes.bfloat16)
    if not bf16:
        return numpy_helper.from_array(a.astype(np.float32), t.name)
    return helper.make_tensor(t.name, TensorProto.BFLOAT16, a.shape, a.view(np.uint16).tobytes(), raw=True)


def bfl_graph(model: onnx.ModelProto, bf16: bool) -> onnx.ModelProto:
    """The tiny fp32 graph as BFL ships it (bf16=True), or its fp32 twin with the same rounded values. Constants with
    16+ elements become initializers, as in BFL's constant-folded .opt graphs (RoPE's pair swaps among them)."""
    m = copy.deepcopy(model)
    g = m.graph
    float_only = {n.input[k] for n in g.node for op, k in FLOAT_ONLY if n.op_type == op and len(n.input) > k}
    nodes = []
    for n in g.node:
        value = n.attribute[0].t if n.op_type == "Constant" and n.attribute[0].name == "value" else None
        if value is not None and np.prod(value.dims) >= 16:
            g.initializer.append(value)
            g.initializer[-1].name = n.output[0]
        else:
            nodes.append(n)
    for i, t in enumerate(g.initializer):
        if t.data_type == TensorProto.FLOAT and t.name not in float_only:
            g.initializer[i].CopyFrom(_bf16_tensor(t, bf16))
    for n in nodes:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.FLOAT and \
                    n.output[0] not in float_only:
                a.t.CopyFrom(_bf16_tensor(a.t, bf16))
            if bf16 and n.op_type == "Cast" and a.name == "to" and a.i == TensorProto.FLOAT:
                a.i = TensorProto.BFLOAT16
    casts = []
    if bf16:
        for v in (*g.input, *g.output):
            if v.type.tensor_type.elem_type != TensorProto.FLOAT:
                continue
            if v.name in F32_INPUTS:
                for n in nodes:
                    n.input[:] = [f"{v.name}_bf16" if x == v.name else x for x in n.input]
                casts.append(helper.make_node("Cast", [v.name], [f"{v.name}_bf16"], to=TensorProto.BFLOAT16))
            else:
                v.type.tensor_type.elem_type = TensorProto.BFLOAT16
    del g.node[:]
    g.node.extend(casts + nodes)
    return m


def save_graph(model: onnx.ModelProto, path: Path, external: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location="backbone.onnx_data")


def make_download(root: Path, graphs=tuple(BFL)) -> Path:
    for g in graphs:
        save_graph(bfl_graph(onnx.load(str(TINY / f"{g}.onnx")), True), root / BFL[g] / "model.onnx", g in EXTERNAL)
    (root / "transformer.opt" / "fp8").mkdir(parents=True)  # ModelOpt folders: TensorRT only, skipped
    (root / "t5-fp8.opt").mkdir()
    return root


@pytest.fixture(scope="module")
def download(tmp_path_factory) -> Path:
    return make_download(tmp_path_factory.mktemp("bfl") / "FLUX.1-schnell-onnx")


def run_convert(*args) -> tuple[int, str, str]:
    """convert.main in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = convert.main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def converted(download, tmp_path_factory):
    """precision -> its converted folder, each made once."""
    made = {}

    def get(precision: str) -> Path:
        if precision not in made:
            out = tmp_path_factory.mktemp("out") / f"schnell-{precision}"
            rc, _, err = run_convert(download, out, "--precision", precision)
            assert rc == 0, err
            made[precision] = out
        return made[precision]

    return get


# ---------------------------------------------------------------- running graphs

def feeds(graph: str) -> dict:
    rng = np.random.default_rng(0)
    rnd = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    if graph == "clip":
        ids = rng.integers(0, 49406, (B, 77)).astype(np.int32)
        ids[0, 6:], ids[1, 9:] = 49407, 49407
        return {"input_ids": ids}
    if graph == "t5":
        return {"input_ids": rng.integers(0, 32100, (B, L)).astype(np.int32)}
    if graph == "transformer":
        h, w = H // 16, W // 16
        img_ids = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), -1).reshape(-1, 2)
        return {"hidden_states": rnd(B, h * w, 64), "encoder_hidden_states": rnd(B, L, 16),
                "pooled_projections": rnd(B, 8), "timestep": np.array([0.25, 0.75], np.float32),
                "img_ids": np.concatenate([np.zeros((h * w, 1)), img_ids], 1).astype(np.float32),
                "txt_ids": np.zeros((L, 3), np.float32)}
    if graph == "vae_decoder":
        return {"latent": rnd(B, 16, H // 8, W // 8)}
    return {"images": np.tanh(rnd(B, 3, H, W))}


def run(model, graph: str) -> list[np.ndarray]:
    """Outputs of a graph (a path or a proto) on the CPU provider, inputs cast to the types it declares."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    path = str(model) if isinstance(model, Path) else model.SerializeToString()
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    types = {i.name: i.type for i in s.get_inputs()}
    given = {k: v.astype(np.float16) if types[k] == "tensor(float16)" else v for k, v in feeds(graph).items()}
    return [np.asarray(o, np.float32) for o in s.run(None, given)]


def rel_err(got, want) -> float:
    """Relative L2 error over all outputs."""
    num = sum(float(np.sum((g.astype(np.float64) - w) ** 2)) for g, w in zip(got, want))
    return (num / sum(float(np.sum(np.square(w, dtype=np.float64))) for w in want)) ** 0.5


@pytest.fixture(scope="module")
def references():
    """graph -> (outputs of the fp32 tiny graph, outputs of its bf16-rounded twin)."""
    return {g: (run(TINY / f"{g}.onnx", g), run(bfl_graph(onnx.load(str(TINY / f"{g}.onnx")), False), g))
            for g in BFL}


def out_graph(folder: Path, graph: str, precision: str) -> Path:
    rel = f"transformer.opt/{precision}" if graph == "transformer" else BFL[graph]
    return folder / rel / "model.onnx"


def ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


def bf16_anywhere(path: Path) -> list[str]:
    """Everything in a graph still typed bf16 (values, initializers, attribute tensors, element-type attributes)."""
    g = onnx.load(str(path), load_external_data=False).graph
    found = [v.name for v in (*g.input, *g.output, *g.value_info) if v.type.tensor_type.elem_type == TensorProto.BFLOAT16]
    found += [t.name for t in g.initializer if t.data_type == TensorProto.BFLOAT16]
    for n in g.node:
        for a in n.attribute:
            if (a.type == onnx.AttributeProto.TENSOR and a.t.data_type == TensorProto.BFLOAT16) or \
                    (a.type == onnx.AttributeProto.INT and a.name in ("to", "dtype") and a.i == TensorProto.BFLOAT16):
                found.append(n.name)
    return found


def declared(path: Path) -> dict[str, int]:
    g = onnx.load(str(path), load_external_data=False).graph
    return {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output)}


# ---------------------------------------------------------------- precisions

@pytest.mark.parametrize("graph", list(BFL))
def test_fp32_is_the_same_math_as_the_bf16_weights(converted, references, graph):
    path = out_graph(converted("fp32"), graph, "fp32")
    assert bf16_anywhere(path) == []
    got = run(path, graph)
    original, rounded = references[graph]
    assert rel_err(got, rounded) <= 1e-5  # the same graph and values: only kernel order may differ
    # every weight and constant rounded once to bf16 (relative error <= 2^-9 each); a few layers deep that stays
    # within a few bf16 epsilons of the fp32 model
    assert rel_err(got, original) <= 4 * BF16_EPS


@pytest.mark.parametrize("graph", ["clip", "transformer", "vae_decoder", "vae_encoder"])
def test_fp16_runs_on_cpu_within_fp16_rounding(download, converted, references, graph):
    path = out_graph(converted("fp16"), graph, "fp16")
    assert bf16_anywhere(path) == []
    types = declared(path)
    assert TensorProto.FLOAT16 in types.values()
    assert {types[n] for n in F32_INPUTS & set(types)} <= {TensorProto.FLOAT}  # BFL's fp32 inputs stay fp32
    # activations rounded to fp16 (relative 2^-12 each) at every node outside the islands, tens of nodes deep (the
    # VAE decoder's chain of convolutions is the longest): within a few fp16 epsilons of the same fp32 math
    assert rel_err(run(path, graph), references[graph][1]) <= 8 * FP16_EPS
    record = json.loads((converted("fp16") / "fluxrt-convert.json").read_text())
    islands = record["graphs"]["vae" if graph == "vae_decoder" else graph]["islands"]
    source = onnx.load(str(download / BFL[graph] / "model.onnx"), load_external_data=False).graph
    assert islands["nodes"] == len(convert._island_candidates(source, islands))  # every one typed and cast
    assert islands["nodes"] > 0 or graph == "clip"


def test_fp16_islands_stay_fp32_between_casts(converted):
    """Chains of island ops (Pow -> ReduceMean -> Sqrt of an RMSNorm) run in fp32 without a round trip to fp16."""
    g = onnx.load(str(out_graph(converted("fp16"), "transformer", "fp16")), load_external_data=False).graph
    island_ops = set(convert.FP16_ISLANDS["transformer"]["op_types"])
    producer = {o: n for n in g.node for o in n.output}
    chained = [n for n in g.node if n.op_type in island_ops
               and any(producer.get(x) is not None and producer[x].op_type in island_ops for x in n.input)]
    assert chained, "the tiny transformer's RMSNorms chain island ops"
    casts = [n for n in g.node if n.op_type == "Cast"]
    assert len({n.output[0] for n in casts}) == len(casts)  # one Cast per value and direction


def test_fp16_keeps_t5_fp32(converted, references):
    path = out_graph(converted("fp16"), "t5", "fp16")
    assert set(declared(path).values()) <= {TensorProto.FLOAT, TensorProto.INT32}
    assert rel_err(run(path, "t5"), references["t5"][1]) <= 1e-5
    record = json.loads((converted("fp16") / "fluxrt-convert.json").read_text())["graphs"]["t5"]
    assert record["precision"] == "fp32" and record["islands"]["whole_graph"]


def _onnxruntime_quantized(converted, tmp_path, method: str) -> tuple[onnx.ModelProto, list[str]]:
    """The fp32 conversion's transformer quantized by onnxruntime's own quantizers, as the export step does."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from export.quantize import signed_permutation_matmuls

    logging.disable(logging.INFO)
    fp32 = onnx.load(str(out_graph(converted("fp32"), "transformer", "fp32")))
    keep = signed_permutation_matmuls(fp32)
    if method == "int8":
        quantize_dynamic(fp32, str(tmp_path / "ort.onnx"), op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True}, nodes_to_exclude=keep)
        return onnx.load(str(tmp_path / "ort.onnx")), keep
    q = MatMulNBitsQuantizer(fp32, bits=4, block_size=32, is_symmetric=True, accuracy_level=4,
                             op_types_to_quantize=("MatMul",), nodes_to_exclude=keep)
    q.process()
    return q.model.model, keep


def _tensors(model: onnx.ModelProto) -> dict[str, bytes]:
    return {t.name: (t.data_type, tuple(t.dims), numpy_helper.to_array(t).tobytes()) for t in model.graph.initializer}


# quantization noise per MatMul, relative to the output's rms: int8 rounds weights to 1/254 of a column's peak and
# activations to 1/255 of their range (~1 % rms each); int4 to 1/16 of a 32-value block's peak (~9 %). A few
# MatMuls deep that stays below these bounds.
QUANT_TOL = {"int8": 4 * 2.0 ** -7, "int4": 2.0 ** -2}


@pytest.mark.parametrize("method,op", [("int8", "MatMulInteger"), ("int4", "MatMulNBits")])
def test_quantized_transformer_is_what_onnxruntime_writes(converted, references, tmp_path, method, op):
    path = out_graph(converted(method), "transformer", method)
    mine = onnx.load(str(path))
    theirs, permutations = _onnxruntime_quantized(converted, tmp_path, method)
    assert sorted(n.op_type for n in mine.graph.node) == sorted(n.op_type for n in theirs.graph.node)
    assert {n.name: n for n in mine.graph.node} == {n.name: n for n in theirs.graph.node}
    assert _tensors(mine) == _tensors(theirs)  # bit for bit: scales, zero points, packed weights
    record = json.loads((converted(method) / "fluxrt-convert.json").read_text())["graphs"]["transformer"]
    quantized = [n for n in mine.graph.node if n.op_type == op]
    assert record["quantization"]["quantized_nodes"] == len(quantized) > 0
    assert len(permutations) == record["quantization"]["kept_float"] == 4  # RoPE's pair swaps stay float MatMuls
    assert {n.name for n in mine.graph.node if n.op_type == "MatMul"} >= set(permutations)
    got = run(path, "transformer")
    assert rel_err(got, run(theirs, "transformer")) <= 1e-6
    assert rel_err(got, references["transformer"][1]) <= QUANT_TOL[method]
    for graph in ("clip", "t5", "vae_decoder"):  # the other graphs are the fp32 conversion's
        assert (out_graph(converted(method), graph, method).read_bytes()
                == out_graph(converted("fp32"), graph, "fp32").read_bytes())


@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("shape", [(64, 48), (72, 20), (33, 7)])
def test_quantizers_match_onnxruntime_bit_for_bit(tmp_path, method, shape):
    """Random weights with odd K (int4 pads to 32), exact halves between steps and an all-zero column."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.disable(logging.INFO)
    rng = np.random.default_rng(sum(shape))
    w = rng.standard_normal(shape).astype(np.float32)
    w[::5, 0] = np.float32(0.5) * np.round(w[::5, 0] * 4) / 4  # multiples of 1/8: ties of the rounding
    w[:, -1] = 0
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], "mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, shape[0]])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, shape[1]])],
                          [numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    if method == "int8":
        quantize_dynamic(model, str(tmp_path / "q.onnx"), per_channel=True, weight_type=QuantType.QInt8,
                         extra_options={"MatMulConstBOnly": True})
        theirs = onnx.load(str(tmp_path / "q.onnx"))
        mine = convert._quantize_int8(w, "w")
    else:
        q = MatMulNBitsQuantizer(model, bits=4, block_size=32, is_symmetric=True, accuracy_level=4)
        q.process()
        theirs = q.model.model
        mine = convert._quantize_int4(w, "w")
    want = {k: v for k, v in _tensors(theirs).items() if k != "w"}
    got = {name: (dtype, a.shape, a.tobytes()) for name, dtype, a in mine}
    if method == "int4" and shape[0] % 2:  # past K the kernel leaves a stale nibble, never read; ours are zero
        unpack = lambda b: np.stack([b & 15, b >> 4], -1).reshape(shape[1], -1)  # noqa: E731
        ours, kernel = (unpack(np.frombuffer(d[2], np.uint8)) for d in (got.pop("w_Q4"), want.pop("w_Q4")))
        assert np.array_equal(ours[:, :shape[0]], kernel[:, :shape[0]]) and not ours[:, shape[0]:].any()
    assert got == want


def test_fp16_saturates_finite_values_and_keeps_inf():
    x = np.array([1e5, -1e6, np.inf, -np.inf, 1.0, 65519.0], np.float32)
    h = convert._from_f32(x, TensorProto.FLOAT16)
    assert h.tolist() == [65504.0, -65504.0, np.inf, -np.inf, 1.0, 65504.0]


def test_bf16_in_typed_fields_reads_like_raw_data():
    t = helper.make_tensor("t", TensorProto.BFLOAT16, [3], [1.5, -2.0, 3.140625])  # bits in int32_data
    assert not t.HasField("raw_data")
    assert convert._to_f32(convert._inline_bytes(t), TensorProto.BFLOAT16).tolist() == [1.5, -2.0, 3.140625]


# ---------------------------------------------------------------- the folder

def test_layout_record_and_includes(download, tmp_path):
    out = tmp_path / "out"
    tok = TINY / "tokenizer"
    rc, _, err = run_convert(download, out, "--precision", "int8", "--include", f"tokenizer={tok}",
                             "--include", f"tokenizer_2={TINY / 'tokenizer_2'}")
    assert rc == 0, err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.onnx*")) == [
        "clip.opt/model.onnx", "t5.opt/backbone.onnx_data", "t5.opt/model.onnx",
        "transformer.opt/int8/backbone.onnx_data", "transformer.opt/int8/model.onnx", "vae.opt/model.onnx",
        "vae_encoder.opt/model.onnx"]
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == sorted(p.name for p in tok.iterdir())
    assert (out / "tokenizer_2" / "tokenizer.json").read_bytes() == (TINY / "tokenizer_2" / "tokenizer.json").read_bytes()
    record = json.loads((out / "fluxrt-convert.json").read_text())
    assert record["precision"] == "int8" and record["version"] == convert.VERSION
    assert record["skipped"] == ["transformer.opt/fp8", "t5-fp8.opt"]
    assert record["included"] == {"tokenizer": str(tok.resolve()), "tokenizer_2": str((TINY / "tokenizer_2").resolve())}
    graphs = record["graphs"]
    assert list(graphs) == ["clip", "t5", "transformer", "vae", "vae_encoder"]
    assert graphs["transformer"]["file"] == "transformer.opt/int8/model.onnx"
    assert graphs["t5"]["external_data"] == "backbone.onnx_data" and graphs["clip"]["external_data"] is None
    for g in graphs.values():
        assert g["bytes"] == sum(p.stat().st_size for p in (out / g["file"]).parent.iterdir() if p.is_file())
    # the data file holds every weight at an aligned offset
    data = out / "transformer.opt/int8/backbone.onnx_data"
    for t in onnx.load(str(out / graphs["transformer"]["file"]), load_external_data=False).graph.initializer:
        if convert._is_external(t):
            _, offset, length = convert._external_ref(t)
            assert offset % convert.ALIGN == 0 and offset + length <= data.stat().st_size


def test_progress_json(download, tmp_path):
    rc, out, err = run_convert(download, tmp_path / "out", "--progress", "json")
    assert rc == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert events[0]["event"] == "start" and events[-1]["event"] == "done"
    total = events[0]["total_bytes"]
    assert events[0]["graphs"] == ["clip", "t5", "transformer", "vae", "vae_encoder"]
    assert total == sum(convert._nbytes(t) for g in BFL for t in
                        onnx.load(str(download / BFL[g] / "model.onnx"), load_external_data=False).graph.initializer)
    done = [e["done_bytes"] for e in events if e["event"] == "progress"]
    assert done == sorted(done) and done[-1] == total
    assert len(done) <= 100 + len(BFL)  # at most every 1 %, plus each graph's end
    assert [e["graph"] for e in events if e["event"] == "graph"] == events[0]["graphs"]
    assert all(e["bytes"] > 0 and e["seconds"] >= 0 for e in events if e["event"] == "graph")


def small_download(tmp_path: Path) -> Path:
    return make_download(tmp_path / "dl", ("t5", "transformer"))


def test_truncated_data_file_is_named_and_nothing_is_left(tmp_path):
    dl = small_download(tmp_path)
    data = dl / "transformer.opt/bf16/backbone.onnx_data"
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size - 100)
    out = tmp_path / "out"
    rc, _, err = run_convert(dl, out)
    assert rc == 2
    assert err.startswith("error: incomplete download: ") and str(data) in err and str(size - 100) in err
    assert err.count("\n") == 1 and "re-download" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dl"]  # no OUT, no staging folder


def test_lfs_pointer_is_named(tmp_path):
    dl = small_download(tmp_path)
    pointer = dl / "t5.opt/backbone.onnx_data"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 2135411\n")
    rc, _, err = run_convert(dl, tmp_path / "out")
    assert rc == 2 and f"error: {pointer} is a Git LFS pointer" in err and "git lfs pull" in err
    assert not (tmp_path / "out").exists()


def test_failure_while_converting_keeps_the_old_out(tmp_path, monkeypatch):
    dl = small_download(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    real = convert.convert_graph

    def fail_at_transformer(job, *a):
        if job.name == "transformer":
            raise convert.UserError("disk trouble")
        return real(job, *a)

    monkeypatch.setattr(convert, "convert_graph", fail_at_transformer)
    rc, _, err = run_convert(dl, out, "--overwrite")
    assert rc == 2 and err.endswith("\nerror: disk trouble\n")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dl", "out"]


def test_existing_out_needs_overwrite(tmp_path):
    dl = small_download(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    rc, _, err = run_convert(dl, out)
    assert rc == 2 and err == f"error: {out} already exists; choose another folder or pass --overwrite\n"
    rc, _, err = run_convert(dl, out, "--overwrite")
    assert rc == 0, err
    assert not (out / "old.txt").exists() and (out / "transformer.opt/fp32/model.onnx").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dl", "out"]  # the old OUT is gone too


@pytest.mark.parametrize("case", ["out_is_model", "out_inside_model", "model_inside_out", "no_transformer",
                                  "bad_include", "bad_precision"])
def test_user_errors(tmp_path, case):
    dl = small_download(tmp_path)
    args = {"out_is_model": [dl, dl], "out_inside_model": [dl, dl / "converted"],
            "model_inside_out": [dl, tmp_path, "--overwrite"], "no_transformer": [dl / "t5.opt", tmp_path / "o"],
            "bad_include": [dl, tmp_path / "o", "--include", "tokenizer"],
            "bad_precision": [dl, tmp_path / "o", "--precision", "bf16"]}[case]
    rc, out, err = run_convert(*args)
    want = {"out_is_model": "the model folder or inside it", "out_inside_model": "the model folder or inside it",
            "model_inside_out": "--overwrite would delete it", "no_transformer": "no transformer.opt/bf16/model.onnx",
            "bad_include": "expected NAME=DIR", "bad_precision": "invalid choice"}[case]
    assert rc == 2 and err.startswith("error: ") and want in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dl"]


def test_standalone_script_needs_only_onnx_and_numpy(download, converted, tmp_path):
    """What the fluxrt binary runs: `python -c SOURCE ...` from anywhere, with no torch and no onnxruntime."""
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for name in ("torch", "onnxruntime", "export"):
        (blocked / f"{name}.py").write_text(f"raise ImportError('{name} is not for the converter')\n")
    source = (REPO / "export" / "convert.py").read_text()
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(blocked)}
    p = subprocess.run([sys.executable, "-c", source, str(download), str(out), "--precision", "fp32", "--progress",
                        "json"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout.splitlines()[-1])["event"] == "done"
    for graph in BFL:  # what the in-process conversion wrote, byte for byte
        assert out_graph(out, graph, "fp32").read_bytes() == out_graph(converted("fp32"), graph, "fp32").read_bytes()
    p = subprocess.run([sys.executable, "-c", source, str(download), str(out)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "already exists" in p.stderr


def test_python_m_export_convert(download, tmp_path):
    p = subprocess.run([sys.executable, "-m", "export", "convert", str(download), str(tmp_path / "out"), "--precision",
                        "fp16"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "out/transformer.opt/fp16/model.onnx").is_file() and "done in" in p.stderr
    p = subprocess.run([sys.executable, "-m", "export", "convert", str(tmp_path / "missing"), str(tmp_path / "o")],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "is not a folder" in p.stderr


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads the peak resident size from /proc")
def test_weights_stream_one_tensor_at_a_time(tmp_path):
    """The converter's memory grows by about one tensor, not by the model: 12 weights of 16 MiB (fp32) each, measured
    as the peak resident size of a fresh process (so protobuf's own buffers count too)."""
    n, count = 1 << 22, 12
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal(n, np.float32).astype(ml_dtypes.bfloat16) for _ in range(count)]
    inits = [helper.make_tensor(f"w{i}", TensorProto.BFLOAT16, [n], w.view(np.uint16).tobytes(), raw=True)
             for i, w in enumerate(weights)]
    g = helper.make_graph([helper.make_node("Sum", ["x", *(t.name for t in inits)], ["y"])], "big",
                          [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [n])],
                          [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [n])], inits)
    src = tmp_path / "dl" / "transformer.opt/bf16/model.onnx"
    save_graph(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), src, True)
    del inits, g
    model = onnx.load(str(src), load_external_data=False)
    for t in model.graph.initializer:  # offset 0 and every length left for the reader to work out
        keep = [e for e in t.external_data if e.key == "location" or (e.key == "offset" and e.value != "0")]
        del t.external_data[:]
        t.external_data.extend(keep)
    onnx.save_model(model, str(src))
    # VmHWM: this process's peak resident size (getrusage's would include the parent's from before exec)
    code = ("import re, sys\n"
            f"sys.path.insert(0, {str(REPO)!r})\n"
            "from export import convert\n"
            "rss = lambda: int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read())[1]) * 1024\n"
            "before = rss()\n"
            f"rc = convert.main([{str(tmp_path / 'dl')!r}, {str(tmp_path / 'out')!r}])\n"
            "print(rc, rss() - before)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    rc, grown = map(int, p.stdout.split())
    assert rc == 0, p.stderr
    # reading one tensor (8 MiB bf16) and its fp32 (16 MiB): well under 4 tensors, against 192 MiB of fp32 weights
    assert grown < 4 * 4 * n, f"grew {grown / 2**20:.0f} MiB converting {count} weights of {4 * n / 2**20:.0f} MiB"
    out = onnx.load(str(tmp_path / "out/transformer.opt/fp32/model.onnx"))
    for w, t in zip(weights, out.graph.initializer):
        assert t.data_type == TensorProto.FLOAT
        assert np.array_equal(numpy_helper.to_array(t), w.astype(np.float32))  # bf16 -> fp32 is exact
