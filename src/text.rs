//! Prompt tokenization for FLUX.1's two text encoders, reproducing diffusers' `FluxPipeline` exactly.
//!
//! diffusers tokenizes a prompt with `padding="max_length", truncation=True`:
//! - CLIP-L (`tokenizer/`): `[bos] content… [eos]`, padded with `pad_id` (`<|endoftext|>`, 49407) to 77;
//! - T5 v1.1 (`tokenizer_2/`): `content… [eos]`, padded with `<pad>` (0) to 256 or 512.
//!
//! When a prompt is too long the *content* is cut and the special tokens are kept, so the last id before
//! the padding is always `eos`. The tokenizer.json files are written by the export step from the
//! transformers-5 backend tokenizer (padding and truncation off), so this module only tokenizes the content
//! with the `tokenizers` crate and does the special tokens, truncation and padding itself, where they can be
//! tested and reported ([`Tokenized::lost`], [`truncation_warning`]).

use std::path::{Path, PathBuf};
use std::str::FromStr;

use tokenizers::Tokenizer;

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

/// A CLIP or T5 tokenizer loaded from a tokenizer.json, padding and truncating like diffusers.
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

const FIX_HINT: &str = "re-run the export step (`python -m export`) or copy the checkpoint's tokenizer folder \
                        (`tokenizer/` for CLIP, `tokenizer_2/` for T5, with its tokenizer.json) into the model folder";

impl PromptTokenizer {
    /// Loads `path` (a tokenizer.json). A missing, unreadable or corrupt file, or one whose special tokens do
    /// not fit `settings`, is an [`Error::model`] naming the file and the fix.
    pub fn from_file(path: impl AsRef<Path>, settings: TokenizerSettings) -> Result<Self> {
        let path = path.as_ref();
        let which = settings.style.name();
        let json = std::fs::read_to_string(path).map_err(|e| {
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

    /// Like [`PromptTokenizer::from_file`] for tokenizer.json text already in memory; `origin` names it in errors.
    pub fn from_json(
        json: &str,
        settings: TokenizerSettings,
        origin: impl Into<PathBuf>,
    ) -> Result<Self> {
        let path = origin.into();
        let which = settings.style.name();
        let bad = |msg: String| Error::model(msg).with_hint(FIX_HINT);
        let mut tokenizer = Tokenizer::from_str(json).map_err(|e| {
            bad(format!(
                "the {which} tokenizer file {} is not a valid tokenizer.json: {e}",
                path.display()
            ))
        })?;
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

    /// The tokenizer.json this was loaded from.
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
