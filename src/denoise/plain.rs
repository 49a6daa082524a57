//! The plain strategy: one ONNX Runtime run per step through host arrays. It drives any transformer graph (any
//! element types, batch-1 graphs split per row), so it is what every other strategy falls back to.

use std::time::Duration;

use ndarray::{Array1, Array3};

use super::{host_report, ModelInputs, StepAt, Strategy};
use crate::engine::{run_graph, Transformer};
use crate::runtime::step_graph::StepReport;
use crate::runtime::{Canceller, LoopKind, TensorIn};
use crate::{guidance, schedule, Error, Result};

pub struct Plain<'a> {
    tf: Transformer<'a>,
    inputs: &'a ModelInputs<'a>,
    ort_start: Duration,
}

impl<'a> Plain<'a> {
    pub fn new(tf: Transformer<'a>, inputs: &'a ModelInputs<'a>) -> Plain<'a> {
        let ort_start = tf.graph.ort_time();
        Plain {
            tf,
            inputs,
            ort_start,
        }
    }

    /// One transformer evaluation on `x` `[R, S, 64]` (R = the rows of `self.inputs`).
    fn run(&mut self, x: &Array3<f32>, t: f32, cancel: &Canceller) -> Result<Array3<f32>> {
        let rows = x.shape()[0];
        let timestep = Array1::from_elem(rows, t).into_dyn();
        let guidance = self.inputs.guidance_rows(rows);
        // The latents first: `run_graph` reads the batch from the first input.
        let mut feed: Vec<(&str, TensorIn)> = vec![
            ("hidden_states", TensorIn::F32(x.view().into_dyn())),
            ("timestep", TensorIn::F32(timestep.view())),
        ];
        feed.extend(self.inputs.constants(guidance.as_ref()));
        let v = run_graph(self.tf.graph, self.tf.spec, &feed, "latent", cancel)?;
        v.into_dimensionality()
            .map_err(|e| Error::model(format!("transformer output has the wrong rank: {e}")))
    }
}

impl Strategy for Plain<'_> {
    fn kind(&self) -> LoopKind {
        LoopKind::Plain
    }

    fn step(&mut self, at: &StepAt, x: &mut Array3<f32>, cancel: &Canceller) -> Result<StepReport> {
        let v = match self.inputs.cfg_scale {
            Some(scale) => {
                guidance::guided_velocity(x, scale, |both| self.run(both, at.timestep, cancel))?
            }
            None => self.run(x, at.timestep, cancel)?,
        };
        if v.len() != x.len() {
            return Err(Error::model(format!(
                "transformer output has {} values for {} latents",
                v.len(),
                x.len()
            )));
        }
        let v = v.as_standard_layout();
        let v = v.as_slice().expect("standard layout");
        let xs = x.as_slice_mut().expect("packed latents are contiguous");
        schedule::euler_step(xs, v, at.sigma, at.sigma_next);
        Ok(host_report(at, v, xs))
    }

    fn finish(&mut self, _x: &mut Array3<f32>) -> Result<()> {
        // The latents were updated in place.
        Ok(())
    }

    fn ort_time(&self) -> Duration {
        self.tf.graph.ort_time() - self.ort_start
    }
}
