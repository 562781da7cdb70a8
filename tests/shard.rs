//! Tensor parallelism on CPU ranks: a model split over 2 and 3 ranks (threads joined by the
//! in-process communicator) gives the unsharded logits within 1e-4 relative, on tiny models
//! whose kv heads do not divide by the rank count and on the real Qwen2.5-Coder-1.5B (12 query
//! heads, 2 kv heads: with 3 ranks the middle one reads both kv heads).
//!
//! Quantized tiny models are held to 2e-2 instead: their kernels round each activation row to
//! int8 per block, so the ranks' partial sums (equal to the whole sum within f32 rounding, about
//! 1e-7) can flip one rounding in the next layer, which moves logits by about 1e-2 (seen: 8.5e-3
//! for Q6_K over 2 ranks, where each projection alone agrees within 5e-7). A split cut at the
//! wrong block or head would be off by order 1. The real model runs dequantized for this reason
//! (`Model::dequantized`).

use candle_core::Device;
use candle_core::quantized::GgmlDType;
use std::path::{Path, PathBuf};
use verdict::models::testing::{TinySpec, write_tiny_gguf};
use verdict::models::{Arch, KvDtype, Model, Rows, Session};

fn rows(s: &mut Session, toks: &[u32], r: Rows) -> Vec<Vec<f32>> {
    s.forward(toks, r)
        .expect("forward")
        .logits
        .to_vec2::<f32>()
        .expect("2-D logits")
}

/// max |a - b| / max |b| over all rows.
fn rel_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    let (mut d, mut m) = (0f32, 0f32);
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.len(), y.len());
        for (p, q) in x.iter().zip(y) {
            d = d.max((p - q).abs());
            m = m.max(q.abs());
        }
    }
    d / m
}

/// Prefill, a speculative-style 4-token forward, rollback, then single steps, a fork, and a
/// prompt-cache copy: the sharded session must follow the unsharded one at every call.
fn check_same(full: &Model, sharded: &Model, prompt: &[u32], more: &[u32], what: &str, bound: f32) {
    let (mut a, mut b) = (full.session(), sharded.session());
    let mut worst = rel_diff(
        &rows(&mut b, prompt, Rows::All),
        &rows(&mut a, prompt, Rows::All),
    );
    let step = &more[..4];
    worst = worst.max(rel_diff(
        &rows(&mut b, step, Rows::All),
        &rows(&mut a, step, Rows::All),
    ));
    a.truncate(prompt.len() + 1).unwrap();
    b.truncate(prompt.len() + 1).unwrap();
    for &t in &more[4..] {
        worst = worst.max(rel_diff(
            &rows(&mut b, &[t], Rows::Last),
            &rows(&mut a, &[t], Rows::Last),
        ));
    }
    let (mut fa, mut fb) = (a.fork().unwrap(), b.fork().unwrap());
    worst = worst.max(rel_diff(
        &rows(&mut fb, &more[..2], Rows::All),
        &rows(&mut fa, &more[..2], Rows::All),
    ));
    // The original is untouched by its fork's step.
    worst = worst.max(rel_diff(
        &rows(&mut b, &[more[3]], Rows::Last),
        &rows(&mut a, &[more[3]], Rows::Last),
    ));
    // A prompt-cache copy of the first positions, taken back by the model and continued.
    let keep = prompt.len() - 1;
    let mut ca = full.adopt(a.copy_prefix(keep).unwrap()).unwrap();
    let mut cb = sharded.adopt(b.copy_prefix(keep).unwrap()).unwrap();
    assert_eq!((ca.len(), cb.len()), (keep, keep));
    worst = worst.max(rel_diff(
        &rows(&mut cb, &more[..3], Rows::All),
        &rows(&mut ca, &more[..3], Rows::All),
    ));
    assert_eq!(a.len(), b.len());
    eprintln!("{what}: max relative logit difference {worst:e}");
    assert!(
        worst < bound,
        "{what}: sharded logits differ by {worst:e} (relative, bound {bound:e})"
    );
}

fn tiny(dir: &Path, spec: &TinySpec) -> Model {
    let p = dir.join(format!(
        "tiny-{:?}-{:?}-{}.gguf",
        spec.arch, spec.dtype, spec.heads
    ));
    write_tiny_gguf(&p, spec).expect("write tiny gguf");
    Model::load_gguf(&p, &Device::Cpu).expect("load tiny gguf")
}

#[test]
fn tiny_models_on_2_and_3_ranks_match_one() {
    let dir = tempfile::tempdir().unwrap();
    let prompt = [5u32, 17, 250, 3, 99, 260, 7, 1, 42];
    let more = [11u32, 12, 13, 14, 15, 16, 17];
    for (arch, dtype) in [
        (Arch::Qwen2, GgmlDType::F32),
        (Arch::Llama, GgmlDType::F32),
        // LayerNorms (whole on every rank), an MLP without a gate, biases on the row-split
        // projections (added once, by rank 0).
        (Arch::Starcoder2, GgmlDType::F32),
        // Attention and MLP in parallel: two all-reduces into one residual add.
        (Arch::Cohere2, GgmlDType::F32),
        (Arch::Qwen2, GgmlDType::Q8_0),
        (Arch::Qwen2, GgmlDType::Q4K),
        (Arch::Qwen2, GgmlDType::Q6K),
    ] {
        let k = matches!(dtype, GgmlDType::Q4K | GgmlDType::Q6K);
        // 6 query heads over 2 kv heads: with 3 ranks, rank 1 holds heads 2-3 and reads both.
        let spec = TinySpec {
            arch,
            dtype,
            hidden: if k { 768 } else { 96 },
            heads: 6,
            kv_heads: 2,
            intermediate: if k { 768 } else { 192 },
            ..TinySpec::default()
        };
        let full = tiny(dir.path(), &spec);
        for n in [2, 3] {
            let sharded = full.shard(n).unwrap();
            assert_eq!(sharded.shards(), n);
            assert_eq!(
                sharded.config(),
                full.config(),
                "the config stays the model's"
            );
            check_same(
                &full,
                &sharded,
                &prompt,
                &more,
                &format!("{arch:?} {dtype:?} x{n}"),
                if dtype == GgmlDType::F32 { 1e-4 } else { 2e-2 },
            );
        }
    }
}

/// Ranks keep their part of the cache in the model's KV cache type: f16 or Q8_0 on 2 and 3 ranks
/// follow the unsharded model on the same type through rollbacks, forks and prompt-cache copies.
#[test]
fn ranks_keep_a_narrow_kv_cache_like_one() {
    let dir = tempfile::tempdir().unwrap();
    let prompt = [5u32, 17, 250, 3, 99, 260, 7, 1, 42];
    let more = [11u32, 12, 13, 14, 15, 16, 17];
    let spec = TinySpec {
        hidden: 96,
        heads: 6,
        kv_heads: 2,
        head_dim: Some(32),
        intermediate: 192,
        ..TinySpec::default()
    };
    let base = tiny(dir.path(), &spec);
    for dt in [KvDtype::F16, KvDtype::Q8_0] {
        let full = base.with_kv_cache_dtype(dt).unwrap();
        for n in [2, 3] {
            let sharded = full.shard(n).unwrap();
            assert_eq!(sharded.kv_cache_dtype(), dt);
            check_same(&full, &sharded, &prompt, &more, &format!("{dt} x{n}"), 1e-4);
        }
    }
}

#[test]
fn ranks_on_named_devices_match_one() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinySpec {
        arch: Arch::Qwen2,
        dtype: GgmlDType::F32,
        hidden: 96,
        heads: 6,
        kv_heads: 2,
        intermediate: 192,
        ..TinySpec::default()
    };
    let full = tiny(dir.path(), &spec);
    let sharded = full.shard_across(&[Device::Cpu, Device::Cpu]).unwrap();
    assert_eq!(sharded.shards(), 2);
    check_same(
        &full,
        &sharded,
        &[5, 17, 250, 3, 99],
        &[11, 12, 13, 14, 15, 16],
        "2 ranks named",
        1e-4,
    );
    assert_eq!(full.shard_across(&[Device::Cpu]).unwrap().shards(), 1);
    for err in [
        full.shard_across(&[]).unwrap_err(),
        full.shard(0).unwrap_err(),
    ] {
        assert!(err.to_string().contains("at least 1"), "{err}");
    }
}

#[test]
fn impossible_splits_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let full = tiny(
        dir.path(),
        &TinySpec {
            heads: 4,
            kv_heads: 2,
            ..TinySpec::default()
        },
    );
    let err = full.shard(5).unwrap_err().to_string();
    assert!(
        err.contains("over 5 ranks") && err.contains("4 heads"),
        "{err}"
    );
    let err = full.shard(0).unwrap_err().to_string();
    assert!(err.contains("at least 1"), "{err}");
    let err = full.shard(2).unwrap().shard(2).unwrap_err().to_string();
    assert!(err.contains("already sharded"), "{err}");
    // Q8_0 blocks hold 32 values: heads of 16 move in pairs, so 4 heads allow 2 ranks, not 3.
    let q8 = tiny(
        dir.path(),
        &TinySpec {
            dtype: GgmlDType::Q8_0,
            hidden: 64,
            heads: 4,
            kv_heads: 2,
            ..TinySpec::default()
        },
    );
    assert!(q8.shard(2).is_ok());
    let err = q8.shard(3).unwrap_err().to_string();
    assert!(
        err.contains("32-value") && err.contains("at most 2"),
        "{err}"
    );
    // One rank is the model itself.
    assert_eq!(full.shard(1).unwrap().shards(), 1);
}

/// A sharded model serves batching requests one by one: batching is refused quietly (the
/// sessions run alone) and a sharded session never joins a batch.
#[test]
fn a_sharded_model_does_not_batch() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinySpec {
        heads: 6,
        hidden: 96,
        intermediate: 192,
        ..TinySpec::default()
    };
    let full = tiny(dir.path(), &spec);
    let m = full.shard(2).unwrap().with_batching(4).unwrap();
    assert!(m.batch_stats().is_none());
    let mut s = m.session();
    assert_eq!(rows(&mut s, &[1, 2, 3], Rows::Last).len(), 1);
}

fn models_dir() -> PathBuf {
    match std::env::var("VERDICT_MODELS") {
        Ok(d) => PathBuf::from(d),
        Err(_) => PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
            .join(".cache/verdict/models"),
    }
}

/// The real 1.5B, its weights dequantized to f32: with the GGUF's K-quants the kernels round
/// each activation to int8 per block, so the ranks' other summation order (1e-7) flips
/// roundings and the logits part by up to a few percent after 28 layers; that is a property of
/// int8 activations, not of the split, which f32 weights show exactly.
#[test]
fn qwen15_on_2_and_3_ranks_matches_one() {
    let p = models_dir().join("qwen2.5-coder-1.5b.gguf");
    let full = Model::load_gguf(&p, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{e} (run scripts/fetch-models first)"))
        .dequantized()
        .unwrap();
    let c = full.config();
    assert_eq!((c.n_heads, c.n_kv_heads), (12, 2));
    // "<|im_start|>user\nWrite a function" and a few code tokens.
    let prompt = [
        151644u32, 872, 198, 7985, 264, 729, 13, 151645, 198, 151644, 77091, 198,
    ];
    let more = [750u32, 912, 7, 77, 1648, 262, 470];
    for n in [2, 3] {
        let sharded = full.shard(n).unwrap();
        check_same(
            &full,
            &sharded,
            &prompt,
            &more,
            &format!("qwen2.5-coder-1.5b f32 x{n}"),
            1e-4,
        );
    }
}
