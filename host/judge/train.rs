//! Training (`verdict judge train`): class-weighted, L2-regularised logistic regression on
//! standardised hidden states (candle autograd + AdamW), a validation split by prompt, and a
//! threshold chosen on it for a target precision. With several weight decays, each is scored by
//! k-fold cross-validation over the training prompts (folds by prompt, pooled out-of-fold AUC)
//! and the best one trains the head: with a few hundred samples in 1536 dimensions the
//! shrinkage decides more than anything else, and one small validation split is too noisy to
//! choose it.

use std::collections::BTreeMap;

use anyhow::{Result, bail, ensure};
use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};

use super::mine::Dataset;
use crate::verify::judge::{JudgeHead, TargetIdentity};

#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// Share of prompts (groups) held out for validation.
    pub validation: f64,
    /// The threshold is the lowest probability whose validation precision reaches this.
    pub target_precision: f64,
    pub epochs: usize,
    pub lr: f64,
    /// L2 strengths to choose from (AdamW weight decay); one means no cross-validation.
    pub weight_decays: Vec<f64>,
    /// Folds of the cross-validation that chooses among `weight_decays`.
    pub folds: usize,
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            validation: 0.25,
            target_precision: 0.9,
            epochs: 400,
            lr: 0.01,
            weight_decays: vec![0.05],
            folds: 5,
            seed: 0,
        }
    }
}

/// Precision, recall and AUC of scores against labels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Metrics {
    pub n: usize,
    pub positives: usize,
    pub threshold: f64,
    pub precision: f64,
    pub recall: f64,
    pub auc: f64,
}

impl std::fmt::Display for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "n={} positives={} threshold={:.3} precision={:.3} recall={:.3} auc={:.3}",
            self.n, self.positives, self.threshold, self.precision, self.recall, self.auc
        )
    }
}

pub struct Trained {
    pub head: JudgeHead,
    pub train: Metrics,
    pub validation: Metrics,
    /// Each weight decay with its cross-validated AUC (empty with one weight decay).
    pub cv: Vec<(f64, f64)>,
    /// The weight decay the head was trained with.
    pub weight_decay: f64,
}

/// A fixed pseudo-random number in [0, 1) per group (splitmix64 of group + salt).
fn group_hash(g: u32, salt: u64) -> f64 {
    let mut z = (g as u64)
        .wrapping_add(salt)
        .wrapping_add(0x9E3779B97F4A7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    z ^= z >> 31;
    z as f64 / u64::MAX as f64
}

/// Weighted logistic regression on standardised rows `x` (`[n, h]`): weight and bias.
fn fit(x: &[f32], y: &[u8], h: usize, wd: f64, cfg: &TrainConfig) -> Result<(Vec<f32>, f32)> {
    let n = y.len();
    let dev = Device::Cpu;
    let xt = Tensor::from_slice(x, (n, h), &dev)?;
    let n_pos = y.iter().filter(|&&v| v == 1).count().max(1) as f32;
    let n_neg = (n as f32 - n_pos).max(1.0);
    // Class weights so both classes weigh half of the loss.
    let sw: Vec<f32> = y
        .iter()
        .map(|&v| {
            if v == 1 {
                0.5 * n as f32 / n_pos
            } else {
                0.5 * n as f32 / n_neg
            }
        })
        .collect();
    let yt = Tensor::from_vec(y.iter().map(|&v| v as f32).collect::<Vec<_>>(), n, &dev)?;
    let sw = Tensor::from_vec(sw, n, &dev)?;
    let w = Var::from_tensor(&Tensor::zeros(h, DType::F32, &dev)?)?;
    let b = Var::from_tensor(&Tensor::zeros(1, DType::F32, &dev)?)?;
    let mut opt = AdamW::new(
        vec![w.clone(), b.clone()],
        ParamsAdamW {
            lr: cfg.lr,
            weight_decay: wd,
            ..Default::default()
        },
    )?;
    for _ in 0..cfg.epochs {
        let z = xt
            .matmul(&w.as_tensor().unsqueeze(1)?)?
            .squeeze(1)?
            .broadcast_add(b.as_tensor())?;
        // Weighted binary cross-entropy with logits: softplus(z) - y z, stable form.
        let softplus = z
            .relu()?
            .add(&z.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?)?;
        let loss = softplus.sub(&yt.mul(&z)?)?.mul(&sw)?.mean(D::Minus1)?;
        opt.backward_step(&loss)?;
    }
    let weight = w.as_tensor().to_vec1::<f32>()?;
    let bias = b.as_tensor().to_vec1::<f32>()?[0];
    ensure!(
        weight.iter().all(|v| v.is_finite()) && bias.is_finite(),
        "training diverged (non-finite weights); try a lower --lr"
    );
    Ok((weight, bias))
}

/// Trains a head on `data`; the threshold is picked on the validation prompts.
pub fn train(data: &Dataset, cfg: &TrainConfig) -> Result<Trained> {
    ensure!(!data.is_empty(), "the dataset is empty");
    let h = data.hidden_size;
    let pos = data.positives();
    if pos == 0 || pos == data.len() {
        bail!(
            "all {} samples have label {}: logistic regression needs both acceptable and unacceptable examples",
            data.len(),
            (pos > 0) as u8
        );
    }
    // Split by prompt: a prompt's samples are strongly correlated.
    let mut groups: Vec<u32> = data.group.clone();
    groups.sort_unstable();
    groups.dedup();
    let is_val = |g: u32| group_hash(g, cfg.seed) < cfg.validation;
    let (mut tr, mut va): (Vec<usize>, Vec<usize>) =
        (0..data.len()).partition(|&i| !is_val(data.group[i]));
    if groups.len() < 2 || tr.is_empty() || va.is_empty() {
        // Too few prompts to hold any out: validate on the training samples (printed as such).
        tr = (0..data.len()).collect();
        va = tr.clone();
    }
    // Standardisation from the training samples.
    let mut mean = vec![0f64; h];
    for &i in &tr {
        for (m, &x) in mean.iter_mut().zip(data.row(i)) {
            *m += x as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= tr.len() as f64);
    let mut var = vec![0f64; h];
    for &i in &tr {
        for ((v, &x), m) in var.iter_mut().zip(data.row(i)).zip(&mean) {
            *v += (x as f64 - m).powi(2);
        }
    }
    let scale: Vec<f32> = var
        .iter()
        .map(|v| ((v / tr.len() as f64).sqrt() as f32).max(1e-4))
        .collect();
    let mean: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
    let standardised = |idx: &[usize]| -> Vec<f32> {
        let mut out = Vec::with_capacity(idx.len() * h);
        for &i in idx {
            out.extend(
                data.row(i)
                    .iter()
                    .enumerate()
                    .map(|(j, &x)| (x - mean[j]) / scale[j]),
            );
        }
        out
    };
    ensure!(
        !cfg.weight_decays.is_empty(),
        "give at least one weight decay"
    );
    // Cross-validation over the training prompts picks the weight decay. Every fold uses the
    // training split's standardisation: a shift and scale per dimension, which barely moves
    // with one fold's samples left out.
    let mut cv = Vec::new();
    let mut weight_decay = cfg.weight_decays[0];
    if cfg.weight_decays.len() > 1 {
        let folds = cfg.folds.max(2);
        let fold_of =
            |i: usize| (group_hash(data.group[i], cfg.seed ^ 0x5eed) * folds as f64) as usize;
        let mut best = f64::NEG_INFINITY;
        for &wd in &cfg.weight_decays {
            let mut oof = Vec::with_capacity(tr.len());
            for f in 0..folds {
                let (fit_idx, score_idx): (Vec<usize>, Vec<usize>) =
                    tr.iter().partition(|&&i| fold_of(i) != f);
                let fit_y: Vec<u8> = fit_idx.iter().map(|&i| data.label[i]).collect();
                if score_idx.is_empty() || !fit_y.contains(&0) || !fit_y.contains(&1) {
                    continue;
                }
                let (w, b) = fit(&standardised(&fit_idx), &fit_y, h, wd, cfg)?;
                let xs = standardised(&score_idx);
                for (j, &i) in score_idx.iter().enumerate() {
                    let z: f32 = xs[j * h..(j + 1) * h]
                        .iter()
                        .zip(&w)
                        .map(|(a, c)| a * c)
                        .sum::<f32>()
                        + b;
                    oof.push((z as f64, data.label[i] == 1));
                }
            }
            let a = auc(&oof);
            cv.push((wd, a));
            if a > best {
                (best, weight_decay) = (a, wd);
            }
        }
    }
    let y: Vec<u8> = tr.iter().map(|&i| data.label[i]).collect();
    let (weight, bias) = fit(&standardised(&tr), &y, h, weight_decay, cfg)?;
    let target = TargetIdentity {
        architecture: data
            .meta
            .get("target.architecture")
            .cloned()
            .unwrap_or_default(),
        hidden_size: h,
        sha256: data.meta.get("target.sha256").cloned().unwrap_or_default(),
    };
    ensure!(
        !target.architecture.is_empty() && !target.sha256.is_empty(),
        "the dataset does not name its target (metadata target.architecture / target.sha256)"
    );
    let mut head = JudgeHead {
        weight,
        bias,
        mean,
        scale,
        threshold: 0.5,
        target,
        provenance: BTreeMap::new(),
    };
    let probs = |idx: &[usize]| -> Vec<(f64, bool)> {
        idx.iter()
            .map(|&i| (sigmoid(head.logit(data.row(i)) as f64), data.label[i] == 1))
            .collect()
    };
    let va_scores = probs(&va);
    let tr_scores = probs(&tr);
    let threshold = choose_threshold(&va_scores, cfg.target_precision);
    let train_m = metrics(&tr_scores, threshold);
    let val_m = metrics(&va_scores, threshold);
    head.threshold = threshold as f32;
    Ok(Trained {
        head,
        train: train_m,
        validation: val_m,
        cv,
        weight_decay,
    })
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// The lowest threshold whose precision reaches `target` (ties: the most recall); when none
/// does, the one with the best precision.
pub fn choose_threshold(scores: &[(f64, bool)], target: f64) -> f64 {
    let mut sorted: Vec<(f64, bool)> = scores.to_vec();
    sorted.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (mut tp, mut fp) = (0usize, 0usize);
    let mut best_reaching: Option<f64> = None;
    let (mut best_prec, mut best_prec_t) = (-1.0, 1.0);
    for (k, &(s, l)) in sorted.iter().enumerate() {
        if l {
            tp += 1
        } else {
            fp += 1
        }
        // Only cut between distinct scores.
        if sorted.get(k + 1).is_some_and(|n| n.0 == s) {
            continue;
        }
        let prec = tp as f64 / (tp + fp) as f64;
        if prec >= target {
            best_reaching = Some(s);
        }
        if prec > best_prec {
            (best_prec, best_prec_t) = (prec, s);
        }
    }
    best_reaching.unwrap_or(best_prec_t).clamp(0.0, 1.0)
}

/// Precision and recall at `threshold` (accept when p >= threshold) and the ROC AUC.
pub fn metrics(scores: &[(f64, bool)], threshold: f64) -> Metrics {
    let positives = scores.iter().filter(|s| s.1).count();
    let tp = scores.iter().filter(|s| s.1 && s.0 >= threshold).count();
    let accepted = scores.iter().filter(|s| s.0 >= threshold).count();
    Metrics {
        n: scores.len(),
        positives,
        threshold,
        precision: if accepted == 0 {
            0.0
        } else {
            tp as f64 / accepted as f64
        },
        recall: if positives == 0 {
            0.0
        } else {
            tp as f64 / positives as f64
        },
        auc: auc(scores),
    }
}

/// ROC AUC by the rank statistic (ties count half).
pub fn auc(scores: &[(f64, bool)]) -> f64 {
    let pos: Vec<f64> = scores.iter().filter(|s| s.1).map(|s| s.0).collect();
    let neg: Vec<f64> = scores.iter().filter(|s| !s.1).map(|s| s.0).collect();
    if pos.is_empty() || neg.is_empty() {
        return f64::NAN;
    }
    let mut wins = 0.0;
    for &p in &pos {
        for &n in &neg {
            wins += if p > n {
                1.0
            } else if p == n {
                0.5
            } else {
                0.0
            };
        }
    }
    wins / (pos.len() * neg.len()) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_and_threshold_on_known_scores() {
        let s = [
            (0.9, true),
            (0.8, true),
            (0.7, false),
            (0.6, true),
            (0.2, false),
        ];
        assert!((auc(&s) - 5.0 / 6.0).abs() < 1e-12);
        // Precision 1.0 needs the threshold at 0.8; 0.75 precision is reached at 0.6.
        assert_eq!(choose_threshold(&s, 1.0), 0.8);
        assert_eq!(choose_threshold(&s, 0.75), 0.6);
        let m = metrics(&s, 0.6);
        assert_eq!((m.precision, m.recall), (0.75, 1.0));
    }

    /// A separable synthetic problem: labels from a known direction; the head must find it.
    #[test]
    fn learns_a_linear_rule() {
        let h = 12;
        let mut d = Dataset {
            hidden_size: h,
            ..Default::default()
        };
        d.meta.insert("target.architecture".into(), "qwen2".into());
        d.meta.insert("target.sha256".into(), "00".repeat(32));
        let mut rng = crate::sample::Rng64::new(7);
        for i in 0..600 {
            let x: Vec<f32> = (0..h)
                .map(|j| rng.uniform() * 4.0 - 2.0 + j as f32)
                .collect();
            // Positive when dims 0 and 3 say so; imbalanced (about 30% positive).
            let label = (x[0]) - 0.5 * (x[3] - 3.0) > 0.6;
            d.hidden.extend_from_slice(&x);
            d.label.push(label as u8);
            d.group.push(i / 10);
            d.draft_token.push(0);
            d.target_token.push(0);
        }
        let t = train(&d, &TrainConfig::default()).unwrap();
        assert!(t.validation.auc > 0.97, "{}", t.validation);
        assert!(t.validation.precision >= 0.85, "{}", t.validation);
        assert!(t.validation.recall > 0.5, "{}", t.validation);
        assert!(t.train.n > t.validation.n);
        assert!(t.cv.is_empty(), "one weight decay: no cross-validation");
        // Cross-validation turns down a decay that wipes the weights out every step.
        let cfg = TrainConfig {
            weight_decays: vec![200.0, 0.05],
            epochs: 100,
            ..TrainConfig::default()
        };
        let t = train(&d, &cfg).unwrap();
        assert_eq!(t.weight_decay, 0.05);
        assert_eq!(t.cv.len(), 2);
        assert!(t.cv[1].1 > 0.95 && t.cv[1].1 > t.cv[0].1, "{:?}", t.cv);
        assert!(t.validation.auc > 0.95, "{}", t.validation);
    }

    #[test]
    fn one_class_data_is_a_clear_error() {
        let d = Dataset {
            hidden_size: 2,
            hidden: vec![0.0; 6],
            label: vec![0; 3],
            group: vec![0, 1, 2],
            draft_token: vec![0; 3],
            target_token: vec![0; 3],
            ..Default::default()
        };
        let e = train(&d, &TrainConfig::default()).err().unwrap();
        assert!(
            e.to_string().contains("both acceptable and unacceptable"),
            "{e}"
        );
    }
}
