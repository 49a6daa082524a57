//! One generation request, its checks (each rule once, with one message) and which requests may share a batch.
//! Plain data: the conditioning parts ([`crate::img2img`], [`crate::guidance`], [`crate::lora`]) read it; it knows
//! none of them beyond their input types.

use crate::init_image::InitImage;
use crate::lora::LoraChoice;
use crate::vae_tiling::VaeTiling;
use crate::{latents, schedule, Error, Result};

/// Largest image fluxrt accepts by default (pixels): 4096x4096. Checked before anything is allocated.
pub const DEFAULT_MAX_PIXELS: u64 = 4096 * 4096;
/// diffusers' `FluxImg2ImgPipeline` default strength.
pub const DEFAULT_STRENGTH: f64 = 0.6;
/// diffusers' default `true_cfg_scale`: off.
pub const DEFAULT_TRUE_CFG: f32 = 1.0;

/// One text-to-image (or img2img) request.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: String,
    /// The T5 prompt; `None` uses `prompt` (as diffusers does).
    pub prompt_2: Option<String>,
    pub width: u32,
    pub height: u32,
    pub steps: usize,
    /// Distilled guidance for dev models; ignored by schnell.
    pub guidance: Option<f32>,
    /// Image i uses seed + i.
    pub seed: u64,
    pub num_images: usize,
    pub max_pixels: u64,
    /// img2img (crate::img2img): start from this image instead of pure noise.
    pub init_image: Option<InitImage>,
    /// img2img strength in (0, 1]: the share of the schedule that runs (default 0.6, diffusers').
    pub strength: f64,
    /// True CFG (crate::guidance): the negative prompt, used when `true_cfg > 1`.
    pub negative_prompt: Option<String>,
    /// True CFG scale; above 1 with a negative prompt it runs two evaluations per step (default 1.0: off).
    pub true_cfg: f32,
    /// Tiled VAE decode/encode (crate::vae_tiling), default automatic above 2 MP.
    pub vae_tiling: VaeTiling,
    /// Run-time LoRAs (crate::lora), stacked in order; each loaded with `Pipeline::load_lora`. Empty: none.
    pub loras: Vec<LoraChoice>,
}

impl Default for Request {
    /// An empty prompt with FLUX.1-schnell's settings at 1024x1024, seed 0 (for struct-update syntax).
    fn default() -> Self {
        Request {
            prompt: String::new(),
            prompt_2: None,
            width: 1024,
            height: 1024,
            steps: 4,
            guidance: None,
            seed: 0,
            num_images: 1,
            max_pixels: DEFAULT_MAX_PIXELS,
            init_image: None,
            strength: DEFAULT_STRENGTH,
            negative_prompt: None,
            true_cfg: DEFAULT_TRUE_CFG,
            vae_tiling: VaeTiling::default(),
            loras: Vec::new(),
        }
    }
}

/// Whether true CFG runs (diffusers' `do_true_cfg`): a scale above 1 and a negative prompt, both. Usable before a
/// request exists (e.g. to size the shapes a pipeline is loaded for).
pub fn true_cfg_on(true_cfg: f32, has_negative_prompt: bool) -> bool {
    true_cfg > 1.0 && has_negative_prompt
}

/// The rule for a true-CFG scale: a finite number >= 0.
pub fn check_true_cfg(scale: f32) -> Result<()> {
    if !scale.is_finite() || scale < 0.0 {
        return Err(Error::input(format!(
            "true-cfg must be a finite number >= 0, got {scale}"
        ))
        .with_hint("values above 1 turn true CFG on (with a negative prompt); 4.0 is common"));
    }
    Ok(())
}

/// The rule for an image count: at least 1 (a server may set an upper limit).
pub fn check_num_images(n: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::input("num-images must be at least 1"));
    }
    Ok(())
}

/// The rule for a distilled guidance scale: a finite number >= 0.
pub fn check_guidance(g: f32) -> Result<()> {
    if !g.is_finite() || g < 0.0 {
        return Err(Error::input(format!(
            "guidance must be a finite number >= 0, got {g}"
        )));
    }
    Ok(())
}

impl Request {
    /// A request with the model's defaults (size, steps, guidance).
    pub fn new(spec: &crate::model::ModelSpec, prompt: impl Into<String>, seed: u64) -> Self {
        let d = spec.defaults();
        Request {
            prompt: prompt.into(),
            width: d.width,
            height: d.height,
            steps: d.steps,
            guidance: d.guidance,
            seed,
            ..Request::default()
        }
    }

    /// Checks sizes and counts before any allocation: every rule of every part, each once.
    pub fn validate(&self, vae_factor: usize) -> Result<()> {
        latents::validate_size(self.width, self.height, self.max_pixels, vae_factor)?;
        schedule::check_steps(self.steps, schedule::MAX_STEPS)?;
        check_num_images(self.num_images)?;
        if let Some(g) = self.guidance {
            check_guidance(g)?;
        }
        // Strength always, so a bad value never waits for an init image; with one, a step must be left to run.
        schedule::check_strength(self.strength)?;
        if self.init_image.is_some() {
            schedule::img2img_start(self.steps, self.strength)?;
        }
        check_true_cfg(self.true_cfg)?;
        self.vae_tiling.validate(vae_factor)?;
        for c in &self.loras {
            crate::lora::check_scale(c.scale, &c.lora.name)?;
        }
        Ok(())
    }

    /// Whether this request runs true CFG.
    pub fn true_cfg_active(&self) -> bool {
        true_cfg_on(self.true_cfg, self.negative_prompt.is_some())
    }

    /// Whether two requests can share one batch: one schedule (size, steps, and img2img's strength or none), one
    /// guidance, the same true CFG (scale or none), tiling and LoRAs; any prompts, seeds and init images.
    pub fn batches_with(&self, other: &Request) -> bool {
        let img2img = match (&self.init_image, &other.init_image) {
            (None, None) => true,
            (Some(_), Some(_)) => self.strength == other.strength,
            _ => false,
        };
        let cfg = match (self.true_cfg_active(), other.true_cfg_active()) {
            (false, false) => true,
            (true, true) => self.true_cfg == other.true_cfg,
            _ => false,
        };
        self.width == other.width
            && self.height == other.height
            && self.steps == other.steps
            && self.guidance == other.guidance
            && img2img
            && cfg
            && self.vae_tiling == other.vae_tiling
            && crate::lora::same_set(&self.loras, &other.loras)
    }

    pub fn t5_prompt(&self) -> &str {
        self.prompt_2.as_deref().unwrap_or(&self.prompt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rule_has_one_message() {
        let ok = Request {
            width: 64,
            height: 64,
            ..Request::default()
        };
        assert!(ok.validate(8).is_ok());
        let bad = |r: Request, needle: &str| {
            let e = r.validate(8).unwrap_err();
            assert_eq!(e.kind, crate::ErrorKind::InvalidInput);
            assert!(e.message.contains(needle), "{e}");
        };
        bad(
            Request {
                steps: 0,
                ..ok.clone()
            },
            "steps must be between 1 and 1000, got 0",
        );
        bad(
            Request {
                strength: 1.5,
                ..ok.clone()
            },
            "strength must be in (0, 1], got 1.5",
        );
        bad(
            Request {
                true_cfg: f32::NAN,
                ..ok.clone()
            },
            "true-cfg must be a finite number",
        );
        bad(
            Request {
                guidance: Some(-1.0),
                ..ok.clone()
            },
            "guidance must be a finite number",
        );
        bad(
            Request {
                num_images: 0,
                ..ok.clone()
            },
            "num-images must be at least 1",
        );
        bad(
            Request {
                width: 100,
                ..ok.clone()
            },
            "100",
        );
        // The same rules, called alone (the CLI checks before a model is loaded).
        assert_eq!(
            schedule::check_steps(0, schedule::MAX_STEPS)
                .unwrap_err()
                .message,
            "steps must be between 1 and 1000, got 0"
        );
        assert!(schedule::check_strength(0.0).is_err());
    }

    #[test]
    fn batches_share_one_schedule_one_cfg_and_one_lora_set() {
        let a = Request {
            prompt: "a".into(),
            ..Request::default()
        };
        let b = Request {
            prompt: "b".into(),
            seed: 9,
            ..a.clone()
        };
        assert!(a.batches_with(&b));
        assert!(!a.batches_with(&Request {
            steps: 5,
            ..b.clone()
        }));
        let cfg = Request {
            negative_prompt: Some("n".into()),
            true_cfg: 4.0,
            ..b.clone()
        };
        assert!(cfg.true_cfg_active() && !a.batches_with(&cfg));
        assert!(cfg.batches_with(&Request {
            true_cfg: 4.0,
            ..cfg.clone()
        }));
        assert!(!cfg.batches_with(&Request {
            true_cfg: 3.0,
            ..cfg.clone()
        }));
        // Either half of true CFG alone is off, and batches with plain requests.
        let half = Request {
            negative_prompt: Some("n".into()),
            ..b.clone()
        };
        assert!(!half.true_cfg_active() && a.batches_with(&half));
    }
}
