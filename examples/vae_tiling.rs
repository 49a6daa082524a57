//! Decodes random latents with and without VAE tiling and reports the time and the process's peak memory
//! (`VmHWM`), for docs and the tiling issue's numbers. Run each mode in its own process (the peak is per process):
//!
//! ```text
//! cargo run --release --example vae_tiling -- models/tiny-flux-schnell 2048 off
//! cargo run --release --example vae_tiling -- models/tiny-flux-schnell 2048 on 1024 /tmp/tiled
//! ```
//!
//! Arguments: MODEL SIZE (square, pixels) MODE (auto|on|off) [TILE_PX [OUT_PREFIX [COMPARE]]]. With OUT_PREFIX it
//! writes the latents (`OUT_PREFIX.latents.f32`, [1, C, SIZE/8, SIZE/8]) and the decoded image
//! (`OUT_PREFIX.image.f32`, [1, 3, SIZE, SIZE]) as raw little-endian f32, for comparisons outside (e.g. with
//! diffusers' tiled_decode); COMPARE names another run's `.image.f32` to report the max and mean difference to.

use std::time::Instant;

use fluxrt::pipeline::{LoadOptions, Pipeline};
use fluxrt::runtime::Canceller;
use fluxrt::vae_tiling::{self, VaeTiling};

fn peak_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

fn write_f32(path: &str, data: &[f32]) {
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).expect("output is writable");
}

fn main() -> fluxrt::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        eprintln!("usage: vae_tiling MODEL SIZE auto|on|off [TILE_PX [OUT_PREFIX]]");
        std::process::exit(2);
    }
    let size: usize = args[1].parse().expect("SIZE is a number");
    let tiling = VaeTiling {
        mode: args[2].parse()?,
        tile_size: args.get(3).map_or(vae_tiling::DEFAULT_TILE_SIZE, |t| {
            t.parse().expect("TILE_PX is a number")
        }),
        ..VaeTiling::default()
    };
    let mut pipe = Pipeline::load(&LoadOptions::new(&args[0]))?;
    let f = pipe.engine().spec.vae.downsample_factor;
    let c = pipe.engine().spec.latent_channels;
    let (h, w) = (size / f, size / f);
    let z = ndarray::Array4::from_shape_vec((1, c, h, w), fluxrt::noise::randn(0, c * h * w))
        .expect("shape");
    let before = peak_memory_bytes();
    let t0 = Instant::now();
    let img = vae_tiling::decode(
        z.clone(),
        &tiling,
        pipe.engine().spec.vae.downsample_factor,
        |z| pipe.engine_mut().decode(z, &Canceller::new()),
    )?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    println!(
        "{}",
        serde_json::json!({
            "size": size,
            "mode": tiling.mode.name(),
            "tile_size": tiling.tile_size,
            "tiled": tiling.applies(size as u32, size as u32),
            "decode_ms": ms,
            "peak_memory_bytes_before_decode": before,
            "peak_memory_bytes": peak_memory_bytes(),
        })
    );
    if let Some(prefix) = args.get(4).filter(|p| !p.is_empty()) {
        write_f32(
            &format!("{prefix}.latents.f32"),
            z.as_slice().expect("contiguous"),
        );
        write_f32(
            &format!("{prefix}.image.f32"),
            img.as_slice().expect("contiguous"),
        );
    }
    if let Some(other) = args.get(5) {
        let bytes = std::fs::read(other).expect("COMPARE is readable");
        let (mut max, mut sum) = (0f32, 0f64);
        for (c, &v) in bytes.chunks_exact(4).zip(img.iter()) {
            let d = (f32::from_le_bytes(c.try_into().expect("4 bytes")) - v).abs();
            max = max.max(d);
            sum += d as f64;
        }
        // In the decoder's [-1, 1] range; halve for [0, 1] images.
        println!(
            "{}",
            serde_json::json!({"compared_to": other, "max_abs_diff": max, "mean_abs_diff": sum / img.len() as f64})
        );
    }
    Ok(())
}
