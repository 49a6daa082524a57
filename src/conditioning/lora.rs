//! The run-time LoRA part ([`crate::lora`] reads, checks and stacks the files): the batch's LoRA set as the
//! transformer's slot factors, fed with every call. The stacked factors of the last set are kept, so a server
//! repeating one set does not rebuild them.

use std::sync::Arc;

use super::{Batch, Context, Part};
use crate::lora::{self, LoraChoice};
use crate::runtime::Provider;
use crate::{Error, Result};

#[derive(Default)]
pub struct RuntimeLoras {
    /// The last set and its stacked factors.
    last: Option<(Vec<LoraChoice>, Arc<lora::Feeds>)>,
}

impl Part for RuntimeLoras {
    fn prepare(&mut self, cx: &mut Context, batch: &mut Batch) -> Result<()> {
        let loras = &cx.first().loras;
        if loras.is_empty() {
            return Ok(());
        }
        // TensorRT builds its engine with the slots' zero-rank defaults as weights; fed factors could be ignored
        // without a word, so refuse rather than risk a silently un-adapted image.
        if cx.engine.providers().active.contains(&Provider::TensorRt) {
            return Err(Error::input(
                "run-time LoRAs are not supported with the TensorRT provider",
            )
            .with_hint(
                "fuse the LoRA at export (`python -m export CHECKPOINT OUT --lora FILE:SCALE`) for TensorRT, \
                 or run this request on --provider cuda",
            ));
        }
        for c in loras {
            lora::check_scale(c.scale, &c.lora.name)?;
            c.lora.check_fits(cx.engine.lora_slots())?;
        }
        let feeds = match &self.last {
            Some((set, feeds)) if lora::same_set(set, loras) => feeds.clone(),
            _ => {
                let feeds = Arc::new(lora::feeds(lora::stack(loras)));
                self.last = Some((loras.clone(), feeds.clone()));
                feeds
            }
        };
        batch.extra = feeds;
        Ok(())
    }
}
