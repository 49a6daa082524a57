//! The denoise driver: BFL's `denoise` (candle's `flux::sampling::denoise`) over a model that only knows how to
//! take one Euler step. [`drive`] walks the schedule and owns what every loop shares: step timing, progress, the
//! NaN/Inf guard, the trace and cancellation. How a step runs is a [`Strategy`]:
//! - [`plain::Plain`]: one ONNX Runtime run per step through host arrays (any graph);
//! - [`host_bound::HostBound`]: an I/O binding, inputs bound once, latents updated in place on the host;
//! - [`device::Device`]: latents, constants and the Euler step stay in device memory.
//!
//! Every strategy takes the same [`ModelInputs`], so every conditioning works with every strategy (true CFG's
//! doubled rows included). [`Denoiser`] picks the strategy for a generation, device first, and reports a fallback
//! as a value ([`Denoiser::fallback`]), never as a side effect of a loop.

pub mod device;
pub mod host_bound;
pub mod plain;

use std::time::{Duration, Instant};

use ndarray::{Array1, Array3, ArrayD};

use crate::engine::{Engine, Transformer};
use crate::error::non_finite;
use crate::runtime::step_graph::{self, LoopPlan, StepReport};
use crate::runtime::{Canceller, DeviceLoop, LoopKind, TensorIn};
use crate::schedule;
use crate::{Error, ErrorKind, Result};

/// Called after each denoising step (for progress bars and servers).
pub trait Progress {
    fn step(&mut self, _done: usize, _total: usize) {}
}

/// No progress reporting.
pub struct Quiet;
impl Progress for Quiet {}

/// What the transformer reads besides the latents and the timestep, the same for every step of one generation: the
/// conditioning parts ([`crate::conditioning`]) fill it, the strategies feed it.
#[derive(Clone, Copy)]
pub struct ModelInputs<'a> {
    /// T5 embeddings and pooled CLIP vectors, one row per transformer row: `B`, or `2B` with true CFG (prompt rows,
    /// then negative rows).
    pub txt: &'a ArrayD<f32>,
    pub pooled: &'a ArrayD<f32>,
    pub img_ids: &'a ArrayD<f32>,
    pub txt_ids: &'a ArrayD<f32>,
    /// Distilled guidance (dev models), one value for every row.
    pub guidance: Option<f32>,
    /// More named inputs by graph name (run-time LoRA factors), fed whole to every call.
    pub extra: &'a [(String, ArrayD<f32>)],
    /// True CFG ([`crate::guidance`]): the transformer runs on `[x; x]` and the halves are combined with this scale.
    pub cfg_scale: Option<f32>,
}

impl<'a> ModelInputs<'a> {
    /// Transformer rows per call for `images` latent rows.
    pub fn rows(&self, images: usize) -> usize {
        images * if self.cfg_scale.is_some() { 2 } else { 1 }
    }

    /// The distilled guidance as one value per row, for the graph's `guidance` input.
    pub fn guidance_rows(&self, rows: usize) -> Option<ArrayD<f32>> {
        self.guidance.map(|g| Array1::from_elem(rows, g).into_dyn())
    }

    /// The constant inputs by contract name (the extra ones by their graph names, which no rename touches), with
    /// `guidance` from [`ModelInputs::guidance_rows`]. Every strategy feeds this one list.
    pub fn constants<'b>(
        &'b self,
        guidance: Option<&'b ArrayD<f32>>,
    ) -> Vec<(&'b str, TensorIn<'b>)> {
        let mut inputs = vec![
            ("encoder_hidden_states", TensorIn::F32(self.txt.view())),
            ("pooled_projections", TensorIn::F32(self.pooled.view())),
            ("img_ids", TensorIn::F32(self.img_ids.view())),
            ("txt_ids", TensorIn::F32(self.txt_ids.view())),
        ];
        inputs.extend(guidance.map(|g| ("guidance", TensorIn::F32(g.view()))));
        inputs.extend(
            self.extra
                .iter()
                .map(|(n, v)| (n.as_str(), TensorIn::F32(v.view()))),
        );
        inputs
    }
}

/// One step of the schedule, as a strategy sees it.
#[derive(Debug, Clone, Copy)]
pub struct StepAt {
    /// 0-based.
    pub index: usize,
    /// The transformer's timestep (in the model's scale) for this step, and for the next one (`None` on the last).
    pub timestep: f32,
    pub next_timestep: Option<f32>,
    pub sigma: f32,
    pub sigma_next: f32,
    /// Return the new latents (a trace is kept).
    pub want_latents: bool,
}

/// How one denoising step runs: the transformer at `at.timestep`, then `x + (sigma_next - sigma) * v`.
pub trait Strategy {
    fn kind(&self) -> LoopKind;
    /// One step. Strategies that keep the latents in their own buffers leave `x` as it is until
    /// [`Strategy::finish`]; they report NaN/Inf counts, and the driver turns them into errors.
    fn step(&mut self, at: &StepAt, x: &mut Array3<f32>, cancel: &Canceller) -> Result<StepReport>;
    /// Writes the final latents into `x`.
    fn finish(&mut self, x: &mut Array3<f32>) -> Result<()>;
    /// Time spent inside ONNX Runtime so far.
    fn ort_time(&self) -> Duration;
}

/// Walks the schedule (`sigmas` has one more entry than `timesteps`) with `strategy`, starting from `x`: per step the
/// wall time, progress, the NaN/Inf guard ("... at step N") and, with `trace`, the latents. Returns each step's time.
pub fn drive(
    strategy: &mut dyn Strategy,
    x: &mut Array3<f32>,
    (sigmas, timesteps): (&[f32], &[f32]),
    progress: &mut dyn Progress,
    cancel: &Canceller,
    mut trace: Option<&mut Vec<Array3<f32>>>,
) -> Result<Vec<Duration>> {
    let steps = timesteps.len();
    let mut times = Vec::with_capacity(steps);
    for i in 0..steps {
        if cancel.is_cancelled() {
            return Err(Error::new(
                ErrorKind::Cancelled,
                format!("generation cancelled before step {}", i + 1),
            ));
        }
        let t0 = Instant::now();
        let at = StepAt {
            index: i,
            timestep: schedule::model_timestep(timesteps[i]),
            next_timestep: timesteps.get(i + 1).map(|&t| schedule::model_timestep(t)),
            sigma: sigmas[i],
            sigma_next: sigmas[i + 1],
            want_latents: trace.is_some(),
        };
        let r = strategy.step(&at, x, cancel)?;
        if r.bad_velocity > 0 {
            return Err(non_finite(
                &format!("transformer output (velocity) at step {}", i + 1),
                r.bad_velocity as usize,
                r.latents_len,
            ));
        }
        if r.bad_latents > 0 {
            return Err(non_finite(
                &format!("latents after step {}", i + 1),
                r.bad_latents as usize,
                r.latents_len,
            ));
        }
        if let (Some(tr), Some(l)) = (trace.as_mut(), r.latents) {
            tr.push(Array3::from_shape_vec(x.raw_dim(), l).expect("latents keep their shape"));
        }
        times.push(t0.elapsed());
        progress.step(i + 1, steps);
    }
    strategy.finish(x).map(|()| times)
}

/// NaN/Inf values in `data`.
fn count_non_finite(data: &[f32]) -> u64 {
    data.iter().filter(|v| !v.is_finite()).count() as u64
}

/// The report of a step taken on the host: the NaN/Inf counts of the velocity `v` and the new latents `x`, and the
/// latents themselves when `at` asks for them.
pub(crate) fn host_report(at: &StepAt, v: &[f32], x: &[f32]) -> StepReport {
    StepReport {
        bad_velocity: count_non_finite(v),
        bad_latents: count_non_finite(x),
        latents_len: x.len(),
        latents: at.want_latents.then(|| x.to_vec()),
        ort_time: Duration::ZERO,
    }
}

/// A strategy that cannot drive this transformer gives it back, with the reason when the caller should hear it.
pub enum Setup<'a, S> {
    Ready(S),
    Fallback(Transformer<'a>, Option<String>),
}

/// Picks the denoising strategy of each generation and keeps what outlives one: the device loop's buffers.
pub struct Denoiser {
    /// The device-resident loop: on, off, or automatic (GPU providers).
    pub device_loop: DeviceLoop,
    /// The host I/O binding loop, where the device loop does not run.
    pub io_binding: bool,
    device: device::DeviceState,
    /// The last generation's loop, and why the device loop did not run when it was wanted.
    last: (LoopKind, Option<String>),
}

impl Denoiser {
    pub fn new(device_loop: DeviceLoop, io_binding: bool) -> Denoiser {
        Denoiser {
            device_loop,
            io_binding,
            device: device::DeviceState::default(),
            last: (LoopKind::Plain, None),
        }
    }

    /// Which loop the last generation ran.
    pub fn last_kind(&self) -> LoopKind {
        self.last.0
    }

    /// Why the last generation did not run the device loop although it was wanted (`None` when it ran or was off).
    pub fn fallback(&self) -> Option<&str> {
        self.last.1.as_deref()
    }

    /// The device addresses the transformer reads and writes in the kept device loop (`None` when none is kept).
    pub fn device_buffers(&self) -> Option<Vec<(String, usize)>> {
        self.device.buffers()
    }

    /// Denoises `x` over the schedule on the engine's transformer with the first strategy that can drive it: the
    /// device loop (GPU providers by default; required with CUDA graphs, which only its fixed buffers can drive),
    /// then the host I/O binding, then plain runs. The time inside ONNX Runtime goes to the engine's account,
    /// also when a step fails.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &mut self,
        engine: &mut Engine,
        x: &mut Array3<f32>,
        inputs: &ModelInputs,
        schedule: (&[f32], &[f32]),
        progress: &mut dyn Progress,
        cancel: &Canceller,
        trace: Option<&mut Vec<Array3<f32>>>,
    ) -> Result<Vec<Duration>> {
        self.last = (LoopKind::Plain, None);
        let plan = step_graph::loop_plan(
            self.device_loop,
            &engine.providers().active,
            engine.transformer_cuda_graphs(),
        )?;
        let mut ort = Duration::ZERO;
        let result = (|| {
            let tf = engine.transformer()?;
            let steps = schedule.1.len();
            let (mut strategy, fallback) = pick(
                tf,
                plan,
                self.io_binding,
                &mut self.device,
                x,
                inputs,
                steps,
            )?;
            self.last = (strategy.kind(), fallback);
            let result = drive(&mut *strategy, x, schedule, progress, cancel, trace);
            ort = strategy.ort_time();
            result
        })();
        // A transformer loaded for this loop (low-memory mode) goes, whatever happened.
        engine.release_transformer();
        engine.add_ort_time(ort);
        result
    }
}

/// The first strategy that can drive `tf`, with the reason the device loop did not run when it was wanted.
fn pick<'a>(
    tf: Transformer<'a>,
    plan: LoopPlan,
    io_binding: bool,
    state: &'a mut device::DeviceState,
    x: &Array3<f32>,
    inputs: &'a ModelInputs<'a>,
    steps: usize,
) -> Result<(Box<dyn Strategy + 'a>, Option<String>)> {
    let mut fallback = None;
    let tf = if plan.device {
        match device::Device::setup(tf, plan, state, x, inputs, steps)? {
            Setup::Ready(d) => return Ok((Box::new(d), None)),
            Setup::Fallback(tf, why) => {
                fallback = why;
                tf
            }
        }
    } else {
        tf
    };
    let tf = if io_binding {
        match host_bound::HostBound::setup(tf, x, inputs)? {
            Setup::Ready(h) => return Ok((Box::new(h), fallback)),
            Setup::Fallback(tf, _) => tf,
        }
    } else {
        tf
    };
    Ok((Box::new(plain::Plain::new(tf, inputs)), fallback))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A strategy over a fixed velocity, to test the driver alone.
    struct Constant {
        v: f32,
        finished: bool,
    }

    impl Strategy for Constant {
        fn kind(&self) -> LoopKind {
            LoopKind::Plain
        }
        fn step(&mut self, at: &StepAt, x: &mut Array3<f32>, _: &Canceller) -> Result<StepReport> {
            let v = vec![self.v; x.len()];
            let xs = x.as_slice_mut().unwrap();
            schedule::euler_step(xs, &v, at.sigma, at.sigma_next);
            Ok(host_report(at, &v, xs))
        }
        fn finish(&mut self, _: &mut Array3<f32>) -> Result<()> {
            self.finished = true;
            Ok(())
        }
        fn ort_time(&self) -> Duration {
            Duration::ZERO
        }
    }

    struct Count(Vec<(usize, usize)>);
    impl Progress for Count {
        fn step(&mut self, done: usize, total: usize) {
            self.0.push((done, total));
        }
    }

    #[test]
    fn the_driver_walks_the_schedule_and_traces_each_step() {
        let mut s = Constant {
            v: 1.0,
            finished: false,
        };
        let mut x = Array3::zeros((1, 2, 2));
        let mut trace = Vec::new();
        let mut progress = Count(Vec::new());
        let sigmas = [1.0, 0.5, 0.0];
        let times = drive(
            &mut s,
            &mut x,
            (&sigmas, &[1.0, 0.5]),
            &mut progress,
            &Canceller::new(),
            Some(&mut trace),
        )
        .unwrap();
        // x + (s' - s) * 1 twice: -0.5, then -1.
        assert_eq!(times.len(), 2);
        assert_eq!(progress.0, [(1, 2), (2, 2)]);
        assert_eq!(trace[0][[0, 0, 0]], -0.5);
        assert_eq!(x[[0, 1, 1]], -1.0);
        assert!(s.finished);
    }

    #[test]
    fn the_driver_names_the_step_of_a_nan_and_stops_when_cancelled() {
        let mut s = Constant {
            v: f32::NAN,
            finished: false,
        };
        let mut x = Array3::zeros((1, 2, 2));
        let sched = (&[1.0, 0.5, 0.0][..], &[1.0, 0.5][..]);
        let e = drive(&mut s, &mut x, sched, &mut Quiet, &Canceller::new(), None).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Numerics);
        assert!(
            e.message
                .starts_with("transformer output (velocity) at step 1 contains 4 NaN/Inf"),
            "{e}"
        );
        assert!(!s.finished);
        let cancel = Canceller::new();
        cancel.cancel();
        let e = drive(&mut s, &mut x, sched, &mut Quiet, &cancel, None).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Cancelled);
    }
}
