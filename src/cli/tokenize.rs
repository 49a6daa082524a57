//! `fluxrt tokenize`: both tokenizers' ids, lengths and truncation, as JSON.

use clap::Args as ClapArgs;
use fluxrt::model::ModelSpec;
use fluxrt::text::{PromptTokenizer, Tokenized};
use fluxrt::Result;
use serde_json::json;

use super::common::{model_path, print_json, PromptArgs};

#[derive(ClapArgs, Debug)]
pub struct Args {
    #[command(flatten)]
    input: PromptArgs,
    /// T5 sequence length (default: the model's, 256 for schnell and 512 for dev).
    #[arg(long)]
    t5_max_length: Option<usize>,
}

pub fn run(a: Args) -> Result<()> {
    let spec = ModelSpec::resolve(&model_path(a.input.model.clone()))?;
    let clip = PromptTokenizer::from_file(
        &spec.clip_tokenizer.path,
        spec.clip_tokenizer.settings.clone(),
    )?;
    let mut t5_settings = spec.t5_tokenizer.settings.clone();
    if let Some(n) = a.t5_max_length {
        t5_settings.max_length = n;
    }
    let t5 = PromptTokenizer::from_file(&spec.t5_tokenizer.path, t5_settings)?;
    let c = clip.encode(&a.input.prompt)?;
    let t = t5.encode(a.input.prompt_2.as_deref().unwrap_or(&a.input.prompt))?;
    print_json(&json!({
        "model": spec.name,
        "clip": describe(&c, clip.max_length()),
        "t5": describe(&t, t5.max_length()),
    }));
    Ok(())
}

fn describe(t: &Tokenized, max: usize) -> serde_json::Value {
    json!({
        "ids": t.ids,
        "max_length": max,
        "length": t.used,
        "untruncated_length": t.untruncated_len(),
        "truncated": t.lost > 0,
        "tokens_lost": t.lost,
    })
}
