//! True classifier-free guidance with a negative prompt (diffusers' `FluxPipeline(..., negative_prompt=...,
//! true_cfg_scale=S)`): two transformer evaluations per step on the same latents, timestep and (dev) distilled
//! guidance, one with the prompt and one with the negative prompt, combined in f32 as
//! `v = v_neg + S * (v_pos - v_neg)` before the Euler step.
//!
//! diffusers' rule, kept here: true CFG runs only when `S > 1` AND a negative prompt is given; either one alone is
//! ignored (with a warning). The negative prompt is encoded exactly like the prompt (its T5 prompt is itself,
//! as `negative_prompt_2` defaults to `negative_prompt`). Both evaluations go into one transformer call of batch
//! 2B when the graph's batch dimension is dynamic ([`crate::pipeline`]'s `run_graph` splits it into single-image
//! calls for a batch-1 graph). schnell accepts it as diffusers does, with a warning: it was distilled without CFG.

use ndarray::{concatenate, Array3, ArrayD, Axis};

use crate::model::{Role, Variant};
use crate::pipeline::{Pipeline, Request, Timings, Trace};
use crate::runtime::Canceller;
use crate::text::truncation_warning;
use crate::{Error, Result};

/// diffusers' default `true_cfg_scale`: off.
pub const DEFAULT_TRUE_CFG: f32 = 1.0;

/// Whether a request runs true CFG (diffusers' `do_true_cfg`).
pub fn active(req: &Request) -> bool {
    is_on(req.true_cfg, req.negative_prompt.is_some())
}

/// [`active`] from a scale and whether there is a negative prompt, before a request exists (e.g. to size the
/// shapes a pipeline is loaded for).
pub fn is_on(true_cfg: f32, has_negative_prompt: bool) -> bool {
    true_cfg > 1.0 && has_negative_prompt
}

pub fn validate(req: &Request) -> Result<()> {
    if !req.true_cfg.is_finite() || req.true_cfg < 0.0 {
        return Err(Error::input(format!(
            "true-cfg must be a finite number >= 0, got {}",
            req.true_cfg
        ))
        .with_hint("values above 1 turn true CFG on (with a negative prompt); 4.0 is common"));
    }
    Ok(())
}

/// Requests share a batch when both run true CFG with the same scale, or neither does.
pub fn batches_with(a: &Request, b: &Request) -> bool {
    match (active(a), active(b)) {
        (false, false) => true,
        (true, true) => a.true_cfg == b.true_cfg,
        _ => false,
    }
}

/// What the user should know about a request's negative prompt and scale.
pub fn warnings(req: &Request, variant: Variant, model: &str) -> Vec<String> {
    let mut w = Vec::new();
    match (&req.negative_prompt, req.true_cfg > 1.0) {
        (Some(_), false) => w.push(format!(
            "the negative prompt is ignored: true CFG needs a true-cfg scale above 1 (got {})",
            req.true_cfg
        )),
        (None, true) => w.push(format!(
            "true-cfg {} is ignored without a negative prompt",
            req.true_cfg
        )),
        _ => {}
    }
    if variant == Variant::Schnell && req.negative_prompt.is_some() {
        w.push(format!(
            "{model} is a schnell model, distilled to run without classifier-free guidance: a negative prompt{} \
             does not work as intended{}",
            if active(req) { " doubles the transformer work and" } else { "" },
            if active(req) { " (run as diffusers does)" } else { "" }
        ));
    }
    w
}

/// `v = v_neg + scale * (v_pos - v_neg)` in f32, diffusers' operation order.
pub fn combine(pos: &[f32], neg: &[f32], scale: f32) -> Vec<f32> {
    assert_eq!(pos.len(), neg.len(), "both halves have the same length");
    pos.iter()
        .zip(neg)
        .map(|(&p, &n)| n + scale * (p - n))
        .collect()
}

/// A batch's true-CFG state: the prompt rows followed by the negative rows, ready for a 2B transformer call.
pub(crate) struct TrueCfg {
    scale: f32,
    /// Images in the batch (B).
    rows: usize,
    txt: ArrayD<f32>,
    pooled: ArrayD<f32>,
    clip_ids: Vec<Vec<i64>>,
    t5_ids: Vec<Vec<i64>>,
    neg_txt: ArrayD<f32>,
    neg_pooled: ArrayD<f32>,
}

/// Encodes the batch's negative prompts (through the embedding cache when the pipeline has one); `None` when the
/// batch does not run true CFG. `txt` and `pooled` are the prompt embeddings, one row per image.
#[allow(clippy::too_many_arguments)]
pub(crate) fn prepare(
    pipe: &mut Pipeline,
    reqs: &[Request],
    txt: &ArrayD<f32>,
    pooled: &ArrayD<f32>,
    cancel: &Canceller,
    t: &mut Timings,
    warnings: &mut [Vec<String>],
) -> Result<Option<TrueCfg>> {
    let Some(first) = reqs.first() else {
        return Ok(None);
    };
    if !active(first) {
        return Ok(None);
    }
    // The negative prompt plays the prompt's part (prompt_2 = None: T5 gets it too).
    let neg: Vec<Request> = reqs
        .iter()
        .map(|r| Request {
            prompt: r.negative_prompt.clone().unwrap_or_default(),
            prompt_2: None,
            ..r.clone()
        })
        .collect();
    let (clip_tok, t5_tok) = pipe.tokenizers();
    let mut per_request = Vec::with_capacity(neg.len());
    let (mut clip_ids, mut t5_ids) = (Vec::new(), Vec::new());
    for (r, warn) in neg.iter().zip(warnings.iter_mut()) {
        let clip = clip_tok.encode(&r.prompt)?;
        let t5 = t5_tok.encode(&r.prompt)?;
        for (which, tok, max) in [
            ("CLIP", &clip, clip_tok.max_length()),
            ("T5", &t5, t5_tok.max_length()),
        ] {
            if let Some(w) = truncation_warning(which, tok, max) {
                warn.push(format!("negative prompt: {w}"));
            }
        }
        for _ in 0..r.num_images {
            clip_ids.push(clip.ids.clone());
            t5_ids.push(t5.ids.clone());
        }
        per_request.push((clip.ids, t5.ids));
    }
    let mut nt = Timings::default();
    let (neg_pooled, neg_txt) = match pipe.embedding_cache().cloned() {
        Some(cache) => pipe.encode_cached(&cache, &neg, &per_request, cancel, &mut nt)?,
        None => {
            let (p, dt) = pipe.encode(Role::Clip, &clip_ids, cancel)?;
            nt.clip = dt;
            let (x, dt) = pipe.encode(Role::T5, &t5_ids, cancel)?;
            nt.t5 = dt;
            (p, x)
        }
    };
    t.clip += nt.clip;
    t.t5 += nt.t5;
    if neg_txt.shape() != txt.shape() || neg_pooled.shape() != pooled.shape() {
        return Err(Error::model(format!(
            "the negative prompt's embeddings {:?} / {:?} differ in shape from the prompt's {:?} / {:?}",
            neg_txt.shape(),
            neg_pooled.shape(),
            txt.shape(),
            pooled.shape()
        )));
    }
    let join = |a: &ArrayD<f32>, b: &ArrayD<f32>| {
        concatenate(Axis(0), &[a.view(), b.view()])
            .map_err(|e| Error::runtime(format!("cannot join the CFG batch: {e}")))
    };
    Ok(Some(TrueCfg {
        scale: first.true_cfg,
        rows: txt.shape()[0],
        txt: join(txt, &neg_txt)?,
        pooled: join(pooled, &neg_pooled)?,
        clip_ids,
        t5_ids,
        neg_txt,
        neg_pooled,
    }))
}

impl TrueCfg {
    /// The guided velocity for the packed latents `x` `[B, S, 64]`: one transformer call on `[x; x]` with the
    /// prompt and negative rows, then [`combine`].
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn velocity(
        &self,
        pipe: &mut Pipeline,
        x: &Array3<f32>,
        t: f32,
        guidance: Option<f32>,
        img_ids: &ArrayD<f32>,
        txt_ids: &ArrayD<f32>,
        cancel: &Canceller,
    ) -> Result<Array3<f32>> {
        let both = concatenate(Axis(0), &[x.view(), x.view()])
            .map_err(|e| Error::runtime(format!("cannot join the CFG batch: {e}")))?;
        let v = pipe.velocity(
            &both,
            &self.txt,
            &self.pooled,
            t,
            guidance,
            img_ids,
            txt_ids,
            cancel,
        )?;
        if v.shape()[0] != 2 * self.rows {
            return Err(Error::model(format!(
                "the transformer returned {} rows for a CFG batch of {}",
                v.shape()[0],
                2 * self.rows
            )));
        }
        let v = v.as_standard_layout();
        let flat = v.as_slice().expect("standard layout");
        let half = flat.len() / 2;
        let out = combine(&flat[..half], &flat[half..], self.scale);
        Ok(Array3::from_shape_vec(x.raw_dim(), out).expect("velocity keeps the latents' shape"))
    }

    /// The joined 2B text embeddings and pooled vectors (prompt rows, then negative rows) and the scale, for a
    /// loop that combines the halves itself (the device loop's step graph).
    pub(crate) fn batch_inputs(&self) -> (&ArrayD<f32>, &ArrayD<f32>, f32) {
        (&self.txt, &self.pooled, self.scale)
    }

    /// Records the negative prompt's ids and embeddings in a trace.
    pub(crate) fn trace(&self, tr: &mut Trace) {
        tr.negative_clip_ids = self.clip_ids.clone();
        tr.negative_t5_ids = self.t5_ids.clone();
        tr.negative_prompt_embeds = Some(self.neg_txt.clone());
        tr.negative_pooled_embeds = Some(self.neg_pooled.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combine_matches_torch() {
        // neg + 4.0 * (pos - neg) in float32 (torch: n + 4.0 * (p - n)).
        let pos = [0.1f32, -2.5, 3.3, 1e-3];
        let neg = [1.7f32, 0.2, -0.9, -4.1];
        assert_eq!(combine(&pos, &neg, 4.0), [-4.7, -10.6, 15.9, 12.303999]);
        // Scale 1 gives the positive half (up to rounding), scale 0 the negative one.
        assert_eq!(combine(&pos, &neg, 0.0), neg);
    }
}
