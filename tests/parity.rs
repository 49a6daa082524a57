//! Parity with diffusers' FluxPipeline (goldens from export/fixtures/goldens.py), through the library: every stage of
//! every case, both tiny variants, both resolutions, all prompts.

mod common;

use common::*;
use fluxrt::pipeline::{LoadOptions, Pipeline, Quiet, Request};
use fluxrt::runtime::Canceller;

fn check_model(model_name: &str) {
    let mut pipe =
        Pipeline::load(&LoadOptions::new(model(model_name))).expect("bundled model loads");
    for case in cases(model_name) {
        let g = Golden::load(model_name, &case);
        let what = |s: &str| format!("{model_name}/{}: {s}", case.name);
        let mut req = Request::new(&pipe.engine().spec, case.prompt.clone(), case.seed);
        req.width = case.width;
        req.height = case.height;
        req.steps = case.steps;
        req.guidance = case.guidance;
        let out = pipe
            .generate(&req, &mut Quiet, &Canceller::new(), true)
            .expect("generate");
        let tr = out.trace.expect("trace requested");
        assert_eq!(tr.t5_ids[0].len(), case.t5_max_length);
        assert_trace_matches(&what, &tr, &g, case.steps);
        // The 8-bit image is the float image rounded: at most one level off anywhere.
        let rgb = &out.images[0].rgb;
        assert_eq!((rgb.width(), rgb.height()), (case.width, case.height));
        let worst = levels_off(rgb, &g.f32("image").1);
        assert!(worst <= 1.0, "{}: {worst} levels off", what("8-bit image"));
    }
}

#[test]
fn schnell_matches_diffusers_at_every_stage() {
    check_model("tiny-flux-schnell");
}

#[test]
fn dev_matches_diffusers_at_every_stage() {
    check_model("tiny-flux-dev");
}

#[test]
fn a_batch_of_different_requests_equals_single_runs() {
    for m in MODELS {
        let mut pipe = Pipeline::load(&LoadOptions::new(model(m))).unwrap();
        let mut a = Request::new(&pipe.engine().spec, "a lighthouse", 21);
        a.width = 64;
        a.height = 48;
        a.num_images = 2;
        let mut b = a.clone();
        b.prompt = "ein Boot".into();
        b.seed = 99;
        b.num_images = 1;
        let batch = pipe
            .generate_batch(
                &[a.clone(), b.clone()],
                &mut Quiet,
                &Canceller::new(),
                false,
            )
            .unwrap();
        assert_eq!(batch[0].images.len(), 2);
        assert_eq!(batch[1].images.len(), 1);
        let single_a = pipe
            .generate(&a, &mut Quiet, &Canceller::new(), false)
            .unwrap();
        let single_b = pipe
            .generate(&b, &mut Quiet, &Canceller::new(), false)
            .unwrap();
        for (x, y) in batch[0].images.iter().zip(&single_a.images) {
            assert_eq!(x.seed, y.seed);
            assert_eq!(x.rgb, y.rgb, "{m}: batched image (seed {}) differs", x.seed);
        }
        assert_eq!(
            batch[1].images[0].rgb, single_b.images[0].rgb,
            "{m}: second request differs in the batch"
        );
        assert_ne!(batch[0].images[0].rgb, batch[0].images[1].rgb);
        // Incompatible requests are refused, not silently mixed.
        let mut c = b.clone();
        c.steps = 2;
        assert!(pipe
            .generate_batch(&[a.clone(), c], &mut Quiet, &Canceller::new(), false)
            .is_err());
    }
}

#[test]
fn low_memory_mode_gives_the_same_image() {
    let mut opts = LoadOptions::new(model("tiny-flux-schnell"));
    let mut normal = Pipeline::load(&opts).unwrap();
    opts.low_memory = true;
    let mut low = Pipeline::load(&opts).unwrap();
    let req = Request {
        width: 64,
        height: 64,
        ..Request::new(&normal.engine().spec, "a cat", 4)
    };
    let a = normal
        .generate(&req, &mut Quiet, &Canceller::new(), false)
        .unwrap();
    let b = low
        .generate(&req, &mut Quiet, &Canceller::new(), false)
        .unwrap();
    assert_eq!(a.images[0].rgb, b.images[0].rgb);
}

#[test]
fn a_cancelled_run_stops_with_a_cancelled_error() {
    let mut pipe = Pipeline::load(&LoadOptions::new(model("tiny-flux-schnell"))).unwrap();
    let req = Request {
        width: 64,
        height: 64,
        ..Request::new(&pipe.engine().spec, "a cat", 4)
    };
    let cancel = Canceller::new();
    cancel.cancel();
    let e = pipe.generate(&req, &mut Quiet, &cancel, false).unwrap_err();
    assert_eq!(e.kind, fluxrt::ErrorKind::Cancelled);
}
