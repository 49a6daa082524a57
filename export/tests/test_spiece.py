"""The spiece.model-only T5 tokenizer folder (tests/data/tokenizers/t5-spiece, export/fixtures/spiece.py): it
regenerates byte for byte, sentencepiece and transformers both load it, transformers builds from it the same T5
pipeline as from the committed tokenizer.json, and sentencepiece's own ids agree with the goldens except where
transformers' added tokens deliberately differ."""

from __future__ import annotations

import json

import pytest

from export.fixtures import spiece

FILES = ("spiece.model", "tokenizer_config.json", "special_tokens_map.json", spiece.GOLDENS)


@pytest.fixture(scope="module")
def goldens() -> dict:
    return json.loads((spiece.OUT_DIR / spiece.GOLDENS).read_text(encoding="utf-8"))


@pytest.mark.regeneration
def test_regenerates_byte_equal(tmp_path):
    folder = spiece.regenerate(tmp_path / "t5-spiece")
    assert sorted(p.name for p in folder.iterdir()) == sorted(FILES)
    for name in FILES:
        assert (folder / name).read_bytes() == (spiece.OUT_DIR / name).read_bytes(), (
            f"{name} differs from the committed tests/data/tokenizers/t5-spiece/{name}: regenerate with "
            "`python -m export.fixtures.spiece` (a new transformers / sentencepiece version changes goldens.json)")
    assert not (spiece.OUT_DIR / "tokenizer.json").exists()


def test_sentencepiece_loads_the_model():
    sp = spiece.load_sentencepiece(spiece.OUT_DIR)
    assert sp.get_piece_size() == 32000
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
    assert sp.is_control(0) and sp.is_control(1) and sp.is_unknown(2)
    assert sp.encode("a photo of a cat") == [3, 9, 1202, 13, 3, 9, 1712]
    assert sp.encode("ｆｕｌｌ") == sp.encode("full")  # nmt_nfkc through the precompiled charsmap


def test_transformers_builds_the_committed_t5_pipeline():
    import transformers

    tok = spiece.load_transformers(spiece.OUT_DIR)
    assert type(tok).__name__ == "T5Tokenizer"
    auto = transformers.AutoTokenizer.from_pretrained(str(spiece.OUT_DIR), local_files_only=True)
    assert auto.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    assert len(tok) == 32100
    assert tok.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_99>"]) == [32099, 32000]
    built = json.loads(tok.backend_tokenizer.to_str())
    committed = json.loads(spiece.SOURCE_JSON.read_text(encoding="utf-8"))
    for key in ("added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder"):
        assert built[key] == committed[key], key
    # The vocabulary is the same, its scores rounded to float32 as spiece.model stores them.
    b, c = built["model"], committed["model"]
    assert [p for p, _ in b["vocab"]] == [p for p, _ in c["vocab"]]
    assert all(abs(x - y) < 1e-6 for (_, x), (_, y) in zip(b["vocab"], c["vocab"]))
    assert (b["unk_id"], b["byte_fallback"]) == (c["unk_id"], c["byte_fallback"]) == (2, False)


def test_goldens_cover_the_cases(goldens):
    cases = {c["name"]: c for c in goldens["cases"]}
    assert len(cases) >= 25
    max_length = goldens["max_length"]
    assert max_length == spiece.MAX_LENGTH
    for c in cases.values():
        assert len(c["ids"]) == max_length
        assert c["ids"][-1] in (goldens["eos_id"], goldens["pad_id"])
        assert c["unpadded_ids"][-1] == goldens["eos_id"]
    assert len(cases["long_truncated"]["unpadded_ids"]) > 2 * max_length
    assert cases["long_truncated"]["ids"][-1] == goldens["eos_id"]
    assert len(cases["limit_exact"]["unpadded_ids"]) == max_length
    assert len(cases["limit_plus_one"]["unpadded_ids"]) == max_length + 1
    assert cases["empty"]["unpadded_ids"] == [goldens["eos_id"]]
    assert 32096 in cases["extra_id_literal"]["ids"]  # <extra_id_3>


def test_sentencepiece_agrees_except_where_transformers_differs_on_purpose(goldens):
    sp = spiece.load_sentencepiece(spiece.OUT_DIR)
    differing = set()
    for c in goldens["cases"]:
        got = spiece.sentencepiece_ids(sp, c["prompt"])
        if c["name"] in spiece.SPM_DIFFERS:
            differing.add(c["name"])
            assert got == c["sentencepiece_ids"] != c["unpadded_ids"], c["name"]
            assert c["sentencepiece_differs_because"] == spiece.SPM_DIFFERS[c["name"]]
        else:
            assert got == c["unpadded_ids"], c["name"]
            assert "sentencepiece_ids" not in c
    assert differing == set(spiece.SPM_DIFFERS)
