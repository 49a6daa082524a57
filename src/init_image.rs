//! An input image (img2img's init image, and later the family's reference images and masks): decoded from PNG or
//! JPEG, brought to the output size as diffusers does, and turned into the VAE's input tensor. Pure: no graph runs.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use ndarray::Array4;

use crate::latents;
use crate::{Error, Result};

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
}
