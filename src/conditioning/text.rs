//! Text-to-image, the part every batch starts from: tokenize and encode the prompts (through the embedding cache
//! when there is one), draw each image's noise from its seed, and make the schedule, ids and guidance.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ndarray::{Array4, ArrayD, Axis};

use super::{Batch, Context};
use crate::embeddings::{EmbeddingCache, EmbeddingKey, PromptEmbedding};
use crate::engine::Engine;
use crate::model::{Role, Variant};
use crate::runtime::Canceller;
use crate::text::truncation_warning;
use crate::{latents, noise, schedule, Error, Result};

/// One request's prompts: CLIP's, T5's, and the images that share them.
pub struct Prompts<'a> {
    pub clip: &'a str,
    pub t5: &'a str,
    pub images: usize,
}

/// A batch's prompts, tokenized and encoded: one row per image.
pub struct Encoded {
    pub pooled: ArrayD<f32>,
    pub txt: ArrayD<f32>,
    pub clip_ids: Vec<Vec<i64>>,
    pub t5_ids: Vec<Vec<i64>>,
    pub tokenize: Duration,
    /// Zero when every prompt came from the cache.
    pub clip: Duration,
    pub t5: Duration,
    /// Truncation warnings, one list per request.
    pub warnings: Vec<Vec<String>>,
}

/// Tokenizes and encodes each request's prompts; with `cache`, only the prompts it does not hold are encoded (one
/// row each, one call per encoder) and stored. Cached or not, the transformer gets the same rows.
pub fn encode(
    engine: &mut Engine,
    cache: Option<&EmbeddingCache>,
    prompts: &[Prompts],
    cancel: &Canceller,
) -> Result<Encoded> {
    let t0 = Instant::now();
    let (clip_tok, t5_tok) = engine.tokenizers();
    let (mut clip_ids, mut t5_ids, mut per_request, mut warnings) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for p in prompts {
        let clip = clip_tok.encode(p.clip)?;
        let t5 = t5_tok.encode(p.t5)?;
        let w = [
            truncation_warning("CLIP", &clip, clip_tok.max_length()),
            truncation_warning("T5", &t5, t5_tok.max_length()),
        ];
        warnings.push(w.into_iter().flatten().collect());
        for _ in 0..p.images {
            clip_ids.push(clip.ids.clone());
            t5_ids.push(t5.ids.clone());
        }
        per_request.push((clip.ids, t5.ids));
    }
    let tokenize = t0.elapsed();
    let ((pooled, clip), (txt, t5)) = match cache {
        Some(cache) => encode_cached(engine, cache, prompts, &per_request, cancel)?,
        None => (
            engine.encode_text(Role::Clip, &clip_ids, cancel)?,
            engine.encode_text(Role::T5, &t5_ids, cancel)?,
        ),
    };
    Ok(Encoded {
        pooled,
        txt,
        clip_ids,
        t5_ids,
        tokenize,
        clip,
        t5,
        warnings,
    })
}

/// Adds an encoding's times to the batch's and its truncation warnings (each after `prefix`) to the requests'.
pub fn account(cx: &mut Context, enc: &mut Encoded, prefix: &str) {
    cx.timings.tokenize += enc.tokenize;
    cx.timings.clip += enc.clip;
    cx.timings.t5 += enc.t5;
    for (w, e) in cx
        .warnings
        .iter_mut()
        .zip(std::mem::take(&mut enc.warnings))
    {
        w.extend(e.into_iter().map(|e| format!("{prefix}{e}")));
    }
}

type Timed = (ArrayD<f32>, Duration);

/// [`encode`] through the cache: looks up each distinct prompt pair, encodes the missing ones, stores them, and
/// returns the rows repeated per image.
fn encode_cached(
    engine: &mut Engine,
    cache: &EmbeddingCache,
    prompts: &[Prompts],
    ids: &[(Vec<i64>, Vec<i64>)],
    cancel: &Canceller,
) -> Result<(Timed, Timed)> {
    let model = engine.spec.root.display().to_string();
    let keys: Vec<EmbeddingKey> = prompts
        .iter()
        .map(|p| EmbeddingKey {
            model: model.clone(),
            prompt: p.clip.to_string(),
            prompt_2: p.t5.to_string(),
        })
        .collect();
    let mut found: HashMap<&EmbeddingKey, Arc<PromptEmbedding>> = HashMap::new();
    let mut missing: Vec<usize> = Vec::new();
    for (i, k) in keys.iter().enumerate() {
        if found.contains_key(k) || missing.iter().any(|&j| keys[j] == *k) {
            continue;
        }
        match cache.get(k) {
            Some(e) => {
                found.insert(k, e);
            }
            None => missing.push(i),
        }
    }
    let (mut clip, mut t5) = (Duration::ZERO, Duration::ZERO);
    if !missing.is_empty() {
        let clip_rows: Vec<Vec<i64>> = missing.iter().map(|&i| ids[i].0.clone()).collect();
        let t5_rows: Vec<Vec<i64>> = missing.iter().map(|&i| ids[i].1.clone()).collect();
        let (pooled, dt) = engine.encode_text(Role::Clip, &clip_rows, cancel)?;
        clip = dt;
        let (txt, dt) = engine.encode_text(Role::T5, &t5_rows, cancel)?;
        t5 = dt;
        for (row, &i) in missing.iter().enumerate() {
            let emb = Arc::new(PromptEmbedding {
                pooled: pooled.slice_axis(Axis(0), (row..row + 1).into()).to_owned(),
                txt: txt.slice_axis(Axis(0), (row..row + 1).into()).to_owned(),
            });
            cache.insert(keys[i].clone(), emb.clone());
            found.insert(&keys[i], emb);
        }
    }
    let (mut p_rows, mut t_rows) = (Vec::new(), Vec::new());
    for (p, k) in prompts.iter().zip(&keys) {
        let e = &found[k];
        for _ in 0..p.images {
            p_rows.push(e.pooled.view());
            t_rows.push(e.txt.view());
        }
    }
    let join = |rows: &[ndarray::ArrayViewD<f32>]| {
        ndarray::concatenate(Axis(0), rows)
            .map_err(|e| Error::runtime(format!("cannot join cached embeddings: {e}")))
    };
    Ok(((join(&p_rows)?, clip), (join(&t_rows)?, t5)))
}

/// Initial noise `[B,C,h,w]`: image i is `torch.randn` of one image with `seeds[i]`.
pub fn draw_noise(seeds: &[u64], channels: usize, h: usize, w: usize) -> Array4<f32> {
    let per = channels * h * w;
    let mut all = Vec::with_capacity(seeds.len() * per);
    for &seed in seeds {
        all.extend(noise::randn(seed, per));
    }
    Array4::from_shape_vec((seeds.len(), channels, h, w), all)
        .expect("noise length matches its shape")
}

/// The text-to-image batch: the prompts encoded, each image's noise from its seed (exactly as `torch.randn` with a CPU
/// generator), packed as the start latents, the full schedule for the image's sequence length, the ids and (dev) the
/// distilled guidance.
pub fn prepare(cx: &mut Context) -> Result<Batch> {
    let prompts: Vec<Prompts> = cx
        .reqs
        .iter()
        .map(|r| Prompts {
            clip: &r.prompt,
            t5: r.t5_prompt(),
            images: r.num_images,
        })
        .collect();
    let mut enc = encode(cx.engine, cx.embeddings, &prompts, cx.cancel)?;
    account(cx, &mut enc, "");
    if let Some(tr) = cx.trace.as_deref_mut() {
        tr.clip_ids = enc.clip_ids;
        tr.t5_ids = enc.t5_ids;
        tr.pooled_embeds = Some(enc.pooled.clone());
        tr.prompt_embeds = Some(enc.txt.clone());
    }

    let spec = &cx.engine.spec;
    let first = cx.first();
    let (h, w) = latents::latent_hw(first.width, first.height, spec.vae.downsample_factor);
    let noise = draw_noise(&cx.seeds, spec.latent_channels, h, w);
    let x = latents::pack(&noise.view());
    let sigmas = schedule::sigmas(first.steps, x.shape()[1], &spec.scheduler())?;
    let timesteps = schedule::timesteps(&sigmas);
    let guidance = match cx.engine.variant() {
        Variant::Dev => Some(first.guidance.or(spec.defaults().guidance).unwrap_or(3.5)),
        Variant::Schnell => None,
    };
    Ok(Batch {
        x,
        noise,
        sigmas,
        timesteps,
        img_ids: latents::img_ids(h, w).into_dyn(),
        txt_ids: latents::txt_ids(enc.txt.shape()[1]).into_dyn(),
        txt: enc.txt,
        pooled: enc.pooled,
        guidance,
        extra: Arc::default(),
        cfg_scale: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_of_image_i_uses_seed_plus_i() {
        let both = draw_noise(&[7, 8], 16, 4, 4);
        let second = draw_noise(&[8], 16, 4, 4);
        assert_eq!(both.index_axis(Axis(0), 1), second.index_axis(Axis(0), 0));
        assert_ne!(both.index_axis(Axis(0), 0), both.index_axis(Axis(0), 1));
    }
}
