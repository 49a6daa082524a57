//! The true-CFG part ([`crate::guidance`] has the rule and the arithmetic): encodes the negative prompts exactly as
//! the prompts (their T5 prompt is themselves, as `negative_prompt_2` defaults to `negative_prompt`), puts their
//! rows after the prompt rows and sets the scale; every denoising strategy then runs the transformer on `[x; x]`
//! and combines the halves.

use ndarray::{concatenate, ArrayD, Axis};

use super::text::{account, encode, Prompts};
use super::{Batch, Context, Part};
use crate::guidance;
use crate::{Error, Result};

pub struct TrueCfg;

impl Part for TrueCfg {
    fn prepare(&mut self, cx: &mut Context, batch: &mut Batch) -> Result<()> {
        let (variant, model) = (cx.engine.variant(), cx.engine.spec.name.clone());
        for (r, w) in cx.reqs.iter().zip(cx.warnings.iter_mut()) {
            w.extend(guidance::warnings(r, variant, &model));
        }
        if !cx.first().true_cfg_active() {
            return Ok(());
        }
        let prompts: Vec<Prompts> = cx
            .reqs
            .iter()
            .map(|r| {
                let negative = r.negative_prompt.as_deref().unwrap_or_default();
                Prompts {
                    clip: negative,
                    t5: negative,
                    images: r.num_images,
                }
            })
            .collect();
        let mut neg = encode(cx.engine, cx.embeddings, &prompts, cx.cancel)?;
        account(cx, &mut neg, "negative prompt: ");
        if neg.txt.shape() != batch.txt.shape() || neg.pooled.shape() != batch.pooled.shape() {
            return Err(Error::model(format!(
                "the negative prompt's embeddings {:?} / {:?} differ in shape from the prompt's {:?} / {:?}",
                neg.txt.shape(),
                neg.pooled.shape(),
                batch.txt.shape(),
                batch.pooled.shape()
            )));
        }
        batch.txt = join(&batch.txt, &neg.txt)?;
        batch.pooled = join(&batch.pooled, &neg.pooled)?;
        batch.cfg_scale = Some(cx.first().true_cfg);
        if let Some(tr) = cx.trace.as_deref_mut() {
            tr.negative_clip_ids = neg.clip_ids;
            tr.negative_t5_ids = neg.t5_ids;
            tr.negative_prompt_embeds = Some(neg.txt);
            tr.negative_pooled_embeds = Some(neg.pooled);
        }
        Ok(())
    }
}

/// The prompt rows, then the negative rows.
fn join(a: &ArrayD<f32>, b: &ArrayD<f32>) -> Result<ArrayD<f32>> {
    concatenate(Axis(0), &[a.view(), b.view()])
        .map_err(|e| Error::runtime(format!("cannot join the CFG batch: {e}")))
}
