//! True classifier-free guidance with a negative prompt (diffusers' `FluxPipeline(..., negative_prompt=...,
//! true_cfg_scale=S)`): two transformer evaluations per step on the same latents, timestep and (dev) distilled
//! guidance, one with the prompt and one with the negative prompt, combined in f32 as
//! `v = v_neg + S * (v_pos - v_neg)` before the Euler step.
//!
//! diffusers' rule, kept here: true CFG runs only when `S > 1` AND a negative prompt is given; either one alone is
//! ignored (with a warning). The negative prompt is encoded exactly like the prompt (its T5 prompt is itself,
//! as `negative_prompt_2` defaults to `negative_prompt`: [`crate::conditioning::true_cfg`]). Both evaluations go into
//! one transformer call of batch 2B when the graph's batch dimension is dynamic (the engine splits it into
//! single-image calls for a batch-1 graph); every denoising strategy combines the halves ([`guided_velocity`] on the
//! host, the step graph on the device). schnell accepts it as diffusers does, with a warning: it was distilled
//! without CFG.

use ndarray::{concatenate, Array3, ArrayView3, Axis};

use crate::model::Variant;
use crate::request::Request;
pub use crate::request::DEFAULT_TRUE_CFG;
use crate::{Error, Result};

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
    let active = req.true_cfg_active();
    if variant == Variant::Schnell && req.negative_prompt.is_some() {
        w.push(format!(
            "{model} is a schnell model, distilled to run without classifier-free guidance: a negative prompt{} \
             does not work as intended{}",
            if active { " doubles the transformer work and" } else { "" },
            if active { " (run as diffusers does)" } else { "" }
        ));
    }
    w
}

/// `v = v_neg + scale * (v_pos - v_neg)` in f32, diffusers' operation order, into `out`.
pub fn combine_into(pos: &[f32], neg: &[f32], scale: f32, out: &mut [f32]) {
    assert!(
        pos.len() == neg.len() && out.len() == pos.len(),
        "both halves have the output's length"
    );
    for ((o, &p), &n) in out.iter_mut().zip(pos).zip(neg) {
        *o = n + scale * (p - n);
    }
}

/// [`combine_into`] a new vector.
pub fn combine(pos: &[f32], neg: &[f32], scale: f32) -> Vec<f32> {
    let mut out = vec![0.0; pos.len()];
    combine_into(pos, neg, scale, &mut out);
    out
}

/// True CFG as a velocity wrapper: `model` evaluated once on `[x; x]` (the caller's text rows hold the prompt rows,
/// then the negative rows), its halves combined with `scale`.
pub fn guided_velocity(
    x: &Array3<f32>,
    scale: f32,
    model: impl FnOnce(&Array3<f32>) -> Result<Array3<f32>>,
) -> Result<Array3<f32>> {
    let both = doubled(x.view())?;
    let v = model(&both)?;
    if v.shape() != both.shape() {
        return Err(Error::model(format!(
            "the transformer returned {:?} for a CFG batch of {:?}",
            v.shape(),
            both.shape()
        )));
    }
    let v = v.as_standard_layout();
    let flat = v.as_slice().expect("standard layout");
    let half = flat.len() / 2;
    let out = combine(&flat[..half], &flat[half..], scale);
    Ok(Array3::from_shape_vec(x.raw_dim(), out).expect("velocity keeps the latents' shape"))
}

/// `[x; x]`: the latents for both halves of a CFG call.
pub fn doubled(x: ArrayView3<f32>) -> Result<Array3<f32>> {
    concatenate(Axis(0), &[x, x])
        .map_err(|e| Error::runtime(format!("cannot join the CFG batch: {e}")))
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
        // Scale 1 gives the positive half up to the rounding of n + (p - n): within one ulp of max(|p|, |n|).
        for ((c, p), n) in combine(&pos, &neg, 1.0).iter().zip(pos).zip(neg) {
            let ulp = f32::EPSILON * p.abs().max(n.abs());
            assert!((c - p).abs() <= ulp, "{c} vs {p}");
        }
        // Scale 0 gives the negative half exactly.
        assert_eq!(combine(&pos, &neg, 0.0), neg);
    }

    #[test]
    fn the_velocity_wrapper_runs_both_halves_in_one_call() {
        let x = Array3::from_shape_vec((1, 1, 2), vec![1.0f32, 2.0]).unwrap();
        let mut calls = 0;
        // A "model" whose prompt rows give x + 1 and negative rows x - 1: guided = (x - 1) + 3 * 2.
        let v = guided_velocity(&x, 3.0, |both| {
            calls += 1;
            assert_eq!(both.shape(), [2, 1, 2]);
            let mut v = both.clone();
            v.index_axis_mut(Axis(0), 0).mapv_inplace(|a| a + 1.0);
            v.index_axis_mut(Axis(0), 1).mapv_inplace(|a| a - 1.0);
            Ok(v)
        })
        .unwrap();
        assert_eq!(calls, 1);
        assert_eq!(v.as_slice().unwrap(), [6.0, 7.0]);
        let e = guided_velocity(&x, 3.0, |_| Ok(Array3::zeros((1, 1, 2)))).unwrap_err();
        assert_eq!(e.kind, crate::ErrorKind::Model);
    }
}
