//! Tiled VAE decode and encode for large images, as diffusers' `AutoencoderKL.tiled_decode` / `_tiled_encode`
//! do it: the input is cut into overlapping square tiles, each tile goes through the graph on its own, and
//! neighbouring tiles are blended linearly over the overlap (diffusers' `blend_v` above, then `blend_h` to the
//! left, on the already blended neighbours) before each tile is cropped to the stride and placed.
//!
//! Geometry (pixels `P` = [`VaeTiling::tile_size`], VAE factor `f`, overlap `o`): latent tiles of `T = P / f`,
//! `O = int(T * o)` latents of overlap, stride `T - O`; decode blends `O * f` pixels and keeps `(T - O) * f` per
//! tile; encode blends `O` latents and keeps `T - O`. With FLUX.1's VAE and the defaults (1024 px, 0.25) that is
//! diffusers' 128-latent tiles, stride 96, 256-pixel blend, 768-pixel crop. Encode blends the posterior's mean and
//! log-variance (diffusers blends the moments), so `std` is taken to `2 ln std` and back.
//!
//! Tiles see only their own region, so the VAE's GroupNorm statistics and mid-block attention differ from a
//! whole-image pass: a tiled result is close to, not equal to, the untiled one (tests/features.rs measures it);
//! the linear blend leaves no seam, only a ramp of `1 / blend` of the two tiles' disagreement per pixel.

use std::str::FromStr;

use ndarray::{concatenate, s, Array4, ArrayView4, Axis};

use crate::{Error, Result};

/// Above this many pixels, `auto` tiles (2 MP: 1024x2048 still decodes whole, 2048x2048 is tiled).
pub const DEFAULT_AUTO_PIXELS: u64 = 2 * 1024 * 1024;
/// diffusers' FLUX.1 VAE tile (`sample_size` 1024).
pub const DEFAULT_TILE_SIZE: u32 = 1024;
/// diffusers' `tile_overlap_factor`.
pub const DEFAULT_OVERLAP: f32 = 0.25;

/// `--vae-tiling`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TilingMode {
    /// Tile images above [`VaeTiling::auto_pixels`] that do not fit one tile.
    #[default]
    Auto,
    /// Tile every image that does not fit one tile.
    On,
    /// Never tile.
    Off,
}

impl TilingMode {
    pub fn name(self) -> &'static str {
        match self {
            TilingMode::Auto => "auto",
            TilingMode::On => "on",
            TilingMode::Off => "off",
        }
    }
}

impl FromStr for TilingMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(TilingMode::Auto),
            "on" | "true" => Ok(TilingMode::On),
            "off" | "false" => Ok(TilingMode::Off),
            other => Err(Error::input(format!(
                "vae tiling must be auto, on or off, got {other:?}"
            ))),
        }
    }
}

/// How (and whether) the VAE runs in tiles.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VaeTiling {
    pub mode: TilingMode,
    /// Tile side in pixels, a multiple of the VAE factor.
    pub tile_size: u32,
    /// Share of a tile that overlaps its neighbour, in [0, 0.5].
    pub overlap: f32,
    /// `auto` tiles above this many pixels.
    pub auto_pixels: u64,
}

impl Default for VaeTiling {
    fn default() -> Self {
        VaeTiling {
            mode: TilingMode::Auto,
            tile_size: DEFAULT_TILE_SIZE,
            overlap: DEFAULT_OVERLAP,
            auto_pixels: DEFAULT_AUTO_PIXELS,
        }
    }
}

/// Tile geometry in latents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Grid {
    tile: usize,
    overlap: usize,
    factor: usize,
}

impl Grid {
    fn stride(&self) -> usize {
        self.tile - self.overlap
    }
}

impl VaeTiling {
    pub fn with_mode(mode: TilingMode) -> Self {
        VaeTiling {
            mode,
            ..Self::default()
        }
    }

    pub fn validate(&self, vae_factor: usize) -> Result<()> {
        let f = vae_factor as u32;
        if self.tile_size < 2 * f || !self.tile_size.is_multiple_of(f) {
            return Err(Error::input(format!(
                "the VAE tile size must be a multiple of {f} and at least {}, got {}",
                2 * f,
                self.tile_size
            ))
            .with_hint(format!("diffusers uses {DEFAULT_TILE_SIZE}")));
        }
        if !(0.0..=0.5).contains(&self.overlap) {
            return Err(Error::input(format!(
                "the VAE tile overlap must be between 0 and 0.5, got {}",
                self.overlap
            )));
        }
        Ok(())
    }

    /// Whether an image of `width` x `height` pixels is decoded (and encoded) in tiles.
    pub fn applies(&self, width: u32, height: u32) -> bool {
        let larger = width > self.tile_size || height > self.tile_size;
        match self.mode {
            TilingMode::Off => false,
            TilingMode::On => larger,
            TilingMode::Auto => larger && width as u64 * height as u64 > self.auto_pixels,
        }
    }

    /// The distinct (width, height) in pixels of the tiles a `width` x `height` image is decoded (and encoded) in,
    /// or `None` when tiling does not apply: the tiles the VAE graphs see, for TensorRT profile checks. Edge tiles
    /// are cut to the image, so they may be smaller than the tile size.
    pub fn tile_sizes(
        &self,
        width: u32,
        height: u32,
        vae_factor: usize,
    ) -> Option<Vec<(u32, u32)>> {
        if !self.applies(width, height) || vae_factor == 0 {
            return None;
        }
        let g = self.grid(vae_factor);
        let extents = |px: u32| -> Vec<u32> {
            let n = px as usize / vae_factor;
            let mut v: Vec<u32> = (0..n)
                .step_by(g.stride())
                .map(|i| (g.tile.min(n - i) * vae_factor) as u32)
                .collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        let (ws, hs) = (extents(width), extents(height));
        Some(
            hs.iter()
                .flat_map(|&h| ws.iter().map(move |&w| (w, h)))
                .collect(),
        )
    }

    fn grid(&self, vae_factor: usize) -> Grid {
        let tile = (self.tile_size as usize / vae_factor).max(1);
        // int(T * o) as diffusers; at least one latent of stride.
        let overlap = ((tile as f64 * self.overlap as f64) as usize).min(tile - 1);
        Grid {
            tile,
            overlap,
            factor: vae_factor,
        }
    }
}

/// Decodes VAE-space latents `[B, C, h, w]` (already `z / scale + shift`) to images `[B, 3, H, W]` in [-1, 1],
/// in tiles when `tiling` applies to the image size, else in one pass; `f` is the VAE factor and `run` one decoder
/// call.
pub fn decode(
    z: Array4<f32>,
    tiling: &VaeTiling,
    f: usize,
    mut run: impl FnMut(Array4<f32>) -> Result<Array4<f32>>,
) -> Result<Array4<f32>> {
    let (_, _, h, w) = z.dim();
    if !tiling.applies((w * f) as u32, (h * f) as u32) {
        return run(z);
    }
    tiling.validate(f)?;
    let g = tiling.grid(f);
    tiled(
        z.view(),
        g.tile,
        g.stride(),
        g.overlap * f,
        g.stride() * f,
        (h * f, w * f),
        run,
    )
}

/// Encodes images `[1, 3, H, W]` in [-1, 1] to the posterior's (mean, std), `[1, C, H/f, W/f]` each, in tiles when
/// `tiling` applies, else in one pass; `f` is the VAE factor and `run` one encoder call.
pub fn encode(
    x: &Array4<f32>,
    tiling: &VaeTiling,
    f: usize,
    mut run: impl FnMut(&Array4<f32>) -> Result<(Array4<f32>, Array4<f32>)>,
) -> Result<(Array4<f32>, Array4<f32>)> {
    let (_, _, h, w) = x.dim();
    if !tiling.applies(w as u32, h as u32) {
        return run(x);
    }
    tiling.validate(f)?;
    let g = tiling.grid(f);
    let mut channels = 0;
    let moments = tiled(
        x.view(),
        g.tile * f,
        g.stride() * f,
        g.overlap,
        g.stride(),
        (h / f, w / f),
        |t| {
            let (mean, std) = run(&t)?;
            channels = mean.shape()[1];
            let logvar = std.mapv(|s| (2.0 * s.ln()).clamp(-30.0, 20.0));
            concatenate(Axis(1), &[mean.view(), logvar.view()])
                .map_err(|e| Error::runtime(format!("cannot join encoder outputs: {e}")))
        },
    )?;
    let mean = moments.slice(s![.., ..channels, .., ..]).to_owned();
    let std = moments
        .slice(s![.., channels.., .., ..])
        .mapv(|lv| (0.5 * lv).exp());
    Ok((mean, std))
}

/// diffusers' tiled pass over `x` `[B, C, h, w]`: tiles of `tile` input cells every `stride`, each through `run`;
/// outputs blended over `blend` cells with the tile above and to the left and cropped to `keep`; the result is
/// `out_hw` cells.
fn tiled(
    x: ArrayView4<f32>,
    tile: usize,
    stride: usize,
    blend: usize,
    keep: usize,
    out_hw: (usize, usize),
    mut run: impl FnMut(Array4<f32>) -> Result<Array4<f32>>,
) -> Result<Array4<f32>> {
    let (b, _, h, w) = x.dim();
    let mismatch = |what: &str| {
        Error::model(format!(
            "tiled VAE: the tiles' {what} do not add up to the {}x{} output",
            out_hw.1, out_hw.0
        ))
        .with_hint("the VAE graph must scale every tile by the manifest's vae.downsample_factor")
    };
    let mut out: Option<Array4<f32>> = None;
    let mut above: Vec<Array4<f32>> = Vec::new();
    let mut oy = 0;
    for i in (0..h).step_by(stride) {
        let mut row: Vec<Array4<f32>> = Vec::new();
        let (mut ox, mut row_h) = (0, 0);
        for (col, j) in (0..w).step_by(stride).enumerate() {
            let input = x
                .slice(s![.., .., i..(i + tile).min(h), j..(j + tile).min(w)])
                .to_owned();
            let mut t = run(input)?;
            if let Some(a) = above.get(col) {
                blend_edge(a, &mut t, blend, Axis(2));
            }
            if let Some(l) = row.last() {
                blend_edge(l, &mut t, blend, Axis(3));
            }
            let (th, tw) = (t.shape()[2].min(keep), t.shape()[3].min(keep));
            let out =
                out.get_or_insert_with(|| Array4::zeros((b, t.shape()[1], out_hw.0, out_hw.1)));
            if t.shape()[0] != b || t.shape()[1] != out.shape()[1] {
                return Err(mismatch("batch or channels"));
            }
            if oy + th > out_hw.0 || ox + tw > out_hw.1 {
                return Err(mismatch("sizes"));
            }
            out.slice_mut(s![.., .., oy..oy + th, ox..ox + tw])
                .assign(&t.slice(s![.., .., ..th, ..tw]));
            ox += tw;
            row_h = th;
            row.push(t);
        }
        if ox != out_hw.1 {
            return Err(mismatch("widths"));
        }
        oy += row_h;
        above = row;
    }
    if oy != out_hw.0 {
        return Err(mismatch("heights"));
    }
    out.ok_or_else(|| mismatch("sizes"))
}

/// diffusers' `blend_v` (`axis` 2, rows) and `blend_h` (`axis` 3, columns): the first `extent` rows or columns
/// of `b` fade in from the last `extent` of `a`. Tiles whose other side differs are left alone.
fn blend_edge(a: &Array4<f32>, b: &mut Array4<f32>, extent: usize, axis: Axis) {
    let across = if axis == Axis(2) { 3 } else { 2 };
    if a.shape()[across] != b.shape()[across] {
        return;
    }
    let (la, lb) = (a.len_of(axis), b.len_of(axis));
    let e = extent.min(la).min(lb);
    for i in 0..e {
        let wb = (i as f64 / e as f64) as f32;
        let wa = (1.0 - i as f64 / e as f64) as f32;
        let src = a.index_axis(axis, la - e + i);
        let mut dst = b.index_axis_mut(axis, i);
        ndarray::Zip::from(&mut dst)
            .and(&src)
            .for_each(|d, &s| *d = s * wa + *d * wb);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in decoder: nearest upsampling by `f`, plus a per-tile offset (the tile's mean), which is how
    /// per-tile normalisation statistics make tiles disagree.
    fn fake_decode(t: &Array4<f32>, f: usize, offset: bool) -> Array4<f32> {
        let (b, c, h, w) = t.dim();
        let mean = if offset { t.mean().unwrap() } else { 0.0 };
        Array4::from_shape_fn((b, 3.min(c), h * f, w * f), |(bi, ci, y, x)| {
            t[[bi, ci, y / f, x / f]] + mean
        })
    }

    fn smooth_latents(b: usize, c: usize, h: usize, w: usize) -> Array4<f32> {
        Array4::from_shape_fn((b, c, h, w), |(bi, ci, y, x)| {
            ((y as f32 * 0.37 + x as f32 * 0.21 + ci as f32).sin() + bi as f32) * 0.5
        })
    }

    #[test]
    fn geometry_matches_diffusers_defaults() {
        let t = VaeTiling::with_mode(TilingMode::On);
        let g = t.grid(8);
        // tile_latent_min_size 128, overlap_size int(128 * 0.75) = 96, blend int(1024 * 0.25) = 256,
        // row_limit 1024 - 256 = 768; encode: overlap_size int(1024 * 0.75) = 768, blend 32, row_limit 96.
        assert_eq!(
            (g.tile, g.stride(), g.overlap * 8, g.stride() * 8),
            (128, 96, 256, 768)
        );
        assert_eq!(
            (g.tile * 8, g.stride() * 8, g.overlap, g.stride()),
            (1024, 768, 32, 96)
        );
    }

    #[test]
    fn tile_sizes_follow_the_grid() {
        let t = VaeTiling::with_mode(TilingMode::On);
        // 2048 px = 256 latents: tiles at 0, 96, 192 of 128, 128, 64 latents; 1024 px = 128 latents: tiles at 0
        // and 96 of 128 and 32 latents (diffusers' range(0, h, stride)).
        assert_eq!(
            t.tile_sizes(2048, 1024, 8),
            Some(vec![(512, 256), (1024, 256), (512, 1024), (1024, 1024)])
        );
        assert_eq!(t.tile_sizes(1024, 1024, 8), None, "fits one tile");
        assert_eq!(
            VaeTiling::default().tile_sizes(2048, 1024, 8),
            None,
            "auto: 2 MP"
        );
    }

    #[test]
    fn when_tiling_applies() {
        let auto = VaeTiling::default();
        assert!(!auto.applies(1024, 1024));
        assert!(!auto.applies(2048, 1024)); // 2 MP: not above the threshold
        assert!(auto.applies(2048, 2048));
        let on = VaeTiling::with_mode(TilingMode::On);
        assert!(on.applies(1040, 16) && !on.applies(1024, 1024));
        assert!(!VaeTiling::with_mode(TilingMode::Off).applies(8192, 8192));
        assert_eq!("ON".parse::<TilingMode>().unwrap(), TilingMode::On);
        assert_eq!("auto".parse::<TilingMode>().unwrap(), TilingMode::Auto);
        assert!("sometimes".parse::<TilingMode>().is_err());
        let bad = VaeTiling {
            tile_size: 100,
            ..on
        };
        assert!(bad.validate(8).is_err());
        let bad = VaeTiling { overlap: 0.9, ..on };
        assert!(bad.validate(8).is_err());
        assert!(on.validate(8).is_ok());
    }

    #[test]
    fn tiles_of_a_tile_independent_decoder_give_the_untiled_result() {
        // Odd sizes leave a short last tile (diffusers' layout); nothing is lost or doubled.
        for (h, w) in [(20, 28), (16, 16), (9, 33), (8, 8)] {
            let z = smooth_latents(2, 4, h, w);
            let whole = fake_decode(&z, 8, false);
            let (tile, overlap) = (8, 2);
            let out = tiled(
                z.view(),
                tile,
                tile - overlap,
                overlap * 8,
                (tile - overlap) * 8,
                (h * 8, w * 8),
                |t| Ok(fake_decode(&t, 8, false)),
            )
            .unwrap();
            assert_eq!(out.shape(), whole.shape());
            let d = (&out - &whole).mapv(f32::abs).fold(0f32, |a, &b| a.max(b));
            assert!(d <= 1e-6, "{h}x{w}: {d}");
        }
    }

    #[test]
    fn disagreeing_tiles_blend_without_seams() {
        let (h, w, f) = (24, 40, 8);
        let z = smooth_latents(1, 3, h, w);
        let (tile, overlap) = (8, 2);
        let run = |blend: usize| {
            tiled(
                z.view(),
                tile,
                tile - overlap,
                blend,
                (tile - overlap) * f,
                (h * f, w * f),
                |t| Ok(fake_decode(&t, f, true)),
            )
            .unwrap()
        };
        let blended = run(overlap * f);
        let hard = run(0);
        // Largest step between neighbouring columns of the error against the offset-free decode.
        let whole = fake_decode(&z, f, false);
        let max_step = |img: &Array4<f32>| {
            let e = img - &whole;
            let mut m = 0f32;
            for y in 0..h * f {
                for x in 1..w * f {
                    m = m.max((e[[0, 0, y, x]] - e[[0, 0, y, x - 1]]).abs());
                }
            }
            m
        };
        // The tiles' offsets differ by up to ~0.3: a hard join jumps by that, the blend by 1/16 of it.
        let (soft, jump) = (max_step(&blended), max_step(&hard));
        assert!(
            jump > 0.05,
            "the stand-in decoder must disagree across tiles: {jump}"
        );
        assert!(
            soft <= jump / 8.0,
            "blended step {soft} vs hard join {jump}"
        );
    }

    #[test]
    fn a_wrong_tile_size_is_a_model_error() {
        let z = smooth_latents(1, 3, 16, 16);
        let e = tiled(z.view(), 8, 6, 16, 48, (128, 128), |t| {
            Ok(fake_decode(&t, 4, false))
        })
        .unwrap_err();
        assert_eq!(e.kind, crate::ErrorKind::Model);
    }
}
