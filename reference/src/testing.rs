//! Deterministic test inputs shared by every test suite and by `linattn validate`: a seeded
//! generator (SplitMix64, no dependencies), normal draws, and the gate families of the test matrix.

/// SplitMix64: tiny, fast, and good enough for test data. The same seed gives the same stream on
/// every platform.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)` with 53 random bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in `[lo, hi]`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        assert!(lo <= hi);
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // in (0, 1]: log is finite
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// `n` standard normal draws.
    pub fn randn(&mut self, n: usize) -> Vec<f64> {
        (0..n).map(|_| self.normal()).collect()
    }

    /// `n` draws uniform in `[lo, hi)`.
    pub fn uniform_vec(&mut self, n: usize, lo: f64, hi: f64) -> Vec<f64> {
        (0..n).map(|_| lo + (hi - lo) * self.uniform()).collect()
    }
}

/// `log(sigmoid(x))`, computed without overflow for large `|x|`.
pub fn logsigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

/// The test matrix's gate family: `logsigmoid(u) / n` with `u ~ N(0, 1)`. `n = 0.1` gives strong
/// decays (down to about -30 per step), `n = 10` weak ones.
pub fn logsigmoid_gates(rng: &mut Rng, len: usize, n: f64) -> Vec<f64> {
    (0..len).map(|_| logsigmoid(rng.normal()) / n).collect()
}

/// The gate strengths of the test matrix.
pub const GATE_STRENGTHS: [f64; 3] = [0.1, 1.0, 10.0];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_in_range() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        for _ in 0..100 {
            let x = a.uniform();
            assert_eq!(x, b.uniform());
            assert!((0.0..1.0).contains(&x));
        }
        let mut r = Rng::new(1);
        for _ in 0..100 {
            let i = r.range(3, 5);
            assert!((3..=5).contains(&i));
        }
    }

    #[test]
    fn normal_moments() {
        let mut r = Rng::new(42);
        let xs = r.randn(20_000);
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / xs.len() as f64;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "var {var}");
    }

    #[test]
    fn logsigmoid_is_stable_and_nonpositive() {
        assert!((logsigmoid(0.0) - (0.5f64).ln()).abs() < 1e-15);
        assert!((logsigmoid(-800.0) + 800.0).abs() < 1e-12);
        assert!(logsigmoid(800.0) <= 0.0 && logsigmoid(800.0) > -1e-300);
        let mut r = Rng::new(3);
        for n in GATE_STRENGTHS {
            assert!(
                logsigmoid_gates(&mut r, 1000, n)
                    .iter()
                    .all(|g| *g <= 0.0 && g.is_finite())
            );
        }
    }
}
