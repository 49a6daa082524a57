//! What batching gains, measured in-process without HTTP: four requests run one by one against the same
//! four as one `generate_batch` call, interleaved so both see the same machine load. A measurement, not a test
//! (a minute or two in a release build; that batched images equal single ones is tested in tests/parity.rs):
//!
//! ```sh
//! cargo run --release --example batch_gain [MODEL]
//! ```

use std::time::Instant;

use fluxrt::pipeline::{LoadOptions, Pipeline, Quiet, Request};
use fluxrt::runtime::Canceller;

fn main() -> fluxrt::Result<()> {
    let model = std::env::args().nth(1).unwrap_or_else(|| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny-flux-schnell").to_string()
    });
    let mut p = Pipeline::load(&LoadOptions::new(model))?;
    let none = Canceller::new;
    for (w, h) in [(256u32, 256u32), (512, 512)] {
        let reqs: Vec<Request> = (0..4)
            .map(|i| Request {
                width: w,
                height: h,
                ..Request::new(&p.engine().spec, format!("prompt {i}"), i)
            })
            .collect();
        p.generate(&reqs[0], &mut Quiet, &none(), false)?;
        p.generate_batch(&reqs, &mut Quiet, &none(), false)?;
        let (mut singles, mut batches) = (vec![], vec![]);
        for _ in 0..12 {
            let t = Instant::now();
            for r in &reqs {
                p.generate(r, &mut Quiet, &none(), false)?;
            }
            singles.push(t.elapsed().as_secs_f64() * 1e3 / 4.0);
            let t = Instant::now();
            p.generate_batch(&reqs, &mut Quiet, &none(), false)?;
            batches.push(t.elapsed().as_secs_f64() * 1e3 / 4.0);
        }
        singles.sort_by(f64::total_cmp);
        batches.sort_by(f64::total_cmp);
        eprintln!(
            "{w}x{h} ms per image: one by one min {:.1} median {:.1} | batch of 4 min {:.1} median {:.1}",
            singles[0], singles[6], batches[0], batches[6]
        );
    }
    Ok(())
}
