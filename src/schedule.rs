//! The rectified-flow Euler schedule, reproducing diffusers' `FluxPipeline` +
//! `FlowMatchEulerDiscreteScheduler` with the same f64/f32 order of operations, so a run here walks the same sigmas
//! as the Python reference (to the last bit where both libms' `exp` agree, which they do on the goldens' cases).
//!
//! diffusers' path: the pipeline builds `np.linspace(1, 1/N, N)` in f64 and `mu = calculate_shift(S)`;
//! `set_timesteps` casts the sigmas to f32 and shifts them in f32 (numpy keeps Python scalars weak); the
//! terminal 0 is appended; `timesteps = sigmas * 1000` in f32; the transformer receives `t / 1000`.

use crate::{Error, Result};

/// The scheduler settings of a model (diffusers' `scheduler_config.json`, embedded in the manifest).
/// Missing fields take diffusers' constructor defaults, as diffusers does.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// Static shift `s`, used only when `use_dynamic_shifting` is off.
    pub shift: f64,
    /// Resolution-dependent shift (FLUX.1-dev): `mu` grows linearly with the image token count.
    pub use_dynamic_shifting: bool,
    pub base_shift: f64,
    pub max_shift: f64,
    pub base_image_seq_len: u64,
    pub max_image_seq_len: u64,
}

impl SchedulerConfig {
    /// FLUX.1-schnell: no shift at all (its `scheduler_config.json`).
    pub fn schnell() -> Self {
        SchedulerConfig {
            shift: 1.0,
            use_dynamic_shifting: false,
            base_shift: 0.5,
            max_shift: 1.15,
            base_image_seq_len: 256,
            max_image_seq_len: 4096,
        }
    }

    /// FLUX.1-dev: dynamic shift from 0.5 at 256 tokens to 1.15 at 4096 (`shift` 3.0 is stored but unused).
    pub fn dev() -> Self {
        SchedulerConfig {
            shift: 3.0,
            use_dynamic_shifting: true,
            ..Self::schnell()
        }
    }

    /// Rejects settings that would divide by zero or produce NaN sigmas.
    pub fn validate(&self) -> Result<()> {
        if self.use_dynamic_shifting {
            let finite = self.base_shift.is_finite() && self.max_shift.is_finite();
            if !finite || self.base_image_seq_len == self.max_image_seq_len {
                return Err(Error::model(format!(
                    "scheduler config has an unusable dynamic shift: base_shift {} max_shift {} \
                     base_image_seq_len {} max_image_seq_len {}",
                    self.base_shift,
                    self.max_shift,
                    self.base_image_seq_len,
                    self.max_image_seq_len
                ))
                .with_hint(
                    "base/max shift must be finite and the two sequence lengths must differ",
                ));
            }
        } else if !(self.shift.is_finite() && self.shift > 0.0) {
            return Err(Error::model(format!(
                "scheduler config has shift {}, which must be > 0",
                self.shift
            ))
            .with_hint("FLUX.1-schnell uses shift 1.0"));
        }
        Ok(())
    }
}

impl Default for SchedulerConfig {
    /// diffusers' `FlowMatchEulerDiscreteScheduler()` defaults (= schnell).
    fn default() -> Self {
        Self::schnell()
    }
}

/// `mu` for an image of `image_seq_len` packed tokens: the line through (base_seq, base_shift) and
/// (max_seq, max_shift), in f64 (diffusers' `calculate_shift`, BFL's `get_lin_function`).
pub fn calculate_shift(image_seq_len: usize, cfg: &SchedulerConfig) -> f64 {
    let m = (cfg.max_shift - cfg.base_shift)
        / (cfg.max_image_seq_len as f64 - cfg.base_image_seq_len as f64);
    let b = cfg.base_shift - m * cfg.base_image_seq_len as f64;
    image_seq_len as f64 * m + b
}

/// Unshifted sigmas `1, ..., 1/N` exactly as `np.linspace(1.0, 1/N, N)` builds them in f64:
/// `i * step + start`, with the last value set to `stop`.
fn linspace_sigmas(num_steps: usize) -> Vec<f64> {
    let stop = 1.0 / num_steps as f64;
    if num_steps == 1 {
        return vec![1.0];
    }
    let step = (stop - 1.0) / (num_steps - 1) as f64;
    let mut s: Vec<f64> = (0..num_steps).map(|i| i as f64 * step + 1.0).collect();
    s[num_steps - 1] = stop;
    s
}

/// Exponential time shift with exponent 1 (BFL's `time_shift`): `e^mu / (e^mu + (1/t - 1))`, in f32
/// with `e^mu` rounded to f32 first, as numpy evaluates it on an f32 array.
fn time_shift(mu: f64, t: f32) -> f32 {
    let e = mu.exp() as f32;
    e / (e + (1.0 / t - 1.0))
}

/// Static shift `s*t / (1 + (s-1)*t)` in f32 (`s - 1` is taken in f64 first, as Python does).
fn static_shift(shift: f64, t: f32) -> f32 {
    (shift as f32 * t) / (1.0 + (shift - 1.0) as f32 * t)
}

/// Most denoising steps a request may ask for.
pub const MAX_STEPS: usize = 1000;

/// The rule for a step count: 1 to `max` (a server may set a lower limit than [`MAX_STEPS`]).
pub fn check_steps(steps: usize, max: usize) -> Result<()> {
    if steps == 0 || steps > max {
        return Err(
            Error::input(format!("steps must be between 1 and {max}, got {steps}"))
                .with_hint("FLUX.1-schnell uses 4 steps, FLUX.1-dev 28-50"),
        );
    }
    Ok(())
}

/// The rule for an img2img strength: in (0, 1].
pub fn check_strength(strength: f64) -> Result<()> {
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(
            Error::input(format!("strength must be in (0, 1], got {strength}"))
                .with_hint("1.0 ignores the init image; 0.6-0.8 keeps its layout"),
        );
    }
    Ok(())
}

/// The N shifted sigmas plus the terminal 0 (N + 1 values), equal to diffusers' `scheduler.sigmas`.
pub fn sigmas(num_steps: usize, image_seq_len: usize, cfg: &SchedulerConfig) -> Result<Vec<f32>> {
    check_steps(num_steps, MAX_STEPS)?;
    cfg.validate()?;
    let mu = calculate_shift(image_seq_len, cfg);
    let mut out: Vec<f32> = linspace_sigmas(num_steps)
        .into_iter()
        .map(|s| {
            let s = s as f32;
            if cfg.use_dynamic_shifting {
                time_shift(mu, s)
            } else {
                static_shift(cfg.shift, s)
            }
        })
        .collect();
    out.push(0.0);
    Ok(out)
}

/// The pipeline's timesteps: `sigma * 1000` in f32 for every sigma but the terminal 0.
pub fn timesteps(sigmas: &[f32]) -> Vec<f32> {
    let n = sigmas.len().saturating_sub(1);
    sigmas[..n].iter().map(|&s| s * 1000.0).collect()
}

/// What the transformer's `timestep` input receives for pipeline timestep `t`: `t / 1000` in f32.
/// This is not always `sigma` itself (sigma*1000/1000 can differ by an ulp), and diffusers feeds exactly
/// this value. (With bf16 latents diffusers would first round `t` to bf16; fluxrt keeps f32 latents.)
pub fn model_timestep(t: f32) -> f32 {
    t / 1000.0
}

/// One Euler step of the flow ODE, in place: `x += (sigma_next - sigma) * v`, with `dt` rounded to f32
/// once, as diffusers' `FlowMatchEulerDiscreteScheduler.step` does.
///
/// # Panics
/// If `latents` and `velocity` differ in length.
pub fn euler_step(latents: &mut [f32], velocity: &[f32], sigma: f32, sigma_next: f32) {
    assert_eq!(
        latents.len(),
        velocity.len(),
        "latents and velocity must have the same length"
    );
    let dt = sigma_next - sigma;
    for (x, &v) in latents.iter_mut().zip(velocity) {
        *x += dt * v;
    }
}

/// Index of the first sigma an img2img run starts from (diffusers' `FluxImg2ImgPipeline.get_timesteps`):
/// `int(N - min(N * strength, N))`, in f64. The run then takes `num_steps - start` steps from
/// `sigmas[start]`, on the full N-step schedule.
pub fn img2img_start(num_steps: usize, strength: f64) -> Result<usize> {
    check_steps(num_steps, MAX_STEPS)?;
    check_strength(strength)?;
    let n = num_steps as f64;
    let init = (n * strength).min(n);
    let start = (n - init).max(0.0) as usize;
    if start >= num_steps {
        return Err(Error::input(format!(
            "strength {strength} with {num_steps} steps leaves no step to run"
        ))
        .with_hint(format!(
            "raise strength to at least {} or use more steps",
            1.0 / n
        )));
    }
    Ok(start)
}

/// The forward flow process at `sigma`: `x_t = sigma * noise + (1 - sigma) * x0` in f32 (diffusers'
/// `scale_noise`), the img2img starting latents.
///
/// # Panics
/// If `x0` and `noise` differ in length.
pub fn scale_noise(x0: &[f32], noise: &[f32], sigma: f32) -> Vec<f32> {
    assert_eq!(
        x0.len(),
        noise.len(),
        "x0 and noise must have the same length"
    );
    x0.iter()
        .zip(noise)
        .map(|(&x, &n)| sigma * n + (1.0 - sigma) * x)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    // Reference values from diffusers 0.42.1 (numpy 2.4.6, torch 2.15), for each case:
    //   s = FlowMatchEulerDiscreteScheduler(**cfg); N = steps
    //   mu = calculate_shift(S, 256, 4096, 0.5, 1.15)
    //   retrieve_timesteps(s, N, "cpu", sigmas=np.linspace(1.0, 1/N, N), mu=mu)
    //   s.sigmas.tolist()   (and s.timesteps, (s.timesteps / 1000) for the model input)
    // with cfg = schnell: shift=1, use_dynamic_shifting=False; dev: shift=3, use_dynamic_shifting=True,
    // base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096; static3: shift=3.0.
    #[rustfmt::skip]
    const DEV_28_4096: [f32; 29] = [1.0, 0.9884086, 0.97622246, 0.9633944, 0.94987255, 0.9355989, 0.920509, 0.90453076, 0.88758343, 0.8695759, 0.8504057, 0.8299564, 0.8080955, 0.7846716, 0.75951093, 0.7324128, 0.7031447, 0.6714348, 0.6369645, 0.5993567, 0.55816287, 0.51284415, 0.4627484, 0.40707842, 0.34484893, 0.274828, 0.1954546, 0.1047209, 0.0];
    #[rustfmt::skip]
    const DEV_28_4096_TIMESTEPS: [f32; 28] = [1000.0, 988.4086, 976.2225, 963.3944, 949.87256, 935.59894, 920.509, 904.53076, 887.58344, 869.5759, 850.4057, 829.9564, 808.0955, 784.67163, 759.5109, 732.41284, 703.1447, 671.4348, 636.9645, 599.3567, 558.16284, 512.8441, 462.7484, 407.07843, 344.84894, 274.82797, 195.45459, 104.7209];
    #[rustfmt::skip]
    const DEV_28_4096_MODEL_T: [f32; 28] = [1.0, 0.9884086, 0.97622246, 0.9633944, 0.94987255, 0.9355989, 0.920509, 0.90453076, 0.88758343, 0.8695759, 0.8504057, 0.8299564, 0.8080955, 0.7846716, 0.75951093, 0.7324128, 0.7031447, 0.6714348, 0.6369645, 0.5993567, 0.55816287, 0.51284415, 0.4627484, 0.40707844, 0.34484893, 0.274828, 0.19545458, 0.1047209];
    #[rustfmt::skip]
    const DEV_28_48: [f32; 29] = [1.0, 0.97726005, 0.95389974, 0.92989355, 0.90521413, 0.87983286, 0.85371923, 0.82684124, 0.7991648, 0.7706537, 0.74126965, 0.7109721, 0.6797175, 0.6474599, 0.6141503, 0.5797363, 0.54416203, 0.5073679, 0.46928996, 0.4298599, 0.3890044, 0.34664473, 0.30269626, 0.25706786, 0.20966138, 0.16037078, 0.10908151, 0.05566943, 0.0];
    #[rustfmt::skip]
    const DEV_28_48_TIMESTEPS: [f32; 28] = [1000.0, 977.2601, 953.8997, 929.89355, 905.2141, 879.8329, 853.71924, 826.84125, 799.1648, 770.65375, 741.26965, 710.97205, 679.71747, 647.4599, 614.15027, 579.73627, 544.16205, 507.36792, 469.28995, 429.8599, 389.0044, 346.6447, 302.69626, 257.06787, 209.66138, 160.37079, 109.081505, 55.66943];
    const DEV_6_64: [f32; 7] = [
        1.0, 0.88864136, 0.7614503, 0.61479187, 0.44382635, 0.24196474, 0.0,
    ];
    #[rustfmt::skip]
    const STATIC3_10: [f32; 11] = [1.0, 0.9642857, 0.923077, 0.87499994, 0.8181818, 0.75, 0.6666667, 0.5625, 0.42857146, 0.25, 0.0];
    #[rustfmt::skip]
    const STATIC3_10_TIMESTEPS: [f32; 10] = [1000.0, 964.28564, 923.07697, 874.99994, 818.1818, 750.0, 666.6667, 562.5, 428.57147, 250.0];

    fn static3() -> SchedulerConfig {
        SchedulerConfig {
            shift: 3.0,
            ..SchedulerConfig::schnell()
        }
    }

    fn assert_close(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 1e-6, "{what}[{i}]: {g} vs diffusers {w}");
        }
    }

    #[test]
    fn mu_matches_calculate_shift() {
        let dev = SchedulerConfig::dev();
        // calculate_shift(S) for S = 4096, 256, 64, 48
        assert_eq!(calculate_shift(4096, &dev), 1.15);
        assert_eq!(calculate_shift(256, &dev), 0.5);
        assert_eq!(calculate_shift(64, &dev), 0.46749999999999997);
        assert_eq!(calculate_shift(48, &dev), 0.46479166666666666);
    }

    #[test]
    fn schnell_is_linear() {
        let want = [1.0, 0.75, 0.5, 0.25, 0.0];
        assert_close(
            &sigmas(4, 256, &SchedulerConfig::schnell()).unwrap(),
            &want,
            "schnell 4 @256",
        );
        assert_close(
            &sigmas(4, 64, &SchedulerConfig::schnell()).unwrap(),
            &want,
            "schnell 4 @64",
        );
        assert_eq!(timesteps(&want), [1000.0, 750.0, 500.0, 250.0]);
        assert_eq!(
            sigmas(1, 256, &SchedulerConfig::schnell()).unwrap(),
            [1.0, 0.0]
        );
    }

    #[test]
    fn dev_matches_diffusers() {
        let dev = SchedulerConfig::dev();
        let s = sigmas(28, 4096, &dev).unwrap();
        assert_close(&s, &DEV_28_4096, "dev 28 @4096");
        assert_eq!(s, DEV_28_4096, "expected bit-exact");
        let t = timesteps(&s);
        assert_close(&t, &DEV_28_4096_TIMESTEPS, "dev 28 @4096 timesteps");
        let m: Vec<f32> = t.iter().map(|&t| model_timestep(t)).collect();
        assert_eq!(m, DEV_28_4096_MODEL_T);
        // t/1000 is not sigma at every step: the transformer must get t/1000.
        assert_ne!(m[23], s[23]);

        let s = sigmas(28, 48, &dev).unwrap();
        assert_close(&s, &DEV_28_48, "dev 28 @48 (128x96)");
        assert_close(&timesteps(&s), &DEV_28_48_TIMESTEPS, "dev 28 @48 timesteps");
        assert_close(&sigmas(6, 64, &dev).unwrap(), &DEV_6_64, "dev 6 @64");
        assert_eq!(sigmas(1, 4096, &dev).unwrap(), [1.0, 0.0]);
    }

    #[test]
    fn static_shift_matches_diffusers() {
        let s = sigmas(10, 256, &static3()).unwrap();
        assert_close(&s, &STATIC3_10, "static 3.0, 10 steps");
        assert_close(
            &timesteps(&s),
            &STATIC3_10_TIMESTEPS,
            "static 3.0 timesteps",
        );
        // Static shift ignores the sequence length.
        assert_close(
            &sigmas(4, 4096, &static3()).unwrap(),
            &[1.0, 0.9, 0.75, 0.5, 0.0],
            "static 3.0, 4 steps",
        );
    }

    #[test]
    fn zero_steps_is_an_input_error() {
        let e = sigmas(0, 4096, &SchedulerConfig::dev()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidInput);
        assert!(e.hint.is_some());
    }

    #[test]
    fn unusable_config_is_a_model_error() {
        let bad = SchedulerConfig {
            max_image_seq_len: 256,
            ..SchedulerConfig::dev()
        };
        assert_eq!(sigmas(4, 256, &bad).unwrap_err().kind, ErrorKind::Model);
        let bad = SchedulerConfig {
            shift: 0.0,
            ..SchedulerConfig::schnell()
        };
        assert_eq!(sigmas(4, 256, &bad).unwrap_err().kind, ErrorKind::Model);
    }

    #[test]
    fn config_json_round_trip_and_defaults() {
        let dev = SchedulerConfig::dev();
        let json = serde_json::to_string(&dev).unwrap();
        assert!(
            json.contains("\"use_dynamic_shifting\":true")
                && json.contains("\"base_image_seq_len\":256")
        );
        assert_eq!(serde_json::from_str::<SchedulerConfig>(&json).unwrap(), dev);
        // diffusers' scheduler_config.json has extra keys and may omit some.
        let c: SchedulerConfig =
            serde_json::from_str(r#"{"_class_name":"FlowMatchEulerDiscreteScheduler","num_train_timesteps":1000,"shift":3.0,"use_dynamic_shifting":true}"#)
                .unwrap();
        assert_eq!(c, dev);
    }

    #[test]
    fn euler_step_matches_torch() {
        // x = torch.tensor([0.1, -2.5, 3.3, 1e-3]); v = torch.tensor([1.7, 0.2, -0.9, -4.1])
        // (x + (torch.tensor(sn) - torch.tensor(s)) * v).tolist() for (s, sn) below
        let x0 = [0.1f32, -2.5, 3.3, 1e-3];
        let v = [1.7f32, 0.2, -0.9, -4.1];
        let mut x = x0;
        euler_step(&mut x, &v, 0.9884086, 0.97622246);
        assert_eq!(x, [0.07928351, -2.502437, 3.3109674, 0.050963294]);
        let mut x = x0;
        euler_step(&mut x, &v, 0.1047209, 0.0);
        assert_eq!(x, [-0.07802553, -2.520944, 3.3942487, 0.43035567]);
    }

    #[test]
    fn img2img_start_matches_get_timesteps() {
        // int(max(N - min(N * strength, N), 0))
        for (n, strength, want) in [
            (4, 1.0, 0),
            (4, 0.6, 1),
            (28, 0.75, 7),
            (10, 0.35, 6),
            (3, 0.7, 0),
            (4, 0.25, 3),
            (1, 1.0, 0),
            (6, 0.5, 3),
        ] {
            assert_eq!(
                img2img_start(n, strength).unwrap(),
                want,
                "N {n} strength {strength}"
            );
        }
        for bad in [0.0, -0.1, 1.5, f64::NAN] {
            assert_eq!(
                img2img_start(4, bad).unwrap_err().kind,
                ErrorKind::InvalidInput,
                "strength {bad}"
            );
        }
        assert_eq!(
            img2img_start(0, 0.5).unwrap_err().kind,
            ErrorKind::InvalidInput
        );
        assert_eq!(
            img2img_start(4, 1e-20).unwrap_err().kind,
            ErrorKind::InvalidInput
        );
    }

    #[test]
    fn scale_noise_matches_torch() {
        // sig = torch.tensor(0.7614503); (sig * v + (1.0 - sig) * x).tolist() with x, v as above
        let x = [0.1f32, -2.5, 3.3, 1e-3];
        let noise = [1.7f32, 0.2, -0.9, -4.1];
        assert_eq!(
            scale_noise(&x, &noise, 0.7614503),
            [1.3183205, -0.44408423, 0.1019088, -3.1217074]
        );
        assert_eq!(scale_noise(&x, &noise, 1.0), noise);
    }
}
