//! The img2img part ([`crate::img2img`] has the steps and the arithmetic): encodes each request's init image (tiled
//! when the request's VAE tiling applies), draws each image's posterior sample and noise from its seed, and moves
//! the batch to `x_t` at the strength's starting sigma, over the rest of the schedule.

use std::time::Instant;

use ndarray::Array4;

use super::{Batch, Context, Part};
use crate::img2img::{draw, fit, start, to_tensor};
use crate::{vae_tiling, Error, Result};

pub struct Img2Img;

impl Part for Img2Img {
    fn prepare(&mut self, cx: &mut Context, batch: &mut Batch) -> Result<()> {
        if cx.first().init_image.is_none() {
            return Ok(());
        }
        let t0 = Instant::now();
        let (_, channels, h, w) = batch.noise.dim();
        let vae = cx.engine.spec.vae.clone();
        let n = channels * h * w;
        let mut noise = Vec::with_capacity(cx.images() * n);
        let mut x0 = Vec::with_capacity(cx.images() * n);
        let mut seeds = cx.seeds.iter();
        for r in cx.reqs {
            let init = r.init_image.as_ref().ok_or_else(|| {
                Error::input("img2img and text-to-image requests cannot share a batch")
            })?;
            let pixels = to_tensor(&fit(init.rgb(), r.width, r.height));
            let engine = &mut *cx.engine;
            let (mean, std) =
                vae_tiling::encode(&pixels, &r.vae_tiling, vae.downsample_factor, |t| {
                    engine.encode_image(t, cx.cancel)
                })?;
            if mean.shape() != [1, channels, h, w] || std.shape() != mean.shape() {
                return Err(Error::model(format!(
                    "the VAE encoder returned latents of shape {:?} for a {}x{} image, expected [1, {channels}, {h}, {w}]",
                    mean.shape(),
                    r.width,
                    r.height
                ))
                .with_hint("check that vae_encoder downsamples by the manifest's vae.downsample_factor"));
            }
            let (mean, std) = (
                mean.as_slice().expect("encoder outputs are contiguous"),
                std.as_slice().expect("encoder outputs are contiguous"),
            );
            for _ in 0..r.num_images {
                let seed = *seeds.next().expect("one seed per image");
                let (x, e) = draw(mean, std, seed, (vae.scaling_factor, vae.shift_factor));
                x0.extend(x);
                noise.extend(e);
            }
        }
        let shape = batch.noise.raw_dim();
        let x0 = Array4::from_shape_vec(shape, x0).expect("latents fill their shape");
        batch.noise = Array4::from_shape_vec(shape, noise).expect("noise fills its shape");
        let (x, sigmas, timesteps) = start(
            &x0,
            &batch.noise,
            (&batch.sigmas, &batch.timesteps),
            cx.first().strength,
        )?;
        (batch.x, batch.sigmas, batch.timesteps) = (x, sigmas, timesteps);
        if let Some(tr) = cx.trace.as_deref_mut() {
            tr.init_latents = Some(x0);
            tr.start_latents = Some(batch.x.clone());
        }
        cx.timings.vae_encode += t0.elapsed();
        Ok(())
    }
}
