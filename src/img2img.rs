//! Image-to-image (diffusers' `FluxImg2ImgPipeline`): an init image is encoded by the VAE encoder, noised to the
//! sigma that `strength` picks, and denoised over the rest of the schedule.
//!
//! The steps, in diffusers' order and arithmetic:
//! 1. The init image is brought to the requested size ([`fit`]): kept as is when it already has that size;
//!    otherwise scaled to cover it with a Lanczos3 filter (aspect ratio kept) and center-cropped. Then
//!    `x = 2 * (u8 / 255) - 1` in f32, `[1, 3, H, W]` RGB ([`to_tensor`], `VaeImageProcessor.preprocess` of an
//!    image already at the target size). Grayscale images are expanded to RGB; an alpha channel is dropped.
//! 2. The VAE encoder gives the posterior's mean and std; one `torch.Generator("cpu").manual_seed(seed)` draws
//!    the posterior sample `eps` first and the initial noise second ([`crate::noise::TorchGenerator`]), so
//!    `x0 = ((mean + std * eps) - shift) * scale` and the noise is the seed's SECOND draw.
//! 3. The full N-step schedule is made as for text-to-image; `t_start = int(N - min(N * strength, N))`
//!    ([`crate::schedule::img2img_start`]); the loop runs `N - t_start` steps from `sigma0 = sigmas[t_start]`
//!    starting at `x_t = sigma0 * noise + (1 - sigma0) * x0` ([`crate::schedule::scale_noise`]).
//!
//! Image `i` of a request uses seed `seed + i` for both draws, so each image equals the same request run
//! alone with that seed and `num_images` 1 (diffusers with one generator per image).

use ndarray::{Array3, Array4};

pub use crate::init_image::{fit, to_tensor, InitImage, RESIZE_RULE};
use crate::latents;
use crate::noise::TorchGenerator;
pub use crate::request::DEFAULT_STRENGTH;
use crate::schedule;
use crate::Result;

/// One image's draws from its seed's generator (step 2): the posterior sample `eps` first, normalised into
/// `x0 = ((mean + std * eps) - shift) * scale`, then the initial noise. Returns (x0, noise), each `mean.len()` long.
pub fn draw(
    mean: &[f32],
    std: &[f32],
    seed: u64,
    (scale, shift): (f32, f32),
) -> (Vec<f32>, Vec<f32>) {
    let mut gen = TorchGenerator::new(seed);
    let eps = gen.randn(mean.len());
    let mut x0: Vec<f32> = mean
        .iter()
        .zip(std)
        .zip(&eps)
        .map(|((&m, &s), &e)| m + s * e)
        .collect();
    latents::vae_encode_output(&mut x0, scale, shift);
    (x0, gen.randn(mean.len()))
}

/// Step 3: the packed start latents `x_t` at the strength's starting sigma, and the part of the schedule still to
/// run (`sigmas[t_start..]`, `timesteps[t_start..]`). `x0` and `noise` are `[B, C, h, w]`.
pub fn start(
    x0: &Array4<f32>,
    noise: &Array4<f32>,
    (sigmas, timesteps): (&[f32], &[f32]),
    strength: f64,
) -> Result<(Array3<f32>, Vec<f32>, Vec<f32>)> {
    let t_start = schedule::img2img_start(timesteps.len(), strength)?;
    let x_t = schedule::scale_noise(
        x0.as_slice().expect("contiguous"),
        noise.as_slice().expect("contiguous"),
        sigmas[t_start],
    );
    let x_t = Array4::from_shape_vec(noise.raw_dim(), x_t).expect("x_t keeps the shape");
    Ok((
        latents::pack(&x_t.view()),
        sigmas[t_start..].to_vec(),
        timesteps[t_start..].to_vec(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_noise_is_the_seeds_second_draw() {
        let (mean, std) = ([0.5f32; 4], [0.0f32; 4]);
        let (x0, noise) = draw(&mean, &std, 3, (2.0, 0.25));
        // std 0: x0 is the mode, (0.5 - 0.25) * 2; the noise is what follows the posterior's draw.
        assert_eq!(x0, [0.5; 4]);
        let mut gen = TorchGenerator::new(3);
        gen.randn(4);
        assert_eq!(noise, gen.randn(4));
    }

    #[test]
    fn start_runs_the_tail_of_the_schedule_from_x_t() {
        let x0 = Array4::from_elem((1, 16, 2, 2), 1.0f32);
        let noise = Array4::zeros((1, 16, 2, 2));
        let sigmas = [1.0, 0.75, 0.5, 0.25, 0.0];
        let timesteps = [1.0, 0.75, 0.5, 0.25];
        let (x, s, t) = start(&x0, &noise, (&sigmas, &timesteps), 0.5).unwrap();
        // t_start = 4 - 2 = 2: x_t = 0.5 * noise + 0.5 * x0.
        assert_eq!((s, t), (vec![0.5, 0.25, 0.0], vec![0.5, 0.25]));
        assert_eq!(x.shape(), [1, 1, 64]);
        assert!(x.iter().all(|&v| v == 0.5));
    }
}
