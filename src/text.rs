//! Prompt tokenization for FLUX.1's two text encoders, reproducing diffusers' `FluxPipeline` exactly.
//!
//! diffusers tokenizes a prompt with `padding="max_length", truncation=True`:
//! - CLIP-L (`tokenizer/`): `[bos] content… [eos]`, padded with `pad_id` (`<|endoftext|>`, 49407) to 77;
//! - T5 v1.1 (`tokenizer_2/`): `content… [eos]`, padded with `<pad>` (0) to 256 or 512.
//!
//! When a prompt is too long the *content* is cut and the special tokens are kept, so the last id before
//! the padding is always `eos`. This module only tokenizes the content with the `tokenizers` crate and does
//! the special tokens, truncation and padding itself, where they can be tested and reported
//! ([`Tokenized::lost`], [`truncation_warning`]).
//!
//! A tokenizer folder comes in these forms ([`TokenizerSource`]):
//! - the export step's: a tokenizer.json written from the transformers-5 backend tokenizer;
//! - the Hugging Face hub's, as FLUX.1's base repositories ship them next to BFL's ONNX download: CLIP's
//!   `tokenizer/` holds only vocab.json + merges.txt, which are built into a tokenizer here exactly as
//!   transformers 5's `CLIPTokenizer` builds them; T5's `tokenizer_2/` holds the hub's tokenizer.json, whose
//!   pipeline predates transformers 5. transformers 5 keeps only the vocabulary and the precompiled charsmap
//!   of a T5 tokenizer.json and rebuilds the rest (pre-tokenizer `WhitespaceSplit` + `Metaspace`); without
//!   that, a prompt ending in whitespace gets an extra `▁` (id 3). [`PromptTokenizer::from_json`] does the
//!   same rebuild for every T5 (Unigram) tokenizer.json, so both forms give diffusers' ids;
//! - T5 as google/t5-v1_1-xxl ships it: spiece.model (+ tokenizer_config.json), no tokenizer.json. The
//!   SentencePiece model is read natively ([`spiece`]) and built into the same pipeline transformers 5's
//!   `T5Tokenizer` builds from it ([`PromptTokenizer::from_spiece`]).

pub mod spiece;

use std::path::{Path, PathBuf};
use std::str::FromStr;

use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, DecoderWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::{Error, Result};

/// How a tokenizer frames and pads the content tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerStyle {
    /// `[bos] content [eos] [pad]…` (CLIP).
    Clip,
    /// `content [eos] [pad]…` (T5).
    T5,
}

impl TokenizerStyle {
    /// The encoder's name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            TokenizerStyle::Clip => "CLIP",
            TokenizerStyle::T5 => "T5",
        }
    }

    /// Number of special tokens framing the content.
    pub fn num_special(self) -> usize {
        match self {
            TokenizerStyle::Clip => 2,
            TokenizerStyle::T5 => 1,
        }
    }

    fn default_bos_token(self) -> Option<&'static str> {
        match self {
            TokenizerStyle::Clip => Some("<|startoftext|>"),
            TokenizerStyle::T5 => None,
        }
    }

    fn default_eos_token(self) -> &'static str {
        match self {
            TokenizerStyle::Clip => "<|endoftext|>",
            TokenizerStyle::T5 => "</s>",
        }
    }
}

/// Settings recorded in the model manifest for one tokenizer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizerSettings {
    pub style: TokenizerStyle,
    /// Sequence length the encoder takes (77 for CLIP, 256/512 for T5); every encoding has exactly this length.
    pub max_length: usize,
    pub pad_id: u32,
    /// Begin-of-sequence id (CLIP only); `None` looks up `<|startoftext|>` in the tokenizer.
    pub bos_id: Option<u32>,
    /// End-of-sequence id; `None` looks up `<|endoftext|>` (CLIP) or `</s>` (T5) in the tokenizer.
    pub eos_id: Option<u32>,
}

impl TokenizerSettings {
    /// CLIP-L defaults: pad = eos = `<|endoftext|>` (49407), bos/eos looked up in the tokenizer.
    pub fn clip(max_length: usize) -> Self {
        TokenizerSettings {
            style: TokenizerStyle::Clip,
            max_length,
            pad_id: 49407,
            bos_id: None,
            eos_id: None,
        }
    }

    /// T5 defaults: pad `<pad>` (0), eos looked up in the tokenizer.
    pub fn t5(max_length: usize) -> Self {
        TokenizerSettings {
            style: TokenizerStyle::T5,
            max_length,
            pad_id: 0,
            bos_id: None,
            eos_id: None,
        }
    }
}

/// One tokenized prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokenized {
    /// Exactly `max_length` ids: specials, content, padding.
    pub ids: Vec<i64>,
    /// Tokens including the special ones before padding (`<= max_length`).
    pub used: usize,
    /// Content tokens dropped by truncation (0 when the prompt fits).
    pub lost: usize,
}

impl Tokenized {
    /// Length the prompt would have had without truncation, special tokens included.
    pub fn untruncated_len(&self) -> usize {
        self.used + self.lost
    }
}

/// Where a tokenizer is read from; see [`TokenizerSource::locate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerSource {
    /// A tokenizer.json (the export step's, or a Hugging Face hub one).
    Json(PathBuf),
    /// A CLIP folder as the Hugging Face hub ships openai/clip-vit-large-patch14 and FLUX.1's `tokenizer/`:
    /// vocab.json + merges.txt (+ tokenizer_config.json), no tokenizer.json.
    VocabMerges(PathBuf),
    /// A T5 SentencePiece model (the spiece.model file) as the Hugging Face hub ships google/t5-v1_1-xxl:
    /// spiece.model (+ tokenizer_config.json), no tokenizer.json.
    SentencePiece(PathBuf),
}

/// File names inside a tokenizer folder.
pub const TOKENIZER_JSON: &str = "tokenizer.json";
pub const VOCAB_JSON: &str = "vocab.json";
pub const MERGES_TXT: &str = "merges.txt";
pub const TOKENIZER_CONFIG_JSON: &str = "tokenizer_config.json";
pub const SPIECE_MODEL: &str = "spiece.model";

/// transformers 5's `CLIPTokenizer` pre-tokenizer pattern (split with behavior "removed", inverted).
const CLIP_SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

const FIX_HINT: &str = "re-run the export step (`python -m export`) or copy the checkpoint's tokenizer folder \
                        (`tokenizer/` for CLIP, `tokenizer_2/` for T5, with its tokenizer.json) into the model folder";

const FOLDER_HINT: &str = "copy the tokenizer folders of the FLUX.1 base repository (black-forest-labs/FLUX.1-schnell \
                           or -dev) next to the ONNX files: `tokenizer/` (CLIP: tokenizer.json, or vocab.json + \
                           merges.txt) and `tokenizer_2/` (T5: tokenizer.json, or google/t5-v1_1-xxl's spiece.model \
                           + tokenizer_config.json), or re-run the export step (`python -m export`)";

/// The most `<extra_id_N>` sentinels a tokenizer_config.json may ask for (T5 has 100).
const MAX_EXTRA_IDS: u64 = 10_000;

impl TokenizerSource {
    /// Finds the tokenizer at `path`: a tokenizer.json file, (T5) a `.model` SentencePiece file, or a tokenizer
    /// folder holding a tokenizer.json, else (CLIP) vocab.json + merges.txt or (T5) spiece.model; tokenizer.json
    /// wins when a folder has both. A tokenizer.json path that does not exist falls back to what the same folder
    /// holds instead (vocab.json + merges.txt for CLIP, spiece.model for T5). Anything else is an
    /// [`Error::model`] naming the file or folder.
    pub fn locate(path: &Path, style: TokenizerStyle) -> Result<TokenizerSource> {
        let which = style.name();
        if path.is_dir() {
            let json = path.join(TOKENIZER_JSON);
            if json.is_file() {
                return Ok(TokenizerSource::Json(json));
            }
            if let Some(source) = Self::without_json(path, style) {
                return Ok(source);
            }
            let found = match style {
                TokenizerStyle::Clip => "neither tokenizer.json nor vocab.json + merges.txt",
                TokenizerStyle::T5 => "neither tokenizer.json nor spiece.model",
            };
            return Err(Error::model(format!(
                "the {which} tokenizer folder {} has {found}",
                path.display()
            ))
            .with_hint(FOLDER_HINT));
        }
        if path.is_file() {
            if style == TokenizerStyle::T5 && path.extension().is_some_and(|e| e == "model") {
                return Ok(TokenizerSource::SentencePiece(path.to_path_buf()));
            }
            return Ok(TokenizerSource::Json(path.to_path_buf()));
        }
        if path.file_name().is_some_and(|n| n == TOKENIZER_JSON) {
            if let Some(source) = path.parent().and_then(|d| Self::without_json(d, style)) {
                return Ok(source);
            }
        }
        let what = if path.extension().is_some_and(|e| e == "json") {
            "file"
        } else {
            "folder"
        };
        Err(Error::model(format!(
            "the {which} tokenizer {what} {} is missing",
            path.display()
        ))
        .with_hint(FIX_HINT))
    }

    /// What a folder without tokenizer.json offers instead: vocab.json + merges.txt (CLIP), spiece.model (T5).
    fn without_json(dir: &Path, style: TokenizerStyle) -> Option<TokenizerSource> {
        match style {
            TokenizerStyle::Clip if has_vocab_and_merges(dir) => {
                Some(TokenizerSource::VocabMerges(dir.to_path_buf()))
            }
            TokenizerStyle::T5 if dir.join(SPIECE_MODEL).is_file() => {
                Some(TokenizerSource::SentencePiece(dir.join(SPIECE_MODEL)))
            }
            _ => None,
        }
    }

    /// The tokenizer.json, the folder holding vocab.json + merges.txt, or the spiece.model.
    pub fn path(&self) -> &Path {
        match self {
            TokenizerSource::Json(p)
            | TokenizerSource::VocabMerges(p)
            | TokenizerSource::SentencePiece(p) => p,
        }
    }
}

fn has_vocab_and_merges(dir: &Path) -> bool {
    dir.join(VOCAB_JSON).is_file() && dir.join(MERGES_TXT).is_file()
}

/// A special token as tokenizer_config.json names it: a string, or an object with `content`.
fn config_token(config: &serde_json::Value, key: &str) -> Option<String> {
    token_content(&config[key])
}

fn token_content(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// An added token as tokenizer_config.json describes it: a string (special, not normalized), or an object with
/// `content` and flags.
fn config_added_token(value: &serde_json::Value, default_special: bool) -> Option<AddedToken> {
    let content = token_content(value)?;
    let flag = |k: &str, default: bool| value[k].as_bool().unwrap_or(default);
    let special = flag("special", default_special);
    Some(
        AddedToken::from(content, special)
            .normalized(flag("normalized", !special))
            .lstrip(flag("lstrip", false))
            .rstrip(flag("rstrip", false))
            .single_word(flag("single_word", false)),
    )
}

/// The tokens of tokenizer_config.json's `added_tokens_decoder`, by id (transformers adds them first).
fn config_decoder_tokens(config: &serde_json::Value) -> Vec<AddedToken> {
    let Some(decoder) = config["added_tokens_decoder"].as_object() else {
        return Vec::new();
    };
    let mut entries: Vec<(u64, &serde_json::Value)> = decoder
        .iter()
        .filter_map(|(id, t)| Some((id.parse().ok()?, t)))
        .collect();
    entries.sort_by_key(|(id, _)| *id);
    entries
        .into_iter()
        .filter_map(|(_, t)| config_added_token(t, true))
        .collect()
}

/// `dir`'s tokenizer_config.json, or `Null` when it has none; unreadable or invalid JSON is an error.
fn read_tokenizer_config(dir: &Path, which: &str) -> Result<serde_json::Value> {
    let bad = |msg: String| Error::model(msg).with_hint(FOLDER_HINT);
    let config_path = dir.join(TOKENIZER_CONFIG_JSON);
    match std::fs::read_to_string(&config_path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| {
            bad(format!(
                "the {which} tokenizer config {} is not valid JSON: {e}",
                config_path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(serde_json::Value::Null),
        Err(e) => Err(bad(format!(
            "the {which} tokenizer config {} cannot be read: {e}",
            config_path.display()
        ))),
    }
}

/// Adds `tokens` as transformers does: skipping contents already added, the special ones as special tokens.
fn add_tokens_once(tokenizer: &mut Tokenizer, tokens: Vec<AddedToken>) -> tokenizers::Result<()> {
    let mut seen = std::collections::HashSet::new();
    let tokens: Vec<AddedToken> = tokens
        .into_iter()
        .filter(|t| seen.insert(t.content.clone()))
        .collect();
    let (special, plain): (Vec<AddedToken>, Vec<AddedToken>) =
        tokens.into_iter().partition(|t| t.special);
    tokenizer.add_special_tokens(special)?;
    tokenizer.add_tokens(plain)?;
    Ok(())
}

/// Rebuilds a T5 (Unigram) tokenizer.json's pipeline the way transformers 5's `T5Tokenizer` does when it loads
/// one: it keeps the vocabulary and the normalizer's precompiled charsmap and sets the normalizer to that
/// charsmap alone, the pre-tokenizer to `WhitespaceSplit` + `Metaspace("▁", prepend_scheme="always",
/// split=True)` and the decoder to the same `Metaspace`, without byte fallback. The hub's T5 tokenizer.json
/// (`Precompiled` + `Replace(" {2,}")`, a lone `Metaspace`) would otherwise emit an extra `▁` (id 3) before
/// `</s>` for a prompt ending in whitespace. The export step's files already have this pipeline.
fn t5_transformers5_pipeline(json: &mut serde_json::Value) {
    use serde_json::{json, Value};
    let Some(obj) = json.as_object_mut() else {
        return;
    };
    if obj
        .get("model")
        .and_then(|m| m.get("type"))
        .and_then(Value::as_str)
        != Some("Unigram")
    {
        return;
    }
    let is_precompiled = |n: &Value| {
        n.get("type").and_then(Value::as_str) == Some("Precompiled")
            && n.get("precompiled_charsmap").is_some()
    };
    let normalizer = match obj.get("normalizer") {
        Some(n) if is_precompiled(n) => Some(n.clone()),
        Some(n) => n
            .get("normalizers")
            .and_then(Value::as_array)
            .and_then(|list| list.iter().find(|n| is_precompiled(n)).cloned()),
        None => None,
    };
    let metaspace = json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "always", "split": true});
    obj.insert("normalizer".into(), normalizer.unwrap_or(Value::Null));
    obj.insert(
        "pre_tokenizer".into(),
        json!({"type": "Sequence", "pretokenizers": [{"type": "WhitespaceSplit"}, metaspace.clone()]}),
    );
    obj.insert("decoder".into(), metaspace);
    if let Some(model) = obj.get_mut("model").and_then(Value::as_object_mut) {
        model.insert("byte_fallback".into(), Value::Bool(false));
    }
}

/// A CLIP or T5 tokenizer loaded from a tokenizer folder or a tokenizer.json, padding and truncating like
/// diffusers.
#[derive(Debug, Clone)]
pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    style: TokenizerStyle,
    max_length: usize,
    pad_id: u32,
    bos_id: Option<u32>,
    eos_id: u32,
    path: PathBuf,
}

impl PromptTokenizer {
    /// Loads `path`: a tokenizer.json, or a tokenizer folder (see [`TokenizerSource::locate`]). A missing,
    /// unreadable or corrupt file, or one whose special tokens do not fit `settings`, is an [`Error::model`]
    /// naming the file and the fix.
    pub fn from_file(path: impl AsRef<Path>, settings: TokenizerSettings) -> Result<Self> {
        let path = path.as_ref();
        let which = settings.style.name();
        let path = match TokenizerSource::locate(path, settings.style)? {
            TokenizerSource::Json(p) => p,
            TokenizerSource::VocabMerges(dir) => {
                return Self::from_vocab_and_merges(&dir, settings)
            }
            TokenizerSource::SentencePiece(model) => return Self::from_spiece(&model, settings),
        };
        let json = std::fs::read_to_string(&path).map_err(|e| {
            let what = if e.kind() == std::io::ErrorKind::NotFound {
                "is missing"
            } else {
                "cannot be read"
            };
            Error::model(format!(
                "the {which} tokenizer file {} {what}: {e}",
                path.display()
            ))
            .with_hint(FIX_HINT)
        })?;
        Self::from_json(&json, settings, path)
    }

    /// Loads the tokenizer folder `dir` (FLUX.1's `tokenizer/` or `tokenizer_2/`): its tokenizer.json when it
    /// has one, else (CLIP) its vocab.json + merges.txt or (T5) its spiece.model. A folder with none of them is
    /// an [`Error::model`] naming it.
    pub fn from_folder(dir: impl AsRef<Path>, settings: TokenizerSettings) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            let what = if dir.exists() {
                "is not a folder"
            } else {
                "is missing"
            };
            return Err(Error::model(format!(
                "the {} tokenizer folder {} {what}",
                settings.style.name(),
                dir.display()
            ))
            .with_hint(FOLDER_HINT));
        }
        Self::from_file(dir, settings)
    }

    /// Builds CLIP's tokenizer from the hub's vocab.json + merges.txt in `dir` exactly as transformers 5's
    /// `CLIPTokenizer` does: BPE with `</w>` word ends and unk `<|endoftext|>`; normalizer NFC, whitespace runs
    /// to one space, lowercase; pre-tokenizer CLIP's regex split then byte-level; byte-level decoder; the
    /// `[bos] … [eos]` post-processor. Special tokens and their flags come from tokenizer_config.json when the
    /// folder has one.
    pub fn from_vocab_and_merges(dir: &Path, settings: TokenizerSettings) -> Result<Self> {
        let which = settings.style.name();
        let bad = |msg: String| Error::model(msg).with_hint(FOLDER_HINT);
        if settings.style != TokenizerStyle::Clip {
            return Err(bad(format!(
                "the {which} tokenizer folder {} has vocab.json + merges.txt, a CLIP (BPE) tokenizer",
                dir.display()
            )));
        }
        let config = read_tokenizer_config(dir, which)?;
        let token = |key: &str, default: &str| {
            config_token(&config, key).unwrap_or_else(|| default.to_string())
        };
        let unk = token("unk_token", "<|endoftext|>");
        let bos = token("bos_token", "<|startoftext|>");
        let eos = token("eos_token", "<|endoftext|>");
        let pad = token("pad_token", "<|endoftext|>");

        let (vocab, merges) = (dir.join(VOCAB_JSON), dir.join(MERGES_TXT));
        let files = format!("{} + {}", vocab.display(), merges.display());
        let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .fuse_unk(false)
            .unk_token(unk.clone())
            .build()
            .map_err(|e| {
                bad(format!(
                    "the {which} tokenizer files {files} are not a BPE vocabulary: {e}"
                ))
            })?;
        let build_error =
            |e: tokenizers::Error| bad(format!("the {which} tokenizer from {files}: {e}"));
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer
            .with_normalizer(Some(NormalizerSequence::new(vec![
                NFC.into(),
                Replace::new(ReplacePattern::Regex(r"\s+".into()), " ")
                    .map_err(build_error)?
                    .into(),
                Lowercase.into(),
            ])))
            .map_err(build_error)?;
        tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            Split::new(
                SplitPattern::Regex(CLIP_SPLIT_PATTERN.into()),
                SplitDelimiterBehavior::Removed,
                true,
            )
            .map_err(build_error)?
            .into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        tokenizer.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));

        // transformers adds the tokens of `added_tokens_decoder` (by id), then the named special tokens.
        let mut added = config_decoder_tokens(&config);
        added.extend([&bos, &eos, &unk, &pad].map(|name| AddedToken::from(name.as_str(), true)));
        add_tokens_once(&mut tokenizer, added).map_err(build_error)?;

        let id = |name: &str| {
            tokenizer.token_to_id(name).ok_or_else(|| {
                bad(format!(
                    "the {which} tokenizer files {files} have no token {name}"
                ))
            })
        };
        let (bos_id, eos_id) = (id(&bos)?, id(&eos)?);
        tokenizer.with_post_processor(Some(
            RobertaProcessing::new((eos, eos_id), (bos, bos_id))
                .trim_offsets(false)
                .add_prefix_space(false),
        ));
        Self::from_tokenizer(tokenizer, settings, dir.to_path_buf())
    }

    /// Builds T5's tokenizer from a SentencePiece model (`model`: the spiece.model file; its folder's
    /// tokenizer_config.json is read when there is one) exactly as transformers 5's `T5Tokenizer.from_pretrained`
    /// builds it from a spiece.model-only folder: the pipeline of [`spiece::t5_tokenizer`] over
    /// tokenizer_config.json's `extra_ids` sentinels (100 by default); added tokens: `added_tokens_decoder`'s
    /// (with their flags), the eos / unk / pad tokens, then the config's `additional_special_tokens` (or
    /// `extra_special_tokens`) list when it has one, else the model's CONTROL and USER_DEFINED pieces and the
    /// `<extra_id_0>` … sentinels; the `$A </s>` post-processor. A missing, unreadable or malformed file, a
    /// non-Unigram model or one that is not laid out like T5's is an [`Error::model`] naming the file.
    pub fn from_spiece(model: &Path, settings: TokenizerSettings) -> Result<Self> {
        let which = settings.style.name();
        let bad = |msg: String| Error::model(msg).with_hint(FOLDER_HINT);
        if settings.style != TokenizerStyle::T5 {
            return Err(bad(format!(
                "the {which} tokenizer file {} is a SentencePiece model, a T5 tokenizer",
                model.display()
            )));
        }
        let bytes = std::fs::read(model).map_err(|e| {
            let what = if e.kind() == std::io::ErrorKind::NotFound {
                "is missing"
            } else {
                "cannot be read"
            };
            bad(format!(
                "the {which} tokenizer file {} {what}: {e}",
                model.display()
            ))
        })?;
        let invalid = |e: spiece::SpieceError| {
            bad(format!(
                "the {which} tokenizer file {} is not a usable SentencePiece model: {e}",
                model.display()
            ))
        };
        let parsed = spiece::parse(&bytes).map_err(invalid)?;
        let dir = model.parent().unwrap_or(Path::new("."));
        let config = read_tokenizer_config(dir, which)?;
        let extra_ids = match &config["extra_ids"] {
            serde_json::Value::Null => spiece::DEFAULT_EXTRA_IDS,
            v => v
                .as_u64()
                .filter(|&n| n <= MAX_EXTRA_IDS)
                .map(|n| n as usize)
                .ok_or_else(|| {
                    bad(format!(
                        "the {which} tokenizer config {} has extra_ids {v}: expected a count of at most \
                         {MAX_EXTRA_IDS}",
                        dir.join(TOKENIZER_CONFIG_JSON).display()
                    ))
                })?,
        };
        let mut tokenizer = spiece::t5_tokenizer(&parsed, extra_ids).map_err(invalid)?;

        let token = |key: &str, default: &str| {
            config_token(&config, key).unwrap_or_else(|| default.to_string())
        };
        let eos = token("eos_token", "</s>");
        let mut added = config_decoder_tokens(&config);
        added.extend(
            [
                eos.clone(),
                token("unk_token", "<unk>"),
                token("pad_token", "<pad>"),
            ]
            .map(|name| AddedToken::from(name, true)),
        );
        let listed = ["additional_special_tokens", "extra_special_tokens"]
            .iter()
            .find_map(|key| config[*key].as_array());
        match listed {
            Some(list) => added.extend(list.iter().filter_map(|t| config_added_token(t, true))),
            None => {
                added.extend(spiece::added_pieces(&parsed));
                added.extend(
                    (0..extra_ids).map(|i| AddedToken::from(format!("<extra_id_{i}>"), true)),
                );
            }
        }
        let build_error = |e: tokenizers::Error| {
            bad(format!(
                "the {which} tokenizer from {}: {e}",
                model.display()
            ))
        };
        add_tokens_once(&mut tokenizer, added).map_err(build_error)?;
        let eos_id = tokenizer.token_to_id(&eos).ok_or_else(|| {
            bad(format!(
                "the {which} tokenizer file {} has no token {eos}",
                model.display()
            ))
        })?;
        let template = TemplateProcessing::builder()
            .try_single(vec!["$A", eos.as_str()])
            .and_then(|b| b.try_pair(vec!["$A", eos.as_str(), "$B", eos.as_str()]))
            .map_err(|e| bad(format!("the {which} tokenizer's template: {e}")))?
            .special_tokens(vec![(eos.as_str(), eos_id)])
            .build()
            .map_err(|e| bad(format!("the {which} tokenizer's template: {e}")))?;
        tokenizer.with_post_processor(Some(template));
        Self::from_tokenizer(tokenizer, settings, model.to_path_buf())
    }

    /// Like [`PromptTokenizer::from_file`] for tokenizer.json text already in memory; `origin` names it in errors.
    /// A T5 (Unigram) tokenizer gets transformers 5's pipeline, as transformers rebuilds it at load time.
    pub fn from_json(
        json: &str,
        settings: TokenizerSettings,
        origin: impl Into<PathBuf>,
    ) -> Result<Self> {
        let path = origin.into();
        let which = settings.style.name();
        let bad = |msg: String| Error::model(msg).with_hint(FIX_HINT);
        let invalid = |e: &dyn std::fmt::Display| {
            bad(format!(
                "the {which} tokenizer file {} is not a valid tokenizer.json: {e}",
                path.display()
            ))
        };
        let tokenizer = match settings.style {
            TokenizerStyle::Clip => Tokenizer::from_str(json).map_err(|e| invalid(&e))?,
            TokenizerStyle::T5 => {
                let mut value: serde_json::Value =
                    serde_json::from_str(json).map_err(|e| invalid(&e))?;
                t5_transformers5_pipeline(&mut value);
                serde_json::from_value(value).map_err(|e| invalid(&e))?
            }
        };
        Self::from_tokenizer(tokenizer, settings, path)
    }

    /// Checks a built tokenizer against `settings` and wraps it; `path` names it in errors.
    fn from_tokenizer(
        mut tokenizer: Tokenizer,
        settings: TokenizerSettings,
        path: PathBuf,
    ) -> Result<Self> {
        let which = settings.style.name();
        let bad = |msg: String| Error::model(msg).with_hint(FIX_HINT);
        // The runtime pads and truncates itself; settings baked into the file must not interfere.
        tokenizer.with_truncation(None).map_err(|e| {
            bad(format!(
                "the {which} tokenizer file {}: {e}",
                path.display()
            ))
        })?;
        tokenizer.with_padding(None);

        let n_special = settings.style.num_special();
        if settings.max_length <= n_special {
            return Err(bad(format!(
                "the {which} tokenizer's max_length {} leaves no room for the prompt ({n_special} special tokens)",
                settings.max_length
            )));
        }
        let lookup = |given: Option<u32>, token: &str, role: &str| -> Result<u32> {
            match given {
                Some(id) => Ok(id),
                None => tokenizer.token_to_id(token).ok_or_else(|| {
                    bad(format!(
                        "the {which} tokenizer file {} has no {role} token {token}",
                        path.display()
                    ))
                }),
            }
        };
        let bos_id = match settings.style.default_bos_token() {
            Some(token) => Some(lookup(settings.bos_id, token, "begin-of-sequence")?),
            None => None,
        };
        let eos_id = lookup(
            settings.eos_id,
            settings.style.default_eos_token(),
            "end-of-sequence",
        )?;

        let vocab = tokenizer.get_vocab_size(true);
        for (role, id) in [
            ("pad", Some(settings.pad_id)),
            ("bos", bos_id),
            ("eos", Some(eos_id)),
        ] {
            if let Some(id) = id {
                if id as usize >= vocab {
                    return Err(bad(format!(
                        "the {which} tokenizer file {} has {vocab} tokens, but the {role} id is {id}",
                        path.display()
                    )));
                }
            }
        }

        let this = PromptTokenizer {
            tokenizer,
            style: settings.style,
            max_length: settings.max_length,
            pad_id: settings.pad_id,
            bos_id,
            eos_id,
            path,
        };
        this.check_post_processor()?;
        Ok(this)
    }

    /// If the file carries a post-processor, it must add the same special tokens as the style says, or the
    /// file belongs to another encoder (e.g. CLIP's and T5's files swapped).
    fn check_post_processor(&self) -> Result<()> {
        if self.tokenizer.get_post_processor().is_none() {
            return Ok(());
        }
        let framed = self
            .tokenizer
            .encode("", true)
            .map_err(|e| self.encode_error(e))?;
        let expected: Vec<u32> = self.bos_id.into_iter().chain([self.eos_id]).collect();
        if framed.get_ids() != expected.as_slice() {
            return Err(Error::model(format!(
                "the {} tokenizer file {} frames a prompt with {:?}, expected {:?}: it is not a {} tokenizer",
                self.style.name(),
                self.path.display(),
                framed.get_ids(),
                expected,
                self.style.name()
            ))
            .with_hint(FIX_HINT));
        }
        Ok(())
    }

    fn encode_error(&self, e: impl std::fmt::Display) -> Error {
        Error::model(format!(
            "the {} tokenizer ({}) failed: {e}",
            self.style.name(),
            self.path.display()
        ))
    }

    pub fn style(&self) -> TokenizerStyle {
        self.style
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The tokenizer.json this was loaded from, the folder of its vocab.json + merges.txt, or its spiece.model.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Content ids of `prompt`, without special tokens, padding or truncation.
    pub fn content_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(prompt, false)
            .map_err(|e| self.encode_error(e))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Tokenizes like transformers with `padding="max_length", truncation=True, max_length=max_length`.
    pub fn encode(&self, prompt: &str) -> Result<Tokenized> {
        let content = self.content_ids(prompt)?;
        Ok(frame(
            &content,
            self.bos_id,
            self.eos_id,
            self.pad_id,
            self.max_length,
        ))
    }

    /// [`PromptTokenizer::encode`] for each prompt.
    pub fn encode_batch(&self, prompts: &[&str]) -> Result<Vec<Tokenized>> {
        prompts.iter().map(|p| self.encode(p)).collect()
    }

    /// The vocabulary entry of each id as the tokenizer stores it (CLIP `photo</w>`, T5 `▁photo`); `?` for an id
    /// outside the vocabulary.
    pub fn token_strings(&self, ids: &[i64]) -> Vec<String> {
        ids.iter()
            .map(|&id| {
                u32::try_from(id)
                    .ok()
                    .and_then(|id| self.tokenizer.id_to_token(id))
                    .unwrap_or_else(|| "?".into())
            })
            .collect()
    }

    /// Decodes ids back to text (special tokens skipped), e.g. to show what truncation removed.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| self.encode_error(e))
    }
}

/// Frames `content` as `[bos] content [eos]`, cutting the content so the whole fits in `max_length`, then pads
/// with `pad_id` to exactly `max_length`. This is what Hugging Face tokenizers do for a single sequence with
/// right-side "longest first" truncation: the content is truncated before the special tokens are added.
pub fn frame(
    content: &[u32],
    bos_id: Option<u32>,
    eos_id: u32,
    pad_id: u32,
    max_length: usize,
) -> Tokenized {
    let n_special = usize::from(bos_id.is_some()) + 1;
    let keep = content.len().min(max_length.saturating_sub(n_special));
    let mut ids = Vec::with_capacity(max_length.max(keep + n_special));
    ids.extend(bos_id.map(i64::from));
    ids.extend(content[..keep].iter().map(|&id| i64::from(id)));
    ids.push(i64::from(eos_id));
    let used = ids.len();
    ids.resize(max_length.max(used), i64::from(pad_id));
    Tokenized {
        ids,
        used,
        lost: content.len() - keep,
    }
}

/// The warning to show when truncation dropped part of a prompt (`None` when nothing was lost), in the spirit
/// of diffusers' "The following part of your input was truncated because CLIP can only handle sequences up to
/// 77 tokens".
pub fn truncation_warning(which: &str, t: &Tokenized, max: usize) -> Option<String> {
    if t.lost == 0 {
        return None;
    }
    let s = if t.lost == 1 { "" } else { "s" };
    Some(format!(
        "the prompt is {} tokens long for {which}, which can only handle sequences up to {max} tokens: \
         the last {} token{s} were truncated and have no effect",
        t.untruncated_len(),
        t.lost
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_clip_pads_with_pad_id() {
        let t = frame(&[10, 11, 12], Some(1), 2, 2, 8);
        assert_eq!(t.ids, vec![1, 10, 11, 12, 2, 2, 2, 2]);
        assert_eq!((t.used, t.lost, t.untruncated_len()), (5, 0, 5));
    }

    #[test]
    fn frame_t5_has_no_bos_and_pads_zero() {
        let t = frame(&[10, 11], None, 1, 0, 5);
        assert_eq!(t.ids, vec![10, 11, 1, 0, 0]);
        assert_eq!((t.used, t.lost), (3, 0));
    }

    #[test]
    fn frame_empty_prompt_is_only_specials() {
        assert_eq!(frame(&[], Some(7), 8, 8, 4).ids, vec![7, 8, 8, 8]);
        assert_eq!(frame(&[], None, 1, 0, 3).ids, vec![1, 0, 0]);
        assert_eq!(frame(&[], None, 1, 0, 3).used, 1);
    }

    #[test]
    fn frame_exact_fit_loses_nothing() {
        let t = frame(&[10, 11, 12], Some(1), 2, 0, 5);
        assert_eq!(t.ids, vec![1, 10, 11, 12, 2]);
        assert_eq!((t.used, t.lost), (5, 0));
        let t = frame(&[10, 11, 12, 13], None, 1, 0, 5);
        assert_eq!(t.ids, vec![10, 11, 12, 13, 1]);
        assert_eq!((t.used, t.lost), (5, 0));
    }

    #[test]
    fn frame_truncates_content_and_keeps_specials_at_the_end() {
        let t = frame(&[10, 11, 12, 13], Some(1), 2, 0, 5);
        assert_eq!(t.ids, vec![1, 10, 11, 12, 2]);
        assert_eq!((t.used, t.lost, t.untruncated_len()), (5, 1, 6));
        let content: Vec<u32> = (100..1100).collect();
        let t = frame(&content, None, 1, 0, 512);
        assert_eq!(t.ids.len(), 512);
        assert_eq!(t.ids[510], 610);
        assert_eq!(t.ids[511], 1);
        assert_eq!((t.used, t.lost), (512, 489));
    }

    #[test]
    fn warning_only_when_tokens_were_lost() {
        let fits = frame(&[10, 11], Some(1), 2, 2, 77);
        assert_eq!(truncation_warning("CLIP", &fits, 77), None);
        let content = vec![5u32; 80];
        let long = frame(&content, Some(1), 2, 2, 77);
        let msg = truncation_warning("CLIP", &long, 77).unwrap();
        assert!(msg.contains("82 tokens"), "{msg}");
        assert!(msg.contains("77 tokens"), "{msg}");
        assert!(msg.contains("last 5 tokens"), "{msg}");
        let one = frame(&vec![5u32; 76], Some(1), 2, 2, 77);
        assert!(truncation_warning("CLIP", &one, 77)
            .unwrap()
            .contains("last 1 token were"));
    }

    /// A small word-level tokenizer.json with a CLIP-like or T5-like post-processor.
    fn tiny_tokenizer_json(clip_like: bool) -> String {
        let post = if clip_like {
            r#"{"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                           {"SpecialToken": {"id": "</s>", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]},
                                   "</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}}}"#
        } else {
            r#"{"type": "TemplateProcessing",
                "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}}}"#
        };
        format!(
            r#"{{"version": "1.0", "truncation": {{"direction": "Right", "max_length": 3, "strategy": "LongestFirst", "stride": 0}},
                "padding": null,
                "added_tokens": [
                  {{"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}},
                  {{"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}}],
                "normalizer": {{"type": "Lowercase"}},
                "pre_tokenizer": {{"type": "Whitespace"}},
                "post_processor": {post},
                "decoder": null,
                "model": {{"type": "WordLevel", "vocab": {{"<pad>": 0, "<s>": 1, "</s>": 2, "a": 3, "cat": 4, "dog": 5, "<unk>": 6}},
                          "unk_token": "<unk>"}}}}"#
        )
    }

    fn settings(style: TokenizerStyle, max_length: usize) -> TokenizerSettings {
        TokenizerSettings {
            style,
            max_length,
            pad_id: 0,
            bos_id: Some(1),
            eos_id: Some(2),
        }
    }

    #[test]
    fn encodes_with_a_tiny_tokenizer_ignoring_the_files_truncation() {
        let tok = PromptTokenizer::from_json(
            &tiny_tokenizer_json(true),
            settings(TokenizerStyle::Clip, 6),
            "tiny",
        )
        .unwrap();
        let t = tok.encode("A cat a DOG bird").unwrap();
        assert_eq!(t.ids, vec![1, 3, 4, 3, 5, 2]);
        assert_eq!((t.used, t.lost), (6, 1));
        let batch = tok.encode_batch(&["a", ""]).unwrap();
        assert_eq!(batch[0].ids, vec![1, 3, 2, 0, 0, 0]);
        assert_eq!(batch[1].ids, vec![1, 2, 0, 0, 0, 0]);

        let tok = PromptTokenizer::from_json(
            &tiny_tokenizer_json(false),
            settings(TokenizerStyle::T5, 4),
            "tiny",
        )
        .unwrap();
        assert_eq!(tok.bos_id(), None);
        assert_eq!(tok.encode("cat dog").unwrap().ids, vec![4, 5, 2, 0]);
    }

    #[test]
    fn post_processor_of_the_other_style_is_rejected() {
        let err = PromptTokenizer::from_json(
            &tiny_tokenizer_json(false),
            settings(TokenizerStyle::Clip, 6),
            "x.json",
        )
        .unwrap_err();
        assert_eq!(err.kind, crate::ErrorKind::Model);
        assert!(
            err.message.contains("not a CLIP tokenizer"),
            "{}",
            err.message
        );
    }

    #[test]
    fn max_length_must_leave_room_for_content() {
        let err = PromptTokenizer::from_json(
            &tiny_tokenizer_json(true),
            settings(TokenizerStyle::Clip, 2),
            "x",
        )
        .unwrap_err();
        assert_eq!(err.kind, crate::ErrorKind::Model);
    }

    #[test]
    fn missing_and_corrupt_files_are_model_errors_with_a_fix() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("tokenizer_2").join("tokenizer.json");
        let err = PromptTokenizer::from_file(&missing, TokenizerSettings::t5(256)).unwrap_err();
        assert_eq!(err.kind, crate::ErrorKind::Model);
        assert!(
            err.message.contains(&missing.display().to_string()),
            "{}",
            err.message
        );
        assert!(err.message.contains("missing"), "{}", err.message);
        assert!(err.hint.as_deref().unwrap().contains("export"));

        let corrupt = dir.path().join("tokenizer.json");
        std::fs::write(&corrupt, b"{\"version\": \"1.0\", \"model\": ").unwrap();
        let err = PromptTokenizer::from_file(&corrupt, TokenizerSettings::clip(77)).unwrap_err();
        assert_eq!(err.kind, crate::ErrorKind::Model);
        assert!(
            err.message.contains("not a valid tokenizer.json"),
            "{}",
            err.message
        );
        assert!(err.hint.as_deref().unwrap().contains("tokenizer folder"));

        std::fs::write(&corrupt, [0xff, 0xfe, 0x00]).unwrap();
        let err = PromptTokenizer::from_file(&corrupt, TokenizerSettings::clip(77)).unwrap_err();
        assert_eq!(err.kind, crate::ErrorKind::Model);
        assert!(err.message.contains("cannot be read"), "{}", err.message);
    }

    #[test]
    fn missing_special_token_is_reported() {
        let json = tiny_tokenizer_json(true);
        let mut s = TokenizerSettings::clip(6);
        s.pad_id = 0;
        let err = PromptTokenizer::from_json(&json, s, "x.json").unwrap_err();
        assert!(err.message.contains("<|startoftext|>"), "{}", err.message);
    }

    /// A tiny Unigram tokenizer.json with the Hugging Face hub's old T5 pipeline (no WhitespaceSplit).
    fn tiny_hub_t5_json() -> String {
        r#"{"version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [
              {"id": 0, "content": "<pad>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
              {"id": 1, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
              {"id": 2, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
            "normalizer": {"type": "Sequence", "normalizers": [{"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]},
            "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "add_prefix_space": true},
            "post_processor": {"type": "TemplateProcessing",
              "single": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
              "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "</s>", "type_id": 0}}],
              "special_tokens": {"</s>": {"id": "</s>", "ids": [1], "tokens": ["</s>"]}}},
            "decoder": {"type": "Metaspace", "replacement": "\u2581", "add_prefix_space": true},
            "model": {"type": "Unigram", "unk_id": 2, "vocab": [["<pad>", 0.0], ["</s>", 0.0], ["<unk>", 0.0],
              ["\u2581", -2.0], ["\u2581cat", -1.0], ["\u2581dog", -1.0], ["c", -5.0], ["a", -5.0], ["t", -5.0],
              ["d", -5.0], ["o", -5.0], ["g", -5.0]]}}"#
            .to_string()
    }

    #[test]
    fn t5_hub_pipeline_is_rebuilt_like_transformers_5() {
        let json = tiny_hub_t5_json();
        // What raw `tokenizers` does with the hub's file: an extra `▁` (3) for trailing whitespace.
        let raw = Tokenizer::from_str(&json).unwrap();
        assert_eq!(raw.encode("cat dog ", false).unwrap().get_ids(), &[4, 5, 3]);
        let tok = PromptTokenizer::from_json(&json, TokenizerSettings::t5(6), "hub.json").unwrap();
        for prompt in ["cat dog", "cat dog ", "  cat \t dog\n", " cat  dog  "] {
            assert_eq!(
                tok.encode(prompt).unwrap().ids,
                vec![4, 5, 1, 0, 0, 0],
                "{prompt:?}"
            );
        }
        for prompt in ["", " ", " \t\n "] {
            assert_eq!(
                tok.encode(prompt).unwrap().ids,
                vec![1, 0, 0, 0, 0, 0],
                "{prompt:?}"
            );
        }
        assert_eq!(tok.decode(&[4, 5, 1]).unwrap(), "cat dog");
        // The rebuild leaves a CLIP (BPE) file and a non-Unigram T5-style file alone.
        let wordlevel = PromptTokenizer::from_json(
            &tiny_tokenizer_json(false),
            settings(TokenizerStyle::T5, 4),
            "tiny",
        )
        .unwrap();
        assert_eq!(wordlevel.encode("cat dog").unwrap().ids, vec![4, 5, 2, 0]);
    }

    /// A tiny CLIP folder in the hub's form: vocab.json + merges.txt (+ tokenizer_config.json).
    fn tiny_clip_folder(dir: &Path, with_config: bool) {
        let vocab = r#"{"a": 0, "c": 1, "t": 2, "d": 3, "o": 4, "g": 5, "!": 6, "a</w>": 7, "t</w>": 8,
            "g</w>": 9, "!</w>": 10, "ca": 11, "cat</w>": 12, "do": 13, "dog</w>": 14,
            "<|startoftext|>": 15, "<|endoftext|>": 16}"#;
        std::fs::write(dir.join(VOCAB_JSON), vocab).unwrap();
        std::fs::write(
            dir.join(MERGES_TXT),
            "#version: 0.2\nc a\nca t</w>\nd o\ndo g</w>\n",
        )
        .unwrap();
        if with_config {
            let config = r#"{"added_tokens_decoder": {
                "15": {"content": "<|startoftext|>", "lstrip": false, "normalized": true, "rstrip": false, "single_word": false, "special": true},
                "16": {"content": "<|endoftext|>", "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": true}},
              "bos_token": "<|startoftext|>", "eos_token": {"content": "<|endoftext|>"}, "pad_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>", "model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}"#;
            std::fs::write(dir.join(TOKENIZER_CONFIG_JSON), config).unwrap();
        }
    }

    #[test]
    fn clip_from_vocab_and_merges() {
        for with_config in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            tiny_clip_folder(dir.path(), with_config);
            let mut s = TokenizerSettings::clip(8);
            s.pad_id = 16;
            let tok = PromptTokenizer::from_folder(dir.path(), s).unwrap();
            assert_eq!((tok.bos_id(), tok.eos_id()), (Some(15), 16));
            assert_eq!(tok.path(), dir.path());
            // Lowercase, whitespace runs, punctuation split off, `</w>` word ends, unknown bytes -> unk.
            assert_eq!(
                tok.encode(" Cat\t\tDOG! cat ").unwrap().ids,
                vec![15, 12, 14, 10, 12, 16, 16, 16]
            );
            assert_eq!(tok.content_ids("cax").unwrap(), vec![11, 16]);
            assert_eq!(
                tok.content_ids("dog<|endoftext|>cat").unwrap(),
                vec![14, 16, 12]
            );
        }
    }

    #[test]
    fn locate_picks_the_form_a_folder_has() {
        let dir = tempfile::tempdir().unwrap();
        let clip = dir.path().join("tokenizer");
        std::fs::create_dir(&clip).unwrap();
        let err = TokenizerSource::locate(&clip, TokenizerStyle::Clip).unwrap_err();
        assert_eq!(err.kind, crate::ErrorKind::Model);
        assert!(
            err.message.contains(&clip.display().to_string()),
            "{}",
            err.message
        );
        tiny_clip_folder(&clip, false);
        let vm = TokenizerSource::VocabMerges(clip.clone());
        assert_eq!(
            TokenizerSource::locate(&clip, TokenizerStyle::Clip).unwrap(),
            vm
        );
        // The manifest's tokenizer.json path falls back to the folder's vocab.json + merges.txt (CLIP only).
        let json = clip.join(TOKENIZER_JSON);
        assert_eq!(
            TokenizerSource::locate(&json, TokenizerStyle::Clip).unwrap(),
            vm
        );
        assert!(TokenizerSource::locate(&json, TokenizerStyle::T5).is_err());
        assert!(TokenizerSource::locate(&clip, TokenizerStyle::T5).is_err());
        // tokenizer.json wins when both are there.
        std::fs::write(&json, tiny_tokenizer_json(true)).unwrap();
        assert_eq!(
            TokenizerSource::locate(&clip, TokenizerStyle::Clip).unwrap(),
            TokenizerSource::Json(json.clone())
        );
        assert_eq!(
            TokenizerSource::locate(&json, TokenizerStyle::Clip)
                .unwrap()
                .path(),
            json
        );
    }

    // ---- goldens: the real CLIP-L and T5 v1.1 tokenizers against transformers' ids ----

    fn repo_path(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
    }

    fn load_goldens() -> serde_json::Value {
        let path = repo_path("tests/goldens/tokenizer_cases.json");
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).unwrap()
    }

    fn golden_settings(goldens: &serde_json::Value, key: &str) -> TokenizerSettings {
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

    fn check_goldens(key: &str, file: &str) {
        let goldens = load_goldens();
        let settings = golden_settings(&goldens, key);
        let max = settings.max_length;
        let path = repo_path(file);
        let tok = PromptTokenizer::from_file(&path, settings).unwrap_or_else(|e| panic!("{e}"));
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
            assert_eq!(got.ids.len(), max, "{name}");
            if got.ids != want {
                let first = got.ids.iter().zip(&want).position(|(a, b)| a != b);
                failures.push(format!("{name}: first difference at {first:?}"));
            } else if got.untruncated_len() != untruncated || got.used != untruncated.min(max) {
                failures.push(format!(
                    "{name}: used {} lost {}, transformers untruncated length {untruncated}",
                    got.used, got.lost
                ));
            }
            assert_eq!(
                truncation_warning(key, &got, max).is_some(),
                untruncated > max,
                "{name}"
            );
        }
        assert!(
            failures.is_empty(),
            "{key}: {} of {} cases differ:\n{}",
            failures.len(),
            cases.len(),
            failures.join("\n")
        );
        // The batch path gives the same answers.
        let prompts: Vec<&str> = cases
            .iter()
            .map(|c| c["prompt"].as_str().unwrap())
            .collect();
        let batch = tok.encode_batch(&prompts).unwrap();
        for (case, got) in cases.iter().zip(batch) {
            let want: Vec<i64> = case[format!("{key}_ids")]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect();
            assert_eq!(got.ids, want);
        }
    }

    #[test]
    fn clip_matches_transformers_on_every_golden_case() {
        check_goldens("clip", "models/tiny-flux-schnell/tokenizer/tokenizer.json");
    }

    #[test]
    fn t5_matches_transformers_on_every_golden_case() {
        check_goldens("t5", "models/tiny-flux-schnell/tokenizer_2/tokenizer.json");
    }

    #[test]
    fn real_tokenizers_known_ids() {
        let clip = PromptTokenizer::from_file(
            repo_path("models/tiny-flux-schnell/tokenizer/tokenizer.json"),
            TokenizerSettings::clip(77),
        )
        .unwrap();
        assert_eq!((clip.bos_id(), clip.eos_id()), (Some(49406), 49407));
        assert_eq!(
            &clip.encode("a photo of a cat").unwrap().ids[..8],
            &[49406, 320, 1125, 539, 320, 2368, 49407, 49407]
        );
        let t5 = PromptTokenizer::from_file(
            repo_path("models/tiny-flux-schnell/tokenizer_2/tokenizer.json"),
            TokenizerSettings::t5(256),
        )
        .unwrap();
        assert_eq!(t5.eos_id(), 1);
        let t = t5.encode("a photo of a cat ").unwrap();
        assert_eq!(&t.ids[..9], &[3, 9, 1202, 13, 3, 9, 1712, 1, 0]);
        assert_eq!((t.ids.len(), t.used, t.lost), (256, 8, 0));
        assert_eq!(&t5.encode("Hello world").unwrap().ids[..3], &[8774, 296, 1]);
        assert_eq!(t5.decode(&[8774, 296, 1]).unwrap(), "Hello world");
    }
}
