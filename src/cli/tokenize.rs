//! `fluxrt tokenize`: how both tokenizers split a prompt: each token with its id and string, the padding counted
//! rather than listed, and what truncation dropped; `--json` adds the full padded id rows the encoders receive.

use std::path::PathBuf;

use clap::Args as ClapArgs;
use fluxrt::model::ModelSpec;
use fluxrt::text::{PromptTokenizer, Tokenized};
use fluxrt::Result;
use serde_json::json;

use super::common::{model_path, print_json, print_out, PromptArgs};

#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(flatten)]
    input: PromptArgs,
    /// T5 sequence length (default: the model's, 256 for schnell and 512 for dev).
    #[arg(long)]
    t5_max_length: Option<usize>,
    /// Tokenizers for a model folder without them (BFL's ONNX downloads): a folder holding tokenizer/ and
    /// tokenizer_2/, or a repo id in the Hugging Face cache. Default: the model folder, then the cache.
    #[arg(long, value_name = "DIR|REPO", env = "FLUXRT_TOKENIZERS")]
    tokenizers: Option<PathBuf>,
    /// Print JSON on stdout: per tokenizer the full padded ids, the tokens, lengths and truncation.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let spec =
        ModelSpec::resolve_with(&model_path(a.input.model.clone()), a.tokenizers.as_deref())?;
    let clip = PromptTokenizer::from_file(
        &spec.clip_tokenizer.path,
        spec.clip_tokenizer.settings.clone(),
    )?;
    let mut t5_settings = spec.t5_tokenizer.settings.clone();
    if let Some(n) = a.t5_max_length {
        t5_settings.max_length = n;
    }
    let t5 = PromptTokenizer::from_file(&spec.t5_tokenizer.path, t5_settings)?;
    let t5_prompt = a.input.prompt_2.as_deref().unwrap_or(&a.input.prompt);
    let (c, t) = (clip.encode(&a.input.prompt)?, t5.encode(t5_prompt)?);
    if a.json {
        return print_json(&json!({
            "model": spec.name,
            "clip": describe(&clip, &c),
            "t5": describe(&t5, &t),
        }));
    }
    let mut text = format!("model {}\n", spec.name);
    for (name, tok, tokenized, prompt) in [
        ("CLIP", &clip, &c, a.input.prompt.as_str()),
        ("T5", &t5, &t, t5_prompt),
    ] {
        text += &table(name, tok, tokenized, prompt)?;
    }
    print_out(&text)
}

/// One tokenizer's tokens as lines `position  id  token`, then the padding and any truncation in words.
fn table(name: &str, tok: &PromptTokenizer, t: &Tokenized, prompt: &str) -> Result<String> {
    let used = &t.ids[..t.used];
    let mut out = format!(
        "\n{name}: {} of {} tokens used, {} padding\n",
        t.used,
        tok.max_length(),
        t.ids.len() - t.used
    );
    for (i, (id, s)) in used.iter().zip(tok.token_strings(used)).enumerate() {
        out += &format!("  {i:4}  {id:6}  {s}\n");
    }
    if t.lost > 0 {
        let content: Vec<i64> = tok
            .content_ids(prompt)?
            .into_iter()
            .map(i64::from)
            .collect();
        let dropped = tok.token_strings(&content[content.len() - t.lost..]);
        out += &format!(
            "  truncated: the last {} token(s) do not fit and are dropped: {}\n",
            t.lost,
            dropped.join(" ")
        );
    }
    Ok(out)
}

fn describe(tok: &PromptTokenizer, t: &Tokenized) -> serde_json::Value {
    json!({
        "ids": t.ids,
        "tokens": tok.token_strings(&t.ids[..t.used]),
        "max_length": tok.max_length(),
        "length": t.used,
        "padding": t.ids.len() - t.used,
        "untruncated_length": t.untruncated_len(),
        "truncated": t.lost > 0,
        "tokens_lost": t.lost,
    })
}
