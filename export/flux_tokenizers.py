"""Real FLUX.1 tokenizers, built offline, and the golden cases the Rust side is tested against.

FLUX.1 tokenizes a prompt twice: with CLIP-L's byte-level BPE (openai/clip-vit-large-patch14, 77 tokens,
``tokenizer/``) and with T5 v1.1's SentencePiece Unigram model (google/t5-v1_1-xxl, 256 or 512 tokens,
``tokenizer_2/``). The Hugging Face hub is not reachable from the export machines, so the sources come from PyPI:

* CLIP: ``bpe_simple_vocab_16e6.txt.gz`` ships inside the ``open-clip-torch`` wheel (fallback: the
  ``clip-anytorch`` wheel). vocab.json (49408 entries) and merges.txt (48894 merges, byte-identical to the
  hub's) are rebuilt from it exactly the way OpenAI's ``SimpleTokenizer`` builds its tables.
* T5: the ``stable-diffusion-cpp-python`` sdist embeds the Hugging Face T5 tokenizer.json (Unigram, 32100 pieces)
  as a C byte array in ``vendor/stable-diffusion.cpp/src/tokenizers/vocab/clip_t5.hpp``.

Every tokenizer.json written here is the *transformers 5* backend tokenizer (``tok.backend_tokenizer``) with its
padding and truncation switched off, so the Rust ``tokenizers`` crate runs the same normalizer / pre-tokenizer /
model pipeline that diffusers' FluxPipeline runs. That matters for T5: transformers 5 rebuilds the pre-tokenizer as
WhitespaceSplit + Metaspace, and the tokenizer.json found on the hub (and in the sdist) lacks the WhitespaceSplit,
which makes raw ``tokenizers`` emit an extra "▁" (id 3) before ``</s>`` for prompts that end in whitespace.

Nothing here needs a network connection except :func:`fetch_sources` (PyPI only), and its results are cached.
All outputs are deterministic: same sources + same transformers version -> same bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Any

# --------------------------------------------------------------------------------------------------------------
# Pinned sources
# --------------------------------------------------------------------------------------------------------------

#: Wheels that ship OpenAI's CLIP BPE table, tried in order: (pip requirement, path of the file inside the wheel).
CLIP_BPE_SOURCES: tuple[tuple[str, str], ...] = (
    ("open-clip-torch==3.3.0", "open_clip/bpe_simple_vocab_16e6.txt.gz"),
    ("clip-anytorch==2.6.0", "clip/bpe_simple_vocab_16e6.txt.gz"),
)
CLIP_BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
#: SHA-256 of the *decompressed* bpe_simple_vocab_16e6.txt (identical in all the wheels above).
CLIP_BPE_SHA256 = "67603cfda2e032ad77b5f8808af37789d590db664b26df8705d2bf8b3c553fc8"
#: SHA-256 of the merges.txt rebuilt from it ("#version: 0.2" header + 48894 merges), as on the hub.
CLIP_MERGES_SHA256 = "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a"

#: The sdist that embeds T5 v1.1's tokenizer.json. Only ever fetched as an sdist of THIS package
#: (``--no-binary <name>``); ``--no-binary :all:`` would try to build cmake from source and hang.
T5_SDIST_NAME = "stable-diffusion-cpp-python"
T5_SDIST_REQUIREMENT = "stable-diffusion-cpp-python==0.4.7"
#: Where the byte array lives inside the sdist (below the top-level ``<name>-<version>/`` folder).
T5_HEADER_PATH = "vendor/stable-diffusion.cpp/src/tokenizers/vocab/clip_t5.hpp"
#: SHA-256 of the tokenizer.json recovered from the array.
T5_JSON_SHA256 = "fe2ebbbbde2985be723e0ce18217853e4020c5e9d35bd07be2c27ab9d3ead57a"

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512
CLIP_VOCAB_SIZE = 49408
T5_VOCAB_SIZE = 32100

PIP_TIMEOUT_S = 600  # whole `pip download` subprocess (the sdist is ~20 MB and pip prepares its metadata)
PIP_NETWORK_TIMEOUT_S = 30  # per socket operation, passed to pip as --timeout

_SOURCES_RECORD = "SOURCES.json"


def default_cache_dir() -> Path:
    """Where :func:`fetch_sources` keeps the files when no folder is given: ``$FLUXRT_CACHE/tokenizer-sources``
    (``~/.cache/fluxrt/tokenizer-sources`` by default)."""
    root = os.environ.get("FLUXRT_CACHE") or (Path.home() / ".cache" / "fluxrt")
    return Path(root) / "tokenizer-sources"


# --------------------------------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pip_download(requirement: str, dest: Path, extra: list[str]) -> Path:
    """``pip download --no-deps`` one pinned requirement into ``dest``; returns the downloaded archive."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--no-input",
        "--timeout", str(PIP_NETWORK_TIMEOUT_S), "--retries", "2", "-d", str(dest), *extra, requirement,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(
            f"`pip download {requirement}` did not finish within {PIP_TIMEOUT_S} s. Is PyPI reachable "
            "(or PIP_INDEX_URL set to a reachable mirror)?"
        ) from e
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
        raise RuntimeError(
            f"`pip download {requirement}` failed (exit {proc.returncode}). The tokenizer sources come from PyPI; "
            f"check that PyPI (or the mirror in PIP_INDEX_URL) is reachable.\n{tail}"
        )
    name = requirement.split("==")[0].lower().replace("-", "_")
    found = [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(name)]
    if not found:
        raise RuntimeError(f"`pip download {requirement}` reported success but left no archive in {dest}")
    return sorted(found)[0]


def _fetch_clip_bpe(target: Path, work: Path) -> str:
    """Download a wheel from :data:`CLIP_BPE_SOURCES`, extract only the BPE file to ``target``; returns provenance."""
    errors = []
    for requirement, member in CLIP_BPE_SOURCES:
        try:
            wheel = _pip_download(requirement, work / "clip", ["--only-binary", ":all:"])
            with zipfile.ZipFile(wheel) as zf:
                data = zf.read(member)
            if _sha256(gzip.decompress(data)) != CLIP_BPE_SHA256:
                raise RuntimeError(f"{member} in {wheel.name} is not the expected CLIP BPE table (SHA-256 differs)")
            tmp = target.with_suffix(".part")
            tmp.write_bytes(data)
            tmp.replace(target)
            return f"{requirement} (wheel {wheel.name}): {member}"
        except (RuntimeError, KeyError, OSError, zipfile.BadZipFile) as e:
            errors.append(f"{requirement}: {e}")
    raise RuntimeError("could not obtain the CLIP BPE table from PyPI:\n  " + "\n  ".join(errors)
                       + f"\nAlternatively copy {CLIP_BPE_FILENAME} out of one of those wheels to {target}.")


_ARRAY_RE = re.compile(r"unsigned\s+char\s+(\w+)\s*\[\s*\w*\s*\]\s*=\s*\{")


def extract_c_byte_array(source: str, name: str | None = None, name_pattern: str = r"(?<!um)t5\w*json") -> bytes:
    """Recover the bytes of an ``unsigned char NAME[] = { 0x.., .. };`` array from C/C++ source text.

    ``name`` selects the array exactly; otherwise the first array whose name matches ``name_pattern``
    (default: a T5 tokenizer JSON, not the UMT5 one) is taken. Hex, decimal and octal literals are accepted.
    """
    arrays = [(m.group(1), m.end()) for m in _ARRAY_RE.finditer(source)]
    if name is not None:
        picked = [a for a in arrays if a[0] == name]
    else:
        picked = [a for a in arrays if re.search(name_pattern, a[0])]
    if not picked:
        raise RuntimeError(
            f"no byte array {'named ' + name if name else 'matching /' + name_pattern + '/'} found; "
            f"arrays present: {[a[0] for a in arrays]}"
        )
    start = picked[0][1]
    end = source.index("}", start)
    body = re.sub(r"/\*.*?\*/|//[^\n]*", "", source[start:end], flags=re.S)
    literals = [t for t in (x.strip() for x in body.split(",")) if t]
    return bytes(int(t, 16) if t[:2] in ("0x", "0X") else int(t, 8) if t.startswith("0") and t != "0" else int(t)
                 for t in literals)


def _fetch_t5_json(target: Path, work: Path) -> str:
    """Download the stable-diffusion-cpp-python sdist and recover T5's tokenizer.json; returns provenance."""
    sdist = _pip_download(T5_SDIST_REQUIREMENT, work / "t5", ["--no-binary", T5_SDIST_NAME])
    with tarfile.open(sdist) as tf:
        members = [m for m in tf.getmembers() if m.isfile() and m.name.endswith("/" + T5_HEADER_PATH)]
        if not members:  # the layout moved: look at every vocab header
            members = [m for m in tf.getmembers()
                       if m.isfile() and "/tokenizers/" in m.name and m.name.endswith((".hpp", ".h"))
                       and "umt5" not in m.name.rsplit("/", 1)[-1]]
        errors = []
        for m in members:
            text = tf.extractfile(m).read().decode("utf-8", errors="replace")
            if "unsigned char" not in text:
                continue
            try:
                data = extract_c_byte_array(text)
            except RuntimeError as e:
                errors.append(f"{m.name}: {e}")
                continue
            digest = _sha256(data)
            if digest != T5_JSON_SHA256:
                # A different sdist version could carry a re-serialized file: accept it if it is the T5 Unigram.
                obj = json.loads(data)
                if obj.get("model", {}).get("type") != "Unigram" or len(obj["model"]["vocab"]) != T5_VOCAB_SIZE:
                    errors.append(f"{m.name}: array is not a T5 Unigram tokenizer.json")
                    continue
            tmp = target.with_suffix(".part")
            tmp.write_bytes(data)
            tmp.replace(target)
            inner = m.name.split("/", 1)[1] if "/" in m.name else m.name
            return f"{T5_SDIST_REQUIREMENT} (sdist {sdist.name}): {inner}"
    raise RuntimeError(f"no T5 tokenizer.json byte array found in {sdist.name}: {errors or 'no vocab headers'}")


def fetch_sources(cache_dir: Path | None = None) -> dict:
    """Obtain the real CLIP-L and T5 v1.1 tokenizer sources from PyPI (never the Hugging Face hub).

    Files land in ``cache_dir`` (default :func:`default_cache_dir`) and are reused when present and intact:

    * ``clip/bpe_simple_vocab_16e6.txt.gz`` extracted from a pinned wheel in :data:`CLIP_BPE_SOURCES`
      (``pip download --no-deps --only-binary :all:``; the package is never installed);
    * ``t5/tokenizer.json`` recovered from the ``t5_tokenizer_json_str`` byte array of
      :data:`T5_HEADER_PATH` in the pinned :data:`T5_SDIST_REQUIREMENT` sdist.

    Returns ``{"clip_bpe": Path, "t5_tokenizer_json": Path, "provenance": {"clip_bpe": str, "t5_tokenizer_json": str}}``.
    Raises RuntimeError with the reason (PyPI unreachable, file missing from the package, checksum mismatch).
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    clip_bpe = cache_dir / "clip" / CLIP_BPE_FILENAME
    t5_json = cache_dir / "t5" / "tokenizer.json"
    record_path = cache_dir / _SOURCES_RECORD
    try:
        provenance = json.loads(record_path.read_text())
    except (OSError, ValueError):
        provenance = {}

    def intact_clip() -> bool:
        try:
            return _sha256(gzip.decompress(clip_bpe.read_bytes())) == CLIP_BPE_SHA256
        except (OSError, EOFError, gzip.BadGzipFile):
            return False

    def intact_t5() -> bool:
        try:
            obj = json.loads(t5_json.read_bytes())
            return obj["model"]["type"] == "Unigram" and len(obj["model"]["vocab"]) == T5_VOCAB_SIZE
        except (OSError, ValueError, KeyError, TypeError):
            return False

    need_clip, need_t5 = not intact_clip(), not intact_t5()
    if need_clip or need_t5:
        clip_bpe.parent.mkdir(parents=True, exist_ok=True)
        t5_json.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="download-", dir=cache_dir) as work:
            if need_clip:
                provenance["clip_bpe"] = _fetch_clip_bpe(clip_bpe, Path(work))
            if need_t5:
                try:
                    provenance["t5_tokenizer_json"] = _fetch_t5_json(t5_json, Path(work))
                except RuntimeError as e:
                    raise RuntimeError(f"{e}\nAlternatively put T5 v1.1's tokenizer.json (google/t5-v1_1-xxl) "
                                       f"at {t5_json}.") from e
        record_path.write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    provenance.setdefault("clip_bpe", f"{CLIP_BPE_SOURCES[0][0]}: {CLIP_BPE_SOURCES[0][1]}")
    provenance.setdefault("t5_tokenizer_json", f"{T5_SDIST_REQUIREMENT}: {T5_HEADER_PATH}")
    return {"clip_bpe": clip_bpe, "t5_tokenizer_json": t5_json, "provenance": provenance}


# --------------------------------------------------------------------------------------------------------------
# Building tokenizer folders
# --------------------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode table (same as OpenAI's ``clip.simple_tokenizer.bytes_to_unicode``)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def clip_vocab_and_merges(bpe_gz: Path) -> tuple[dict[str, int], str]:
    """Rebuild CLIP's vocab (49408 entries) and merges.txt text from ``bpe_simple_vocab_16e6.txt.gz``.

    Mirrors OpenAI's ``SimpleTokenizer.__init__``: merges are lines 1..48894 of the file; the vocab is the 256
    byte symbols, the same with ``</w>``, one entry per merge, then ``<|startoftext|>`` and ``<|endoftext|>``.
    The merges text gets the ``#version: 0.2`` header that the Hugging Face merges.txt carries.
    """
    lines = gzip.decompress(Path(bpe_gz).read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"rebuilt CLIP vocab has {len(vocab)} entries, expected {CLIP_VOCAB_SIZE}")
    merges_txt = "#version: 0.2\n" + "\n".join(merges) + "\n"
    if _sha256(merges_txt.encode("utf-8")) != CLIP_MERGES_SHA256:
        raise RuntimeError("rebuilt CLIP merges.txt differs from openai/clip-vit-large-patch14's")
    return vocab, merges_txt


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _added_token_dict(tok: Any) -> dict:
    return {
        "content": tok.content, "lstrip": tok.lstrip, "normalized": tok.normalized,
        "rstrip": tok.rstrip, "single_word": tok.single_word, "special": tok.special,
    }


def _clip_configs(max_length: int) -> tuple[dict, dict]:
    """tokenizer_config.json and special_tokens_map.json as in openai/clip-vit-large-patch14 (FLUX's tokenizer/)."""
    def special(content: str, normalized: bool) -> dict:
        return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}

    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            "49406": {**special("<|startoftext|>", True), "special": True},
            "49407": {**special("<|endoftext|>", False), "special": True},
        },
        "bos_token": "<|startoftext|>",
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": max_length,
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": "<|endoftext|>",
    }
    special_map = {
        "bos_token": special("<|startoftext|>", True),
        "eos_token": special("<|endoftext|>", False),
        "pad_token": "<|endoftext|>",
        "unk_token": special("<|endoftext|>", False),
    }
    return config, special_map


def _t5_configs(max_length: int, extra_ids: int = 100) -> tuple[dict, dict]:
    """tokenizer_config.json and special_tokens_map.json in the style of google/t5-v1_1-xxl (FLUX's tokenizer_2/)."""
    extra = [f"<extra_id_{i}>" for i in range(extra_ids)]
    config = {
        "additional_special_tokens": extra,
        "clean_up_tokenization_spaces": True,
        "eos_token": "</s>",
        "extra_ids": extra_ids,
        "legacy": True,
        "model_max_length": max_length,
        "pad_token": "<pad>",
        "sp_model_kwargs": {},
        "tokenizer_class": "T5Tokenizer",
        "unk_token": "<unk>",
    }
    special_map = {"additional_special_tokens": extra, "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    return config, special_map


def _load_hf_tokenizer(hf_dir: Path, kind: str):
    """Load a tokenizer folder with the class diffusers' FluxPipeline uses for it (transformers 5 backend)."""
    import transformers

    if kind == "clip":
        cls = transformers.CLIPTokenizer  # FluxPipeline.tokenizer
    elif kind == "t5":
        cls = transformers.T5TokenizerFast  # FluxPipeline.tokenizer_2
    else:
        raise ValueError(f"kind must be 'clip' or 't5', not {kind!r}")
    try:
        return cls.from_pretrained(str(hf_dir), local_files_only=True)
    except Exception as e:  # transformers raises many types here; keep the cause
        raise RuntimeError(
            f"transformers could not load the {kind} tokenizer in {hf_dir}: {e}. The folder needs tokenizer.json, "
            + ("or vocab.json + merges.txt" if kind == "clip" else "or spiece.model (needs the sentencepiece package)")
        ) from e


def _clean_backend_json(tok) -> str:
    """The backend tokenizer serialized without padding/truncation (the runtime pads and truncates itself)."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.no_padding()
    backend.no_truncation()
    return backend.to_str(pretty=True)


_MACHINE_SPECIFIC_CONFIG_KEYS = ("is_local", "local_files_only", "name_or_path", "_commit_hash", "cache_dir")


def export_tokenizer_json(hf_tokenizer_dir: Path, out_dir: Path, kind: str, max_length: int | None = None) -> dict:
    """Convert any checkpoint's tokenizer folder into the files the Rust runtime loads.

    ``hf_tokenizer_dir`` is a Hugging Face tokenizer folder (FLUX's ``tokenizer/`` for ``kind='clip'``,
    ``tokenizer_2/`` for ``kind='t5'``), with or without tokenizer.json (vocab.json + merges.txt, or spiece.model,
    are converted by transformers). It is loaded exactly as FluxPipeline loads it, and ``out_dir/tokenizer.json``
    is written from that tokenizer's transformers-5 backend, padding/truncation off, so the Rust ``tokenizers`` crate
    reproduces transformers' ids. tokenizer_config.json and special_tokens_map.json are copied from the source
    folder when it has them (with ``model_max_length`` set), otherwise written in the hub's style.
    ``out_dir`` may equal ``hf_tokenizer_dir``.

    ``max_length`` overrides the tokenizer's ``model_max_length`` (default: the folder's, else 77 / 512).
    Returns the manifest metadata: ``{"kind", "max_length", "pad_id", "bos_id" (CLIP only), "eos_id", "vocab_size"}``.
    """
    hf_tokenizer_dir, out_dir = Path(hf_tokenizer_dir), Path(out_dir)
    if not hf_tokenizer_dir.is_dir():
        raise RuntimeError(f"{kind} tokenizer folder {hf_tokenizer_dir} does not exist")
    tok = _load_hf_tokenizer(hf_tokenizer_dir, kind)
    default_len = CLIP_MAX_LENGTH if kind == "clip" else T5_MAX_LENGTH
    if max_length is None:
        mml = getattr(tok, "model_max_length", None)
        max_length = int(mml) if isinstance(mml, int) and 0 < mml < 100_000 else default_len

    meta: dict[str, Any] = {"kind": kind, "max_length": int(max_length)}
    if tok.pad_token_id is None or tok.eos_token_id is None:
        raise RuntimeError(f"the {kind} tokenizer in {hf_tokenizer_dir} has no pad or eos token")
    meta["pad_id"] = int(tok.pad_token_id)
    if kind == "clip":
        if tok.bos_token_id is None:
            raise RuntimeError(f"the CLIP tokenizer in {hf_tokenizer_dir} has no bos token")
        meta["bos_id"] = int(tok.bos_token_id)
    meta["eos_id"] = int(tok.eos_token_id)
    meta["vocab_size"] = int(len(tok))

    # A tokenizer of the wrong kind loads "successfully" with a garbage model: probe it on plain English.
    probe = "a photo of a cat"
    try:
        probe_ids = list(tok(probe, add_special_tokens=False).input_ids)
        round_trip = tok.backend_tokenizer.decode(probe_ids, skip_special_tokens=False)
    except Exception as e:  # the backend raises plain Exception (e.g. unk token missing from the vocab)
        raise RuntimeError(f"the tokenizer in {hf_tokenizer_dir} cannot encode {probe!r} as kind={kind!r}: {e}") from e
    if tok.unk_token_id in probe_ids or " ".join(round_trip.split()).lower() != probe:
        raise RuntimeError(f"the tokenizer in {hf_tokenizer_dir} encodes {probe!r} as {probe_ids} "
                           f"({round_trip!r}): wrong folder for kind={kind!r}?")

    # The post-processor must add exactly what the runtime expects: CLIP [bos] .. [eos], T5 .. [eos].
    empty = tok("").input_ids
    expected = [meta["bos_id"], meta["eos_id"]] if kind == "clip" else [meta["eos_id"]]
    if list(empty) != expected:
        raise RuntimeError(f"the {kind} tokenizer in {hf_tokenizer_dir} encodes '' as {list(empty)}, "
                           f"expected {expected}: not a {kind.upper()}-style tokenizer")

    backend_json = _clean_backend_json(tok)
    model_type = json.loads(backend_json).get("model", {}).get("type")
    want_type = "BPE" if kind == "clip" else "Unigram"
    if model_type != want_type:
        raise RuntimeError(f"the tokenizer in {hf_tokenizer_dir} is a {model_type} model; a {kind.upper()} "
                           f"tokenizer is {want_type}: wrong folder for kind={kind!r}?")
    if kind == "clip":
        config, special_map = _clip_configs(meta["max_length"])
    else:
        extra_ids = sum(1 for t in tok.added_tokens_decoder.values() if t.content.startswith("<extra_id_"))
        config, special_map = _t5_configs(meta["max_length"], extra_ids)
    src_config = hf_tokenizer_dir / "tokenizer_config.json"
    if src_config.is_file():
        config = json.loads(src_config.read_text(encoding="utf-8"))
        for key in _MACHINE_SPECIFIC_CONFIG_KEYS:  # written by save_pretrained, differ between machines
            config.pop(key, None)
        config["model_max_length"] = meta["max_length"]
    src_special = hf_tokenizer_dir / "special_tokens_map.json"
    if src_special.is_file():
        special_map = json.loads(src_special.read_text(encoding="utf-8"))

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(backend_json + "\n", encoding="utf-8")
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json", special_map)
    return meta


def build_clip_tokenizer(out_dir: Path, cache_dir: Path | None = None, sources: dict | None = None) -> dict:
    """Write the real CLIP-L tokenizer folder (as openai/clip-vit-large-patch14 / FLUX.1's ``tokenizer/``).

    Files: vocab.json (49408), merges.txt (byte-identical to the hub's), tokenizer_config.json
    (model_max_length 77), special_tokens_map.json and tokenizer.json (transformers-5 backend). Loadable by
    ``transformers.CLIPTokenizer.from_pretrained(out_dir)``. Sources come from :func:`fetch_sources` (pass
    ``sources`` to reuse a result). Returns the manifest metadata of :func:`export_tokenizer_json`.
    """
    out_dir = Path(out_dir)
    sources = sources or fetch_sources(cache_dir)
    vocab, merges_txt = clip_vocab_and_merges(sources["clip_bpe"])
    config, special_map = _clip_configs(CLIP_MAX_LENGTH)
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = out_dir / "tokenizer.json"  # would take precedence over vocab/merges when loading
    if stale.exists():
        stale.unlink()
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "merges.txt").write_bytes(merges_txt.encode("utf-8"))
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json", special_map)
    meta = export_tokenizer_json(out_dir, out_dir, "clip", CLIP_MAX_LENGTH)
    _check_ids(out_dir, "clip", {"a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407]})
    if (meta["pad_id"], meta["eos_id"], meta["bos_id"], meta["vocab_size"]) != (49407, 49407, 49406, CLIP_VOCAB_SIZE):
        raise RuntimeError(f"unexpected CLIP tokenizer metadata {meta}")
    return meta


def build_t5_tokenizer(out_dir: Path, cache_dir: Path | None = None, sources: dict | None = None) -> dict:
    """Write the real T5 v1.1 tokenizer folder (as google/t5-v1_1-xxl / FLUX.1's ``tokenizer_2/``).

    Files: tokenizer.json saved from the transformers-5 backend (WhitespaceSplit + Metaspace pre-tokenizer, so a
    trailing space adds no token), tokenizer_config.json (model_max_length 512) and special_tokens_map.json.
    Loadable by ``transformers.T5TokenizerFast.from_pretrained(out_dir)``. There is no spiece.model: no PyPI
    package ships it (the runtime reads one natively when a folder has no tokenizer.json; export/fixtures/spiece.py
    rebuilds one from this vocabulary for its tests). Returns the manifest metadata of :func:`export_tokenizer_json`.
    """
    out_dir = Path(out_dir)
    sources = sources or fetch_sources(cache_dir)
    config, special_map = _t5_configs(T5_MAX_LENGTH)
    with tempfile.TemporaryDirectory(prefix="t5-src-") as staging:
        staging = Path(staging)
        shutil.copyfile(sources["t5_tokenizer_json"], staging / "tokenizer.json")
        _write_json(staging / "tokenizer_config.json", config)
        _write_json(staging / "special_tokens_map.json", special_map)
        meta = export_tokenizer_json(staging, out_dir, "t5", T5_MAX_LENGTH)
    _check_ids(out_dir, "t5", {
        "a photo of a cat": [3, 9, 1202, 13, 3, 9, 1712, 1],
        "Hello world": [8774, 296, 1],
        "a photo of a cat ": [3, 9, 1202, 13, 3, 9, 1712, 1],
    })
    if (meta["pad_id"], meta["eos_id"], meta["vocab_size"]) != (0, 1, T5_VOCAB_SIZE):
        raise RuntimeError(f"unexpected T5 tokenizer metadata {meta}")
    return meta


def _check_ids(tok_dir: Path, kind: str, expected: dict[str, list[int]]) -> None:
    """Both transformers (reloading the folder) and raw tokenizer.json must give the known ids."""
    from tokenizers import Tokenizer

    tok = _load_hf_tokenizer(tok_dir, kind)
    raw = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    for prompt, ids in expected.items():
        got_hf = list(tok(prompt).input_ids)
        got_raw = raw.encode(prompt).ids
        if got_hf != ids or got_raw != ids:
            raise RuntimeError(f"{kind} tokenizer in {tok_dir}: {prompt!r} -> transformers {got_hf}, "
                               f"tokenizer.json {got_raw}, expected {ids}")


# --------------------------------------------------------------------------------------------------------------
# Golden cases for the Rust tokenizer
# --------------------------------------------------------------------------------------------------------------

_FILLER_WORDS = ("a", "red", "cat", "on", "the", "old", "blue", "car", "in", "rain", "at", "night")


def _prompt_with_clip_tokens(clip_tok, n_content: int) -> str:
    """A natural-ish prompt whose CLIP encoding has exactly ``n_content`` tokens between bos and eos."""
    words = [_FILLER_WORDS[i % len(_FILLER_WORDS)] for i in range(n_content)]
    prompt = " ".join(words)
    got = len(clip_tok(prompt).input_ids) - 2
    if got != n_content:
        raise RuntimeError(f"filler prompt has {got} CLIP tokens, wanted {n_content}")
    return prompt


def _prompt_with_t5_tokens(t5_tok, n_content: int) -> str:
    """A prompt whose T5 encoding has exactly ``n_content`` tokens before ``</s>``."""
    words = [_FILLER_WORDS[i % len(_FILLER_WORDS)] for i in range(n_content)]
    # "a" alone is two T5 pieces ("▁", "a"); use only single-piece words.
    words = [w if w != "a" else "an" for w in words]
    prompt = " ".join(words)
    got = len(t5_tok(prompt).input_ids) - 1
    if got != n_content:
        raise RuntimeError(f"filler prompt has {got} T5 tokens, wanted {n_content}")
    return prompt


def _long_prompt(n_chars: int) -> str:
    base = ("A highly detailed photograph of a lighthouse on a rocky coast at sunset, waves crashing, "
            "golden hour light, 35mm film, shallow depth of field, seagulls, dramatic clouds. ")
    text = (base * (n_chars // len(base) + 1))[:n_chars]
    return text


def golden_prompts(clip_tok, t5_tok, t5_max_length: int) -> list[tuple[str, str]]:
    """The (name, prompt) pairs recorded in the goldens: whitespace, unicode, casing, truncation edges."""
    return [
        ("plain", "a photo of a cat"),
        ("empty", ""),
        ("space_only", " "),
        ("whitespace_only", " \t\n  \r\n"),
        ("trailing_space", "a photo of a cat "),
        ("leading_space", "  a photo of a cat"),
        ("multiple_spaces", "a   photo  of     a cat"),
        ("newlines_tabs", "a photo\nof a\tcat\n\nin the rain\t"),
        ("punctuation", "Hello, world! (masterpiece:1.2), [best quality]; wow... 100% -- \"quoted\" & more?!"),
        ("numbers", "3 cats, 12 dogs and 2024 birds; 3.14159 pi; 1,000,000 stars; 4k 8K 1080p"),
        ("emoji", "a cat 🐱 with a 🎩 hat 👍🏽 and 🇫🇷 flag ❤️"),
        ("cjk", "一只猫坐在窗台上 東京の夜景 고양이 사진"),
        ("accents", "café naïve résumé Ångström Øresund Straße"),
        ("combining_marks", "cafe\u0301 nai\u0308ve e\u0301te\u0301 \u1e9b\u0323 ﬁne ﬀ ①②"),
        ("casing", "A PHOTO OF A CAT, Photo Of A Cat, pHoTo"),
        ("html", "<b>bold</b> &amp; <i>italic</i> <a href=\"x\">link</a> &lt;tag&gt; &nbsp;"),
        ("apostrophes", "don't can't it's we're they've I'm you'll he'd rock'n'roll ’curly’ quotes"),
        ("url", "see https://example.com/path?q=cat&size=1024#frag and www.flux.ai/a_b-c"),
        ("special_token_text", "a cat <|endoftext|> dog </s> <pad> <|startoftext|> <extra_id_0>"),
        ("control_and_zero_width", "a\u200bcat\u00a0photo\u3000wide\u2028line\ufeffbom\x07bell"),
        ("clip_limit_exact", _prompt_with_clip_tokens(clip_tok, CLIP_MAX_LENGTH - 2)),
        ("clip_limit_plus_one", _prompt_with_clip_tokens(clip_tok, CLIP_MAX_LENGTH - 1)),
        ("t5_limit_exact", _prompt_with_t5_tokens(t5_tok, t5_max_length - 1)),
        ("t5_limit_plus_one", _prompt_with_t5_tokens(t5_tok, t5_max_length)),
        ("long_10000_chars", _long_prompt(10_000)),
        ("mixed_script_long_words", "supercalifragilisticexpialidocious Donaudampfschifffahrtsgesellschaft "
                                    "pneumonoultramicroscopicsilicovolcanoconiosis ΑΒΓ абв"),
    ]


def tokenizer_cases(clip_dir: Path, t5_dir: Path, t5_max_length: int = T5_MAX_LENGTH) -> list[dict]:
    """Tokenize :func:`golden_prompts` exactly as diffusers' FluxPipeline does.

    CLIP: ``tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True)``
    (``_get_clip_prompt_embeds``); T5: the same with ``max_length=t5_max_length`` (``_get_t5_prompt_embeds``).
    The untruncated lengths (``tokenizer(prompt)`` incl. specials) give the number of tokens truncation drops.
    Each case: ``{"name", "prompt", "clip_ids", "clip_untruncated_len", "t5_ids", "t5_untruncated_len"}``.
    """
    clip_tok = _load_hf_tokenizer(Path(clip_dir), "clip")
    t5_tok = _load_hf_tokenizer(Path(t5_dir), "t5")
    clip_max = clip_tok.model_max_length  # FluxPipeline.tokenizer_max_length
    cases = []
    for name, prompt in golden_prompts(clip_tok, t5_tok, t5_max_length):
        clip = clip_tok(prompt, padding="max_length", max_length=clip_max, truncation=True,
                        return_overflowing_tokens=False, return_length=False, return_tensors="pt").input_ids
        t5 = t5_tok(prompt, padding="max_length", max_length=t5_max_length, truncation=True,
                    return_length=False, return_overflowing_tokens=False, return_tensors="pt").input_ids
        clip_full = clip_tok(prompt, padding="longest", return_tensors="pt").input_ids
        t5_full = t5_tok(prompt, padding="longest", return_tensors="pt").input_ids
        cases.append({
            "name": name,
            "prompt": prompt,
            "clip_ids": [int(x) for x in clip[0].tolist()],
            "clip_untruncated_len": int(clip_full.shape[-1]),
            "t5_ids": [int(x) for x in t5[0].tolist()],
            "t5_untruncated_len": int(t5_full.shape[-1]),
        })
    return cases


def _dump_compact(obj: Any, indent: int = 0) -> str:
    """JSON with objects indented but lists of numbers on one line (readable diffs, small files)."""
    pad, inner = "  " * indent, "  " * (indent + 1)
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [f"{inner}{json.dumps(k, ensure_ascii=False)}: {_dump_compact(v, indent + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and not all(isinstance(x, (int, float, str)) for x in obj):
        return "[\n" + ",\n".join(inner + _dump_compact(x, indent + 1) for x in obj) + "\n" + pad + "]"
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": ") if isinstance(obj, list) else None)


def write_tokenizer_goldens(clip_dir: Path, t5_dir: Path, out_json: Path, t5_max_length: int = T5_MAX_LENGTH) -> dict:
    """Write ``out_json`` (tests/goldens/tokenizer_cases.json) with :func:`tokenizer_cases` plus the settings the
    Rust tests need (max length, pad/bos/eos ids per tokenizer) and the library versions that produced it.
    Returns the written object."""
    import tokenizers as hf_tokenizers  # the library, not this module
    import transformers

    clip_dir, t5_dir = Path(clip_dir), Path(t5_dir)
    clip_tok = _load_hf_tokenizer(clip_dir, "clip")
    t5_tok = _load_hf_tokenizer(t5_dir, "t5")
    obj = {
        "description": "FLUX.1 prompt tokenization as diffusers' FluxPipeline does it (padding='max_length', "
                       "truncation=True); *_untruncated_len counts tokens incl. specials before truncation. "
                       "Generated by export/flux_tokenizers.py write_tokenizer_goldens.",
        "generated_with": {"transformers": transformers.__version__, "tokenizers": hf_tokenizers.__version__},
        "clip": {"max_length": int(clip_tok.model_max_length), "pad_id": int(clip_tok.pad_token_id),
                 "bos_id": int(clip_tok.bos_token_id), "eos_id": int(clip_tok.eos_token_id)},
        "t5": {"max_length": int(t5_max_length), "pad_id": int(t5_tok.pad_token_id),
               "eos_id": int(t5_tok.eos_token_id)},
        "cases": tokenizer_cases(clip_dir, t5_dir, t5_max_length),
    }
    out_json = Path(out_json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(_dump_compact(obj) + "\n", encoding="utf-8")
    return obj
