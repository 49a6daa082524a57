//! Latent geometry and the 2x2 patch packing between the VAE's image latents and the transformer's
//! token sequence, matching diffusers' `FluxPipeline` helpers element for element.
//!
//! The VAE downsample factor and the latent channel count come from the model manifest; the `FLUX_*`
//! constants are only the FLUX.1 defaults.

use ndarray::{Array2, Array3, Array4, ArrayView3, ArrayView4};

use crate::{Error, Result};

/// FLUX.1's VAE downsampling: 8 pixels per latent cell.
pub const FLUX_VAE_FACTOR: usize = 8;
/// FLUX.1's VAE latent channels.
pub const FLUX_LATENT_CHANNELS: usize = 16;
/// FLUX.1's VAE `scaling_factor`.
pub const FLUX_VAE_SCALING_FACTOR: f32 = 0.3611;
/// FLUX.1's VAE `shift_factor`.
pub const FLUX_VAE_SHIFT_FACTOR: f32 = 0.1159;

/// Pixel sizes must be multiples of this: the VAE's factor times the 2x2 patch.
pub fn size_multiple(vae_factor: usize) -> u32 {
    (2 * vae_factor) as u32
}

/// Rejects an image size the model cannot produce, naming the nearest sizes it can.
pub fn validate_size(width: u32, height: u32, max_pixels: u64, vae_factor: usize) -> Result<()> {
    let m = size_multiple(vae_factor);
    for (name, v) in [("width", width), ("height", height)] {
        check_side(name, v, m)?;
    }
    let pixels = width as u64 * height as u64;
    if pixels > max_pixels {
        let (w, h) = fit_pixels(width, height, max_pixels, m);
        return Err(Error::input(format!(
            "{width}x{height} is {pixels} pixels, above the limit of {max_pixels}; use {w}x{h} (same aspect) or smaller"
        ))
        .with_hint("raise the max-pixels limit if the accelerator has the memory for it"));
    }
    Ok(())
}

/// One side: positive and a multiple of `m` (diffusers silently floors; we say so instead).
fn check_side(name: &str, v: u32, m: u32) -> Result<()> {
    if v == 0 {
        return Err(
            Error::input(format!("{name} 0 is too small; use {m} or more"))
                .with_hint(format!("image sides must be positive multiples of {m}")),
        );
    }
    if !v.is_multiple_of(m) {
        let lower = v / m * m;
        // checked: a side near u32::MAX has no multiple of m above it
        let fix = match (lower, lower.checked_add(m)) {
            (0, Some(upper)) => format!("use {upper}"),
            (_, Some(upper)) => format!("use {lower} or {upper}"),
            (_, None) => format!("use {lower}"),
        };
        return Err(
            Error::input(format!("{name} {v} is not a multiple of {m}; {fix}")).with_hint(format!(
                "the VAE downsamples by {} and the transformer packs 2x2 latent patches",
                m / 2
            )),
        );
    }
    Ok(())
}

/// The largest size with about the same aspect ratio, multiples of `m`, within `max_pixels`.
fn fit_pixels(width: u32, height: u32, max_pixels: u64, m: u32) -> (u32, u32) {
    let scale = (max_pixels as f64 / (width as f64 * height as f64)).sqrt();
    let side = |v: u32| (((v as f64 * scale) / m as f64).floor() as u32).max(1) * m;
    (side(width), side(height))
}

/// Latent (height, width) for an image: `2 * (H / (2f))`, `2 * (W / (2f))`, as diffusers'
/// `prepare_latents` computes them (flooring, so validate first).
pub fn latent_hw(width: u32, height: u32, vae_factor: usize) -> (usize, usize) {
    let m = 2 * vae_factor;
    (2 * (height as usize / m), 2 * (width as usize / m))
}

/// Number of packed image tokens, `(h/2) * (w/2)`: what the schedule's shift depends on.
pub fn image_seq_len(width: u32, height: u32, vae_factor: usize) -> usize {
    let (h, w) = latent_hw(width, height, vae_factor);
    (h / 2) * (w / 2)
}

/// `[B, C, h, w] -> [B, (h/2)(w/2), 4C]`: each 2x2 patch becomes one token with feature `c*4 + ph*2 + pw`
/// (diffusers' `_pack_latents`: view(B,C,h/2,2,w/2,2).permute(0,2,4,1,3,5)).
///
/// # Panics
/// If `h` or `w` is odd.
pub fn pack(latents: &ArrayView4<f32>) -> Array3<f32> {
    let (b, c, h, w) = latents.dim();
    assert!(
        h.is_multiple_of(2) && w.is_multiple_of(2),
        "latent height and width must be even, got {h}x{w}"
    );
    let mut out = Vec::with_capacity(latents.len());
    for bi in 0..b {
        for i in 0..h / 2 {
            for j in 0..w / 2 {
                for ci in 0..c {
                    for ph in 0..2 {
                        for pw in 0..2 {
                            out.push(latents[[bi, ci, 2 * i + ph, 2 * j + pw]]);
                        }
                    }
                }
            }
        }
    }
    Array3::from_shape_vec((b, (h / 2) * (w / 2), c * 4), out).expect("pack: length matches shape")
}

/// Exact inverse of [`pack`]: `[B, (h/2)(w/2), 4C] -> [B, C, h, w]` (diffusers' `_unpack_latents`, with
/// latent `h`, `w` instead of pixel sizes).
///
/// # Panics
/// If the packed shape does not match `h`, `w` and `channels`.
pub fn unpack(packed: &ArrayView3<f32>, h: usize, w: usize, channels: usize) -> Array4<f32> {
    let (b, s, f) = packed.dim();
    assert!(
        h.is_multiple_of(2) && w.is_multiple_of(2) && s == (h / 2) * (w / 2) && f == channels * 4,
        "unpack: packed shape [{b}, {s}, {f}] does not fit latents {channels}x{h}x{w}"
    );
    let mut out = Array4::<f32>::zeros((b, channels, h, w));
    for ((bi, token, feature), &v) in packed.indexed_iter() {
        let (i, j) = (token / (w / 2), token % (w / 2));
        let (ci, ph, pw) = (feature / 4, (feature / 2) % 2, feature % 2);
        out[[bi, ci, 2 * i + ph, 2 * j + pw]] = v;
    }
    out
}

/// RoPE position ids of the image tokens, `[S, 3]` rows `[0, row, col]` over the `(h/2) x (w/2)` token
/// grid in row-major order (diffusers' `_prepare_latent_image_ids`; `h`, `w` are latent sizes).
pub fn img_ids(h: usize, w: usize) -> Array2<f32> {
    let (gh, gw) = (h / 2, w / 2);
    Array2::from_shape_fn((gh * gw, 3), |(t, k)| match k {
        1 => (t / gw) as f32,
        2 => (t % gw) as f32,
        _ => 0.0,
    })
}

/// Text token position ids: all zeros, `[L, 3]` (text gets no 2-D position).
pub fn txt_ids(len: usize) -> Array2<f32> {
    Array2::zeros((len, 3))
}

/// Undoes the VAE normalisation before decoding: `z / scale + shift`, in place.
pub fn vae_decode_input(z: &mut [f32], scale: f32, shift: f32) {
    for v in z {
        *v = *v / scale + shift;
    }
}

/// Normalises encoder latents for the transformer: `(z - shift) * scale`, in place.
pub fn vae_encode_output(z: &mut [f32], scale: f32, shift: f32) {
    for v in z {
        *v = (*v - shift) * scale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use ndarray::Array;

    fn arange4(b: usize, c: usize, h: usize, w: usize) -> Array4<f32> {
        Array::range(0.0, (b * c * h * w) as f32, 1.0)
            .into_shape_with_order((b, c, h, w))
            .unwrap()
    }

    #[test]
    fn pack_matches_diffusers() {
        // FluxPipeline._pack_latents(torch.arange(32.).reshape(1,2,4,4), 1, 2, 4, 4)[0].int().tolist()
        let want: [[f32; 8]; 4] = [
            [0., 1., 4., 5., 16., 17., 20., 21.],
            [2., 3., 6., 7., 18., 19., 22., 23.],
            [8., 9., 12., 13., 24., 25., 28., 29.],
            [10., 11., 14., 15., 26., 27., 30., 31.],
        ];
        let p = pack(&arange4(1, 2, 4, 4).view());
        assert_eq!(p.shape(), [1, 4, 8]);
        for (t, row) in want.iter().enumerate() {
            assert_eq!(
                p.slice(ndarray::s![0, t, ..]).to_vec(),
                row.to_vec(),
                "token {t}"
            );
        }
        // Non-square: ..._pack_latents(torch.arange(48.).reshape(1,2,4,6), 1, 2, 4, 6)[0][3]
        let p = pack(&arange4(1, 2, 4, 6).view());
        assert_eq!(p.shape(), [1, 6, 8]);
        assert_eq!(
            p.slice(ndarray::s![0, 3, ..]).to_vec(),
            [12., 13., 18., 19., 36., 37., 42., 43.]
        );
    }

    #[test]
    fn pack_unpack_round_trip() {
        let x = arange4(2, 16, 6, 10);
        let p = pack(&x.view());
        assert_eq!(p.shape(), [2, 15, 64]);
        assert_eq!(unpack(&p.view(), 6, 10, 16), x);
        // A non-standard-layout input packs the same.
        let t = x.clone().permuted_axes([0, 1, 3, 2]);
        let t = t
            .as_standard_layout()
            .to_owned()
            .permuted_axes([0, 1, 3, 2]);
        assert_eq!(pack(&t.view()), p);
    }

    #[test]
    #[should_panic(expected = "does not fit")]
    fn unpack_rejects_mismatched_shape() {
        let p = Array3::<f32>::zeros((1, 6, 64));
        unpack(&p.view(), 4, 4, 16);
    }

    #[test]
    fn img_ids_non_square() {
        // FluxPipeline._prepare_latent_image_ids(1, 2, 3, "cpu", torch.float32).int().tolist()
        let ids = img_ids(4, 6);
        let want = [
            [0., 0., 0.],
            [0., 0., 1.],
            [0., 0., 2.],
            [0., 1., 0.],
            [0., 1., 1.],
            [0., 1., 2.],
        ];
        assert_eq!(ids.shape(), [6, 3]);
        for (r, row) in want.iter().enumerate() {
            assert_eq!(ids.row(r).to_vec(), row.to_vec());
        }
        assert_eq!(txt_ids(5), Array2::<f32>::zeros((5, 3)));
    }

    #[test]
    fn a_side_near_u32_max_is_refused_without_overflow() {
        let e = validate_size(u32::MAX, 64, u64::MAX, 8).unwrap_err();
        assert!(e.message.contains("not a multiple of 16"), "{e}");
    }

    #[test]
    fn geometry() {
        assert_eq!(latent_hw(1024, 768, FLUX_VAE_FACTOR), (96, 128));
        assert_eq!(image_seq_len(1024, 1024, FLUX_VAE_FACTOR), 4096);
        assert_eq!(image_seq_len(96, 128, FLUX_VAE_FACTOR), 48);
        assert_eq!(latent_hw(64, 64, 4), (16, 16));
    }

    #[test]
    fn validation_messages() {
        let f = FLUX_VAE_FACTOR;
        assert!(validate_size(1024, 768, 1 << 20, f).is_ok());
        let e = validate_size(100, 64, 1 << 20, f).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput);
        assert_eq!(
            e.message,
            "width 100 is not a multiple of 16; use 96 or 112"
        );
        let e = validate_size(64, 8, 1 << 20, f).unwrap_err();
        assert_eq!(e.message, "height 8 is not a multiple of 16; use 16");
        let e = validate_size(0, 64, 1 << 20, f).unwrap_err();
        assert_eq!(e.message, "width 0 is too small; use 16 or more");
        let e = validate_size(2048, 1024, 1 << 20, f).unwrap_err();
        assert_eq!(
            e.message,
            "2048x1024 is 2097152 pixels, above the limit of 1048576; use 1440x720 (same aspect) or smaller"
        );
        assert!(e.hint.is_some());
        // Another VAE factor changes the multiple.
        assert_eq!(
            validate_size(36, 32, 1 << 20, 4).unwrap_err().message,
            "width 36 is not a multiple of 8; use 32 or 40"
        );
    }

    #[test]
    fn vae_scaling_inverts() {
        let mut z = vec![-1.0f32, 0.0, 0.5, 2.0];
        vae_decode_input(&mut z, FLUX_VAE_SCALING_FACTOR, FLUX_VAE_SHIFT_FACTOR);
        assert!((z[1] - FLUX_VAE_SHIFT_FACTOR).abs() < 1e-7);
        assert!((z[0] - (-1.0 / 0.3611 + 0.1159)).abs() < 1e-6);
        vae_encode_output(&mut z, FLUX_VAE_SCALING_FACTOR, FLUX_VAE_SHIFT_FACTOR);
        for (a, b) in z.iter().zip([-1.0f32, 0.0, 0.5, 2.0]) {
            assert!((a - b).abs() < 1e-6);
        }
    }
}
