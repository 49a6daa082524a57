//! Gaussian noise that matches PyTorch's CPU generator, so a seed here gives the same image as the
//! same seed in BFL's `sampling.py` (bf16) or in diffusers with a `torch.Generator("cpu")` (f32).
//!
//! `torch.randn(n, generator=torch.Generator("cpu").manual_seed(seed))` takes one of two paths:
//! - `n >= 16` (what every latent uses): 24-bit uniforms `u = (r & 0xFFFFFF) * 2^-24` from mt19937, then
//!   Box-Muller over blocks of 16, pairing element `j` with `j + 8`; a ragged tail draws 16 fresh uniforms
//!   and recomputes the last 16 outputs. Only the element count matters, never the shape.
//! - `n < 16`: a scalar path in f64: 53-bit uniforms from two mt19937 words, Box-Muller with `log1p`, and
//!   the sine half cached for the next element; each value is rounded to f32.
//!
//! The f32 results equal torch to about 1 ulp (torch uses vectorised log/sin/cos); the `n < 16` path is
//! bit-exact.

use half::bf16;

/// The standard 32-bit Mersenne Twister (MT19937, `init_genrand` seeding), as in `std::mt19937` and in
/// PyTorch's CPU generator.
#[derive(Clone)]
pub struct Mt19937 {
    state: [u32; Self::N],
    index: usize,
}

impl Mt19937 {
    const N: usize = 624;
    const M: usize = 397;

    /// Seeds with Knuth's initialisation (`init_genrand`).
    pub fn new(seed: u32) -> Self {
        let mut state = [0u32; Self::N];
        state[0] = seed;
        for i in 1..Self::N {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Mt19937 {
            state,
            index: Self::N,
        }
    }

    /// What `torch.Generator("cpu").manual_seed(seed)` does: torch seeds mt19937 with the low 32 bits,
    /// so seeds `s` and `s + 2^32` give the same stream.
    pub fn manual_seed(seed: u64) -> Self {
        Self::new(seed as u32)
    }

    /// Regenerates all 624 words at once (cheaper than per-word twisting).
    fn twist(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        const MATRIX_A: u32 = 0x9908_b0df;
        for i in 0..Self::N {
            let y = (self.state[i] & UPPER) | (self.state[(i + 1) % Self::N] & LOWER);
            let mag = if y & 1 == 1 { MATRIX_A } else { 0 };
            self.state[i] = self.state[(i + Self::M) % Self::N] ^ (y >> 1) ^ mag;
        }
        self.index = 0;
    }

    /// The next tempered 32-bit output.
    #[inline]
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= Self::N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// torch's `random64()`: the first word is the high half.
    #[inline]
    fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32() as u64;
        let lo = self.next_u32() as u64;
        (hi << 32) | lo
    }

    /// torch's `uniform_real_distribution<float>(0, 1)`: 24 random bits, in [0, 1).
    #[inline]
    fn uniform_f32(&mut self) -> f32 {
        (self.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    /// torch's `uniform_real_distribution<double>(0, 1)`: 53 random bits, in [0, 1).
    #[inline]
    fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }
}

/// Size of torch's vectorised Box-Muller block; below it torch uses the scalar path.
const BLOCK: usize = 16;
const HALF: usize = BLOCK / 2;

/// `torch.randn(n, generator=torch.Generator("cpu").manual_seed(seed))` in float32: the first draw of a
/// fresh [`TorchGenerator`].
pub fn randn(seed: u64, n: usize) -> Vec<f32> {
    TorchGenerator::new(seed).randn(n)
}

/// A `torch.Generator("cpu").manual_seed(seed)` that keeps its state between draws, so consecutive
/// [`randn`](TorchGenerator::randn) calls continue one stream exactly as consecutive `torch.randn(...,
/// generator=g)` calls do. diffusers' `FluxImg2ImgPipeline` draws twice from one generator (the VAE posterior
/// sample, then the initial noise), so its noise is the second draw, not the text-to-image noise of that seed.
///
/// What one draw of `n` float32 values consumes: `n >= 16`: `n` mt19937 words when `n % 16 == 0`, `n + 16`
/// otherwise (the ragged tail redraws 16 uniforms); `n < 16`: two words per pair of values, the odd value out
/// cached in the generator (torch's `next_double_normal_sample`) and returned first by the next scalar draw.
#[derive(Clone)]
pub struct TorchGenerator {
    seed: u64,
    mt: Mt19937,
    /// The sine half of the scalar path's last Box-Muller pair, not yet returned.
    next_double_normal: Option<f64>,
}

impl TorchGenerator {
    /// `torch.Generator("cpu").manual_seed(seed)`.
    pub fn new(seed: u64) -> Self {
        TorchGenerator {
            seed,
            mt: Mt19937::manual_seed(seed),
            next_double_normal: None,
        }
    }

    /// The seed it was created with.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The next `torch.randn(n, generator=self)` in float32 (the shape does not matter, only `n`).
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; n];
        if n < BLOCK {
            fill_scalar(&mut self.mt, &mut self.next_double_normal, &mut out);
        } else {
            // The f32 kernel first draws a uniform for every element, including the ragged ones it will
            // overwrite later.
            fill_uniform(&mut self.mt, &mut out);
            fill_blocks(&mut self.mt, &mut out);
        }
        out
    }
}

/// mt19937 words one `torch.randn` of `n >= 16` float32 values consumes: `n` for whole blocks of 16, `n + 16`
/// with a ragged tail.
pub fn words_per_draw(n: usize) -> usize {
    if n < BLOCK || n.is_multiple_of(BLOCK) {
        n
    } else {
        n + BLOCK
    }
}

/// `torch.randn(n, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.bfloat16)`, as BFL's
/// `get_noise` draws it.
///
/// Equal to [`randn`] rounded to bf16, except for the ragged tail: torch's bf16 kernel draws uniforms
/// for whole blocks only, so the 16 tail uniforms come earlier in the stream than in the f32 kernel.
pub fn randn_bf16(seed: u64, n: usize) -> Vec<bf16> {
    let mut rng = Mt19937::manual_seed(seed);
    let mut out = vec![0f32; n];
    if n < BLOCK {
        fill_scalar(&mut rng, &mut None, &mut out);
    } else {
        let whole = n - n % BLOCK;
        fill_uniform(&mut rng, &mut out[..whole]);
        fill_blocks(&mut rng, &mut out);
    }
    out.into_iter().map(bf16::from_f32).collect()
}

fn fill_uniform(rng: &mut Mt19937, out: &mut [f32]) {
    for x in out.iter_mut() {
        *x = rng.uniform_f32();
    }
}

/// Box-Muller over whole blocks already holding uniforms, then the ragged tail from 16 fresh uniforms
/// written over the last 16 outputs (torch's `normal_fill`).
fn fill_blocks(rng: &mut Mt19937, out: &mut [f32]) {
    let n = out.len();
    for block in out.chunks_exact_mut(BLOCK) {
        box_muller_16(block.try_into().expect("chunk of 16"));
    }
    if !n.is_multiple_of(BLOCK) {
        let tail: &mut [f32; BLOCK] = (&mut out[n - BLOCK..]).try_into().expect("tail of 16");
        fill_uniform(rng, tail);
        box_muller_16(tail);
    }
}

/// torch's `normal_fill_16`: pairs `j` and `j + 8`; `1 - u` keeps the log argument in (0, 1].
#[inline]
fn box_muller_16(d: &mut [f32; BLOCK]) {
    const TWO_PI: f32 = 2.0 * std::f32::consts::PI;
    for j in 0..HALF {
        let u1 = 1.0 - d[j];
        let u2 = d[j + HALF];
        let radius = (-2.0 * u1.ln()).sqrt();
        let (sin, cos) = (TWO_PI * u2).sin_cos();
        d[j] = radius * cos;
        d[j + HALF] = radius * sin;
    }
}

/// torch's scalar `normal_distribution<double>`: each pair of 53-bit uniforms yields `r cos(theta)`
/// now and caches `r sin(theta)` (in the generator, so across draws) for the next element.
fn fill_scalar(rng: &mut Mt19937, cached: &mut Option<f64>, out: &mut [f32]) {
    for x in out.iter_mut() {
        let z = match cached.take() {
            Some(z) => z,
            None => {
                let u1 = rng.uniform_f64();
                let u2 = rng.uniform_f64();
                let radius = (-2.0 * (-u2).ln_1p()).sqrt();
                let theta = 2.0 * std::f64::consts::PI * u1;
                *cached = Some(radius * theta.sin());
                radius * theta.cos()
            }
        };
        *x = z as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (seed, n, picked (index, value) pairs, f64 sum of the whole draw).
    type Case<T> = (u64, usize, &'static [(usize, T)], f64);

    #[test]
    fn mt19937_known_outputs() {
        // Reference values of std::mt19937 (C++11 requires the 10000th output of seed 5489 to be 4123659995).
        let mut rng = Mt19937::new(5489);
        assert_eq!(rng.next_u32(), 3_499_211_612);
        assert_eq!(rng.next_u32(), 581_869_302);
        let mut rng = Mt19937::new(5489);
        let last = (0..10_000).map(|_| rng.next_u32()).last().unwrap();
        assert_eq!(last, 4_123_659_995);
        // First output of std::mt19937(0), i.e. init_genrand(0).
        assert_eq!(Mt19937::new(0).next_u32(), 2_357_136_044);
    }

    #[test]
    fn manual_seed_uses_low_32_bits() {
        let a: Vec<u32> = {
            let mut r = Mt19937::manual_seed(7);
            (0..8).map(|_| r.next_u32()).collect()
        };
        let b: Vec<u32> = {
            let mut r = Mt19937::manual_seed((1 << 32) + 7);
            (0..8).map(|_| r.next_u32()).collect()
        };
        assert_eq!(a, b);
    }

    // Produced with torch 2.15 (CPU, AVX512 capability), for each (seed, n):
    //   t = torch.randn(n, generator=torch.Generator("cpu").manual_seed(seed)).numpy()
    //   picked indices -> float(t[i]); last field float(t.astype(np.float64).sum())
    #[rustfmt::skip]
    const F32_CASES: &[Case<f32>] = &[
        (0, 16, &[(0, -1.1258398), (1, -1.1523602), (7, -2.1152194), (8, 0.32227492), (14, 1.1167772), (15, -0.24727815)], -1.909114308655262),
        (0, 17, &[(0, -1.1258398), (1, -1.6959312), (7, 1.8530061), (8, 0.4680964), (15, -0.84367675), (16, 0.9318266)], 2.996606692671776),
        (0, 31, &[(0, -1.1258398), (1, -1.1523602), (7, -2.1152194), (8, 0.32227492), (14, 1.1167772), (15, -0.11160933), (29, 2.3022053), (30, -1.4688939)], -1.9136945717036724),
        (0, 1000, &[(0, -1.1258398), (1, -1.1523602), (7, -2.1152194), (8, 0.32227492), (500, -0.16421619), (983, 0.55482656), (984, -0.79619277), (998, 0.12641814), (999, -0.5861721)], 28.9183199830004),
        (0, 262144, &[(0, -1.1258398), (1, -1.1523602), (7, -2.1152194), (8, 0.32227492), (131072, 1.5554131), (262127, -0.0861227), (262128, 0.26452324), (262142, -1.2138677), (262143, 0.07685992)], -888.9204999630147),
        (42, 16, &[(0, 1.9269153), (1, 1.4872841), (7, -1.604667), (8, -0.7521353), (14, -0.7688389), (15, 0.7624454)], -2.1876682862639427),
        (42, 17, &[(0, 1.9269153), (1, -0.15959747), (7, 1.6806206), (8, 0.3558599), (15, 0.8598585), (16, -0.30972677)], 8.21729576587677),
        (42, 31, &[(0, 1.9269153), (1, 1.4872841), (7, -1.604667), (8, -0.7521353), (14, -0.7688389), (15, -0.21680473), (29, 2.122785), (30, -1.2346531)], -5.826735518872738),
        (42, 1000, &[(0, 1.9269153), (1, 1.4872841), (7, -1.604667), (8, -0.7521353), (500, -0.75258744), (983, -0.35899198), (984, -0.4137083), (998, -0.3797594), (999, -0.8534544)], 4.23129390826216),
        (42, 262144, &[(0, 1.9269153), (1, 1.4872841), (7, -1.604667), (8, -0.7521353), (131072, -1.5828323), (262127, 0.7937959), (262128, -1.2526947), (262142, -1.7622458), (262143, -2.3294172)], -62.91328232561227),
        (4294967303, 16, &[(0, -0.8201345), (1, 0.39563116), (7, -0.8936554), (8, 0.926543), (14, 0.23039687), (15, 1.0901651)], -0.5175819545984268),
        (4294967303, 17, &[(0, -0.8201345), (1, -0.32456663), (7, -0.7245107), (8, -0.8489086), (15, -1.359769), (16, -0.8667016)], -6.4156444221735),
        (4294967303, 31, &[(0, -0.8201345), (1, 0.39563116), (7, -0.8936554), (8, 0.926543), (14, 0.23039687), (15, 0.5035639), (29, -0.25013262), (30, 0.50112146)], 2.6039004493504763),
        (4294967303, 1000, &[(0, -0.8201345), (1, 0.39563116), (7, -0.8936554), (8, 0.926543), (500, 0.68151426), (983, 0.23855348), (984, 2.1394613), (998, 0.16921602), (999, -0.8487755)], 4.843490088824183),
        (18446744073709551557, 16, &[(0, -0.13145427), (1, -1.3445059), (7, 0.025716953), (8, -0.9173793), (14, -0.15246086), (15, -0.46584404)], -0.051991994958370924),
        (18446744073709551557, 17, &[(0, -0.13145427), (1, -1.1843586), (7, 1.0011992), (8, 0.7834286), (15, 1.5752119), (16, 0.01216943)], 6.582829246297479),
        (18446744073709551557, 31, &[(0, -0.13145427), (1, -1.3445059), (7, 0.025716953), (8, -0.9173793), (14, -0.15246086), (15, 0.18165827), (29, -1.8668332), (30, -0.19173948)], -1.006472438108176),
        (18446744073709551557, 1000, &[(0, -0.13145427), (1, -1.3445059), (7, 0.025716953), (8, -0.9173793), (500, -1.0788372), (983, -0.17829776), (984, -1.0447652), (998, 1.8552539), (999, -2.8083873)], 28.926814860198647),
        (18446744073709551557, 262144, &[(0, -0.13145427), (1, -1.3445059), (7, 0.025716953), (8, -0.9173793), (131072, 0.1659434), (262127, -0.9239459), (262128, 1.7714664), (262142, 0.5904904), (262143, 0.85159045)], 930.8590222933005),
    ];

    #[test]
    fn randn_matches_torch_for_blocks_and_ragged_tails() {
        let mut worst = 0f32;
        for &(seed, n, picks, sum) in F32_CASES {
            let x = randn(seed, n);
            assert_eq!(x.len(), n);
            for &(i, want) in picks {
                let err = (x[i] - want).abs();
                worst = worst.max(err);
                assert!(
                    err <= 1e-6,
                    "seed {seed} n {n} [{i}]: {} vs torch {want}",
                    x[i]
                );
            }
            let got: f64 = x.iter().map(|&v| v as f64).sum();
            // A few ulps per element at most, summed.
            assert!(
                (got - sum).abs() <= 1e-6 * n as f64,
                "seed {seed} n {n}: sum {got} vs torch {sum}"
            );
        }
        assert!(worst <= 1e-6, "worst {worst}");
    }

    // torch's scalar path (n < 16) is exact: the whole draw, from
    //   torch.randn(n, generator=torch.Generator("cpu").manual_seed(seed)).tolist()
    #[rustfmt::skip]
    const SMALL_CASES: &[(u64, &[f32])] = &[
        (0, &[1.5409961]),
        (0, &[1.5409961, -0.2934289]),
        (0, &[1.5409961, -0.2934289, -2.1787894]),
        (0, &[1.5409961, -0.2934289, -2.1787894, 0.56843126, -1.0845224, -1.3985955, 0.40334684, 0.83802634, -0.7192576, -0.40334353, -0.59663534, 0.18203649, -0.8566746, 1.1006042, -1.0711874]),
        (42, &[0.33669037]),
        (42, &[0.33669037, 0.1288094]),
        (42, &[0.33669037, 0.1288094, 0.23446237]),
        (42, &[0.33669037, 0.1288094, 0.23446237, 0.23033303, -1.1228564, -0.18632829, 2.2082014, -0.63799703, 0.46165723, 0.26735088, 0.53490466, 0.8093572, 1.1102903, -1.689799, -0.9889599]),
        (4294967303, &[-0.1467951]),
        (4294967303, &[-0.1467951, 0.7861413]),
        (4294967303, &[-0.1467951, 0.7861413, 0.94682163]),
        (4294967303, &[-0.1467951, 0.7861413, 0.94682163, -1.114344, 1.6907902, -0.8948279, -0.35562503, 1.2323858, 0.13817266, -1.6821985, 0.3176783, 0.13280697, 0.1373241, 0.24054612, 1.3954508]),
        (18446744073709551557, &[0.382644]),
        (18446744073709551557, &[0.382644, -1.3825401]),
        (18446744073709551557, &[0.382644, -1.3825401, 1.5820892]),
        (18446744073709551557, &[0.382644, -1.3825401, 1.5820892, -0.43217587, 0.08680343, -0.18817632, -0.23968866, -0.45102036, 0.8707969, -1.6207607, 0.051580295, -1.4993526, 0.9851293, 0.86330867, -0.17609598]),
    ];

    #[test]
    fn randn_small_n_matches_torch_scalar_path_exactly() {
        for &(seed, want) in SMALL_CASES {
            assert_eq!(
                randn(seed, want.len()),
                want,
                "seed {seed} n {}",
                want.len()
            );
        }
        assert!(randn(1, 0).is_empty());
    }

    // bf16 bit patterns from
    //   t = torch.randn(n, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.bfloat16)
    //   t.view(torch.int16) at picked indices; last field t.double().sum().item()
    #[rustfmt::skip]
    const BF16_CASES: &[Case<u16>] = &[
        (0, 5, &[(0, 0x3fc5), (1, 0xbe96), (2, 0xc00b), (3, 0x3f12), (4, 0xbf8b)], -1.44140625),
        (0, 16, &[(0, 0xbf90), (1, 0xbf94), (8, 0x3ea5), (14, 0x3f8f), (15, 0xbe7d)], -1.91259765625),
        (0, 17, &[(0, 0xbf90), (1, 0xbfad), (8, 0x3fed), (15, 0x3f72), (16, 0xbf58)], 0.9921875),
        (0, 1000, &[(0, 0xbf90), (1, 0xbf94), (500, 0xbe28), (983, 0x3f0e), (984, 0xbfa6), (998, 0x3f77), (999, 0x3f5e)], 32.94109344482422),
        (0, 262144, &[(0, 0xbf90), (1, 0xbf94), (131072, 0x3fc7), (262127, 0xbdb0), (262128, 0x3e87), (262142, 0xbf9b), (262143, 0x3d9d)], -888.3859424591064),
        (42, 5, &[(0, 0x3eac), (1, 0x3e04), (2, 0x3e70), (3, 0x3e6c), (4, 0xbf90)], -0.1953125),
        (42, 16, &[(0, 0x3ff7), (1, 0x3fbe), (8, 0xbf41), (14, 0xbf45), (15, 0x3f43)], -2.189453125),
        (42, 17, &[(0, 0x3ff7), (1, 0x3fd2), (8, 0x3fd7), (15, 0xbe81), (16, 0x3f5c)], 11.094482421875),
        (42, 1000, &[(0, 0x3ff7), (1, 0x3fbe), (500, 0xbf41), (983, 0xbeb8), (984, 0xbe09), (998, 0x3f7b), (999, 0x3e68)], 7.116779327392578),
        (42, 262144, &[(0, 0x3ff7), (1, 0x3fbe), (131072, 0xbfcb), (262127, 0x3f4b), (262128, 0xbfa0), (262142, 0xbfe2), (262143, 0xc015)], -62.91889151930809),
        (4294967303, 5, &[(0, 0xbe16), (1, 0x3f49), (2, 0x3f72), (3, 0xbf8f), (4, 0x3fd8)], 2.154296875),
        (4294967303, 16, &[(0, 0xbf52), (1, 0x3ecb), (8, 0x3f6d), (14, 0x3e6c), (15, 0x3f8c)], -0.5126953125),
        (4294967303, 17, &[(0, 0xbf52), (1, 0xbfcb), (8, 0xbf39), (15, 0xbfa9), (16, 0xbfae)], -6.484375),
        (4294967303, 1000, &[(0, 0xbf52), (1, 0x3ecb), (500, 0x3f2e), (983, 0x3e74), (984, 0x3f0f), (998, 0x3f01), (999, 0x3ff6)], 2.9215087890625),
        (4294967303, 262144, &[(0, 0xbf52), (1, 0x3ecb), (131072, 0x3f32), (262127, 0xbb78), (262128, 0x3f57), (262142, 0x3fb3), (262143, 0xbe1a)], 552.2486070990562),
    ];

    #[test]
    fn randn_bf16_matches_torch() {
        for &(seed, n, picks, sum) in BF16_CASES {
            let x = randn_bf16(seed, n);
            assert_eq!(x.len(), n);
            for &(i, want) in picks {
                assert_eq!(
                    x[i].to_bits(),
                    want,
                    "seed {seed} n {n} [{i}]: {} vs torch {}",
                    x[i],
                    bf16::from_bits(want)
                );
            }
            // A 1-ulp f32 difference can flip a bf16 rounding, very rarely (torch's own sin/cos are not
            // libm's): allow a handful of bf16 ulps in the sum.
            let got: f64 = x.iter().map(|v| v.to_f64()).sum();
            assert!(
                (got - sum).abs() <= 0.05,
                "seed {seed} n {n}: sum {got} vs torch {sum}"
            );
        }
    }

    #[test]
    fn generator_continues_the_stream_like_torch() {
        // Whole blocks: the second draw of n is elements [n, 2n) of one draw of 2n (FluxImg2ImgPipeline's noise).
        for seed in [0u64, 42, 2000] {
            let mut g = TorchGenerator::new(seed);
            let first = g.randn(1024);
            let second = g.randn(1024);
            let both = randn(seed, 2048);
            assert_eq!(first, both[..1024]);
            assert_eq!(second, both[1024..]);
            assert_eq!(g.seed(), seed);
        }
        // A ragged draw consumes n + 16 words: the next draw starts 16 words later than n would suggest.
        let mut g = TorchGenerator::new(7);
        assert_eq!(g.randn(17), randn(7, 17));
        let next = g.randn(32);
        let mut mt = Mt19937::manual_seed(7);
        for _ in 0..words_per_draw(17) {
            mt.next_u32();
        }
        let mut want = vec![0f32; 32];
        fill_uniform(&mut mt, &mut want);
        fill_blocks(&mut mt, &mut want);
        assert_eq!(next, want);
        assert_eq!(
            (words_per_draw(16), words_per_draw(17), words_per_draw(3072)),
            (16, 33, 3072)
        );
        // The scalar path keeps its cached sine half in the generator, as torch's CPU generator does.
        let mut g = TorchGenerator::new(42);
        let mut got = g.randn(3);
        got.extend(g.randn(1));
        assert_eq!(got, randn(42, 4));
    }

    #[test]
    fn bf16_equals_rounded_f32_on_whole_blocks() {
        let f = randn(3, 64);
        let b = randn_bf16(3, 64);
        assert!(f.iter().zip(&b).all(|(&f, &b)| bf16::from_f32(f) == b));
    }
}
