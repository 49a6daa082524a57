//! Parity with diffusers' FluxPipeline (goldens from export/goldens.py), through the library: every stage of
//! every case, both tiny variants, both resolutions, all prompts.

mod common;

use common::*;
use fluxrt::pipeline::{LoadOptions, Pipeline, Quiet, Request};
use fluxrt::runtime::Canceller;

/// Tolerances from the runtime issue: ids exact; noise, sigmas, timesteps 1e-6; the ONNX stages 1e-4.
const EXACT_TOL: f32 = 1e-6;
const GRAPH_TOL: f32 = 1e-4;

fn check_model(model_name: &str) {
    let mut pipe =
        Pipeline::load(&LoadOptions::new(model(model_name))).expect("bundled model loads");
    for case in cases(model_name) {
        let g = Golden::load(model_name, &case);
        let what = |s: &str| format!("{model_name}/{}: {s}", case.name);
        let mut req = Request::new(&pipe, case.prompt.clone(), case.seed);
        req.width = case.width;
        req.height = case.height;
        req.steps = case.steps;
        req.guidance = case.guidance;
        let out = pipe
            .generate(&req, &mut Quiet, &Canceller::new(), true)
            .expect("generate");
        let tr = out.trace.expect("trace requested");

        assert_eq!(
            tr.clip_ids[0],
            g.i64("clip_input_ids").1,
            "{}",
            what("CLIP ids")
        );
        assert_eq!(tr.t5_ids[0], g.i64("t5_input_ids").1, "{}", what("T5 ids"));
        assert_eq!(tr.t5_ids[0].len(), case.t5_max_length);

        let (_, noise) = g.f32("noise");
        assert_close(
            &what("noise"),
            tr.noise.as_ref().unwrap().as_slice().unwrap(),
            &noise,
            EXACT_TOL,
        );
        assert_close(&what("sigmas"), &tr.sigmas, &g.f32("sigmas").1, EXACT_TOL);
        // timesteps are sigma * 1000 in f32: 1e-6 relative to their scale.
        assert_close(
            &what("timesteps"),
            &tr.timesteps,
            &g.f32("timesteps").1,
            EXACT_TOL * 1000.0,
        );

        let pooled = tr.pooled_embeds.as_ref().unwrap();
        assert_close(
            &what("pooled embeds"),
            pooled.as_slice().unwrap(),
            &g.f32("pooled_prompt_embeds").1,
            GRAPH_TOL,
        );
        let txt = tr.prompt_embeds.as_ref().unwrap();
        assert_close(
            &what("T5 embeds"),
            txt.as_slice().unwrap(),
            &g.f32("prompt_embeds").1,
            GRAPH_TOL,
        );

        let (shape, steps) = g.f32("latents");
        assert_eq!(shape[0], case.steps);
        assert_eq!(tr.latents.len(), case.steps);
        let per = steps.len() / case.steps;
        for (i, x) in tr.latents.iter().enumerate() {
            let want = &steps[i * per..(i + 1) * per];
            assert_close(
                &what(&format!("latents after step {}", i + 1)),
                x.as_slice().unwrap(),
                want,
                GRAPH_TOL,
            );
        }
        let img = tr.images.as_ref().unwrap();
        let (ishape, want) = g.f32("image");
        assert_eq!(img.shape(), &ishape[..], "{}", what("image shape"));
        assert_close(&what("image"), img.as_slice().unwrap(), &want, GRAPH_TOL);
        // The 8-bit image is the float image rounded: at most one level off anywhere.
        let rgb = &out.images[0].rgb;
        assert_eq!((rgb.width(), rgb.height()), (case.width, case.height));
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
