//! Criterion benchmarks of fluxrt's own stages (everything outside ONNX Runtime) and one end-to-end run of the
//! bundled tiny model. Run: `cargo bench --bench stages` (add `-- tokenize` to pick a group).
//! Whole-model numbers across providers come from `fluxrt bench`; the side-by-side comparison with PyTorch and
//! Python onnxruntime from `benches/compare.py`.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use fluxrt::image_out;
use fluxrt::latents;
use fluxrt::noise;
use fluxrt::pipeline::{LoadOptions, Pipeline, Quiet, Request};
use fluxrt::runtime::Canceller;
use fluxrt::schedule::{self, SchedulerConfig};
use fluxrt::text::{PromptTokenizer, TokenizerSettings};
use ndarray::Array4;

const PROMPT: &str = "a photo of a red fox sitting in fresh snow at sunrise, soft golden light, \
                      shallow depth of field, highly detailed fur, 85mm lens";

fn tiny() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/tiny-flux-schnell")
}

/// 1024x1024 FLUX.1 latents: 16 channels of 128x128.
const LATENT: (usize, usize, usize) = (16, 128, 128);

fn tokenize(c: &mut Criterion) {
    let clip = PromptTokenizer::from_file(
        tiny().join("tokenizer/tokenizer.json"),
        TokenizerSettings::clip(77),
    )
    .expect("CLIP tokenizer");
    let t5 = PromptTokenizer::from_file(
        tiny().join("tokenizer_2/tokenizer.json"),
        TokenizerSettings::t5(512),
    )
    .expect("T5 tokenizer");
    let mut g = c.benchmark_group("tokenize");
    g.bench_function("clip_77", |b| {
        b.iter(|| clip.encode(black_box(PROMPT)).unwrap())
    });
    g.bench_function("t5_512", |b| {
        b.iter(|| t5.encode(black_box(PROMPT)).unwrap())
    });
    g.finish();
}

fn schedule(c: &mut Criterion) {
    let mut g = c.benchmark_group("schedule");
    let seq = latents::image_seq_len(1024, 1024, 8);
    g.bench_function("schnell_4_steps", |b| {
        b.iter(|| {
            let s = schedule::sigmas(4, black_box(seq), &SchedulerConfig::schnell()).unwrap();
            schedule::timesteps(&s)
        })
    });
    g.bench_function("dev_50_steps", |b| {
        b.iter(|| {
            let s = schedule::sigmas(50, black_box(seq), &SchedulerConfig::dev()).unwrap();
            schedule::timesteps(&s)
        })
    });
    let n = LATENT.0 * LATENT.1 * LATENT.2;
    let v = noise::randn(1, n);
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("euler_step_1024x1024", |b| {
        let mut x = noise::randn(2, n);
        b.iter(|| schedule::euler_step(black_box(&mut x), black_box(&v), 0.75, 0.5))
    });
    g.finish();
}

fn packing(c: &mut Criterion) {
    let (ch, h, w) = LATENT;
    let z = Array4::from_shape_vec((1, ch, h, w), noise::randn(3, ch * h * w)).unwrap();
    let packed = latents::pack(&z.view());
    let mut g = c.benchmark_group("packing_1024x1024");
    g.throughput(Throughput::Elements((ch * h * w) as u64));
    g.bench_function("pack", |b| b.iter(|| latents::pack(black_box(&z.view()))));
    g.bench_function("unpack", |b| {
        b.iter(|| latents::unpack(black_box(&packed.view()), h, w, ch))
    });
    g.bench_function("img_ids", |b| b.iter(|| latents::img_ids(black_box(h), w)));
    g.finish();
}

fn noise_bench(c: &mut Criterion) {
    let n = LATENT.0 * LATENT.1 * LATENT.2;
    let mut g = c.benchmark_group("noise_1024x1024");
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("randn_f32", |b| b.iter(|| noise::randn(black_box(42), n)));
    g.bench_function("randn_bf16", |b| {
        b.iter(|| noise::randn_bf16(black_box(42), n))
    });
    g.finish();
}

fn png(c: &mut Criterion) {
    let mut g = c.benchmark_group("png");
    g.sample_size(20);
    for side in [512u32, 1024] {
        // A smooth gradient with some texture: closer to a generated image than noise or a flat fill.
        let img = image::RgbImage::from_fn(side, side, |x, y| {
            let t = ((x * 7 + y * 13) % 17) as u8;
            image::Rgb([
                (x % 256) as u8 ^ t,
                (y % 256) as u8,
                ((x + y) / 8 % 256) as u8,
            ])
        });
        g.throughput(Throughput::Bytes((side * side * 3) as u64));
        g.bench_function(format!("encode_{side}x{side}"), |b| {
            b.iter(|| image_out::encode_png(black_box(&img), "fluxrt bench").unwrap())
        });
    }
    g.finish();
}

fn end_to_end(c: &mut Criterion) {
    let mut o = LoadOptions::new(tiny());
    o.optimized_cache = None;
    let mut pipe = match Pipeline::load(&o) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("skipping the end-to-end benchmark: {e}");
            return;
        }
    };
    let mut g = c.benchmark_group("end_to_end_tiny");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(10));
    for size in [64u32, 256] {
        let mut req = Request::new(&pipe.engine().spec, "a photo of a cat", 0);
        req.width = size;
        req.height = size;
        g.bench_function(format!("generate_{size}x{size}_4_steps"), |b| {
            b.iter_batched(
                Canceller::new,
                |cancel| pipe.generate(&req, &mut Quiet, &cancel, false).unwrap(),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    tokenize,
    schedule,
    packing,
    noise_bench,
    png,
    end_to_end
);
criterion_main!(benches);
