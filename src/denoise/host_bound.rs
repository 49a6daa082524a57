//! The host-bound strategy: an I/O binding with the text embeddings, pooled vectors, ids, guidance and extra inputs
//! bound once, the latents and timestep updated in place and the velocity written into one preallocated buffer;
//! nothing is allocated per step (except with a trace). With true CFG the bound latents are `[x; x]`: the halves of
//! the velocity are combined into a kept buffer, the Euler step runs on the first half and is copied to the second.
//! On the same graph it gives bit-identical latents to the plain strategy.

use std::time::Duration;

use ndarray::{Array1, Array3};

use super::{host_report, ModelInputs, Setup, StepAt, Strategy};
use crate::engine::{batchable, Transformer};
use crate::runtime::step_graph::StepReport;
use crate::runtime::{Binding, Canceller, ElemType, LoopKind, TensorIn};
use crate::{guidance, schedule, Error, Result};

pub struct HostBound<'a> {
    tf: Transformer<'a>,
    bind: Binding,
    /// The graph's names of the latents, timestep and velocity.
    names: [String; 3],
    cfg_scale: Option<f32>,
    /// The combined velocity (true CFG).
    guided: Vec<f32>,
    ort_start: Duration,
}

impl<'a> HostBound<'a> {
    /// Binds the inputs for latents `x`; gives the transformer back when it cannot be driven this way (latents,
    /// timestep or velocity not f32, or a batch-1 graph given several rows).
    pub fn setup(
        tf: Transformer<'a>,
        x: &Array3<f32>,
        inputs: &ModelInputs,
    ) -> Result<Setup<'a, HostBound<'a>>> {
        let names = [
            tf.name("hidden_states"),
            tf.name("timestep"),
            tf.name("latent"),
        ];
        let rows = inputs.rows(x.shape()[0]);
        let graph = &*tf.graph;
        let f32_in = |name: &str| graph.input(name).is_some_and(|i| i.dtype == ElemType::F32);
        let f32_out = graph
            .outputs()
            .iter()
            .any(|o| o.name == names[2] && o.dtype == ElemType::F32);
        if !(f32_in(&names[0]) && f32_in(&names[1]) && f32_out && batchable(graph.inputs(), rows)) {
            return Ok(Setup::Fallback(tf, None));
        }
        // True CFG binds [x; x]; otherwise `x` is bound (copied once into the binding) as it is.
        let doubled = match inputs.cfg_scale {
            Some(_) => Some(guidance::doubled(x.view())?),
            None => None,
        };
        let latents = doubled.as_ref().map_or(x.view(), |d| d.view());
        let timestep = Array1::from_elem(rows, 0.0f32).into_dyn();
        let guidance = inputs.guidance_rows(rows);
        let mut bind = graph.binding()?;
        graph.bind_input(
            &mut bind,
            &names[0],
            TensorIn::F32(latents.view().into_dyn()),
        )?;
        graph.bind_input(&mut bind, &names[1], TensorIn::F32(timestep.view()))?;
        for (name, value) in inputs.constants(guidance.as_ref()) {
            graph.bind_input(&mut bind, &tf.name(name), value)?;
        }
        graph.bind_output(&mut bind, &names[2], latents.shape())?;
        let ort_start = graph.ort_time();
        Ok(Setup::Ready(HostBound {
            tf,
            bind,
            names,
            cfg_scale: inputs.cfg_scale,
            guided: if inputs.cfg_scale.is_some() {
                vec![0.0; x.len()]
            } else {
                Vec::new()
            },
            ort_start,
        }))
    }
}

impl Strategy for HostBound<'_> {
    fn kind(&self) -> LoopKind {
        LoopKind::HostBound
    }

    fn step(
        &mut self,
        at: &StepAt,
        _x: &mut Array3<f32>,
        cancel: &Canceller,
    ) -> Result<StepReport> {
        let [n_x, n_t, n_v] = &self.names;
        self.bind
            .input_mut(n_t)
            .expect("timestep is a bound f32 input")
            .fill(at.timestep);
        self.tf.graph.run_binding(&mut self.bind, cancel)?;
        let (xs, v) = self
            .bind
            .input_mut_and_output(n_x, n_v)
            .expect("latents and velocity are bound f32 buffers");
        if v.len() != xs.len() {
            return Err(Error::model(format!(
                "transformer output has {} values for {} latents",
                v.len(),
                xs.len()
            )));
        }
        let (xs, v) = match self.cfg_scale {
            Some(scale) => {
                let half = xs.len() / 2;
                guidance::combine_into(&v[..half], &v[half..], scale, &mut self.guided);
                let (x, copy) = xs.split_at_mut(half);
                schedule::euler_step(x, &self.guided, at.sigma, at.sigma_next);
                copy.copy_from_slice(x);
                (x, &self.guided[..])
            }
            None => {
                schedule::euler_step(xs, v, at.sigma, at.sigma_next);
                (xs, v)
            }
        };
        Ok(host_report(at, v, xs))
    }

    fn finish(&mut self, x: &mut Array3<f32>) -> Result<()> {
        // The latents come back to the host array once, at the end (the first half with true CFG).
        let xs = self
            .bind
            .input_mut(&self.names[0])
            .expect("latents are bound");
        let n = x.len();
        x.as_slice_mut()
            .expect("packed latents are contiguous")
            .copy_from_slice(&xs[..n]);
        Ok(())
    }

    fn ort_time(&self) -> Duration {
        self.tf.graph.ort_time() - self.ort_start
    }
}
