//! The prompt-embedding cache that `fluxrt serve` gives its pipelines: a cached prompt skips CLIP and T5
//! and gives the same pixels as an uncached run.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fluxrt::pipeline::{EmbeddingCache, LoadOptions, Pipeline, Quiet, Request};
use fluxrt::runtime::Canceller;

fn load() -> Pipeline {
    let mut o = LoadOptions::new(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/tiny-flux-schnell"),
    );
    o.threads = Some(1);
    Pipeline::load(&o).unwrap()
}

fn request(pipe: &Pipeline, prompt: &str, seed: u64, n: usize) -> Request {
    Request {
        width: 64,
        height: 48,
        num_images: n,
        ..Request::new(&pipe.engine().spec, prompt, seed)
    }
}

#[test]
fn a_cached_prompt_skips_the_encoders_and_gives_the_same_pixels() {
    let mut plain = load();
    let mut cached = load();
    let cache = Arc::new(EmbeddingCache::new(64 << 20));
    cached.set_embedding_cache(Some(cache.clone()));

    let req = request(&plain, "a lighthouse at dusk", 5, 1);
    let want = plain
        .generate(&req, &mut Quiet, &Canceller::new(), false)
        .unwrap();

    let first = cached
        .generate(&req, &mut Quiet, &Canceller::new(), true)
        .unwrap();
    assert!(first.timings.clip > Duration::ZERO && first.timings.t5 > Duration::ZERO);
    let s = cache.stats();
    assert_eq!((s.hits, s.misses, s.entries), (0, 1, 1));
    assert!(s.bytes > 0 && s.bytes <= s.budget);

    let second = cached
        .generate(&req, &mut Quiet, &Canceller::new(), true)
        .unwrap();
    assert_eq!(
        second.timings.clip,
        Duration::ZERO,
        "CLIP ran for a cached prompt"
    );
    assert_eq!(
        second.timings.t5,
        Duration::ZERO,
        "T5 ran for a cached prompt"
    );
    assert_eq!(cache.stats().hits, 1);
    assert_eq!(first.images[0].rgb, want.images[0].rgb);
    assert_eq!(second.images[0].rgb, want.images[0].rgb);
    // The transformer got the very same embeddings.
    let (a, b) = (first.trace.unwrap(), second.trace.unwrap());
    assert_eq!(a.prompt_embeds, b.prompt_embeds);
    assert_eq!(a.pooled_embeds, b.pooled_embeds);
}

#[test]
fn a_batch_mixing_cached_and_new_prompts_equals_single_runs() {
    let mut plain = load();
    let mut cached = load();
    let cache = Arc::new(EmbeddingCache::new(64 << 20));
    cached.set_embedding_cache(Some(cache.clone()));

    let a = request(&plain, "a lighthouse", 21, 2);
    let b = request(&plain, "ein Boot", 99, 1);
    let mut c = request(&plain, "a lighthouse", 7, 1);
    c.prompt_2 = Some("a lighthouse in a storm".into());
    // Warm the cache with `a`'s prompt only.
    cached
        .generate(
            &request(&plain, "a lighthouse", 0, 1),
            &mut Quiet,
            &Canceller::new(),
            false,
        )
        .unwrap();
    let batch = cached
        .generate_batch(
            &[a.clone(), b.clone(), a.clone(), c.clone()],
            &mut Quiet,
            &Canceller::new(),
            false,
        )
        .unwrap();
    let s = cache.stats();
    // `a` hit (once per distinct prompt in the batch); `b` and `c` (another T5 prompt) were encoded.
    assert_eq!((s.hits, s.misses, s.entries), (1, 3, 3));
    for (req, out) in [&a, &b, &a, &c].into_iter().zip(&batch) {
        let single = plain
            .generate(req, &mut Quiet, &Canceller::new(), false)
            .unwrap();
        assert_eq!(out.images.len(), single.images.len());
        for (x, y) in out.images.iter().zip(&single.images) {
            assert_eq!(x.seed, y.seed);
            assert_eq!(x.rgb, y.rgb, "{} seed {}", req.prompt, x.seed);
        }
    }
}

#[test]
fn a_tiny_budget_keeps_nothing_and_changes_nothing() {
    let mut plain = load();
    let mut cached = load();
    let cache = Arc::new(EmbeddingCache::new(16));
    cached.set_embedding_cache(Some(cache.clone()));
    let req = request(&plain, "a cat", 1, 1);
    let want = plain
        .generate(&req, &mut Quiet, &Canceller::new(), false)
        .unwrap();
    for _ in 0..2 {
        let got = cached
            .generate(&req, &mut Quiet, &Canceller::new(), false)
            .unwrap();
        assert_eq!(got.images[0].rgb, want.images[0].rgb);
        assert!(got.timings.clip > Duration::ZERO);
    }
    let s = cache.stats();
    assert_eq!((s.entries, s.bytes, s.hits, s.misses), (0, 0, 0, 2));
}
