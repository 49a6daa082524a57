//! The device strategy ([`crate::runtime::step_graph`]): the transformer reads its latents, timestep, text
//! embeddings, pooled vectors, ids, guidance and extra inputs from fixed device buffers and writes the velocity into
//! a fixed device buffer, for every step and every later generation that fits the same buffers (kept in
//! [`DeviceState`]); the Euler step (and the true-CFG combination) runs in a step graph on the same provider, which
//! also refreshes the transformer's latents and timestep in place. Per step only `dt` and the next timestep go to
//! the device and two NaN/Inf counts come back; the latents come back once at the end (every step with a trace).

use std::time::Duration;

use ndarray::Array3;

use super::{ModelInputs, Setup, StepAt, Strategy};
use crate::engine::{batchable, Transformer};
use crate::runtime::step_graph::{
    self, DeviceDenoise, LoopConstants, LoopNames, LoopPlan, StepGraph, StepReport, StepSpec,
};
use crate::runtime::{Canceller, LoopKind, TensorIn};
use crate::{Error, ErrorKind, Result};

/// What the device loop keeps between generations: its step graphs, and the last loop's buffers and bindings, so the
/// transformer keeps reading and writing the same device addresses (what a session with CUDA graphs replays).
#[derive(Default)]
pub struct DeviceState {
    step_graphs: Vec<StepGraph>,
    kept: Option<DeviceDenoise>,
}

impl DeviceState {
    /// The kept loop's transformer buffers by graph name ([`DeviceDenoise::transformer_buffers`]).
    pub fn buffers(&self) -> Option<Vec<(String, usize)>> {
        self.kept.as_ref().map(|d| d.transformer_buffers())
    }

    /// A step graph for `spec`: a kept one, or a new one on the transformer's providers.
    fn step_graph(&mut self, spec: &StepSpec, tf: &Transformer) -> Result<StepGraph> {
        match self.step_graphs.iter().position(|g| g.spec() == spec) {
            Some(i) => Ok(self.step_graphs.swap_remove(i)),
            None => StepGraph::build(spec, tf.session),
        }
    }
}

pub struct Device<'a> {
    tf: Transformer<'a>,
    /// Always `Some` until dropped (then back into `state`).
    dd: Option<DeviceDenoise>,
    state: &'a mut DeviceState,
    last: Option<Vec<f32>>,
    ort_start: Duration,
    step_time: Duration,
}

/// The error of a device loop that must run (`plan.required`) and cannot, for the reason `why`.
fn required_error(plan: LoopPlan, why: &str) -> Error {
    if plan.cuda_graphs {
        Error::model(format!(
            "the transformer's session captures CUDA graphs, which only the device loop can drive, and the device \
             loop cannot run: {why}"
        ))
        .with_hint(step_graph::CUDA_GRAPH_HINT)
    } else {
        Error::model(format!("--device-loop on: {why}"))
            .with_hint("use --device-loop auto or off with this transformer graph")
    }
}

/// The transformer cannot be driven this way, for the reason `why`: a fallback, or the error of a required loop.
fn unsuitable<'a, S>(plan: LoopPlan, tf: Transformer<'a>, why: String) -> Result<Setup<'a, S>> {
    if plan.required {
        return Err(required_error(plan, &why));
    }
    Ok(Setup::Fallback(tf, Some(why)))
}

/// Setting the loop up failed with `e`: a fallback when another loop may run, else the error (named as CUDA graphs'
/// when they are why the loop is required). A cancellation is always an error.
fn failed<'a, S>(plan: LoopPlan, tf: Transformer<'a>, e: Error) -> Result<Setup<'a, S>> {
    match e.kind {
        ErrorKind::Cancelled => Err(e),
        _ if !plan.required => Ok(Setup::Fallback(tf, Some(e.to_string()))),
        _ if plan.cuda_graphs => Err(required_error(plan, &e.to_string())),
        _ => Err(e),
    }
}

impl<'a> Device<'a> {
    /// Sets the loop up for latents `x` over `steps` steps (reusing the kept buffers when they fit); gives the
    /// transformer back, with the reason, when it cannot be driven this way and `plan` allows another loop.
    pub fn setup(
        tf: Transformer<'a>,
        plan: LoopPlan,
        state: &'a mut DeviceState,
        x: &Array3<f32>,
        inputs: &ModelInputs,
        steps: usize,
    ) -> Result<Setup<'a, Device<'a>>> {
        let names = LoopNames {
            latents: tf.name("hidden_states"),
            timestep: tf.name("timestep"),
            velocity: tf.name("latent"),
        };
        let graph = &*tf.graph;
        let dtype = |io: Option<&crate::runtime::IoInfo>| io.map(|i| i.dtype.clone());
        let velocity = graph.outputs().iter().find(|o| o.name == names.velocity);
        let spec = match (
            dtype(graph.input(&names.latents)),
            dtype(velocity),
            dtype(graph.input(&names.timestep)),
        ) {
            (Some(model_in), Some(velocity), Some(timestep)) => StepSpec {
                model_in,
                velocity,
                timestep,
                cfg: inputs.cfg_scale.is_some(),
            },
            _ => {
                let why = format!(
                    "the transformer has no input {} or {}, or no output {}",
                    names.latents, names.timestep, names.velocity
                );
                return unsuitable(plan, tf, why);
            }
        };
        let rows = inputs.rows(x.shape()[0]);
        let why_not = step_graph::unsupported(&spec).or_else(|| {
            (!batchable(graph.inputs(), rows))
                .then(|| format!("the transformer graph takes batch 1, this call has {rows} rows"))
        });
        if let Some(why) = why_not {
            return unsuitable(plan, tf, why);
        }
        if steps == 0 {
            // Nothing to run: no loop touches the transformer.
            return Ok(Setup::Fallback(tf, None));
        }
        let guidance = inputs.guidance_rows(rows);
        let constants: Vec<(String, TensorIn)> = inputs
            .constants(guidance.as_ref())
            .into_iter()
            .map(|(n, t)| (tf.name(n), t))
            .collect();
        let constants: Vec<(&str, TensorIn)> = constants
            .iter()
            .map(|(n, t)| (n.as_str(), t.clone()))
            .collect();
        let constants = match DeviceDenoise::constants(graph, &constants) {
            Ok(c) => c,
            Err(e) => return failed(plan, tf, e),
        };
        match start(&tf, state, spec, names, x, &constants, inputs.cfg_scale)? {
            Ok(dd) => {
                let ort_start = tf.graph.ort_time();
                Ok(Setup::Ready(Device {
                    tf,
                    dd: Some(dd),
                    state,
                    last: None,
                    ort_start,
                    step_time: Duration::ZERO,
                }))
            }
            Err(e) => failed(plan, tf, e),
        }
    }
}

/// The loop for this generation: the kept one when its buffers fit (the same addresses as before), else a new one. A
/// transient transformer (low-memory mode) is a new session, which captures anew. The outer error is final (a request
/// the kept CUDA-graph buffers cannot take); the inner one is a set-up failure ([`failed`]).
fn start(
    tf: &Transformer,
    state: &mut DeviceState,
    spec: StepSpec,
    names: LoopNames,
    x: &Array3<f32>,
    constants: &LoopConstants,
    cfg_scale: Option<f32>,
) -> Result<Result<DeviceDenoise>> {
    let graph = &*tf.graph;
    let kept = if tf.transient {
        None
    } else {
        state.kept.take()
    };
    let old = match kept {
        Some(mut dd) if dd.fits(graph, &spec, x.shape(), constants) => {
            return Ok(dd
                .restart(graph, x.view().into_dyn(), constants, cfg_scale)
                .map(|()| dd));
        }
        other => other,
    };
    if let Some(old) = old {
        // A session that captured CUDA graphs replays the old buffers' addresses: new ones would be read stale.
        // (Static shapes make this rare: a different batch, CFG or LoRA set.) The old loop stays, for the requests
        // that fit it.
        if graph.cuda_graphs() && old.transformer_runs() > 0 {
            state.kept = Some(old);
            return Err(Error::input(
                "this request needs other device buffers than the transformer's captured CUDA graphs (another batch \
                 size, true CFG or LoRA set than the first request of this pipeline)",
            )
            .with_hint(format!(
                "keep those the same for every request of a pipeline, load a new pipeline, or {}",
                step_graph::CUDA_GRAPH_HINT
            )));
        }
        state.step_graphs.push(old.into_step_graph());
    }
    let device_id = tf.session.ep.gpu_id();
    Ok(state.step_graph(&spec, tf).and_then(|step| {
        DeviceDenoise::new(
            graph,
            step,
            names,
            x.view().into_dyn(),
            constants,
            cfg_scale,
            device_id,
        )
    }))
}

impl Strategy for Device<'_> {
    fn kind(&self) -> LoopKind {
        LoopKind::Device
    }

    fn step(
        &mut self,
        at: &StepAt,
        _x: &mut Array3<f32>,
        cancel: &Canceller,
    ) -> Result<StepReport> {
        let dd = self.dd.as_mut().expect("the loop is kept until dropped");
        let last = at.next_timestep.is_none();
        let mut r = dd.step(
            self.tf.graph,
            at.timestep,
            at.next_timestep,
            at.sigma_next - at.sigma,
            at.want_latents || last,
            cancel,
        )?;
        self.step_time += r.ort_time;
        if last {
            self.last = r.latents.clone();
        }
        if !at.want_latents {
            r.latents = None;
        }
        Ok(r)
    }

    fn finish(&mut self, x: &mut Array3<f32>) -> Result<()> {
        // The latents come back to the host once, from the last step.
        let last = self
            .last
            .take()
            .ok_or_else(|| Error::runtime("the device loop returned no latents"))?;
        x.as_slice_mut()
            .expect("packed latents are contiguous")
            .copy_from_slice(&last);
        Ok(())
    }

    fn ort_time(&self) -> Duration {
        self.tf.graph.ort_time() - self.ort_start + self.step_time
    }
}

impl Drop for Device<'_> {
    /// Keeps the loop for the next generation (same addresses); a transient transformer's loop goes with it, its
    /// step graph stays.
    fn drop(&mut self) {
        if let Some(dd) = self.dd.take() {
            if self.tf.transient {
                self.state.step_graphs.push(dd.into_step_graph());
            } else {
                self.state.kept = Some(dd);
            }
        }
    }
}
