//! The judge head (Bachmann et al., "Judge Decoding", arXiv 2501.19309): a linear score
//! `w . standardise(h_i) + b` on the target's last hidden state at each drafted token. The engine
//! computes it for every verified position on the target's device and hands it to policies that
//! ask for it (`info.needs-judge`); the `judge` policy turns it into an acceptance.
//!
//! File format: one safetensors file with f32 tensors `weight [H]`, `bias [1]`, `mean [H]`,
//! `scale [H]` and string metadata: `format = verdict-judge-head`, `format_version = 1`,
//! `threshold` (default probability threshold), `target.architecture`, `target.hidden_size`,
//! `target.sha256` (the target weights the head was trained on), plus free-form provenance
//! (`provenance.*`: the commands and metrics that produced it).

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use anyhow::{Context, Result, ensure};
use candle_core::{DType, Device, Tensor};

use crate::files::write_atomic;
use crate::models::Model;

const FORMAT: &str = "verdict-judge-head";
const FORMAT_VERSION: &str = "1";

/// The head shipped for Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF as fetched by
/// scripts/fetch-models); see heads/README.md for the commands that produced it.
pub const SHIPPED_HEADS: &[(&str, &[u8])] = &[(
    "qwen2.5-coder-1.5b-instruct",
    include_bytes!("../../heads/qwen2.5-coder-1.5b-instruct.judge.safetensors"),
)];

/// Which target weights a head belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetIdentity {
    pub architecture: String,
    pub hidden_size: usize,
    /// sha256 of the weights file (hex).
    pub sha256: String,
}

impl TargetIdentity {
    /// The identity of a loaded model (hashes its file once per process).
    pub fn of(model: &Model) -> Result<TargetIdentity> {
        Ok(TargetIdentity {
            architecture: model.config().arch.name().to_string(),
            hidden_size: model.config().hidden_size,
            sha256: weights_sha256(model.source())?,
        })
    }
}

/// A judge head as stored on disk.
#[derive(Debug, Clone, PartialEq)]
pub struct JudgeHead {
    pub weight: Vec<f32>,
    pub bias: f32,
    /// Standardisation: `(h - mean) / scale`, per hidden dimension.
    pub mean: Vec<f32>,
    pub scale: Vec<f32>,
    /// Default probability threshold for the `judge` policy (sigmoid(logit) >= threshold).
    pub threshold: f32,
    pub target: TargetIdentity,
    /// Free-form provenance (commands, metrics), stored as `provenance.<key>` metadata.
    pub provenance: BTreeMap<String, String>,
}

impl JudgeHead {
    pub fn hidden_size(&self) -> usize {
        self.weight.len()
    }

    /// The logit for one hidden state (host-side reference of [`JudgeScorer::score`]).
    pub fn logit(&self, h: &[f32]) -> f32 {
        let terms = self.weight.iter().zip(&self.mean).zip(&self.scale).zip(h);
        let s: f64 = terms
            .map(|(((&w, &m), &sc), &x)| w as f64 * ((x - m) / sc) as f64)
            .sum();
        (s + self.bias as f64) as f32
    }

    fn validate(&self, what: &str) -> Result<()> {
        let h = self.weight.len();
        ensure!(h > 0, "{what}: the weight vector is empty");
        ensure!(
            self.mean.len() == h && self.scale.len() == h,
            "{what}: weight has {h} entries but mean has {} and scale {}",
            self.mean.len(),
            self.scale.len()
        );
        ensure!(
            self.target.hidden_size == h,
            "{what}: target.hidden_size is {} but the weight has {h} entries",
            self.target.hidden_size
        );
        let finite = |v: &[f32]| v.iter().all(|x| x.is_finite());
        ensure!(
            finite(&self.weight) && finite(&self.mean) && self.bias.is_finite(),
            "{what}: weight, mean or bias holds NaN or infinity"
        );
        ensure!(
            self.scale.iter().all(|&s| s.is_finite() && s > 0.0),
            "{what}: every scale entry must be finite and > 0"
        );
        ensure!(
            (0.0..=1.0).contains(&self.threshold),
            "{what}: threshold {} is outside [0, 1]",
            self.threshold
        );
        Ok(())
    }

    /// Parses a head from safetensors bytes; `what` names the source in errors.
    pub fn from_bytes(bytes: &[u8], what: &str) -> Result<JudgeHead> {
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| anyhow::anyhow!("{what}: not a safetensors file: {e}"))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| anyhow::anyhow!("{what}: not a safetensors file: {e}"))?;
        let meta: HashMap<String, String> = meta.metadata().clone().unwrap_or_default();
        let get = |k: &str| {
            meta.get(k)
                .map(String::as_str)
                .with_context(|| format!("{what}: metadata `{k}` is missing"))
        };
        ensure!(
            get("format")? == FORMAT,
            "{what}: metadata `format` is `{}`, expected `{FORMAT}`",
            get("format")?
        );
        ensure!(
            get("format_version")? == FORMAT_VERSION,
            "{what}: format_version `{}` is not supported (this build reads {FORMAT_VERSION})",
            get("format_version")?
        );
        let vector = |name: &str| -> Result<Vec<f32>> {
            let t = st
                .tensor(name)
                .map_err(|e| anyhow::anyhow!("{what}: tensor `{name}`: {e}"))?;
            ensure!(
                t.dtype() == safetensors::Dtype::F32 && t.shape().len() == 1,
                "{what}: tensor `{name}` must be a 1-d f32 vector, got {:?} {:?}",
                t.dtype(),
                t.shape()
            );
            Ok(t.data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect())
        };
        let bias = vector("bias")?;
        ensure!(bias.len() == 1, "{what}: tensor `bias` must hold one value");
        let number = |k: &str| -> Result<f64> {
            let v = get(k)?;
            v.parse::<f64>()
                .with_context(|| format!("{what}: metadata `{k}` = `{v}` is not a number"))
        };
        let head = JudgeHead {
            weight: vector("weight")?,
            bias: bias[0],
            mean: vector("mean")?,
            scale: vector("scale")?,
            threshold: number("threshold")? as f32,
            target: TargetIdentity {
                architecture: get("target.architecture")?.to_string(),
                hidden_size: number("target.hidden_size")? as usize,
                sha256: get("target.sha256")?.to_string(),
            },
            provenance: meta
                .iter()
                .filter_map(|(k, v)| Some((k.strip_prefix("provenance.")?.into(), v.clone())))
                .collect(),
        };
        head.validate(what)?;
        Ok(head)
    }

    pub fn load(path: &Path) -> Result<JudgeHead> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read judge head {}", path.display()))?;
        Self::from_bytes(&bytes, &format!("judge head {}", path.display()))
    }

    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        self.validate("judge head")?;
        let mut meta: HashMap<String, String> = HashMap::new();
        meta.insert("format".into(), FORMAT.into());
        meta.insert("format_version".into(), FORMAT_VERSION.into());
        meta.insert("threshold".into(), self.threshold.to_string());
        meta.insert(
            "target.architecture".into(),
            self.target.architecture.clone(),
        );
        meta.insert(
            "target.hidden_size".into(),
            self.target.hidden_size.to_string(),
        );
        meta.insert("target.sha256".into(), self.target.sha256.clone());
        for (k, v) in &self.provenance {
            meta.insert(format!("provenance.{k}"), v.clone());
        }
        let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let tensors = [
            ("bias", vec![self.bias]),
            ("mean", self.mean.clone()),
            ("scale", self.scale.clone()),
            ("weight", self.weight.clone()),
        ];
        let data: Vec<(String, Vec<u8>, usize)> = tensors
            .iter()
            .map(|(n, v)| (n.to_string(), bytes(v), v.len()))
            .collect();
        let views = data
            .iter()
            .map(|(n, b, len)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![*len], b)
                    .map(|v| (n.clone(), v))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("serialising the judge head: {e}"))?;
        safetensors::serialize(views, Some(meta))
            .map_err(|e| anyhow::anyhow!("serialising the judge head: {e}"))
    }

    /// Writes the head atomically (temporary file + rename): a crash leaves the old file or none.
    pub fn save(&self, path: &Path) -> Result<()> {
        write_atomic(path, &self.to_bytes()?)
    }

    /// A clear error when this head was not trained on `target`.
    pub fn check_target(&self, target: &Model, what: &str) -> Result<()> {
        let cfg = target.config();
        let t = &self.target;
        ensure!(
            t.architecture == cfg.arch.name() && t.hidden_size == cfg.hidden_size,
            "{what} was trained for a {} model with hidden size {}, but the target {} is {} with hidden size {}",
            t.architecture,
            t.hidden_size,
            target.source().display(),
            cfg.arch.name(),
            cfg.hidden_size
        );
        let sha = weights_sha256(target.source())?;
        ensure!(
            t.sha256 == sha,
            "{what} was trained on target weights with sha256 {}, but {} has sha256 {sha}",
            t.sha256,
            target.source().display()
        );
        Ok(())
    }

    /// The shipped head that matches `target`, if any.
    pub fn shipped_for(target: &Model) -> Result<Option<JudgeHead>> {
        for (name, bytes) in SHIPPED_HEADS {
            let head = Self::from_bytes(bytes, &format!("the shipped judge head `{name}`"))?;
            let cfg = target.config();
            // Cheap checks first: only a plausible match pays for hashing the weights.
            if head.target.architecture == cfg.arch.name()
                && head.target.hidden_size == cfg.hidden_size
                && head.target.sha256 == weights_sha256(target.source())?
            {
                return Ok(Some(head));
            }
        }
        Ok(None)
    }
}

/// How a server or command picks its judge head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadChoice {
    /// The shipped head if one matches the target, else none.
    Auto,
    None,
    File(PathBuf),
}

impl HeadChoice {
    /// `auto`, `none` or a path.
    pub fn parse(s: &str) -> HeadChoice {
        match s {
            "auto" => HeadChoice::Auto,
            "none" => HeadChoice::None,
            p => HeadChoice::File(PathBuf::from(p)),
        }
    }

    /// The choice for a target a LoRA adapter changed: no shipped head (they were trained on
    /// the base's hidden states); a named file stays.
    pub fn adapted(self) -> HeadChoice {
        match self {
            HeadChoice::Auto => HeadChoice::None,
            c => c,
        }
    }

    /// Loads the chosen head and checks it against `target`.
    pub fn load(&self, target: &Model) -> Result<Option<JudgeHead>> {
        match self {
            HeadChoice::Auto => JudgeHead::shipped_for(target),
            HeadChoice::None => Ok(None),
            HeadChoice::File(p) => {
                let head = JudgeHead::load(p)?;
                head.check_target(target, &format!("judge head {}", p.display()))?;
                Ok(Some(head))
            }
        }
    }
}

/// The head prepared on the target's device: the standardisation folded into the weights, so
/// one `[rows, H] x [H, 1]` product scores every position.
#[derive(Debug, Clone)]
pub struct JudgeScorer {
    w: Tensor,
    b: f32,
    pub threshold: f32,
}

impl JudgeScorer {
    pub fn new(head: &JudgeHead, device: &Device) -> Result<JudgeScorer> {
        // w . (h - m) / s + b = (w / s) . h + (b - sum(w m / s)).
        let w_eff: Vec<f32> = (0..head.weight.len())
            .map(|i| head.weight[i] / head.scale[i])
            .collect();
        let shift: f64 = (0..head.weight.len())
            .map(|i| w_eff[i] as f64 * head.mean[i] as f64)
            .sum();
        let w = Tensor::from_vec(w_eff, (head.weight.len(), 1), device)?;
        Ok(JudgeScorer {
            w,
            b: (head.bias as f64 - shift) as f32,
            threshold: head.threshold,
        })
    }

    /// `[H, 1]`: the head's weights with the standardisation folded in (on the scorer's device).
    pub fn weight(&self) -> &Tensor {
        &self.w
    }

    /// The bias with the standardisation folded in: a logit is `weight . h + bias`.
    pub fn bias(&self) -> f32 {
        self.b
    }

    /// Logits for each row of `hidden` (`[rows, H]`).
    pub fn score(&self, hidden: &Tensor) -> Result<Vec<f32>> {
        let h = hidden.to_dtype(DType::F32)?;
        let s = h.matmul(&self.w)?.squeeze(1)?.to_vec1::<f32>()?;
        Ok(s.into_iter().map(|x| x + self.b).collect())
    }
}

/// sha256 of a weights file (or of a checkpoint directory's `*.safetensors` files in name
/// order), cached per path, size and modification time for the life of the process.
pub fn weights_sha256(path: &Path) -> Result<String> {
    type Key = (PathBuf, u64, std::time::SystemTime);
    static CACHE: OnceLock<Mutex<HashMap<Key, String>>> = OnceLock::new();
    let files: Vec<PathBuf> = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("cannot list {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot stat {}", path.display()))?;
    let key: Key = (
        path.to_path_buf(),
        meta.len(),
        meta.modified().unwrap_or(std::time::UNIX_EPOCH),
    );
    let cache = CACHE.get_or_init(Default::default);
    if let Some(s) = cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
        return Ok(s);
    }
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for f in &files {
        let mut file =
            std::fs::File::open(f).with_context(|| format!("cannot open {}", f.display()))?;
        loop {
            let n = file
                .read(&mut buf)
                .with_context(|| format!("cannot read {}", f.display()))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    let s = hex::encode(h.finalize());
    if let Ok(mut c) = cache.lock() {
        c.insert(key, s.clone());
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(h: usize) -> JudgeHead {
        JudgeHead {
            weight: (0..h).map(|i| (i as f32 * 0.37).sin()).collect(),
            bias: -0.25,
            mean: (0..h).map(|i| (i as f32 * 0.11).cos()).collect(),
            scale: (0..h).map(|i| 0.5 + (i % 3) as f32).collect(),
            threshold: 0.7,
            target: TargetIdentity {
                architecture: "qwen2".into(),
                hidden_size: h,
                sha256: "ab".repeat(32),
            },
            provenance: [("command".to_string(), "verdict judge train".to_string())].into(),
        }
    }

    #[test]
    fn round_trips_through_bytes() {
        let h = head(16);
        let back = JudgeHead::from_bytes(&h.to_bytes().unwrap(), "t").unwrap();
        assert_eq!(back, h);
    }

    #[test]
    fn scorer_matches_the_reference_logit() {
        let h = head(16);
        let rows: Vec<f32> = (0..48).map(|i| (i as f32 * 0.731).sin() * 3.0).collect();
        let t = Tensor::from_vec(rows.clone(), (3, 16), &Device::Cpu).unwrap();
        let s = JudgeScorer::new(&h, &Device::Cpu)
            .unwrap()
            .score(&t)
            .unwrap();
        for r in 0..3 {
            let want = h.logit(&rows[r * 16..(r + 1) * 16]);
            assert!((s[r] - want).abs() < 1e-4, "row {r}: {} vs {want}", s[r]);
        }
    }

    #[test]
    fn corrupt_and_inconsistent_files_are_clear_errors() {
        let e = JudgeHead::from_bytes(b"not a head", "x.safetensors").unwrap_err();
        assert!(format!("{e:#}").contains("x.safetensors: not a safetensors file"));
        let mut h = head(8);
        h.scale[3] = 0.0;
        assert!(format!("{:#}", h.to_bytes().unwrap_err()).contains("scale"));
        let mut h = head(8);
        h.mean.pop();
        assert!(format!("{:#}", h.to_bytes().unwrap_err()).contains("mean has 7"));
        // A truncated file.
        let bytes = head(8).to_bytes().unwrap();
        let e = JudgeHead::from_bytes(&bytes[..bytes.len() - 5], "cut").unwrap_err();
        assert!(format!("{e:#}").contains("cut"), "{e:#}");
    }

    #[test]
    fn the_shipped_heads_parse() {
        for (name, bytes) in SHIPPED_HEADS {
            JudgeHead::from_bytes(bytes, name).unwrap();
        }
    }
}
