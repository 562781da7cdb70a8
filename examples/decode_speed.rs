//! CPU speed of the model layer, with the protocol of
//! shared/experiments/cpu-candle-vs-llamacpp (so the numbers compare with stock candle and
//! llama.cpp there): warm-up, prefill the prompt, time N greedy single-token steps; then the
//! median of R runs of one 8-token forward vs 8 single-token forwards on top of a ~230-token
//! context; then one batched forward of B sequences (one new token each, as B concurrent
//! requests decoding) vs B single forwards, for B = 2, 4, 8.
//!
//! usage: decode_speed <model.gguf> [tokens.json key] [n_decode=128] [reps=5]
//!   tokens.json: {"<key>": {"prompt": [...], "ctx": [...], "draft": [8 ids]}} (the experiment's
//!   file); without it, fixed synthetic ids are used.
//! Threads: CANDLE_NUM_THREADS / RAYON_NUM_THREADS (the experiment used 2).
//!
//! Example:
//!   RAYON_NUM_THREADS=2 CANDLE_NUM_THREADS=2 cargo run --release --example decode_speed -- \
//!     ~/.cache/verdict/models/qwen2.5-coder-0.5b.gguf \
//!     /work/shared/experiments/cpu-candle-vs-llamacpp/tokens.json qwen05

use anyhow::{Context, Result, bail};
use candle_core::Device;
use std::path::PathBuf;
use std::time::Instant;
use verdict::models::{BatchItem, Model, Rows, Session, forward_batch};
use verdict::sample::argmax;

fn next(s: &mut Session, toks: &[u32]) -> Result<u32> {
    let f = s.forward(toks, Rows::Last)?;
    let row: Vec<f32> = f.logits.squeeze(0)?.to_vec1()?;
    Ok(argmax(&row))
}

/// Process CPU time (user + system, all threads) from /proc/self/stat, in seconds; None off
/// Linux. On a shared machine this is steadier than wall time (it excludes time spent waiting
/// for a core), though spinning pool workers count as busy.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0) // USER_HZ is 100 on Linux
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn ids(v: &serde_json::Value, what: &str) -> Result<Vec<u32>> {
    v.as_array()
        .with_context(|| format!("tokens.json: {what} is not an array"))?
        .iter()
        .map(|x| {
            x.as_u64()
                .map(|n| n as u32)
                .with_context(|| format!("tokens.json: {what} holds a non-integer {x}"))
        })
        .collect()
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 2 {
        bail!("usage: decode_speed <model.gguf> [tokens.json key] [n_decode=128] [reps=5]");
    }
    let path = PathBuf::from(&args[1]);
    let (tokens_file, key, rest) = if args.len() >= 4 && args[2].ends_with(".json") {
        (Some(&args[2]), args[3].clone(), &args[4..])
    } else {
        (None, String::new(), &args[2..])
    };
    let n_dec: usize = rest.first().map(|s| s.parse()).transpose()?.unwrap_or(128);
    let reps: usize = rest.get(1).map(|s| s.parse()).transpose()?.unwrap_or(5);

    let t = Instant::now();
    let model = Model::load_gguf(&path, &Device::Cpu)?;
    let vocab = model.config().vocab_size as u32;
    eprintln!(
        "loaded {} in {:.2}s: {:?}",
        path.display(),
        t.elapsed().as_secs_f64(),
        model.config()
    );
    let (prompt, ctx, draft) = match tokens_file {
        Some(f) => {
            let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(f)?)?;
            let k = &j[&key];
            (
                ids(&k["prompt"], "prompt")?,
                ids(&k["ctx"], "ctx")?,
                ids(&k["draft"], "draft")?,
            )
        }
        None => {
            let syn = |n: u32, salt: u32| -> Vec<u32> {
                (0..n)
                    .map(|i| (i * 7919 + salt * 104_729) % vocab)
                    .collect()
            };
            (syn(38, 1), syn(232, 2), syn(8, 3))
        }
    };

    // Warm-up: candle repacks some weights lazily on first use.
    let mut s = model.session();
    let mut tok = next(&mut s, &prompt)?;
    for _ in 0..16 {
        tok = next(&mut s, &[tok])?;
    }
    next(&mut s, &draft)?;

    let mut s = model.session();
    let t = Instant::now();
    let mut tok = next(&mut s, &prompt)?;
    let prefill_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut out = vec![tok];
    let cpu0 = cpu_seconds();
    let t = Instant::now();
    for _ in 0..n_dec {
        tok = next(&mut s, &[tok])?;
        out.push(tok);
    }
    let dec = t.elapsed().as_secs_f64();
    let cpu = match (cpu0, cpu_seconds()) {
        (Some(a), Some(b)) => format!("; CPU {:.1} ms/tok", (b - a) * 1e3 / n_dec as f64),
        _ => String::new(),
    };
    println!(
        "prefill {} tok {prefill_ms:.1} ms; decode {n_dec} tok {dec:.3} s = {:.2} tok/s{cpu}",
        prompt.len(),
        n_dec as f64 / dec
    );
    println!("greedy: {:?}", &out[..out.len().min(32)]);
    if reps == 0 {
        return Ok(());
    }

    let l = ctx.len();
    let (mut t8, mut t8all, mut t1) = (vec![], vec![], vec![]);
    for _ in 0..reps {
        let mut base = model.session();
        next(&mut base, &ctx)?;
        let mut a = base.fork()?;
        let t = Instant::now();
        next(&mut a, &draft)?;
        t8.push(t.elapsed().as_secs_f64() * 1e3);
        a.truncate(l)?;
        let t = Instant::now();
        a.forward(&draft, Rows::All)?;
        t8all.push(t.elapsed().as_secs_f64() * 1e3);
        a.truncate(l)?;
        let t = Instant::now();
        for &d in &draft {
            next(&mut a, &[d])?;
        }
        t1.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let (m8, m8a, m1) = (median(t8), median(t8all), median(t1));
    println!(
        "ctx {l}: fwd({}) {m8:.1} ms (all-rows logits {m8a:.1} ms); {} x fwd(1) {m1:.1} ms = {:.1} ms/tok; ratio {:.2}",
        draft.len(),
        draft.len(),
        m1 / draft.len() as f64,
        m8 / (m1 / draft.len() as f64)
    );

    // Concurrent requests: B sequences decoding one token each, batched vs one by one.
    let mut base = model.session();
    next(&mut base, &ctx)?;
    for b in [2usize, 4, 8] {
        let (mut tb, mut ts) = (vec![], vec![]);
        for _ in 0..reps {
            let mut seqs = (0..b).map(|_| base.fork()).collect::<Result<Vec<_>, _>>()?;
            let toks: Vec<[u32; 1]> = (0..b).map(|i| [draft[i % draft.len()]]).collect();
            let mut items: Vec<BatchItem<'_>> = seqs
                .iter_mut()
                .zip(&toks)
                .map(|(session, t)| BatchItem {
                    session,
                    tokens: t,
                    rows: Rows::Last,
                })
                .collect();
            let t = Instant::now();
            for r in forward_batch(&mut items) {
                r?;
            }
            tb.push(t.elapsed().as_secs_f64() * 1e3);
            drop(items);
            for s in &mut seqs {
                s.truncate(l)?;
            }
            let t = Instant::now();
            for (s, tok) in seqs.iter_mut().zip(&toks) {
                next(s, tok)?;
            }
            ts.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let (mb, ms) = (median(tb), median(ts));
        println!(
            "batch of {b} sequences: one forward {mb:.1} ms vs {b} forwards {ms:.1} ms = {:.2}x throughput",
            ms / mb
        );
    }
    Ok(())
}
