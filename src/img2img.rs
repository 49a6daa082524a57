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

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use ndarray::{s, Array3, Array4, ArrayD};

use crate::latents;
use crate::noise::TorchGenerator;
use crate::pipeline::{ensure_finite, Pipeline, Request};
use crate::runtime::Canceller;
use crate::schedule;
use crate::{Error, Result};

/// diffusers' `FluxImg2ImgPipeline` default strength.
pub const DEFAULT_STRENGTH: f64 = 0.6;

/// The rule [`fit`] applies, for `--help` texts and API docs.
pub const RESIZE_RULE: &str =
    "an init image already at the output size is used as is; any other size is \
     scaled (aspect ratio kept, Lanczos3) to cover the output size and center-cropped";

/// A decoded init image (8-bit RGB), cheap to clone.
#[derive(Clone, PartialEq)]
pub struct InitImage {
    rgb: Arc<image::RgbImage>,
}

impl fmt::Debug for InitImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InitImage({}x{})", self.rgb.width(), self.rgb.height())
    }
}

impl InitImage {
    /// Reads a PNG or JPEG file. A missing or unreadable file, a file that is not a PNG or JPEG image, or a damaged
    /// one is an input error (a bad request) naming the file.
    pub fn open(path: &Path) -> Result<InitImage> {
        let bytes = std::fs::read(path).map_err(|e| {
            Error::input(format!(
                "cannot read the init image {}: {e}",
                path.display()
            ))
            .with_hint("--init-image takes a PNG or JPEG file")
        })?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }

    /// Decodes PNG or JPEG bytes; `source` names them in errors (a file name, `init_image`).
    pub fn from_bytes(bytes: &[u8], source: &str) -> Result<InitImage> {
        let format = image::guess_format(bytes)
            .ok()
            .filter(|f| matches!(f, image::ImageFormat::Png | image::ImageFormat::Jpeg));
        let Some(format) = format else {
            return Err(Error::input(format!(
                "the init image {source} is not a PNG or JPEG image"
            ))
            .with_hint("convert it to PNG or JPEG"));
        };
        let img = image::load_from_memory_with_format(bytes, format).map_err(|e| {
            Error::input(format!(
                "the init image {source} cannot be decoded as {format:?}: {e}"
            ))
            .with_hint("the file may be truncated or damaged; re-save it as PNG or JPEG")
        })?;
        Self::from_rgb(img.to_rgb8())
    }

    pub fn from_rgb(rgb: image::RgbImage) -> Result<InitImage> {
        if rgb.width() == 0 || rgb.height() == 0 {
            return Err(Error::input("the init image has no pixels"));
        }
        Ok(InitImage { rgb: Arc::new(rgb) })
    }

    pub fn rgb(&self) -> &image::RgbImage {
        &self.rgb
    }

    pub fn width(&self) -> u32 {
        self.rgb.width()
    }

    pub fn height(&self) -> u32 {
        self.rgb.height()
    }

    /// The output size diffusers picks when none is given: each side floored to a multiple of
    /// `2 * vae_factor` (16 for FLUX.1). An image smaller than that on a side is an input error.
    pub fn default_size(&self, vae_factor: usize) -> Result<(u32, u32)> {
        let m = latents::size_multiple(vae_factor);
        let (w, h) = (self.width() / m * m, self.height() / m * m);
        if w == 0 || h == 0 {
            return Err(Error::input(format!(
                "the init image is {}x{}, smaller than {m} pixels on a side",
                self.width(),
                self.height()
            ))
            .with_hint("pass --width and --height to scale it up"));
        }
        Ok((w, h))
    }

    /// What to tell the user when the output takes [`default_size`](Self::default_size) and that floored the
    /// image's size (`None` when it is already a multiple).
    pub fn floor_warning(&self, vae_factor: usize) -> Option<String> {
        let (w, h) = self.default_size(vae_factor).ok()?;
        ((w, h) != (self.width(), self.height())).then(|| {
            format!(
                "the init image is {}x{}; the output is {w}x{h} (each side floored to a multiple of {}), the \
                 image scaled and cropped to it; pass the width and height to choose another size",
                self.width(),
                self.height(),
                latents::size_multiple(vae_factor)
            )
        })
    }
}

/// The init image at `width` x `height`: unchanged when it has that size; otherwise scaled with Lanczos3 to the
/// smallest size that covers the target while keeping the aspect ratio, then center-cropped ([`RESIZE_RULE`]).
pub fn fit(img: &image::RgbImage, width: u32, height: u32) -> image::RgbImage {
    let (w0, h0) = img.dimensions();
    if (w0, h0) == (width, height) {
        return img.clone();
    }
    let scale = f64::max(width as f64 / w0 as f64, height as f64 / h0 as f64);
    // Round, but never below the target (a cover must cover).
    let sw = ((w0 as f64 * scale).round() as u32).max(width);
    let sh = ((h0 as f64 * scale).round() as u32).max(height);
    let scaled = image::imageops::resize(img, sw, sh, image::imageops::FilterType::Lanczos3);
    let (x, y) = ((sw - width) / 2, (sh - height) / 2);
    image::imageops::crop_imm(&scaled, x, y, width, height).to_image()
}

/// `[1, 3, H, W]` in `[-1, 1]`: `2 * (v / 255) - 1` in f32, as `VaeImageProcessor` (`pil_to_numpy`, `normalize`).
pub fn to_tensor(img: &image::RgbImage) -> Array4<f32> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut out = Array4::<f32>::zeros((1, 3, h, w));
    for (x, y, p) in img.enumerate_pixels() {
        for c in 0..3 {
            let v = p.0[c] as f32 / 255.0;
            out[[0, c, y as usize, x as usize]] = 2.0 * v - 1.0;
        }
    }
    out
}

/// The request checks of this feature: strength in (0, 1] (always, so a bad value never waits for an init
/// image), and with an init image at least one step left to run.
pub fn validate(req: &Request) -> Result<()> {
    check_strength(req.strength)?;
    if req.init_image.is_some() {
        schedule::img2img_start(req.steps, req.strength)?;
    }
    Ok(())
}

/// Strength must be in (0, 1].
pub fn check_strength(strength: f64) -> Result<()> {
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(
            Error::input(format!("strength must be in (0, 1], got {strength}"))
                .with_hint("1.0 ignores the init image; 0.6-0.8 keeps its layout"),
        );
    }
    Ok(())
}

/// Whether two requests can share a batch as far as img2img goes: both text-to-image, or both img2img with the
/// same strength (one schedule). Their init images may differ.
pub fn batches_with(a: &Request, b: &Request) -> bool {
    match (&a.init_image, &b.init_image) {
        (None, None) => true,
        (Some(_), Some(_)) => a.strength == b.strength,
        _ => false,
    }
}

/// The img2img starting point of a batch: the noise (each image's second draw) and the normalised init latents.
pub(crate) struct Start {
    /// `[B, C, h, w]`.
    pub noise: Array4<f32>,
    /// `x0`, `[B, C, h, w]`: `((mean + std * eps) - shift) * scale`.
    pub image_latents: Array4<f32>,
    pub strength: f64,
}

/// Encodes every request's init image and draws each image's posterior sample and noise. `None` for a
/// text-to-image batch. `seeds` has one entry per image, requests in order.
pub(crate) fn prepare(
    pipe: &mut Pipeline,
    reqs: &[Request],
    seeds: &[u64],
    (channels, h, w): (usize, usize, usize),
    cancel: &Canceller,
) -> Result<Option<Start>> {
    let Some(first) = reqs.first() else {
        return Ok(None);
    };
    if first.init_image.is_none() {
        return Ok(None);
    }
    let (scale, shift) = (pipe.spec.vae.scaling_factor, pipe.spec.vae.shift_factor);
    let n = channels * h * w;
    let images: usize = reqs.iter().map(|r| r.num_images).sum();
    let mut noise = Vec::with_capacity(images * n);
    let mut x0 = Vec::with_capacity(images * n);
    let mut seeds = seeds.iter();
    for r in reqs {
        let init = r.init_image.as_ref().ok_or_else(|| {
            Error::input("img2img and text-to-image requests cannot share a batch")
        })?;
        let pixels = to_tensor(&fit(init.rgb(), r.width, r.height));
        let (mean, std) = crate::vae_tiling::encode(pipe, &pixels, &r.vae_tiling, cancel)?;
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
            let mut gen = TorchGenerator::new(seed);
            let eps = gen.randn(n);
            let mut sample: Vec<f32> = mean
                .iter()
                .zip(std)
                .zip(&eps)
                .map(|((&m, &s), &e)| m + s * e)
                .collect();
            latents::vae_encode_output(&mut sample, scale, shift);
            x0.extend(sample);
            noise.extend(gen.randn(n));
        }
    }
    let shape = (images, channels, h, w);
    Ok(Some(Start {
        noise: Array4::from_shape_vec(shape, noise).expect("noise fills its shape"),
        image_latents: Array4::from_shape_vec(shape, x0).expect("latents fill their shape"),
        strength: first.strength,
    }))
}

impl Start {
    /// Moves the packed latents `x` to `x_t` at the strength's starting sigma and returns the part of the
    /// schedule still to run: (sigmas[t_start..], timesteps[t_start..]).
    pub(crate) fn start(
        &self,
        x: &mut Array3<f32>,
        sigmas: &[f32],
        timesteps: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let t_start = schedule::img2img_start(timesteps.len(), self.strength)?;
        let x_t = schedule::scale_noise(
            self.image_latents.as_slice().expect("contiguous"),
            self.noise.as_slice().expect("contiguous"),
            sigmas[t_start],
        );
        let x_t = Array4::from_shape_vec(self.noise.raw_dim(), x_t).expect("x_t keeps the shape");
        *x = latents::pack(&x_t.view());
        Ok((sigmas[t_start..].to_vec(), timesteps[t_start..].to_vec()))
    }
}

/// The VAE encoder's outputs as (mean, std), `[B, C, h, w]` each, from any of the layouts fluxrt reads:
/// fluxrt exports give `latent` (the mean) and `latent_std`; optimum's `latent_parameters` hold mean and logvar
/// (2C channels, diffusers' `DiagonalGaussianDistribution`: logvar clamped to [-30, 20], std = exp(logvar / 2));
/// a graph with the mean only gives std 0 (the posterior's mode; the draw order, hence the noise, is kept).
pub(crate) fn posterior(
    outs: Vec<(String, ArrayD<f32>)>,
    latent_name: &str,
    channels: usize,
) -> Result<(Array4<f32>, Array4<f32>)> {
    let as4 = |a: ArrayD<f32>, what: &str| -> Result<Array4<f32>> {
        a.into_dimensionality()
            .map_err(|e| Error::model(format!("the VAE encoder's {what} has the wrong rank: {e}")))
    };
    let mut latent = None;
    let mut std = None;
    for (name, a) in outs {
        if name == latent_name {
            latent = Some(as4(a, &name)?);
        } else if name == "latent_std" {
            std = Some(as4(a, &name)?);
        }
    }
    let latent = latent.ok_or_else(|| {
        Error::model(format!(
            "the VAE encoder produced no output `{latent_name}`"
        ))
    })?;
    let c = latent.shape()[1];
    let (mean, std) = if c == 2 * channels && std.is_none() {
        let mean = latent.slice(s![.., ..channels, .., ..]).to_owned();
        let std = latent
            .slice(s![.., channels.., .., ..])
            .mapv(|lv| (0.5 * lv.clamp(-30.0, 20.0)).exp());
        (mean, std)
    } else if c == channels {
        let std = std.unwrap_or_else(|| Array4::zeros(latent.raw_dim()));
        (latent, std)
    } else {
        return Err(Error::model(format!(
            "the VAE encoder's `{latent_name}` has {c} channels, expected {channels} (mean) or {} (mean and logvar)",
            2 * channels
        )));
    };
    if std.shape() != mean.shape() {
        return Err(Error::model(format!(
            "the VAE encoder's latent_std has shape {:?}, its latent {:?}",
            std.shape(),
            mean.shape()
        )));
    }
    ensure_finite("VAE encode", mean.as_slice().unwrap_or(&[]))?;
    ensure_finite("VAE encode (std)", std.as_slice().unwrap_or(&[]))?;
    Ok((mean.as_standard_layout().to_owned(), std))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    fn gradient(w: u32, h: u32) -> image::RgbImage {
        image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 255 / w.max(1)) as u8, (y * 255 / h.max(1)) as u8, 128])
        })
    }

    #[test]
    fn preprocessing_matches_vae_image_processor() {
        // numpy f32 (as VaeImageProcessor): 2.0 * (np.array([0, 1, 127, 128, 255], np.uint8).astype(np.float32) / 255.0) - 1.0
        let img = image::RgbImage::from_fn(5, 1, |x, _| {
            let v = [0u8, 1, 127, 128, 255][x as usize];
            image::Rgb([v, v, v])
        });
        let t = to_tensor(&img);
        assert_eq!(t.shape(), [1, 3, 1, 5]);
        let want = [-1.0f32, -0.99215686, -0.0039215684, 0.003921628, 1.0];
        for c in 0..3 {
            for (x, &v) in want.iter().enumerate() {
                assert_eq!(t[[0, c, 0, x]], v, "channel {c} x {x}");
            }
        }
        // Channels first, RGB order.
        let img = image::RgbImage::from_pixel(2, 2, image::Rgb([255, 0, 255]));
        let t = to_tensor(&img);
        assert_eq!(
            (t[[0, 0, 1, 1]], t[[0, 1, 1, 1]], t[[0, 2, 1, 1]]),
            (1.0, -1.0, 1.0)
        );
    }

    #[test]
    fn fit_keeps_a_matching_image_and_covers_then_crops_otherwise() {
        let img = gradient(64, 48);
        assert_eq!(fit(&img, 64, 48), img);
        // Wider than the target: height decides the scale, the sides are cropped evenly.
        let f = fit(&gradient(200, 100), 64, 64);
        assert_eq!(f.dimensions(), (64, 64));
        // Upscaling works too, and odd leftovers crop one pixel more on the right/bottom.
        assert_eq!(fit(&gradient(10, 7), 48, 32).dimensions(), (48, 32));
        // A uniform image stays uniform through Lanczos (no ringing on flat input).
        let flat = image::RgbImage::from_pixel(30, 90, image::Rgb([10, 200, 99]));
        assert!(fit(&flat, 32, 32).pixels().all(|p| p.0 == [10, 200, 99]));
        // Center crop: a left half black, right half white image stays split in the middle.
        let split = image::RgbImage::from_fn(128, 32, |x, _| {
            image::Rgb(if x < 64 { [0, 0, 0] } else { [255, 255, 255] })
        });
        let f = fit(&split, 32, 32); // scale 1, crop x 48..80
        assert_eq!(f.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(f.get_pixel(31, 0).0, [255, 255, 255]);
    }

    #[test]
    fn bad_init_images_are_clear_errors() {
        // A path the user gave that is not there is a bad request (exit code 2), like every other.
        let e = InitImage::open(Path::new("/nonexistent/init.png")).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput);
        assert!(e.message.contains("/nonexistent/init.png"), "{e}");
        let e = InitImage::from_bytes(b"hello, not an image", "notes.txt").unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput);
        assert!(e.message.contains("notes.txt is not a PNG or JPEG"), "{e}");
        // A PNG signature with garbage after it: recognised, then refused as damaged.
        let mut bad = b"\x89PNG\r\n\x1a\n".to_vec();
        bad.extend_from_slice(&[0u8; 40]);
        let e = InitImage::from_bytes(&bad, "cut.png").unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput);
        assert!(e.message.contains("cannot be decoded"), "{e}");
        // A real PNG decodes, grayscale becomes RGB.
        let mut png = Vec::new();
        image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(20, 18, image::Luma([7])))
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let img = InitImage::from_bytes(&png, "gray.png").unwrap();
        assert_eq!(img.rgb().get_pixel(3, 3).0, [7, 7, 7]);
        assert_eq!(img.default_size(8).unwrap(), (16, 16));
        let w = img.floor_warning(8).unwrap();
        assert!(
            w.contains("20x18") && w.contains("16x16") && w.contains("multiple of 16"),
            "{w}"
        );
        let exact = InitImage::from_rgb(gradient(32, 48)).unwrap();
        assert_eq!(exact.floor_warning(8), None);
        let tiny = InitImage::from_rgb(gradient(12, 40)).unwrap();
        assert_eq!(
            tiny.default_size(8).unwrap_err().kind,
            ErrorKind::InvalidInput
        );
        assert_eq!(format!("{tiny:?}"), "InitImage(12x40)");
    }

    #[test]
    fn posterior_reads_every_layout() {
        let mean = ArrayD::from_elem(ndarray::IxDyn(&[1, 2, 1, 1]), 0.5f32);
        let std = ArrayD::from_elem(ndarray::IxDyn(&[1, 2, 1, 1]), 0.25f32);
        // fluxrt: latent + latent_std.
        let (m, s) = posterior(
            vec![
                ("latent".into(), mean.clone()),
                ("latent_std".into(), std.clone()),
            ],
            "latent",
            2,
        )
        .unwrap();
        assert_eq!((m[[0, 1, 0, 0]], s[[0, 1, 0, 0]]), (0.5, 0.25));
        // optimum: mean and logvar in one 2C tensor; logvar clamped as diffusers does.
        let params =
            ArrayD::from_shape_vec(ndarray::IxDyn(&[1, 4, 1, 1]), vec![0.5, 0.1, 0.0, 50.0])
                .unwrap();
        let (m, s) = posterior(
            vec![("latent_parameters".into(), params)],
            "latent_parameters",
            2,
        )
        .unwrap();
        assert_eq!(m.shape(), [1, 2, 1, 1]);
        assert_eq!((s[[0, 0, 0, 0]], s[[0, 1, 0, 0]]), (1.0, 10f32.exp()));
        // mean only: the mode.
        let (_, s) = posterior(vec![("latent".into(), mean)], "latent", 2).unwrap();
        assert!(s.iter().all(|&v| v == 0.0));
        let e = posterior(vec![("other".into(), std)], "latent", 2).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Model);
    }
}
