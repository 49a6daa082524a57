//! The official BFL ONNX layout and optimum-onnx's layout (no manifest, other names) give the same image as
//! the manifest model. The layouts are generated here by the export step (`python -m export layout`), never
//! committed.

mod common;

use std::ffi::OsStr;
use std::path::Path;

use common::*;
use fluxrt::model::{Layout, ModelSpec};
use fluxrt::pipeline::{LoadOptions, Pipeline, Quiet, Request};
use fluxrt::runtime::Canceller;

fn resave(model_name: &str, layout: &str, out: &Path) {
    let m = model(model_name);
    python_ok(
        "export layout",
        [
            OsStr::new("-m"),
            OsStr::new("export"),
            OsStr::new("layout"),
            OsStr::new(layout),
            m.as_os_str(),
            out.as_os_str(),
        ],
    );
}

fn image(model_dir: &Path, seed: u64) -> image::RgbImage {
    let mut pipe = Pipeline::load(&LoadOptions::new(model_dir))
        .unwrap_or_else(|e| panic!("{}: {e}", model_dir.display()));
    let mut req = Request::new(&pipe.engine().spec, "a lighthouse at dusk", seed);
    req.width = 64;
    req.height = 48;
    req.steps = 3;
    pipe.generate(&req, &mut Quiet, &Canceller::new(), false)
        .unwrap()
        .images
        .remove(0)
        .rgb
}

#[test]
fn bfl_and_optimum_layouts_match_the_manifest_model() {
    for m in MODELS {
        let reference = image(&model(m), 8);
        for (layout, kind) in [("bfl", Layout::Bfl), ("optimum", Layout::Optimum)] {
            let dir = tempfile::tempdir().unwrap();
            let out = dir.path().join(format!("{m}-{layout}"));
            resave(m, layout, &out);
            assert!(
                !out.join("manifest.json").exists(),
                "{layout} layout must not carry our manifest"
            );
            let spec = ModelSpec::resolve(&out).unwrap();
            assert_eq!(spec.layout, kind);
            assert_eq!(
                image(&out, 8),
                reference,
                "{m} in the {layout} layout gives another image"
            );
        }
    }
}
