//! Rotary position embeddings: the frequency of each dimension pair, and how a model stretches
//! them past its trained context (llama.cpp's `rope.scaling.*` keys and `rope_freqs` tensor,
//! Hugging Face's `rope_scaling`).
//!
//! Every variant comes down to one angle per position and pair, `pos * inv_freq[i]`, and one
//! magnitude `mscale` that multiplies cos and sin (YaRN's attention temperature). Rotating q and
//! k both by `mscale` scales their dot products by `mscale^2`, so the forward folds it into the
//! attention scale instead of the tables.

use candle_core::{Device, Tensor};

/// How positions are stretched beyond the trained context.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (every frequency times `1 / factor`).
    Linear {
        factor: f32,
    },
    /// YaRN (arXiv 2309.00071, as llama.cpp and Hugging Face compute it): pairs that turn
    /// fast against `original_context` keep their frequency, slow ones are interpolated by
    /// `1 / factor`, a linear ramp between `beta_fast` and `beta_slow` rotations mixes the two,
    /// and cos / sin grow by `attn_factor * (1 + 0.1 ln factor)`.
    Yarn {
        factor: f32,
        original_context: usize,
        beta_fast: f32,
        beta_slow: f32,
        attn_factor: f32,
    },
    /// Llama 3.1's per-pair factors from a Hugging Face config (a GGUF stores the factors
    /// themselves as `rope_freqs.weight`): wavelengths below `original_context /
    /// high_freq_factor` keep their frequency, those above `original_context / low_freq_factor`
    /// are divided by `factor`, and a smooth mix lies between.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_context: usize,
    },
    /// LongRoPE (Phi-3 128k, Phi-3.5, Phi-4-mini; Hugging Face's `longrope`, once `su`): two sets
    /// of per-pair factors that divide the frequencies, `short` for contexts up to
    /// `original_context` and `long` beyond, and `attn_factor` multiplying cos / sin. The factors
    /// are tensors (`rope_factors_short.weight`, `rope_factors_long.weight`) that the weights
    /// loader reads; [`RopeScaling::long_factors`] says which set a context uses.
    LongRope {
        original_context: usize,
        attn_factor: f32,
    },
}

impl RopeScaling {
    /// LongRoPE's choice of factor set, as llama.cpp makes it: by the context a sequence may
    /// reach (here the model's whole context), never by the current length, so every key in
    /// the cache was rotated as the query that reads it. (Hugging Face switches sets once a
    /// sequence passes `original_context`; the two agree up to there when the context is short.)
    pub fn long_factors(&self, context_length: usize) -> Option<bool> {
        match *self {
            RopeScaling::LongRope {
                original_context, ..
            } => Some(context_length > original_context),
            _ => None,
        }
    }
}

/// The rotation a model's heads use: the angle per position of each dimension pair, and the
/// magnitude of cos / sin.
#[derive(Debug, Clone, PartialEq)]
pub struct Rotary {
    pub inv_freq: Vec<f32>,
    pub mscale: f32,
}

impl Rotary {
    /// The rotation of a head's first `dims` dimensions (all of them, or the part a partial
    /// rotation turns) with base `theta`, stretched by `scaling`.
    /// `freq_factors` (llama.cpp's `rope_freqs`, or LongRoPE's chosen set; one per pair) divide
    /// the frequencies first.
    pub fn new(
        dims: usize,
        theta: f32,
        scaling: RopeScaling,
        freq_factors: Option<&[f32]>,
    ) -> Rotary {
        let d = dims as f32;
        let mut inv_freq: Vec<f32> = (0..dims / 2)
            .map(|i| 1.0 / theta.powf(2.0 * i as f32 / d))
            .collect();
        if let Some(ff) = freq_factors {
            for (f, x) in inv_freq.iter_mut().zip(ff) {
                *f /= x;
            }
        }
        let mut mscale = 1.0;
        match scaling {
            RopeScaling::None => {}
            RopeScaling::LongRope { attn_factor, .. } => mscale = attn_factor,
            RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor),
            RopeScaling::Yarn {
                factor,
                original_context,
                beta_fast,
                beta_slow,
                attn_factor,
            } => {
                // The pair index at which a frequency completes `rotations` turns over the
                // original context.
                let corr = |rotations: f32| {
                    d * (original_context as f32 / (rotations * 2.0 * std::f32::consts::PI)).ln()
                        / (2.0 * theta.ln())
                };
                let low = corr(beta_fast).floor().max(0.0);
                let high = corr(beta_slow).ceil().min(d - 1.0);
                for (i, f) in inv_freq.iter_mut().enumerate() {
                    let y = (i as f32 - low) / (high - low).max(0.001);
                    let extrapolate = 1.0 - y.clamp(0.0, 1.0);
                    *f = *f / factor * (1.0 - extrapolate) + *f * extrapolate;
                }
                // No magnitude for a factor of 1 or less (llama.cpp's get_mscale).
                mscale = attn_factor * (1.0 + 0.1 * factor.ln()).max(1.0);
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_context,
            } => {
                let ctx = original_context as f32;
                let (low_wavelen, high_wavelen) = (ctx / low_freq_factor, ctx / high_freq_factor);
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    if wavelen > low_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (ctx / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
        Rotary { inv_freq, mscale }
    }

    /// cos / sin `[n, dims / 2]` for positions `pos..pos + n`.
    pub fn tables(
        &self,
        pos: usize,
        n: usize,
        dev: &Device,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in pos..pos + n {
            for &f in &self.inv_freq {
                // f64 angle: positions in the tens of thousands lose precision in f32.
                let a = p as f64 * f as f64;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Ok((
            Tensor::from_vec(cos, (n, half), dev)?,
            Tensor::from_vec(sin, (n, half), dev)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(d: usize) -> Vec<f32> {
        Rotary::new(d, 10_000.0, RopeScaling::None, None).inv_freq
    }

    #[test]
    fn linear_and_factors_divide_the_frequencies() {
        let base = plain(8);
        assert_eq!(base[0], 1.0);
        let lin = Rotary::new(8, 10_000.0, RopeScaling::Linear { factor: 4.0 }, None);
        assert_eq!(lin.mscale, 1.0);
        for (a, b) in lin.inv_freq.iter().zip(&base) {
            assert!((a * 4.0 - b).abs() < 1e-7);
        }
        let ff = [1.0, 2.0, 4.0, 8.0];
        let r = Rotary::new(8, 10_000.0, RopeScaling::None, Some(&ff));
        for ((a, b), f) in r.inv_freq.iter().zip(&base).zip(ff) {
            assert!((a * f - b).abs() < 1e-7);
        }
    }

    #[test]
    fn yarn_keeps_fast_pairs_and_interpolates_slow_ones() {
        let base = plain(64);
        let r = Rotary::new(
            64,
            10_000.0,
            RopeScaling::Yarn {
                factor: 4.0,
                original_context: 4096,
                beta_fast: 32.0,
                beta_slow: 1.0,
                attn_factor: 1.0,
            },
            None,
        );
        // Pair 0 turns 4096 / 2pi times over the context: far above beta_fast, kept.
        assert_eq!(r.inv_freq[0], base[0]);
        // The slowest pair turns less than once: interpolated.
        assert!((r.inv_freq[31] * 4.0 - base[31]).abs() < 1e-9);
        // Between, a monotone mix.
        let ratio: Vec<f32> = r.inv_freq.iter().zip(&base).map(|(a, b)| a / b).collect();
        assert!(ratio.windows(2).all(|w| w[1] <= w[0] + 1e-6), "{ratio:?}");
        assert!((r.mscale - (1.0 + 0.1 * 4f32.ln())).abs() < 1e-6);
    }

    #[test]
    fn longrope_picks_its_factors_by_the_context() {
        let s = RopeScaling::LongRope {
            original_context: 4096,
            attn_factor: 1.19,
        };
        assert_eq!(s.long_factors(131_072), Some(true));
        assert_eq!(s.long_factors(4096), Some(false));
        assert_eq!(RopeScaling::None.long_factors(131_072), None);
        // The factors divide as llama.cpp's do; the magnitude is the attention factor.
        let ff = [1.0, 1.5, 3.0, 9.0];
        let r = Rotary::new(8, 10_000.0, s, Some(&ff));
        for ((a, b), f) in r.inv_freq.iter().zip(plain(8)).zip(ff) {
            assert!((a * f - b).abs() < 1e-7);
        }
        assert_eq!(r.mscale, 1.19);
    }

    #[test]
    fn llama3_matches_its_published_shape() {
        // Llama 3.1: factor 8, low 1, high 4, original context 8192, theta 500000, head 128.
        let s = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_context: 8192,
        };
        let base = Rotary::new(128, 500_000.0, RopeScaling::None, None).inv_freq;
        let r = Rotary::new(128, 500_000.0, s, None).inv_freq;
        let wavelen = |f: f32| 2.0 * std::f32::consts::PI / f;
        for (a, b) in r.iter().zip(&base) {
            if wavelen(*b) < 2048.0 {
                assert_eq!(a, b);
            } else if wavelen(*b) > 8192.0 {
                assert!((a * 8.0 - b).abs() < 1e-12);
            } else {
                assert!(a < b && a * 8.0 > *b);
            }
        }
    }
}
