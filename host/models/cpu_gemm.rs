//! verdict's own CPU matmul for GGUF's Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_0, Q5_0, Q4_0, Q4_1,
//! Q5_1, MXFP4 and IQ4_NL weights (x86-64 with AVX-512 VNNI). MXFP4 (gpt-oss's experts) and
//! IQ4_NL (IQ4_XS too, as IQ4_NL), which candle cannot hold, keep their stored size: each
//! block's 4-bit codes go through a 16-entry table (`vpshufb`) to the int8 values a Q8_0 block
//! of the same weights holds (IQ4_NL's blocks on Q4_0's tiles), then Q8_0's arithmetic runs,
//! with the same bits.
//!
//! Why not candle's: its x86 fast path repacks Q4_K into tiles with unpacked f32 scales (33%
//! more bytes to stream per token) and runs Q6_K through a compact kernel for one row but
//! through 52%-larger tiles for several, which round differently; verdict had to feed single
//! rows as two to keep a k-token verification forward bit-identical to k single-token forwards.
//! Decoding is bound by the bytes streamed, so this module streams about the stored bytes, and
//! computes every output row with the same instructions in the same order whatever the number
//! of rows: batch size never changes a result.
//!
//! The activations are quantized per row like llama.cpp's: int8 with one f32 scale per 256
//! values (Q8_K, for the k-quants, with the sums per 32 that fold Q4_K's mins in) or per 32
//! values (for the others). The weights are read from a copy made at load: `pack_q4k` (Q4_K and
//! Q5_K), `pack_q6k`, `pack_q3k`, `pack_q2k`, `pack_q5_0`, `pack_q4_0`, `pack_q4_1`,
//! `pack_q5_1`, `pack_q8_0` and `pack_mxfp4` interleave 16 columns, so that one `vpdpbusd`
//! multiplies 4 values of all 16 by 4 broadcast activation values. Each extra activation row
//! costs about half of what per-column kernels spent (the verified rows' cost, BENCHMARKS.md
//! session 13; a prefill of the 0.5B, whose body is mostly Q5_0, 180 -> 250 tokens/s, session
//! 19). Per 32 (Q4_K, Q5_K, Q5_0, Q4_0, Q4_1, Q5_1, Q8_0) or 16 (Q6_K, Q3_K, Q2_K) values the
//! integer sum is exact and is scaled into one f32 lane per column. Q4_K's and Q5_K's 6-bit
//! scales and mins are unpacked to bytes (64 bytes more per 16 blocks), Q6_K's and Q3_K's
//! blocks padded to whole cache lines (32 and 96 bytes more, Q3_K's 6-bit scales unpacked); the
//! others keep the stored size. Offsets (Q2_K's and Q4_K's mins, Q5_0's `q - 16`, Q4_0's `q -
//! 8`, Q8_0's `q + 128` as unsigned bytes, Q4_1's and Q5_1's `+ m`) come from each row's
//! activation sums per 32 values (per 16 for Q2_K, Q3_K and Q6_K). A tile block is laid out in
//! the order the kernel reads it, front to back, so that the hardware prefetcher streams it.
//!
//! The tiles are on 2 MiB pages ([`Pages`]): a one-row forward streams them all, and on 4 KiB
//! pages address translation bound that stream. They hold every bit of the matrix
//! (`Gemm::qtensor` unpacks them back to the stored blocks), so the loader drops candle's copy
//! where nothing else holds it (`Linear::new`): the weights take about the file's size in
//! memory, not twice it.
//!
//! `Gemm::new` returns `None` where this does not apply (another type, another CPU, the GPU,
//! `VERDICT_CPU_GEMM=0` for A/B measurements, or a type left off `VERDICT_CPU_GEMM=q4k,...`),
//! and the caller keeps candle's kernel (and `requant.rs` widens Q5_0 to Q8_0 for it).

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Result, Tensor};
use std::sync::Arc;

use super::gguf::{IQ4_VALUES, MXFP4_VALUES};
use super::pages::Pages;

const QK_K: usize = 256;
const Q4K_BYTES: usize = 144;
const Q6K_BYTES: usize = 210;
const Q5K_BYTES: usize = 176;
const Q3K_BYTES: usize = 110;
const Q2K_BYTES: usize = 84;
const QK8_0: usize = 32;
const Q8_0_BYTES: usize = 34;
const Q5_0_BYTES: usize = 22;
const Q4_0_BYTES: usize = 18;
const Q4_1_BYTES: usize = 20;
const Q5_1_BYTES: usize = 24;
/// MXFP4 (gpt-oss's experts): an E8M0 exponent byte and 16 bytes of 4-bit codes per 32.
const MXFP4_BYTES: usize = 17;
const IQ4_NL_BYTES: usize = 18;
/// Every type runs on a repacked copy: 16 columns per tile, each block of the 16
/// in its `*_TILE_BYTES` (see [`pack_q4k`], [`pack_q6k`], [`pack_q5_0`], [`pack_q4_1`]).
const TILE: usize = 16;
/// 16 columns' nibbles, their 8 scales and 8 mins as bytes, d and dmin: 64 bytes more than the
/// 16 stored blocks (the 6-bit scales unpacked).
const Q4K_TILE_BYTES: usize = Q4K_QS + 2048;
/// Where a Q4_K tile block's mins, d, dmin and nibbles start (its scales at 0; see
/// [`pack_q4k`]).
const Q4K_MN: usize = 128;
const Q4K_D: usize = 256;
const Q4K_DMIN: usize = 288;
const Q4K_QS: usize = 320;
/// Q5_K's tile blocks are Q4_K's with each sub-block's fifth bits after its nibbles: 8 groups'
/// 64-bit masks (one bit per byte of the group's vector), so a sub-block takes 320 bytes, not
/// 256. (With the masks in a run of their own after the nibbles, a one-row product was slower
/// than candle's.)
const Q5K_TILE_BYTES: usize = Q4K_QS + 8 * Q5K_SUB_BYTES;
const Q5K_SUB_BYTES: usize = 256 + 64;
/// 16 columns' scales, their d, padding to a cache line, then per sub-block the nibbles and
/// high bits (see [`pack_q6k`]).
const Q6K_TILE_BYTES: usize = Q6K_QS + 16 * Q6K_SUB_BYTES;
/// Where a Q6_K tile block's d and its sub-blocks' values start, and the bytes per sub-block.
const Q6K_D: usize = 256;
const Q6K_QS: usize = 320;
const Q6K_SUB_BYTES: usize = 192;
/// Q3_K: 16 columns' scales (as signed bytes, `sc - 32`), their d, padding to a cache line,
/// then per 16-value sub-block the low bit pairs and the high bits (see [`pack_q3k`]): 1856
/// bytes, 29 cache lines, for 1760 stored.
const Q3K_TILE_BYTES: usize = Q3K_QS + 16 * Q3K_SUB_BYTES;
const Q3K_D: usize = 256;
const Q3K_QS: usize = 320;
const Q3K_SUB_BYTES: usize = 96;
/// Q2_K: 16 columns' scale-and-min bytes (as stored), their d and dmin, then per 16-value
/// sub-block the bit pairs (see [`pack_q2k`]): 1344 bytes, the stored size, 21 cache lines.
const Q2K_TILE_BYTES: usize = Q2K_QS + 16 * 64;
const Q2K_D: usize = 256;
const Q2K_DMIN: usize = 288;
const Q2K_QS: usize = 320;
/// 16 columns' 32-value Q5_0 or Q4_1 blocks, in the stored bytes.
const Q5_0_TILE_BYTES: usize = TILE * Q5_0_BYTES;
const Q4_0_TILE_BYTES: usize = TILE * Q4_0_BYTES;
const Q4_1_TILE_BYTES: usize = TILE * Q4_1_BYTES;
const Q5_1_TILE_BYTES: usize = TILE * Q5_1_BYTES;
/// 16 columns' Q8_0 blocks (their values plus 128, then their d) and MXFP4 blocks (their codes
/// as nibble planes, then their exponent bytes): the stored bytes.
const Q8_0_TILE_BYTES: usize = TILE * Q8_0_BYTES;
const MXFP4_TILE_BYTES: usize = TILE * MXFP4_BYTES;
/// Output columns (weight rows) per work item handed to the thread pool: one tile.
const COLS_PER_ITEM: usize = TILE;
/// Quantized activations (one byte per value) of a block of rows in [`Gemm::run`].
const ACT_BLOCK_BYTES: usize = 256 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Q4K,
    /// Q4_K's layout and arithmetic with a fifth bit per value.
    Q5K,
    /// Q4_K's arithmetic (scales and mins) on 16-value sub-blocks of 2-bit values.
    Q2K,
    /// Q6_K's arithmetic on 3-bit values.
    Q3K,
    Q6K,
    Q8_0,
    Q5_0,
    Q4_0,
    Q4_1,
    /// Q4_1's arithmetic with a fifth bit per value (Q5_0's).
    Q5_1,
    /// Q8_0's arithmetic: each block's codes through a 16-entry table to int8.
    Mxfp4,
    /// Q4_0's tiles, the codes through IQ4's table, Q8_0's arithmetic (IQ4_XS comes as these,
    /// `gguf::iq4_xs_to_iq4_nl`).
    Iq4Nl,
}

/// `verdict bench gemm`: times of products of a random `dtype` `[n, k]` matrix with each of
/// `rows` activation rows, in microseconds per product, one per round. Each round multiplies
/// `copies` copies of the matrix in turn, so that with enough copies none is in cache when it
/// comes round again, as in a forward. `None`: this CPU or type has no kernel here.
pub(crate) fn time_products(
    dtype: GgmlDType,
    (n, k): (usize, usize),
    rows: &[usize],
    copies: usize,
    rounds: usize,
) -> Result<Option<Vec<Vec<f64>>>> {
    let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
    let Some(g) = Gemm::new(&Arc::new(QTensor::quantize(&w, dtype)?)) else {
        return Ok(None);
    };
    let copies: Vec<Gemm> = (0..copies.max(1))
        .map(|_| Gemm {
            blocks: Arc::new(Pages::copy_of(&g.blocks)),
            ..g.clone()
        })
        .collect();
    let mut times = Vec::new();
    for &m in rows {
        let x = Tensor::randn(0f32, 1.0, (m * k,), &Device::Cpu)?.to_vec1::<f32>()?;
        let mut out = vec![0f32; m * n];
        let mut t = Vec::new();
        // A warm-up round, then the timed ones.
        for round in 0..=rounds {
            let start = std::time::Instant::now();
            for c in &copies {
                c.run(&c.blocks, &x, m, &mut out);
            }
            if round > 0 {
                t.push(start.elapsed().as_secs_f64() * 1e6 / copies.len() as f64);
            }
        }
        times.push(t);
    }
    Ok(Some(times))
}

/// A quantized `[n, k]` weight that this module multiplies (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct Gemm {
    /// The tiles the kernels read, on huge pages ([`Pages`]).
    blocks: Arc<Pages>,
    kind: Kind,
    n: usize,
    k: usize,
}

/// Whether this CPU has the instructions the kernels use (checked once), and
/// `VERDICT_CPU_GEMM=0` does not turn them off.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            std::env::var("VERDICT_CPU_GEMM").map_or(true, |v| v != "0")
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The types this kernel takes: `VERDICT_CPU_GEMM` as a comma-separated list (q4k, q6k, q8_0)
/// when it is set to one, else the default.
fn enabled(kind: Kind) -> bool {
    let name = match kind {
        Kind::Q4K => "q4k",
        Kind::Q5K => "q5k",
        Kind::Q2K => "q2k",
        Kind::Q3K => "q3k",
        Kind::Q6K => "q6k",
        Kind::Q8_0 => "q8_0",
        Kind::Q5_0 => "q5_0",
        Kind::Q4_0 => "q4_0",
        Kind::Q4_1 => "q4_1",
        Kind::Q5_1 => "q5_1",
        Kind::Mxfp4 => "mxfp4",
        Kind::Iq4Nl => "iq4_nl",
    };
    match std::env::var("VERDICT_CPU_GEMM") {
        Ok(list) if list != "1" => list.split(',').any(|s| s.trim().eq_ignore_ascii_case(name)),
        _ => DEFAULT_TYPES.contains(&name),
    }
}

/// Every type by default: each wins against candle's kernels at one row and at several
/// (BENCHMARKS.md; Q4_K since its 16-column tiles, session 13). `VERDICT_CPU_GEMM` narrows
/// the list for A/B measurements.
const DEFAULT_TYPES: &[&str] = &[
    "q2k", "q3k", "q4k", "q5k", "q6k", "q8_0", "q5_0", "q4_0", "q4_1", "q5_1", "mxfp4", "iq4_nl",
];

impl Gemm {
    /// `None` unless `w` is a CPU matrix of a type this module multiplies, which it is
    /// enabled for, and [`available`] holds.
    pub(crate) fn new(w: &Arc<QTensor>) -> Option<Gemm> {
        Self::for_types(w, enabled)
    }

    /// As [`Gemm::new`], for the types `take` accepts (tests run every kernel).
    fn for_types(w: &Arc<QTensor>, take: impl Fn(Kind) -> bool) -> Option<Gemm> {
        let (kind, n, k) = applies(w, take)?;
        let data = w.data().ok()?;
        let blocks = match kind {
            Kind::Q5_0 => Pages::copy_of(&pack_q5_0(&data, n, k)),
            Kind::Q4_0 => Pages::copy_of(&pack_q4_0(&data, n, k)),
            Kind::Q4_1 => Pages::copy_of(&pack_q4_1(&data, n, k)),
            Kind::Q5_1 => Pages::copy_of(&pack_q5_1(&data, n, k)),
            Kind::Q4K => Pages::copy_of(&pack_q4k(&data, n, k, false)),
            Kind::Q5K => Pages::copy_of(&pack_q4k(&data, n, k, true)),
            Kind::Q2K => Pages::copy_of(&pack_q2k(&data, n, k)),
            Kind::Q3K => Pages::copy_of(&pack_q3k(&data, n, k)),
            Kind::Q6K => Pages::copy_of(&pack_q6k(&data, n, k)),
            Kind::Q8_0 => Pages::copy_of(&pack_q8_0(&data, n, k)),
            Kind::Mxfp4 => Pages::copy_of(&pack_mxfp4(&data, n, k)),
            Kind::Iq4Nl => Pages::copy_of(&pack_q4_0(&data, n, k)),
        };
        Some(Gemm {
            blocks: Arc::new(blocks),
            kind,
            n,
            k,
        })
    }

    /// An `[n, k]` matrix of MXFP4 blocks as stored (`n` rows of `k / 32` blocks), or `None`
    /// where the kernel does not apply (another CPU, `VERDICT_CPU_GEMM`, a size that is not
    /// whole blocks).
    pub(crate) fn mxfp4(blocks: &[u8], n: usize, k: usize) -> Option<Gemm> {
        Self::stored(Kind::Mxfp4, blocks, n, k, pack_mxfp4)
    }

    /// [`Gemm::mxfp4`] for IQ4_NL blocks (`gguf::GgufFile::iq4_nl_blocks`).
    pub(crate) fn iq4_nl(blocks: &[u8], n: usize, k: usize) -> Option<Gemm> {
        Self::stored(Kind::Iq4Nl, blocks, n, k, pack_q4_0)
    }

    fn stored(
        kind: Kind,
        blocks: &[u8],
        n: usize,
        k: usize,
        pack: fn(&[u8], usize, usize) -> Vec<u8>,
    ) -> Option<Gemm> {
        let (values, bytes) = kind.block();
        let whole = k > 0 && k.is_multiple_of(values) && blocks.len() == n * k / values * bytes;
        (available() && enabled(kind) && whole).then(|| Gemm {
            blocks: Arc::new(Pages::copy_of(&pack(blocks, n, k))),
            kind,
            n,
            k,
        })
    }

    /// The matrix as candle holds it, its blocks unpacked from the tiles bit for bit (MXFP4's
    /// as the Q8_0 copy): the loader drops candle's tensor once the tiles are made, and the
    /// rare paths that need one (sharding, a cut vocabulary, comparisons with candle's
    /// kernels) rebuild it.
    pub(crate) fn qtensor(&self) -> Result<QTensor> {
        let (n, k) = (self.n, self.k);
        let (dtype, bytes) = match self.kind {
            Kind::Q4K => (GgmlDType::Q4K, unpack_q4k(&self.blocks, n, k, false)),
            Kind::Q5K => (GgmlDType::Q5K, unpack_q4k(&self.blocks, n, k, true)),
            Kind::Q2K => (GgmlDType::Q2K, unpack_q2k(&self.blocks, n, k)),
            Kind::Q3K => (GgmlDType::Q3K, unpack_q3k(&self.blocks, n, k)),
            Kind::Q6K => (GgmlDType::Q6K, unpack_q6k(&self.blocks, n, k)),
            Kind::Q8_0 => (GgmlDType::Q8_0, unpack_q8_0(&self.blocks, n, k)),
            Kind::Q5_0 => (GgmlDType::Q5_0, unpack_q5_0(&self.blocks, n, k)),
            Kind::Q4_0 => (GgmlDType::Q4_0, unpack_q4_0(&self.blocks, n, k)),
            Kind::Q4_1 => (GgmlDType::Q4_1, unpack_q4_1(&self.blocks, n, k)),
            Kind::Q5_1 => (GgmlDType::Q5_1, unpack_q5_1(&self.blocks, n, k)),
            Kind::Mxfp4 => {
                let blocks = unpack_mxfp4(&self.blocks, n, k);
                let q8 = super::gguf::mxfp4_to_q8_0(&blocks).map_err(candle_core::Error::Msg)?;
                (GgmlDType::Q8_0, q8)
            }
            Kind::Iq4Nl => {
                let blocks = untile_q4_0(&self.blocks, n, k, Kind::Iq4Nl);
                let q8 = super::gguf::iq4_nl_to_q8_0(&blocks).map_err(candle_core::Error::Msg)?;
                (GgmlDType::Q8_0, q8)
            }
        };
        candle_core::quantized::ggml_file::qtensor_from_ggml(
            dtype,
            &bytes,
            vec![n, k],
            &Device::Cpu,
        )
    }

    /// Values per block of the stored type (the unit a matrix splits into by columns).
    pub(crate) fn values_per_block(&self) -> usize {
        self.kind.block().0
    }

    /// The weight's `[n, k]`.
    pub(crate) fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// `x [m, k]` (f32, CPU) times the weight transposed: `[m, n]`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (m, k) = x.dims2()?;
        if k != self.k {
            candle_core::bail!("cpu_gemm: input has {k} columns, the weight {}", self.k);
        }
        let x = x.to_dtype(candle_core::DType::F32)?.contiguous()?;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; m * self.n];
        self.run(&self.blocks, &xs, m, &mut out);
        Tensor::from_vec(out, (m, self.n), &Device::Cpu)
    }

    /// Several products in one pass of the thread pool: job i is `xs` (`m` rows, f32) times
    /// its weight, into `[m, n]`. A mixture of experts runs a layer's chosen experts so: one
    /// dispatch where one per matrix left the workers waiting between small matmuls. Each
    /// column's arithmetic is [`Gemm::forward`]'s, so the results are its bits.
    pub(crate) fn forward_many(jobs: &[(&Gemm, &[f32], usize)]) -> Result<Vec<Vec<f32>>> {
        for (g, xs, m) in jobs {
            if xs.len() != m * g.k {
                candle_core::bail!("cpu_gemm: {} values for {m} rows of {}", xs.len(), g.k);
            }
        }
        let mut outs: Vec<Vec<f32>> = jobs.iter().map(|(g, _, m)| vec![0f32; m * g.n]).collect();
        // Each job's rows in the blocks `run` takes, so their activations stay in L2.
        let mut parts = Vec::new();
        for ((g, xs, m), out) in jobs.iter().zip(&mut outs) {
            let block = g.rows_per_block();
            for r0 in (0..*m).step_by(block) {
                let r1 = (*m).min(r0 + block);
                let acts = Acts::quantize(&xs[r0 * g.k..r1 * g.k], r1 - r0, g.k, g.act_kind());
                parts.push((
                    *g,
                    &g.blocks[..],
                    acts,
                    out[r0 * g.n..].as_mut_ptr() as usize,
                ));
            }
        }
        Gemm::dispatch(&parts, true);
        Ok(outs)
    }

    /// Activation rows per block of [`Gemm::run`]: their quantized values fill
    /// [`ACT_BLOCK_BYTES`].
    fn rows_per_block(&self) -> usize {
        (ACT_BLOCK_BYTES / self.k).max(8) / 8 * 8
    }

    /// Products of quantized activations and weight blocks, into `[rows, n]` outputs (their
    /// addresses), with every part's column groups as the work items of one pool pass
    /// (`pool`), or here.
    fn dispatch(parts: &[(&Gemm, &[u8], Acts, usize)], pool: bool) {
        // Work item -> (part, its column group), the parts' groups one after another.
        let mut first = Vec::with_capacity(parts.len() + 1);
        first.push(0);
        for (g, ..) in parts {
            first.push(first[first.len() - 1] + g.n.div_ceil(COLS_PER_ITEM));
        }
        let work = |items: std::ops::Range<usize>| {
            for it in items {
                let j = first.partition_point(|&f| f <= it) - 1;
                let (g, w, acts, out) = &parts[j];
                let grp = it - first[j];
                let cols = grp * COLS_PER_ITEM..g.n.min((grp + 1) * COLS_PER_ITEM);
                // SAFETY: each work item writes only its own columns of its part's output.
                unsafe { g.columns(w, acts, cols, *out as *mut f32) }
            }
        };
        let total = first[parts.len()];
        if pool {
            candle_core::utils::barrier_pool().execute_chunked(total, work);
        } else {
            work(0..total);
        }
    }

    /// The activation quantization this kernel reads: MXFP4 multiplies as Q8_0 does.
    fn act_kind(&self) -> Kind {
        match self.kind {
            Kind::Mxfp4 | Kind::Iq4Nl => Kind::Q8_0,
            k => k,
        }
    }

    fn run(&self, w: &[u8], xs: &[f32], m: usize, out: &mut [f32]) {
        // Many rows (a prefill) go in blocks whose quantized activations stay in L2 while every
        // column walks them; one pass over all rows streamed them from memory once per column
        // tile. Rows are independent (quantized and summed row by row), so blocks change no
        // result.
        let block = self.rows_per_block();
        if m > block {
            for r0 in (0..m).step_by(block) {
                let r1 = m.min(r0 + block);
                let (x, o) = (
                    &xs[r0 * self.k..r1 * self.k],
                    &mut out[r0 * self.n..r1 * self.n],
                );
                self.run_rows(w, x, r1 - r0, o);
            }
        } else {
            self.run_rows(w, xs, m, out);
        }
    }

    fn run_rows(&self, w: &[u8], xs: &[f32], m: usize, out: &mut [f32]) {
        let acts = Acts::quantize(xs, m, self.k, self.act_kind());
        // Small products (one row of a small matrix) are not worth waking the pool.
        let pool = m * self.n * self.k >= 1 << 16;
        Gemm::dispatch(&[(self, w, acts, out.as_mut_ptr() as usize)], pool);
    }

    /// Output columns `cols` (one tile of 16, [`COLS_PER_ITEM`]) for every row. `out` is
    /// `[m, n]`.
    unsafe fn columns(&self, w: &[u8], acts: &Acts, cols: std::ops::Range<usize>, out: *mut f32) {
        #[cfg(target_arch = "x86_64")]
        unsafe {
            x86::tile(self.kind, w, cols.start / TILE, acts, out, self.n)
        };
    }
}

impl Kind {
    /// (values per block, bytes per block) of the weights as stored.
    fn block(self) -> (usize, usize) {
        match self {
            Kind::Q4K => (QK_K, Q4K_BYTES),
            Kind::Q5K => (QK_K, Q5K_BYTES),
            Kind::Q2K => (QK_K, Q2K_BYTES),
            Kind::Q3K => (QK_K, Q3K_BYTES),
            Kind::Q6K => (QK_K, Q6K_BYTES),
            Kind::Q8_0 => (QK8_0, Q8_0_BYTES),
            Kind::Q5_0 => (QK8_0, Q5_0_BYTES),
            Kind::Q4_0 => (QK8_0, Q4_0_BYTES),
            Kind::Q4_1 => (QK8_0, Q4_1_BYTES),
            Kind::Q5_1 => (QK8_0, Q5_1_BYTES),
            Kind::Mxfp4 => (QK8_0, MXFP4_BYTES),
            Kind::Iq4Nl => (QK8_0, IQ4_NL_BYTES),
        }
    }

    /// Bytes of a tile block: 16 columns' blocks, as [`pack_q4k`] and the others lay them out.
    fn tile_bytes(self) -> usize {
        match self {
            Kind::Q4K => Q4K_TILE_BYTES,
            Kind::Q5K => Q5K_TILE_BYTES,
            Kind::Q2K => Q2K_TILE_BYTES,
            Kind::Q3K => Q3K_TILE_BYTES,
            Kind::Q6K => Q6K_TILE_BYTES,
            Kind::Q8_0 => Q8_0_TILE_BYTES,
            Kind::Q5_0 => Q5_0_TILE_BYTES,
            Kind::Q4_0 => Q4_0_TILE_BYTES,
            Kind::Q4_1 => Q4_1_TILE_BYTES,
            Kind::Q5_1 => Q5_1_TILE_BYTES,
            Kind::Mxfp4 => MXFP4_TILE_BYTES,
            Kind::Iq4Nl => Q4_0_TILE_BYTES,
        }
    }

    /// Values per activation scale: 256 for the k-quants (Q8_K), 32 for the others (Q8_0).
    fn act_block(self) -> usize {
        match self {
            Kind::Q2K | Kind::Q3K | Kind::Q4K | Kind::Q5K | Kind::Q6K => QK_K,
            Kind::Q8_0
            | Kind::Q5_0
            | Kind::Q4_0
            | Kind::Q4_1
            | Kind::Q5_1
            | Kind::Mxfp4
            | Kind::Iq4Nl => QK8_0,
        }
    }
}

/// Whether [`Gemm::mxfp4`] runs here: MXFP4 matrices can then stay MXFP4 at load, instead of
/// becoming Q8_0 of twice the bytes.
pub(crate) fn takes_mxfp4() -> bool {
    available() && enabled(Kind::Mxfp4)
}

/// Whether [`Gemm::new`] takes this Q5_0 matrix, so it can stay Q5_0 at load instead of being
/// widened to Q8_0 (`requant.rs`): the CPU kernel is on for it.
pub(crate) fn takes_q5_0(w: &QTensor) -> bool {
    applies(w, enabled).is_some_and(|(kind, _, _)| kind == Kind::Q5_0)
}

/// The kernel and `[n, k]` for `w` if a kernel applies: this CPU, a supported type that `take`
/// accepts, and rows of whole blocks matching the stored bytes.
fn applies(w: &QTensor, take: impl Fn(Kind) -> bool) -> Option<(Kind, usize, usize)> {
    if !available() || !matches!(w.device(), Device::Cpu) {
        return None;
    }
    let kind = match w.dtype() {
        GgmlDType::Q4K => Kind::Q4K,
        GgmlDType::Q5K => Kind::Q5K,
        GgmlDType::Q2K => Kind::Q2K,
        GgmlDType::Q3K => Kind::Q3K,
        GgmlDType::Q6K => Kind::Q6K,
        GgmlDType::Q8_0 => Kind::Q8_0,
        GgmlDType::Q5_0 => Kind::Q5_0,
        GgmlDType::Q4_0 => Kind::Q4_0,
        GgmlDType::Q4_1 => Kind::Q4_1,
        GgmlDType::Q5_1 => Kind::Q5_1,
        _ => return None,
    };
    if !take(kind) {
        return None;
    }
    let (n, k) = w.shape().dims2().ok()?;
    let (blk, bytes) = kind.block();
    if k == 0 || !k.is_multiple_of(blk) || w.data().ok()?.len() != n * (k / blk) * bytes {
        return None;
    }
    Some((kind, n, k))
}

/// Q5_0 blocks (f16 d, 32 fifth bits, 16 bytes of nibbles: `d * (q - 16)`, value j in byte j's
/// low nibble and value 16 + j in its high one) regrouped 16 columns to a tile, like
/// [`pack_q4k`]. Per tile and 32-value block, for the values `4g + bb` (groups g = 0..8):
/// - bytes `64p..`, p = 0..4: `[column j][bb]` holding group 2p (low nibble) and 2p + 1 (high
///   nibble), the low 4 bits of each value;
/// - bytes `256 + 8g..`: group g's fifth bits as one u64, bit `4j + bb`;
/// - bytes `320..352`: the 16 columns' d.
///
/// The stored bytes (22 per block and column); columns past `n` are zero.
fn pack_q5_0(raw: &[u8], n: usize, k: usize) -> Vec<u8> {
    tiles32(raw, n, k, Q5_0_BYTES, |blk, j, dst| {
        put_five_bits(dst, j, &blk[2..6], &blk[6..22]);
        dst[320 + 2 * j..322 + 2 * j].copy_from_slice(&blk[0..2]);
    })
}

/// Column j's 32 five-bit values (`qh`: the fifth bits, value v's in bit v; `qs`: the stored
/// nibbles) into a Q5_0 or Q5_1 tile block: the nibble planes ([`put_nibbles`]) and from byte
/// 256 the 8 groups' 64-bit masks of fifth bits.
fn put_five_bits(dst: &mut [u8], j: usize, qh: &[u8], qs: &[u8]) {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    put_nibbles(dst, j, |v| stored_nibble(qs, v));
    for v in 0..QK8_0 {
        let bit = 4 * j + v % 4;
        dst[256 + 8 * (v / 4) + bit / 8] |= (((qh >> v) & 1) as u8) << (bit % 8);
    }
}

/// [`put_five_bits`]' inverse: column j's `qh` and stored nibbles.
fn get_five_bits(src: &[u8], j: usize, dst_qh: &mut [u8], dst_qs: &mut [u8]) {
    let mut qh = 0u32;
    for v in 0..QK8_0 {
        let bit = 4 * j + v % 4;
        qh |= u32::from((src[256 + 8 * (v / 4) + bit / 8] >> (bit % 8)) & 1) << v;
    }
    dst_qh.copy_from_slice(&qh.to_le_bytes());
    put_stored_nibbles(dst_qs, |v| get_nibble(src, j, v));
}

/// Q5_1 blocks (f16 d, f16 m, 32 fifth bits, 16 bytes of nibbles: `d * q + m`) regrouped like
/// Q5_0's ([`put_five_bits`]), then bytes `320..352` the 16 columns' d, `352..384` their m. The
/// stored bytes; columns past `n` are zero.
fn pack_q5_1(raw: &[u8], n: usize, k: usize) -> Vec<u8> {
    tiles32(raw, n, k, Q5_1_BYTES, |blk, j, dst| {
        put_five_bits(dst, j, &blk[4..8], &blk[8..24]);
        dst[320 + 2 * j..322 + 2 * j].copy_from_slice(&blk[0..2]);
        dst[352 + 2 * j..354 + 2 * j].copy_from_slice(&blk[2..4]);
    })
}

/// [`pack_q5_1`]'s inverse.
fn unpack_q5_1(tiles: &[u8], n: usize, k: usize) -> Vec<u8> {
    untile(tiles, n, k, Kind::Q5_1, |src, j, dst| {
        dst[0..2].copy_from_slice(&src[320 + 2 * j..322 + 2 * j]);
        dst[2..4].copy_from_slice(&src[352 + 2 * j..354 + 2 * j]);
        let (qh, qs) = dst[4..].split_at_mut(4);
        get_five_bits(src, j, qh, qs);
    })
}

/// Q4_0 blocks (f16 d, 16 bytes of nibbles: `d * (q - 8)`, value j in byte j's low nibble and
/// 16 + j in its high one) regrouped 16 columns to a tile: the nibbles as planes
/// ([`put_nibbles`]), then bytes `256..288` the 16 columns' d. The stored bytes; columns past
/// `n` are zero.
fn pack_q4_0(raw: &[u8], n: usize, k: usize) -> Vec<u8> {
    tiles32(raw, n, k, Q4_0_BYTES, |blk, j, dst| {
        put_nibbles(dst, j, |v| stored_nibble(&blk[2..], v));
        dst[256 + 2 * j..258 + 2 * j].copy_from_slice(&blk[0..2]);
    })
}

/// Q4_1 blocks (f16 d, f16 m, 16 bytes of nibbles: `d * q + m`, value j in byte j's low nibble
/// and value 16 + j in its high one) regrouped 16 columns to a tile, like [`pack_q5_0`]: bytes
/// `64p..` the nibbles, `256..288` the 16 columns' d, `288..320` their m. The stored bytes;
/// columns past `n` are zero.
fn pack_q4_1(raw: &[u8], n: usize, k: usize) -> Vec<u8> {
    tiles32(raw, n, k, Q4_1_BYTES, |blk, j, dst| {
        put_nibbles(dst, j, |v| stored_nibble(&blk[4..], v));
        dst[256 + 2 * j..258 + 2 * j].copy_from_slice(&blk[0..2]);
        dst[288 + 2 * j..290 + 2 * j].copy_from_slice(&blk[2..4]);
    })
}

/// Q8_0 blocks (f16 d, 32 int8 `q`: `d * q`) regrouped 16 columns to a tile: bytes `64g..`,
/// g = 0..8, `[column j][b]` holding `q + 128` (`vpdpbusd` multiplies unsigned bytes) of value
/// `4g + b`; bytes `512..544` the 16 columns' d. The stored size; columns past `n` are zero.
///
/// Read as stored, two columns at a time (the weight's sign moved onto the activation), an
/// out-of-cache matrix streamed at 18 GB/s on two threads where the tiled types reached 30-36
/// (session 25).
fn pack_q8_0(raw: &[u8], n: usize, k: usize) -> Vec<u8> {
    tiles32(raw, n, k, Q8_0_BYTES, |blk, j, dst| {
        for v in 0..QK8_0 {
            dst[64 * (v / 4) + 4 * j + v % 4] = blk[2 + v] ^ 0x80;
        }
        dst[512 + 2 * j..514 + 2 * j].copy_from_slice(&blk[0..2]);
    })
}

/// MXFP4 blocks (an E8M0 exponent byte, 16 bytes of 4-bit codes: value j in byte j's low
/// nibble, 16 + j in its high one) regrouped 16 columns to a tile: the codes as nibble planes
/// ([`put_nibbles`]), then bytes `256..272` the 16 columns' exponents. The stored bytes;
/// columns past `n` are zero.
fn pack_mxfp4(raw: &[u8], n: usize, k: usize) -> Vec<u8> {
    tiles32(raw, n, k, MXFP4_BYTES, |blk, j, dst| {
        put_nibbles(dst, j, |v| stored_nibble(&blk[1..], v));
        dst[256 + j] = blk[0];
    })
}

/// The inverse of a packer: each column's stored blocks, `unfill(tile block, j, block)`
/// writing column j's block of `bytes` from its tile block of `tile_bytes`.
fn untile(
    tiles: &[u8],
    n: usize,
    k: usize,
    kind: Kind,
    unfill: impl Fn(&[u8], usize, &mut [u8]),
) -> Vec<u8> {
    let ((values, bytes), tile_bytes) = (kind.block(), kind.tile_bytes());
    let nb = k / values;
    let mut out = vec![0u8; n * nb * bytes];
    for c in 0..n {
        let (t, j) = (c / TILE, c % TILE);
        for b in 0..nb {
            unfill(
                &tiles[(t * nb + b) * tile_bytes..][..tile_bytes],
                j,
                &mut out[(c * nb + b) * bytes..][..bytes],
            );
        }
    }
    out
}

/// Column j's 32 values from a tile block's nibble planes ([`put_nibbles`]' inverse).
fn get_nibble(src: &[u8], j: usize, v: usize) -> u8 {
    let g = v / 4;
    (src[64 * (g / 2) + 4 * j + v % 4] >> (4 * (g % 2))) & 15
}

/// 32 4-bit values into a block's 16 stored bytes (value v in byte v's low nibble, 16 + v in
/// its high one; [`stored_nibble`]'s inverse).
fn put_stored_nibbles(qs: &mut [u8], q: impl Fn(usize) -> u8) {
    for (v, b) in qs.iter_mut().enumerate().take(16) {
        *b = (q(v) & 15) | ((q(v + 16) & 15) << 4);
    }
}

/// [`pack_mxfp4`]'s inverse: the `[n, k]` matrix's blocks in the stored order.
fn unpack_mxfp4(tiles: &[u8], n: usize, k: usize) -> Vec<u8> {
    untile(tiles, n, k, Kind::Mxfp4, |src, j, dst| {
        dst[0] = src[256 + j];
        put_stored_nibbles(&mut dst[1..], |v| get_nibble(src, j, v));
    })
}

/// [`pack_q8_0`]'s inverse.
fn unpack_q8_0(tiles: &[u8], n: usize, k: usize) -> Vec<u8> {
    untile(tiles, n, k, Kind::Q8_0, |src, j, dst| {
        dst[0..2].copy_from_slice(&src[512 + 2 * j..514 + 2 * j]);
        for v in 0..QK8_0 {
            dst[2 + v] = src[64 * (v / 4) + 4 * j + v % 4] ^ 0x80;
        }
    })
}

/// [`pack_q4_0`]'s inverse.
fn unpack_q4_0(tiles: &[u8], n: usize, k: usize) -> Vec<u8> {
    untile_q4_0(tiles, n, k, Kind::Q4_0)
}

/// [`unpack_q4_0`] for `kind`'s tiles in Q4_0's layout (IQ4_NL's: its d and codes).
fn untile_q4_0(tiles: &[u8], n: usize, k: usize, kind: Kind) -> Vec<u8> {
    untile(tiles, n, k, kind, |src, j, dst| {
        dst[0..2].copy_from_slice(&src[256 + 2 * j..258 + 2 * j]);
        put_stored_nibbles(&mut dst[2..], |v| get_nibble(src, j, v));
    })
}

/// [`pack_q4_1`]'s inverse.
fn unpack_q4_1(tiles: &[u8], n: usize, k: usize) -> Vec<u8> {
    untile(tiles, n, k, Kind::Q4_1, |src, j, dst| {
        dst[0..2].copy_from_slice(&src[256 + 2 * j..258 + 2 * j]);
        dst[2..4].copy_from_slice(&src[288 + 2 * j..290 + 2 * j]);
        put_stored_nibbles(&mut dst[4..], |v| get_nibble(src, j, v));
    })
}

/// [`pack_q5_0`]'s inverse.
fn unpack_q5_0(tiles: &[u8], n: usize, k: usize) -> Vec<u8> {
    untile(tiles, n, k, Kind::Q5_0, |src, j, dst| {
        dst[0..2].copy_from_slice(&src[320 + 2 * j..322 + 2 * j]);
        let (qh, qs) = dst[2..].split_at_mut(4);
        get_five_bits(src, j, qh, qs);
    })
}

/// [`pack_q4k`]'s inverse: the scales and mins back into ggml's 12 bytes of 6-bit fields.
fn unpack_q4k(tiles: &[u8], n: usize, k: usize, five: bool) -> Vec<u8> {
    let kind = if five { Kind::Q5K } else { Kind::Q4K };
    let (qs, sub) = if five { (48, Q5K_SUB_BYTES) } else { (16, 256) };
    let unfill = |src: &[u8], j: usize, dst: &mut [u8]| {
        dst[0..2].copy_from_slice(&src[Q4K_D + 2 * j..Q4K_D + 2 + 2 * j]);
        dst[2..4].copy_from_slice(&src[Q4K_DMIN + 2 * j..Q4K_DMIN + 2 + 2 * j]);
        let sc = |s: usize| src[16 * s + j];
        let mn = |s: usize| src[Q4K_MN + 32 * (s / 2) + 2 * j + s % 2];
        for i in 0..4 {
            dst[4 + i] = sc(i) | ((sc(i + 4) >> 4) << 6);
            dst[8 + i] = mn(i) | ((mn(i + 4) >> 4) << 6);
            dst[12 + i] = (sc(i + 4) & 15) | ((mn(i + 4) & 15) << 4);
        }
        // Value u: sub-block u / 32, group pair p, byte bb, the high nibble for its second 4.
        let q = |u: usize| {
            let (s, r) = (u / 32, u % 32);
            let byte = src[Q4K_QS + sub * s + 64 * (r / 8) + 4 * j + r % 4];
            if r % 8 < 4 { byte & 15 } else { byte >> 4 }
        };
        for v in 0..QK_K {
            // ggml's order: 32 bytes of nibbles per 64 values, low nibbles first.
            let at = qs + 32 * (v / 64) + v % 32;
            dst[at] |= q(v) << (4 * ((v % 64) / 32));
            if five {
                let (s, g, bit) = (v / 32, v % 32 / 4, 4 * j + v % 4);
                let high = (src[Q4K_QS + sub * s + 256 + 8 * g + bit / 8] >> (bit % 8)) & 1;
                dst[16 + v % 32] |= high << (v / 32);
            }
        }
    };
    untile(tiles, n, k, kind, unfill)
}

/// [`pack_q6k`]'s inverse.
fn unpack_q6k(tiles: &[u8], n: usize, k: usize) -> Vec<u8> {
    untile(tiles, n, k, Kind::Q6K, |src, j, dst| {
        let q = |u: usize| {
            let (s, g, bb) = (u / 16, u % 16 / 4, u % 4);
            let at = Q6K_QS + Q6K_SUB_BYTES * s + 4 * j + bb;
            let lo = (src[at + 64 * (g / 2)] >> (4 * (g % 2))) & 15;
            lo | (((src[at + 128] >> (2 * g)) & 3) << 4)
        };
        for h in 0..2 {
            for l in 0..32 {
                let v = |o: usize| q(128 * h + l + o);
                dst[64 * h + l] = (v(0) & 15) | ((v(64) & 15) << 4);
                dst[64 * h + l + 32] = (v(32) & 15) | ((v(96) & 15) << 4);
                dst[128 + 32 * h + l] =
                    (v(0) >> 4) | ((v(32) >> 4) << 2) | ((v(64) >> 4) << 4) | ((v(96) >> 4) << 6);
            }
        }
        for s in 0..16 {
            dst[192 + s] = src[16 * s + j];
        }
        dst[208..210].copy_from_slice(&src[Q6K_D + 2 * j..Q6K_D + 2 + 2 * j]);
    })
}

/// The 16-column tiles of a matrix of 32-value blocks of `bytes` each (Q5_0, Q4_1), each tile
/// block `TILE * bytes`: `fill(block, j, tile block)` writes column j's block into its tile's.
/// Columns past `n` stay zero.
fn tiles32(
    raw: &[u8],
    n: usize,
    k: usize,
    bytes: usize,
    fill: impl Fn(&[u8], usize, &mut [u8]),
) -> Vec<u8> {
    let (nb, tile) = (k / QK8_0, TILE * bytes);
    let mut out = vec![0u8; n.div_ceil(TILE) * nb * tile];
    for c in 0..n {
        let (t, j) = (c / TILE, c % TILE);
        for b in 0..nb {
            fill(
                &raw[(c * nb + b) * bytes..][..bytes],
                j,
                &mut out[(t * nb + b) * tile..][..tile],
            );
        }
    }
    out
}

/// Value v of a 32-value block's 16 stored nibble bytes (ggml: v in byte v's low nibble, 16 + v
/// in its high one).
fn stored_nibble(qs: &[u8], v: usize) -> u8 {
    if v < 16 { qs[v] & 15 } else { qs[v - 16] >> 4 }
}

/// Column j's 32 values' low 4 bits into a tile block's nibble planes: byte `64p + 4j + bb`
/// holds value `8p + bb` (low nibble) and `8p + 4 + bb` (high), so that plane p gives the
/// groups 2p and 2p + 1 of 4 values for all 16 columns (`x86::nibble_planes`).
fn put_nibbles(dst: &mut [u8], j: usize, q: impl Fn(usize) -> u8) {
    for v in 0..QK8_0 {
        let g = v / 4;
        dst[64 * (g / 2) + 4 * j + v % 4] |= (q(v) & 15) << (4 * (g % 2));
    }
}

/// Q4_K blocks (f16 d and dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles;
/// value `d * sc * q - dmin * mn` in sub-block j of 32) regrouped 16 columns to a tile, like
/// [`pack_q6k`]. Per tile and block, for sub-block `s` (values `32s + 4g + b`, groups g = 0..8):
/// - bytes `16s..`: the 16 columns' scales of sub-block `s`;
/// - bytes `128 + 32p..`: `[j][2]` the mins of sub-blocks 2p and 2p + 1 (`vpdpwssd` pairs);
/// - bytes `256..288`: the 16 columns' d, `288..320`: their dmin;
/// - bytes `320 + 256s + 64p..`, p = 0..4: `[column j][b]` holding group 2p (low nibble) and
///   2p + 1 (high nibble).
///
/// The block is read front to back (the scales first, as [`pack_q6k`]'s).
///
/// Columns past `n` are zero.
///
/// `five`: Q5_K blocks (the same fields, and 32 bytes of fifth bits `qh` before the nibbles:
/// value v's in bit v / 32 of byte v % 32): sub-block s at `320 + 320s`, its nibbles, then from
/// byte 256 of it, 8 bytes per group g, the 64-bit mask of the group's fifth bits (bit
/// `4j + b`, the byte `vpdpbusd` reads).
fn pack_q4k(raw: &[u8], n: usize, k: usize, five: bool) -> Vec<u8> {
    let nb = k / QK_K;
    let kind = if five { Kind::Q5K } else { Kind::Q4K };
    let (bytes, tile_bytes) = (kind.block().1, kind.tile_bytes());
    let (qs, sub) = if five { (48, Q5K_SUB_BYTES) } else { (16, 256) };
    let mut out = vec![0u8; n.div_ceil(TILE) * nb * tile_bytes];
    for c in 0..n {
        let (t, j) = (c / TILE, c % TILE);
        for b in 0..nb {
            let blk = &raw[(c * nb + b) * bytes..][..bytes];
            let (sc, mn) = q4k_scales_mins(&blk[4..16]);
            // ggml's order: 32 bytes of nibbles per 64 values, low nibbles first.
            let q = |v: usize| {
                let byte = blk[qs + 32 * (v / 64) + v % 32];
                if v % 64 < 32 { byte & 15 } else { byte >> 4 }
            };
            let dst = &mut out[(t * nb + b) * tile_bytes..][..tile_bytes];
            for s in 0..8 {
                for p in 0..4 {
                    for bb in 0..4 {
                        let v = 32 * s + 8 * p + bb;
                        dst[Q4K_QS + sub * s + 64 * p + 4 * j + bb] = q(v) | (q(v + 4) << 4);
                    }
                }
                if five {
                    for v in 32 * s..32 * (s + 1) {
                        let (g, bit) = (v % 32 / 4, 4 * j + v % 4);
                        let high = (blk[16 + v % 32] >> (v / 32)) & 1;
                        dst[Q4K_QS + sub * s + 256 + 8 * g + bit / 8] |= high << (bit % 8);
                    }
                }
                dst[16 * s + j] = sc[s];
                dst[Q4K_MN + 32 * (s / 2) + 2 * j + s % 2] = mn[s];
            }
            dst[Q4K_D + 2 * j..Q4K_D + 2 + 2 * j].copy_from_slice(&blk[0..2]);
            dst[Q4K_DMIN + 2 * j..Q4K_DMIN + 2 + 2 * j].copy_from_slice(&blk[2..4]);
        }
    }
    out
}

/// Q6_K blocks (`ql`: 128 bytes of low nibbles, `qh`: 64 bytes of high bit pairs, 16 i8
/// sub-block scales, f16 d; value `d * sc * (q - 32)`) regrouped 16 columns to a tile, so that
/// one vector holds 4 consecutive values of each of the 16 columns (`vpdpbusd` with the
/// activations' 4 values broadcast: one instruction, 16 columns). Per tile and block, for
/// sub-block `s` (values `16s + 4g + b`, groups g = 0..4, byte b):
/// - bytes `16s..`: the 16 columns' scales of sub-block `s`; bytes `256..288`: their d;
/// - bytes `320 + 192s..`: two vectors of nibbles, `[column j][b]` holding groups 0 and 1
///   (low and high nibble), then groups 2 and 3; then the high bit pairs, `[j][b]`, groups
///   0..4 at bits 0, 2, 4, 6.
///
/// The block is read front to back, in whole cache lines: 3,392 bytes per tile and block, the
/// 16 columns' 3,360 stored bytes and 32 of padding, so that every block starts a line. Read in
/// three runs (nibbles, high bits, scales) and half the blocks straddling lines, an out-of-cache
/// matrix streamed at 18 GB/s on two threads against Q4_K's 33 (session 25). Columns past `n`
/// are zero.
fn pack_q6k(raw: &[u8], n: usize, k: usize) -> Vec<u8> {
    let nb = k / QK_K;
    let tiles = n.div_ceil(TILE);
    let mut out = vec![0u8; tiles * nb * Q6K_TILE_BYTES];
    for c in 0..n {
        let (t, j) = (c / TILE, c % TILE);
        for b in 0..nb {
            let blk = &raw[(c * nb + b) * Q6K_BYTES..][..Q6K_BYTES];
            let (ql, qh) = (&blk[..128], &blk[128..192]);
            // ggml's order: in each half h, byte l of ql/qh gives values 128h + l (+32, +64, +96).
            let mut q = [0u8; QK_K];
            for h in 0..2 {
                for l in 0..32 {
                    let (lo, hi) = (ql[64 * h + l], qh[32 * h + l]);
                    let lo2 = ql[64 * h + l + 32];
                    q[128 * h + l] = (lo & 15) | ((hi & 3) << 4);
                    q[128 * h + l + 32] = (lo2 & 15) | (((hi >> 2) & 3) << 4);
                    q[128 * h + l + 64] = (lo >> 4) | (((hi >> 4) & 3) << 4);
                    q[128 * h + l + 96] = (lo2 >> 4) | (((hi >> 6) & 3) << 4);
                }
            }
            let dst = &mut out[(t * nb + b) * Q6K_TILE_BYTES..][..Q6K_TILE_BYTES];
            for s in 0..16 {
                for bb in 0..4 {
                    let v = |g: usize| q[16 * s + 4 * g + bb];
                    let at = Q6K_QS + Q6K_SUB_BYTES * s + 4 * j + bb;
                    dst[at] = (v(0) & 15) | ((v(1) & 15) << 4);
                    dst[at + 64] = (v(2) & 15) | ((v(3) & 15) << 4);
                    dst[at + 128] =
                        (v(0) >> 4) | ((v(1) >> 4) << 2) | ((v(2) >> 4) << 4) | ((v(3) >> 4) << 6);
                }
                dst[16 * s + j] = blk[192 + s];
            }
            dst[Q6K_D + 2 * j..Q6K_D + 2 + 2 * j].copy_from_slice(&blk[208..210]);
        }
    }
    out
}

/// Value v (0..256) of a stored Q2_K block's 64 bytes of bit pairs (Q3_K's low bits' order):
/// bit pair v % 128 / 32 of byte `32·(v / 128) + v % 32`.
fn q2_pair(qs: &[u8], v: usize) -> u8 {
    (qs[32 * (v / 128) + v % 32] >> (2 * (v % 128 / 32))) & 3
}

/// Puts `q` (0..=3), value v of column j's 16-value sub-block (v counted in the block), into a
/// Q2_K or Q3_K tile block's sub-block plane (`sub`, its 64 bytes): byte `4j + v % 4`, bits
/// `2·(v % 16 / 4)`.
fn put_pair(sub: &mut [u8], j: usize, v: usize, q: u8) {
    sub[4 * j + v % 4] |= q << (2 * (v % 16 / 4));
}

/// [`put_pair`]'s inverse.
fn get_pair(sub: &[u8], j: usize, v: usize) -> u8 {
    (sub[4 * j + v % 4] >> (2 * (v % 16 / 4))) & 3
}

/// Q2_K blocks (16 bytes of 4-bit scale and 4-bit min per sub-block, 64 of bit pairs, f16 d
/// and dmin: `d·sc·q - dmin·m` per 16-value sub-block) regrouped 16 columns to a tile. Per tile
/// block: bytes `16s + j` column j's sub-block s scale-and-min byte as stored; `256..288` the
/// columns' d, `288..320` their dmin; then per sub-block s at `320 + 64s` its bit pairs, laid
/// out as Q3_K's ([`put_pair`]). The stored size.
fn pack_q2k(raw: &[u8], n: usize, k: usize) -> Vec<u8> {
    let nb = k / QK_K;
    let mut out = vec![0u8; n.div_ceil(TILE) * nb * Q2K_TILE_BYTES];
    for c in 0..n {
        let (t, j) = (c / TILE, c % TILE);
        for b in 0..nb {
            let blk = &raw[(c * nb + b) * Q2K_BYTES..][..Q2K_BYTES];
            let dst = &mut out[(t * nb + b) * Q2K_TILE_BYTES..][..Q2K_TILE_BYTES];
            for s in 0..16 {
                dst[16 * s + j] = blk[s];
                let sub = &mut dst[Q2K_QS + 64 * s..][..64];
                for v in 16 * s..16 * s + 16 {
                    put_pair(sub, j, v, q2_pair(&blk[16..80], v));
                }
            }
            dst[Q2K_D + 2 * j..Q2K_D + 2 + 2 * j].copy_from_slice(&blk[80..82]);
            dst[Q2K_DMIN + 2 * j..Q2K_DMIN + 2 + 2 * j].copy_from_slice(&blk[82..84]);
        }
    }
    out
}

/// [`pack_q2k`]'s inverse: the stored blocks, bit for bit.
fn unpack_q2k(tiles: &[u8], n: usize, k: usize) -> Vec<u8> {
    untile(tiles, n, k, Kind::Q2K, |src, j, dst| {
        for v in 0..QK_K {
            let q = get_pair(&src[Q2K_QS + 64 * (v / 16)..][..64], j, v);
            dst[16 + 32 * (v / 128) + v % 32] |= q << (2 * (v % 128 / 32));
        }
        for s in 0..16 {
            dst[s] = src[16 * s + j];
        }
        dst[80..82].copy_from_slice(&src[Q2K_D + 2 * j..Q2K_D + 2 + 2 * j]);
        dst[82..84].copy_from_slice(&src[Q2K_DMIN + 2 * j..Q2K_DMIN + 2 + 2 * j]);
    })
}

/// A Q3_K block's 16 scales (6 bits each, the stored value; `sc - 32` multiplies) from its 12
/// bytes, as ggml unpacks them: scale i's low 4 bits in byte i (i < 8) or the high nibble of
/// byte i - 8, its high 2 bits in byte 8 + i % 4 at bit 2·(i / 4).
fn q3k_scales(s: &[u8]) -> [u8; 16] {
    std::array::from_fn(|i| {
        let low = if i < 8 { s[i] & 15 } else { s[i - 8] >> 4 };
        low | (((s[8 + i % 4] >> (2 * (i / 4))) & 3) << 4)
    })
}

/// [`q3k_scales`]' inverse.
fn q3k_pack_scales(sc: &[u8; 16]) -> [u8; 12] {
    std::array::from_fn(|b| {
        if b < 8 {
            (sc[b] & 15) | ((sc[b + 8] & 15) << 4)
        } else {
            (0..4).fold(0, |acc, q| {
                acc | (((sc[4 * q + b - 8] >> 4) & 3) << (2 * q))
            })
        }
    })
}

/// Value v (0..256) of a stored Q3_K block as unsigned `q + 4` (0..=7): in ggml's order, half
/// h = v / 128, bit pair j = v % 128 / 32 of byte `32h + v % 32` of `qs`, and the high bit
/// 4h + j of byte v % 32 of `hmask` (set: `+ 4`, as ggml's "subtract 4 unless set").
fn q3k_value(blk: &[u8], v: usize) -> u8 {
    q2_pair(&blk[32..96], v) | (((blk[v % 32] >> (4 * (v / 128) + v % 128 / 32)) & 1) << 2)
}

/// Q3_K blocks (32 bytes of high bits, 64 of bit pairs, 12 of packed 6-bit scales, f16 d:
/// `d·(sc - 32)·(q - 4)` per 16-value sub-block) regrouped 16 columns to a tile. Per tile block:
/// - bytes `16s + j`: column j's sub-block s scale minus 32, a signed byte;
/// - bytes `256..288`: the 16 columns' d; then padding to 320;
/// - per sub-block s at `320 + 96s`, for its values `4g + bb` (groups g = 0..4): 64 bytes
///   `[column j][bb]` holding group g's low bit pair at bits 2g, then 4 u64s, group g's high
///   bits at bit `4j + bb` (the masks `vpdpbusd`'s operand is built with).
fn pack_q3k(raw: &[u8], n: usize, k: usize) -> Vec<u8> {
    let nb = k / QK_K;
    let mut out = vec![0u8; n.div_ceil(TILE) * nb * Q3K_TILE_BYTES];
    for c in 0..n {
        let (t, j) = (c / TILE, c % TILE);
        for b in 0..nb {
            let blk = &raw[(c * nb + b) * Q3K_BYTES..][..Q3K_BYTES];
            let dst = &mut out[(t * nb + b) * Q3K_TILE_BYTES..][..Q3K_TILE_BYTES];
            let sc = q3k_scales(&blk[96..108]);
            for s in 0..16 {
                dst[16 * s + j] = sc[s].wrapping_sub(32);
                let sub = &mut dst[Q3K_QS + Q3K_SUB_BYTES * s..][..Q3K_SUB_BYTES];
                for v in 16 * s..16 * s + 16 {
                    let q = q3k_value(blk, v);
                    put_pair(sub, j, v, q & 3);
                    let bit = 4 * j + v % 4;
                    sub[64 + 8 * (v % 16 / 4) + bit / 8] |= (q >> 2) << (bit % 8);
                }
            }
            dst[Q3K_D + 2 * j..Q3K_D + 2 + 2 * j].copy_from_slice(&blk[108..110]);
        }
    }
    out
}

/// [`pack_q3k`]'s inverse: the stored blocks, bit for bit.
fn unpack_q3k(tiles: &[u8], n: usize, k: usize) -> Vec<u8> {
    untile(tiles, n, k, Kind::Q3K, |src, j, dst| {
        for v in 0..QK_K {
            let sub = &src[Q3K_QS + Q3K_SUB_BYTES * (v / 16)..][..Q3K_SUB_BYTES];
            let bit = 4 * j + v % 4;
            let hi = (sub[64 + 8 * (v % 16 / 4) + bit / 8] >> (bit % 8)) & 1;
            let (h, jj, l) = (v / 128, v % 128 / 32, v % 32);
            dst[32 + 32 * h + l] |= get_pair(sub, j, v) << (2 * jj);
            dst[l] |= hi << (4 * h + jj);
        }
        let sc: [u8; 16] = std::array::from_fn(|s| src[16 * s + j].wrapping_add(32));
        dst[96..108].copy_from_slice(&q3k_pack_scales(&sc));
        dst[108..110].copy_from_slice(&src[Q3K_D + 2 * j..Q3K_D + 2 + 2 * j]);
    })
}

/// The largest |x|, or NaN when any x is NaN. Lanes of 16 with a NaN flag so that the loop
/// vectorises (a NaN check per value kept it scalar: most of quantizing a prefill's rows);
/// max is exact, so the order of the comparisons changes nothing.
fn abs_max(xs: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let mut nan = [false; 16];
    let mut it = xs.chunks_exact(16);
    for c in &mut it {
        for ((l, n), &v) in lanes.iter_mut().zip(&mut nan).zip(c) {
            *l = l.max(v.abs());
            *n |= v.is_nan();
        }
    }
    let rest = it.remainder();
    if rest.iter().chain(&lanes).any(|v| v.is_nan()) || nan.iter().any(|&n| n) {
        return f32::NAN;
    }
    rest.iter()
        .map(|v| v.abs())
        .chain(lanes)
        .fold(0f32, f32::max)
}

/// Activation rows quantized to int8, one f32 scale per `blk` values, with the int sums per 32
/// values (Q4_K's mins are dot products with these).
struct Acts {
    m: usize,
    k: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
    sum32: Vec<i16>,
    /// Q6_K and Q3_K only: -32 (-4) times each 16 values' sum, where their dot products over
    /// the unsigned 0..=63 (0..=7) weights start.
    corr: Vec<i32>,
    /// Q2_K only: each 16 values' sum (its mins are dot products with these).
    sum16: Vec<i16>,
    /// Entries per row of `d`, `sum32`, `corr` and `sum16`.
    strides: [usize; 4],
    /// Every row's [`RowPtrs`], made once: the kernels ask for them per row and per tile, and
    /// making them there (slicing, bounds checks) was 2-4% of a prefill.
    rows: RowTable,
}

/// [`RowPtrs`] into an [`Acts`]' own vectors.
struct RowTable(Vec<RowPtrs>);

// SAFETY: the pointers point into the heap buffers of the `Acts` holding the table, which are
// filled before the table is made and never changed or reallocated afterwards; they are only
// read, from any thread, while the `Acts` lives.
unsafe impl Send for RowTable {}
unsafe impl Sync for RowTable {}

impl Acts {
    fn quantize(xs: &[f32], m: usize, k: usize, kind: Kind) -> Acts {
        let blk = kind.act_block();
        let mut a = Acts {
            m,
            k,
            qs: vec![0; m * k],
            d: vec![0.0; m * k / blk],
            sum32: vec![0; m * k / 32],
            corr: Vec::new(),
            sum16: Vec::new(),
            strides: [k / blk, k / 32, 0, 0],
            rows: RowTable(Vec::new()),
        };
        for (b, (x, q)) in xs
            .chunks_exact(blk)
            .zip(a.qs.chunks_exact_mut(blk))
            .enumerate()
        {
            let amax = abs_max(x);
            if amax == 0.0 {
                continue;
            }
            // A non-finite block gets a NaN scale, which carries NaN into the output (as a
            // float matmul would) instead of hiding it.
            if !amax.is_finite() {
                a.d[b] = f32::NAN;
                continue;
            }
            let iscale = 127.0 / amax;
            for (qi, xi) in q.iter_mut().zip(x) {
                let v = (xi * iscale).round().clamp(-127.0, 127.0);
                // SAFETY: finite (x and amax are) and within i32 after the clamp; the
                // unchecked cast vectorises where `as` (saturating) kept the loop scalar.
                *qi = unsafe { v.to_int_unchecked::<i32>() } as i8;
            }
            a.d[b] = 1.0 / iscale;
        }
        for (s, q) in a.sum32.iter_mut().zip(a.qs.chunks_exact(32)) {
            *s = q.iter().map(|&v| v as i16).sum();
        }
        // The offset of Q6_K's (q - 32) and Q3_K's (q - 4) unsigned values.
        let offset = match kind {
            Kind::Q6K => 32,
            Kind::Q3K => 4,
            _ => 0,
        };
        if offset != 0 {
            a.corr =
                a.qs.chunks_exact(16)
                    .map(|q| -offset * q.iter().map(|&v| v as i32).sum::<i32>())
                    .collect();
        }
        if kind == Kind::Q2K {
            a.sum16 =
                a.qs.chunks_exact(16)
                    .map(|q| q.iter().map(|&v| v as i16).sum())
                    .collect();
        }
        a.strides[2] = a.corr.len().checked_div(m).unwrap_or(0);
        a.strides[3] = a.sum16.len().checked_div(m).unwrap_or(0);
        a.rows = RowTable((0..m).map(|r| a.make_ptrs(r)).collect());
        a
    }

    fn row(&self, r: usize) -> &[i8] {
        &self.qs[r * self.k..(r + 1) * self.k]
    }
    /// Row `r`'s values, scales, 32-sums and pair scales as raw pointers: the kernels index
    /// them per block without bounds checks or divisions (perf found a `div` per row and block).
    #[inline(always)]
    fn ptrs(&self, r: usize) -> RowPtrs {
        self.rows.0[r]
    }

    fn make_ptrs(&self, r: usize) -> RowPtrs {
        let [d, sum32, corr, sum16] = self.strides;
        RowPtrs {
            qs: self.row(r).as_ptr(),
            d: self.d[r * d..(r + 1) * d].as_ptr(),
            sum32: self.sum32[r * sum32..(r + 1) * sum32].as_ptr(),
            corr: if self.corr.is_empty() {
                std::ptr::null()
            } else {
                self.corr[r * corr..(r + 1) * corr].as_ptr()
            },
            sum16: if self.sum16.is_empty() {
                std::ptr::null()
            } else {
                self.sum16[r * sum16..(r + 1) * sum16].as_ptr()
            },
        }
    }
    #[cfg(test)]
    fn scale(&self, r: usize, b: usize) -> f32 {
        self.d[r * self.strides[0] + b]
    }
}

/// See [`Acts::ptrs`].
#[derive(Clone, Copy)]
struct RowPtrs {
    qs: *const i8,
    d: *const f32,
    sum32: *const i16,
    corr: *const i32,
    sum16: *const i16,
}

#[cfg(test)]
fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// A Q4_K block's eight 6-bit sub-block scales and mins, unpacked from its 12 bytes.
fn q4k_scales_mins(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    const M6: u32 = 0x3f3f_3f3f;
    const M4: u32 = 0x0f0f_0f0f;
    const M2: u32 = 0x0303_0303;
    let u = |i: usize| u32::from_le_bytes([s[4 * i], s[4 * i + 1], s[4 * i + 2], s[4 * i + 3]]);
    let (u0, u1, u2) = (u(0), u(1), u(2));
    let sc_lo = u0 & M6;
    let sc_hi = (u2 & M4) | (((u0 >> 6) & M2) << 4);
    let mn_lo = u1 & M6;
    let mn_hi = ((u2 >> 4) & M4) | (((u1 >> 6) & M2) << 4);
    let join = |a: u32, b: u32| (a as u64 | (b as u64) << 32).to_le_bytes();
    (join(sc_lo, sc_hi), join(mn_lo, mn_hi))
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// Tile `t` (16 columns, see [`pack_q4k`] and the others) of a `kind` matrix for every
    /// activation row, into `out` (`[m, n]`). Each column's lane does the same operations in
    /// the same order whatever the number of rows, so a row's result does not depend on the
    /// batch.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn tile(
        kind: Kind,
        packed: &[u8],
        t: usize,
        acts: &Acts,
        out: *mut f32,
        n: usize,
    ) {
        let bytes = acts.k / kind.block().0 * kind.tile_bytes();
        let tile = &packed[t * bytes..(t + 1) * bytes];
        let out = Out {
            at: unsafe { out.add(t * TILE) },
            n,
            cols: TILE.min(n - t * TILE),
        };
        // Passes of up to 8 rows, their accumulators in registers; later passes find the tile
        // in cache. (One pass over more rows, their accumulators in memory, measured within
        // 5% either way: session 26.) One row (a decode step) gets code of its own.
        for r in (0..acts.m).step_by(8) {
            let rows = r..acts.m.min(r + 8);
            match rows.len() {
                1 => unsafe { pass::<1>(kind, tile, acts, rows, &out) },
                2..=4 => unsafe { pass::<4>(kind, tile, acts, rows, &out) },
                _ => unsafe { pass::<8>(kind, tile, acts, rows, &out) },
            }
        }
    }

    /// Where a tile's results go: its first column of row 0 in `[m, n]`, and its columns.
    struct Out {
        at: *mut f32,
        n: usize,
        cols: usize,
    }

    /// One pass of `rows` over a tile of `kind`, into `out`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn pass<const N: usize>(
        kind: Kind,
        tile: &[u8],
        acts: &Acts,
        rows: std::ops::Range<usize>,
        out: &Out,
    ) {
        let pass = &Pass::<N>::new(acts, rows.clone());
        let acc = unsafe {
            match kind {
                Kind::Q4K => q4k_rows::<N, false>(tile, pass),
                Kind::Q5K => q4k_rows::<N, true>(tile, pass),
                Kind::Q2K => q2k_rows(tile, pass),
                Kind::Q3K => q3k_rows(tile, pass),
                Kind::Q6K => q6k_rows(tile, pass),
                Kind::Q5_0 => int_rows::<N, Q5_0Block>(tile, pass),
                Kind::Q4_0 => int_rows::<N, Q4_0Block>(tile, pass),
                Kind::Q4_1 => q4_1_rows::<N, false>(tile, pass),
                Kind::Q5_1 => q4_1_rows::<N, true>(tile, pass),
                Kind::Q8_0 => int_rows::<N, Q8_0Block>(tile, pass),
                Kind::Mxfp4 => int_rows::<N, Mxfp4Block>(tile, pass),
                Kind::Iq4Nl => int_rows::<N, Iq4NlBlock>(tile, pass),
            }
        };
        for (i, r) in rows.enumerate() {
            let mut v = [0f32; TILE];
            // SAFETY: row `r`'s `cols` columns from `out.at` lie in the caller's output.
            unsafe {
                _mm512_storeu_ps(v.as_mut_ptr(), acc[i]);
                std::ptr::copy_nonoverlapping(v.as_ptr(), out.at.add(r * out.n), out.cols);
            }
        }
    }

    /// The activation rows of one pass, room for `N` (1, 4 or 8): a pass with fewer rows
    /// repeats its last row's pointers in the spare places, so every row loop runs to the
    /// constant `N` (unrolled, accumulators in registers) and [`pass`] keeps only the real
    /// rows' results.
    struct Pass<const N: usize> {
        rp: [RowPtrs; N],
    }

    impl<const N: usize> Pass<N> {
        #[inline(always)]
        fn new(acts: &Acts, rows: std::ops::Range<usize>) -> Self {
            debug_assert!(!rows.is_empty() && rows.len() <= N);
            let mut rp = [acts.ptrs(rows.end - 1); N];
            for (i, r) in rows.enumerate() {
                rp[i] = acts.ptrs(r);
            }
            Pass { rp }
        }

        /// For every row `i`, `each(i, init(row) + Σ_g w[g]·a[4g..4g + 4])` with `a = at(row)`,
        /// the sum per 32-bit lane (`vpdpbusd`). (Interleaving the rows' chains, one weight
        /// vector against every row in turn, measured the same: session 26.)
        #[inline(always)]
        unsafe fn dots<const G: usize>(
            &self,
            w: &[__m512i; G],
            at: impl Fn(&RowPtrs) -> *const i8,
            init: impl Fn(&RowPtrs) -> __m512i,
            mut each: impl FnMut(usize, __m512i),
        ) {
            let a = self.rp.each_ref().map(at);
            let mut dot = self.rp.each_ref().map(init);
            for i in 0..N {
                for (g, &w) in w.iter().enumerate() {
                    // SAFETY: the callers run with AVX-512 VNNI; each `a[i]` holds 4·G values.
                    dot[i] = unsafe { _mm512_dpbusd_epi32(dot[i], w, bcast4(a[i].add(4 * g))) };
                }
            }
            for (i, &dot) in dot.iter().enumerate() {
                each(i, dot);
            }
        }
    }

    /// Block `b` of a tile (`bytes` each). Not prefetched: a tile's blocks are read in order
    /// and each thread's tiles follow one another, which the hardware prefetcher streams. A
    /// software prefetch of the next block (37 lines at once, Q4_K) cost one row's forward of
    /// the 1.5B 48-51 ms against 38-42 without (session 25, BENCHMARKS.md); every distance
    /// tried was slower than none.
    #[inline(always)]
    unsafe fn block_at(tile: &[u8], b: usize, bytes: usize) -> *const u8 {
        unsafe { tile.as_ptr().add(b * bytes) }
    }

    /// The 4 activation values at `p` in every 32-bit lane (`vpdpbusd`'s shared operand).
    #[inline(always)]
    unsafe fn bcast4(p: *const i8) -> __m512i {
        unsafe { _mm512_set1_epi32(p.cast::<i32>().read_unaligned()) }
    }

    /// A pass against one Q4_K tile (`FIVE`: Q5_K, each group's values 16 more where their
    /// fifth bit is set): one f32 lane per column. Per 32-value sub-block, the integer sum of
    /// `q·a` (exact) times `d·sc` into the block's sum (a fused multiply-add); per block that
    /// sum times `da`, less `dmin·da` times the exact `Σ mn·a`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn q4k_rows<const N: usize, const FIVE: bool>(
        tile: &[u8],
        pass: &Pass<N>,
    ) -> [__m512; N] {
        let (bytes, sub) = match FIVE {
            true => (Q5K_TILE_BYTES, Q5K_SUB_BYTES),
            false => (Q4K_TILE_BYTES, 256),
        };
        let sixteen = _mm512_set1_epi8(16);
        let mut acc = [_mm512_setzero_ps(); N];
        let mut blk_acc = [_mm512_setzero_ps(); N];
        let low = _mm512_set1_epi8(0x0f);
        let zero = _mm512_setzero_si512();
        let k = tile.len() / bytes * QK_K;
        for b in 0..k / QK_K {
            let blk = unsafe { block_at(tile, b, bytes) };
            let d = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(blk.add(Q4K_D).cast()) });
            let dmin = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(blk.add(Q4K_DMIN).cast()) });
            for s in 0..8 {
                let w: [__m512i; 8] = std::array::from_fn(|g| {
                    let at = Q4K_QS + sub * s + 64 * (g / 2);
                    let l = unsafe { _mm512_loadu_si512(blk.add(at).cast()) };
                    let q = if g % 2 == 0 {
                        _mm512_and_si512(l, low)
                    } else {
                        _mm512_and_si512(_mm512_srli_epi16(l, 4), low)
                    };
                    if FIVE {
                        let at = Q4K_QS + sub * s + 256 + 8 * g;
                        let hi: __mmask64 = unsafe { blk.add(at).cast::<u64>().read_unaligned() };
                        _mm512_mask_add_epi8(q, hi, q, sixteen)
                    } else {
                        q
                    }
                });
                let sc = unsafe { _mm_loadu_si128(blk.add(16 * s).cast()) };
                let dsc = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(sc)));
                unsafe {
                    pass.dots(
                        &w,
                        |p| p.qs.add(b * QK_K + 32 * s),
                        |_| zero,
                        |i, dot| {
                            blk_acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), dsc, blk_acc[i])
                        },
                    )
                };
            }
            let mn: [__m512i; 4] = std::array::from_fn(|p| {
                let m = unsafe { _mm256_loadu_si256(blk.add(Q4K_MN + 32 * p).cast()) };
                _mm512_cvtepu8_epi16(m)
            });
            // Sub-blocks 2q and 2q + 1's sums as one i32: the pair `vpdpwssd` multiplies.
            unsafe {
                close_block(
                    pass,
                    b,
                    &mut acc,
                    &mut blk_acc,
                    Some((dmin, &mn, |p: &RowPtrs| p.sum32.add(8 * b))),
                )
            };
        }
        acc
    }

    /// A Q2_K or Q3_K sub-block's 4 groups of bit pairs ([`put_pair`]) as bytes 0..=3.
    #[inline(always)]
    unsafe fn pair_planes(sub: *const u8) -> [__m512i; 4] {
        // SAFETY: the callers run with AVX-512 (their target features); `sub` holds 64 bytes.
        unsafe {
            let pairs = _mm512_loadu_si512(sub.cast());
            let three = _mm512_set1_epi8(3);
            // A 16-bit shift: each byte's own pair lands in its low 2 bits.
            std::array::from_fn(|g| {
                let shift = _mm512_set1_epi16(2 * g as i16);
                _mm512_and_si512(_mm512_srlv_epi16(pairs, shift), three)
            })
        }
    }

    /// A pass against one Q2_K tile ([`pack_q2k`]): Q4_K's arithmetic per 16-value sub-block,
    /// the integer sum of `q·a` (exact) times `d·sc` into the block's sum; per block that sum
    /// times `da`, less `dmin·da` times the exact `Σ m·Σa` (`vpdpwssd` over sub-block pairs).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn q2k_rows<const N: usize>(tile: &[u8], pass: &Pass<N>) -> [__m512; N] {
        let mut acc = [_mm512_setzero_ps(); N];
        let mut blk_acc = [_mm512_setzero_ps(); N];
        let zero = _mm512_setzero_si512();
        let low = _mm512_set1_epi32(15);
        for b in 0..tile.len() / Q2K_TILE_BYTES {
            let blk = unsafe { block_at(tile, b, Q2K_TILE_BYTES) };
            let d = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(blk.add(Q2K_D).cast()) });
            let dmin = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(blk.add(Q2K_DMIN).cast()) });
            let scm =
                |s: usize| _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(blk.add(16 * s).cast()) });
            for s in 0..16 {
                let w = unsafe { pair_planes(blk.add(Q2K_QS + 64 * s)) };
                let dsc = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_and_si512(scm(s), low)));
                unsafe {
                    pass.dots(
                        &w,
                        |p| p.qs.add(b * QK_K + 16 * s),
                        |_| zero,
                        |i, dot| {
                            blk_acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), dsc, blk_acc[i])
                        },
                    )
                };
            }
            // Sub-blocks 2q and 2q + 1's mins as the 16-bit pair of each column's lane.
            let mn: [__m512i; 8] = std::array::from_fn(|q| {
                let (a, b) = (scm(2 * q), scm(2 * q + 1));
                _mm512_or_si512(
                    _mm512_srli_epi32(a, 4),
                    _mm512_slli_epi32(_mm512_srli_epi32(b, 4), 16),
                )
            });
            unsafe {
                close_block(
                    pass,
                    b,
                    &mut acc,
                    &mut blk_acc,
                    Some((dmin, &mn, |p: &RowPtrs| p.sum16.add(16 * b))),
                )
            };
        }
        acc
    }

    /// A pass against one Q3_K tile ([`pack_q3k`]): Q6_K's arithmetic on values `q + 4` in
    /// 0..=7, the dot products starting from -4·Σa.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn q3k_rows<const N: usize>(tile: &[u8], pass: &Pass<N>) -> [__m512; N] {
        let four = _mm512_set1_epi8(4);
        unsafe {
            sub16_rows(tile, pass, Q3K_TILE_BYTES, Q3K_D, |blk, s| {
                let sub = blk.add(Q3K_QS + Q3K_SUB_BYTES * s);
                let lo = pair_planes(sub);
                std::array::from_fn(|g| {
                    let hi: __mmask64 = sub.add(64 + 8 * g).cast::<u64>().read_unaligned();
                    _mm512_mask_add_epi8(lo[g], hi, lo[g], four)
                })
            })
        }
    }

    /// A pass against one Q6_K tile ([`pack_q6k`]): values `q + 32` in 0..=63, the dot
    /// products starting from -32·Σa.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn q6k_rows<const N: usize>(tile: &[u8], pass: &Pass<N>) -> [__m512; N] {
        let low = _mm512_set1_epi8(0x0f);
        let two = _mm512_set1_epi8(0x30);
        // (nibble & 15) | (bit pair << 4): the four groups' 6-bit values.
        let join = |l: __m512i, hp: __m512i| {
            _mm512_ternarylogic_epi32::<0xEA>(l, low, _mm512_and_si512(hp, two))
        };
        unsafe {
            sub16_rows(tile, pass, Q6K_TILE_BYTES, Q6K_D, |blk, s| {
                let q = blk.add(Q6K_QS + Q6K_SUB_BYTES * s);
                let (l0, l1, h) = (
                    _mm512_loadu_si512(q.cast()),
                    _mm512_loadu_si512(q.add(64).cast()),
                    _mm512_loadu_si512(q.add(128).cast()),
                );
                [
                    join(l0, _mm512_slli_epi16(h, 4)),
                    join(_mm512_srli_epi16(l0, 4), _mm512_slli_epi16(h, 2)),
                    join(l1, h),
                    join(_mm512_srli_epi16(l1, 4), _mm512_srli_epi16(h, 2)),
                ]
            })
        }
    }

    /// Q6_K's arithmetic (and Q3_K's), per tile block of `bytes` with its columns' f16 d at
    /// `d_at` and signed byte scales at the front: per 16-value sub-block `s`, the weights
    /// `read(block, s)` gives (unsigned, `q + offset`), their integer sum with the row's values
    /// started from the row's `-offset·Σa` (`corr`, exact) times `d·sc` into the block's sum (a
    /// fused multiply-add); per block that sum times `da` into the result.
    #[inline(always)]
    unsafe fn sub16_rows<const N: usize>(
        tile: &[u8],
        pass: &Pass<N>,
        bytes: usize,
        d_at: usize,
        read: impl Fn(*const u8, usize) -> [__m512i; 4],
    ) -> [__m512; N] {
        // SAFETY: the callers run with AVX-512.
        let zero = unsafe { _mm512_setzero_ps() };
        let (mut acc, mut blk_acc) = ([zero; N], [zero; N]);
        for b in 0..tile.len() / bytes {
            // SAFETY (all the intrinsics): the callers run with AVX-512 VNNI; `blk` is a whole
            // tile block and each row holds the block's values.
            unsafe {
                let blk = block_at(tile, b, bytes);
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(d_at).cast()));
                for s in 0..16 {
                    let w = read(blk, s);
                    let sc = _mm_loadu_si128(blk.add(16 * s).cast());
                    let dsc = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc)));
                    pass.dots(
                        &w,
                        |p| p.qs.add(b * QK_K + 16 * s),
                        |p| _mm512_set1_epi32(*p.corr.add(b * 16 + s)),
                        |i, dot| {
                            blk_acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), dsc, blk_acc[i])
                        },
                    );
                }
                close_block(pass, b, &mut acc, &mut blk_acc, NO_MINS);
            }
        }
        acc
    }

    /// [`close_block`] without mins (Q6_K, Q3_K).
    #[allow(clippy::type_complexity)]
    const NO_MINS: Option<(__m512, &[__m512i; 0], fn(&RowPtrs) -> *const i16)> = None;

    /// The end of a k-quant block `b` for every row: its sum times `da` into the result, less,
    /// with `mins = (dmin, mn, sums)`, `dmin·da` times the exact `Σ mn·Σa` (`vpdpwssd` over pairs
    /// of sub-blocks: `mn` holds each column's pair of mins, `sums(row)` each row's sub-block
    /// sums); the block's sum starts again from zero.
    #[inline(always)]
    unsafe fn close_block<const N: usize, const M: usize>(
        pass: &Pass<N>,
        b: usize,
        acc: &mut [__m512; N],
        blk_acc: &mut [__m512; N],
        mins: Option<(__m512, &[__m512i; M], impl Fn(&RowPtrs) -> *const i16)>,
    ) {
        for i in 0..N {
            let p = &pass.rp[i];
            // SAFETY (all the intrinsics): the callers run with AVX-512 VNNI; the row's scales
            // and sums hold block `b`'s.
            unsafe {
                let da = _mm512_set1_ps(*p.d.add(b));
                acc[i] = _mm512_fmadd_ps(blk_acc[i], da, acc[i]);
                if let Some((dmin, mn, sums)) = &mins {
                    let sums = sums(p);
                    let mut mi = _mm512_setzero_si512();
                    for (q, &mn) in mn.iter().enumerate() {
                        mi = _mm512_dpwssd_epi32(mi, mn, bcast4(sums.add(2 * q).cast()));
                    }
                    let dm = _mm512_mul_ps(*dmin, da);
                    acc[i] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(mi), dm, acc[i]);
                }
                blk_acc[i] = _mm512_setzero_ps();
            }
        }
    }

    /// The 8 groups of 4 values of a Q5_0 or Q4_1 tile block's 16 columns, as bytes 0..=15
    /// (see [`put_nibbles`]): group g in its 32-bit lane j for column j.
    #[inline(always)]
    unsafe fn nibble_planes(blk: *const u8) -> [__m512i; 8] {
        // SAFETY: the callers run with AVX-512 (their target features), `blk` is a whole
        // tile block.
        unsafe {
            let low = _mm512_set1_epi8(0x0f);
            std::array::from_fn(|g| {
                let l = _mm512_loadu_si512(blk.add(64 * (g / 2)).cast());
                if g % 2 == 0 {
                    _mm512_and_si512(l, low)
                } else {
                    _mm512_and_si512(_mm512_srli_epi16(l, 4), low)
                }
            })
        }
    }

    /// A Q5_0 or Q5_1 tile block's 8 groups of values ([`put_five_bits`]) as bytes 0..=31.
    #[inline(always)]
    unsafe fn five_bit_planes(blk: *const u8) -> [__m512i; 8] {
        // SAFETY: the callers run with AVX-512 (their target features); `blk` is a whole
        // tile block.
        unsafe {
            let nib = nibble_planes(blk);
            let sixteen = _mm512_set1_epi8(16);
            std::array::from_fn(|g| {
                let hi: __mmask64 = blk.add(256 + 8 * g).cast::<u64>().read_unaligned();
                _mm512_mask_add_epi8(nib[g], hi, nib[g], sixteen)
            })
        }
    }

    /// A tile block's 4-bit codes as nibble planes ([`nibble_planes`]), each through the
    /// 16-entry `values` table (`vpshufb`) to its int8 value plus 128 (MXFP4, IQ4_NL).
    #[inline(always)]
    unsafe fn coded_planes(blk: *const u8, values: &[i8; 16]) -> [__m512i; 8] {
        // SAFETY: the callers run with AVX-512 (their target features); `blk` is a whole
        // tile block.
        unsafe {
            let table = std::array::from_fn::<u8, 16, _>(|c| (values[c] as u8) ^ 0x80);
            let table = _mm512_broadcast_i32x4(_mm_loadu_si128(table.as_ptr().cast()));
            let codes = nibble_planes(blk);
            std::array::from_fn(|g| _mm512_shuffle_epi8(table, codes[g]))
        }
    }

    /// A pass against one Q4_1 tile ([`pack_q4_1`]; `FIVE`: Q5_1, [`pack_q5_1`]): per
    /// 32-value block, `d·da` times the exact integer sum of `q·a`, plus `m` times the row's
    /// `da · Σ a`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn q4_1_rows<const N: usize, const FIVE: bool>(
        tile: &[u8],
        pass: &Pass<N>,
    ) -> [__m512; N] {
        let mut acc = [_mm512_setzero_ps(); N];
        let zero = _mm512_setzero_si512();
        let (bytes, at_d) = match FIVE {
            true => (Q5_1_TILE_BYTES, 320),
            false => (Q4_1_TILE_BYTES, 256),
        };
        for b in 0..tile.len() / bytes {
            let blk = unsafe { block_at(tile, b, bytes) };
            let w = match FIVE {
                true => unsafe { five_bit_planes(blk) },
                false => unsafe { nibble_planes(blk) },
            };
            let d = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(blk.add(at_d).cast()) });
            let m = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(blk.add(at_d + 32).cast()) });
            unsafe {
                pass.dots(
                    &w,
                    |p| p.qs.add(b * QK8_0),
                    |_| zero,
                    |i, dot| {
                        let p = pass.rp[i];
                        let da = *p.d.add(b);
                        let dd = _mm512_mul_ps(d, _mm512_set1_ps(da));
                        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), dd, acc[i]);
                        let sa = da * f32::from(*p.sum32.add(b));
                        acc[i] = _mm512_fmadd_ps(m, _mm512_set1_ps(sa), acc[i]);
                    },
                )
            };
        }
        acc
    }

    /// How a 32-value tile block of integer weights is read: 8 vectors (groups of 4 values of
    /// the 16 columns) of `q + OFFSET` as unsigned bytes, and the 16 columns' scales.
    pub(super) trait IntBlock {
        const TILE_BYTES: usize;
        const OFFSET: i32;
        /// # Safety
        /// `blk` is a whole tile block; the caller runs with AVX-512 (its target features).
        unsafe fn read(blk: *const u8) -> ([__m512i; 8], __m512);
    }

    /// Q5_0 ([`pack_q5_0`]): the nibbles, 16 added where the fifth bit is set, so `q + 16`.
    pub(super) struct Q5_0Block;
    impl IntBlock for Q5_0Block {
        const TILE_BYTES: usize = Q5_0_TILE_BYTES;
        const OFFSET: i32 = 16;
        #[inline(always)]
        unsafe fn read(blk: *const u8) -> ([__m512i; 8], __m512) {
            unsafe {
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(320).cast()));
                (five_bit_planes(blk), d)
            }
        }
    }

    /// Q4_0 ([`pack_q4_0`]): the nibbles are `q + 8`.
    pub(super) struct Q4_0Block;
    impl IntBlock for Q4_0Block {
        const TILE_BYTES: usize = Q4_0_TILE_BYTES;
        const OFFSET: i32 = 8;
        #[inline(always)]
        unsafe fn read(blk: *const u8) -> ([__m512i; 8], __m512) {
            unsafe {
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(256).cast()));
                (nibble_planes(blk), d)
            }
        }
    }

    /// Q8_0 ([`pack_q8_0`]): stored as `q + 128`.
    pub(super) struct Q8_0Block;
    impl IntBlock for Q8_0Block {
        const TILE_BYTES: usize = Q8_0_TILE_BYTES;
        const OFFSET: i32 = 128;
        #[inline(always)]
        unsafe fn read(blk: *const u8) -> ([__m512i; 8], __m512) {
            unsafe {
                let w = std::array::from_fn(|g| _mm512_loadu_si512(blk.add(64 * g).cast()));
                (w, _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(512).cast())))
            }
        }
    }

    /// MXFP4 ([`pack_mxfp4`]): each code through a 16-entry table (`vpshufb`) to the int8 a
    /// Q8_0 block of the same weights holds, plus 128, and the scale 2^(e - 128) as ggml
    /// computes it (`e8m0_to_fp32_half`): then Q8_0's arithmetic, with its bits.
    pub(super) struct Mxfp4Block;
    impl IntBlock for Mxfp4Block {
        const TILE_BYTES: usize = MXFP4_TILE_BYTES;
        const OFFSET: i32 = 128;
        #[inline(always)]
        unsafe fn read(blk: *const u8) -> ([__m512i; 8], __m512) {
            unsafe {
                let w = coded_planes(blk, &MXFP4_VALUES);
                let e = _mm512_cvtepu8_epi32(_mm_loadu_si128(blk.add(256).cast()));
                // e >= 2: (e - 1) << 23, a normal float; e = 0 or 1: 2^-128 or 2^-127,
                // subnormal.
                let normal = _mm512_slli_epi32::<23>(_mm512_sub_epi32(e, _mm512_set1_epi32(1)));
                let tiny = _mm512_sllv_epi32(_mm512_set1_epi32(0x0020_0000), e);
                let small = _mm512_cmplt_epi32_mask(e, _mm512_set1_epi32(2));
                (
                    w,
                    _mm512_castsi512_ps(_mm512_mask_blend_epi32(small, normal, tiny)),
                )
            }
        }
    }

    /// IQ4_NL (Q4_0's tiles, [`pack_q4_0`]): each code through IQ4's table to its int8 value,
    /// plus 128, and the f16 d: then Q8_0's arithmetic.
    pub(super) struct Iq4NlBlock;
    impl IntBlock for Iq4NlBlock {
        const TILE_BYTES: usize = Q4_0_TILE_BYTES;
        const OFFSET: i32 = 128;
        #[inline(always)]
        unsafe fn read(blk: *const u8) -> ([__m512i; 8], __m512) {
            unsafe {
                let w = coded_planes(blk, &IQ4_VALUES);
                (w, _mm512_cvtph_ps(_mm256_loadu_si256(blk.add(256).cast())))
            }
        }
    }

    /// A pass against one tile of `B`'s blocks: per 32-value block, `d·da` times the exact
    /// integer sum of `q·a`, which `vpdpbusd` sums as `(q + OFFSET)·a - OFFSET·Σa`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn int_rows<const N: usize, B: IntBlock>(tile: &[u8], pass: &Pass<N>) -> [__m512; N] {
        let mut acc = [_mm512_setzero_ps(); N];
        for b in 0..tile.len() / B::TILE_BYTES {
            // SAFETY (all the intrinsics): this runs with AVX-512 (its target features); each
            // row holds the block's 32 values.
            unsafe {
                let (w, d) = B::read(block_at(tile, b, B::TILE_BYTES));
                pass.dots(
                    &w,
                    |p| p.qs.add(b * QK8_0),
                    |p| _mm512_set1_epi32(-B::OFFSET * i32::from(*p.sum32.add(b))),
                    |i, dot| {
                        let dd = _mm512_mul_ps(d, _mm512_set1_ps(*pass.rp[i].d.add(b)));
                        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), dd, acc[i]);
                    },
                )
            };
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn abs_max_is_the_scalar_fold() {
        let fold = |x: &[f32]| {
            x.iter().fold(0f32, |acc, v| {
                if acc.is_nan() || v.is_nan() {
                    f32::NAN
                } else {
                    acc.max(v.abs())
                }
            })
        };
        let mut x: Vec<f32> = (0..300).map(|i| ((i * 37) % 101) as f32 - 50.5).collect();
        x[7] = -3e38;
        for len in [0, 1, 15, 16, 17, 32, 255, 256, 300] {
            let xs = &x[..len];
            assert_eq!(
                super::abs_max(xs).to_bits(),
                fold(xs).to_bits(),
                "len {len}"
            );
        }
        for at in [0, 5, 16, 250] {
            let mut y = x.clone();
            y[at] = f32::NAN;
            assert!(super::abs_max(&y[..256]).is_nan(), "NaN at {at}");
            y[at] = f32::NEG_INFINITY;
            assert_eq!(super::abs_max(&y[..256]), f32::INFINITY);
        }
        assert_eq!(super::abs_max(&[-0.0, 0.0]), 0.0);
    }

    use super::*;
    use candle_core::quantized::QMatMul;
    use candle_core::{Module, Tensor};
    use rand::{Rng, SeedableRng};

    fn random(rows: usize, cols: usize, seed: u64) -> Tensor {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
    }

    /// The exact value the kernel must reproduce up to float rounding: the weights as stored
    /// (dequantized) times the activations as quantized, summed in f64.
    fn reference(w: &QTensor, acts: &Acts) -> Vec<f64> {
        let deq = w
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let mut out = vec![0f64; acts.m * deq.len()];
        for r in 0..acts.m {
            let a: Vec<f64> = (0..acts.k)
                .map(|i| {
                    acts.row(r)[i] as f64 * acts.scale(r, i / (acts.k / acts.strides[0])) as f64
                })
                .collect();
            for (c, wr) in deq.iter().enumerate() {
                out[r * deq.len() + c] = wr.iter().zip(&a).map(|(&w, &a)| w as f64 * a).sum();
            }
        }
        out
    }

    fn check(dtype: GgmlDType, n: usize, k: usize) {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX-512 VNNI (cpu_gemm is not used here)");
            return;
        }
        let w = Arc::new(QTensor::quantize(&random(n, k, 1), dtype).unwrap());
        let g = Gemm::for_types(&w, |_| true).expect("a supported type");
        for m in [1, 3, 9, 17] {
            let x = random(m, k, 2 + m as u64);
            let got = g.forward(&x).unwrap().to_vec2::<f32>().unwrap();
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want = reference(&w, &Acts::quantize(&xs, m, k, g.kind));
            let scale = want.iter().fold(0f64, |a, v| a.max(v.abs()));
            for r in 0..m {
                for c in 0..n {
                    let (g, e) = (got[r][c] as f64, want[r * n + c]);
                    assert!(
                        (g - e).abs() <= 1e-5 * scale,
                        "{dtype:?} m={m} [{r},{c}]: {g} vs exact {e}"
                    );
                }
            }
            // Close to candle's own quantized matmul too (its activation rounding differs).
            let theirs = QMatMul::from_arc(Arc::clone(&w))
                .unwrap()
                .forward(&x)
                .unwrap();
            let theirs = theirs.to_vec2::<f32>().unwrap();
            for r in 0..m {
                for c in 0..n {
                    let d = (got[r][c] - theirs[r][c]).abs() as f64;
                    assert!(d <= 2e-2 * scale, "{dtype:?} vs candle [{r},{c}]: {d}");
                }
            }
        }
    }

    #[test]
    fn q4k_matches_the_exact_sum() {
        check(GgmlDType::Q4K, 40, 512);
        check(GgmlDType::Q4K, 37, 768);
    }

    #[test]
    fn q6k_matches_the_exact_sum() {
        check(GgmlDType::Q6K, 37, 768);
    }

    #[test]
    fn q8_0_matches_the_exact_sum_with_an_odd_block_count() {
        check(GgmlDType::Q8_0, 33, 32 * 7);
        check(GgmlDType::Q8_0, 16, 896);
    }

    /// Several products in one pool pass give each product's own bits: kernels of several
    /// types, row counts of 1, 3, more than a pass and more than a block.
    #[test]
    fn forward_many_equals_each_forward() {
        if !available() {
            return;
        }
        let q = |dtype, n, k, seed| {
            let w = QTensor::quantize(&random(n, k, seed), dtype).unwrap();
            Gemm::for_types(&Arc::new(w), |_| true).expect("a kernel")
        };
        let x: Vec<f32> = (0..1030 * 256)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let blocks = crate::models::testing::mxfp4_blocks(
            &random(40, 256, 9)
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        );
        let gemms = [
            q(GgmlDType::Q8_0, 33, 256, 1),
            q(GgmlDType::Q4K, 48, 256, 2),
            q(GgmlDType::Q5_0, 17, 256, 3),
            Gemm::mxfp4(&blocks, 40, 256).expect("the MXFP4 kernel"),
        ];
        // 1030 rows: more than one block of `run` (1024 rows of 256).
        for m in [1, 3, 20, 1030] {
            let xs = &x[..m * 256];
            let jobs: Vec<(&Gemm, &[f32], usize)> = gemms.iter().map(|g| (g, xs, m)).collect();
            let many = Gemm::forward_many(&jobs).unwrap();
            for (g, got) in gemms.iter().zip(many) {
                let t = Tensor::from_vec(xs.to_vec(), (m, 256), &Device::Cpu).unwrap();
                let one = g
                    .forward(&t)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                assert_eq!(got, one, "{:?}, {m} rows", g.kind);
            }
        }
    }

    /// The MXFP4 kernel gives the bits of the Q8_0 kernel on the Q8_0 copy of the same weights
    /// (`gguf::mxfp4_to_q8_0`): the same int8 values, scales and order. Odd and even block
    /// counts, one column left over, one row and more rows than a pass.
    #[test]
    fn mxfp4_equals_q8_0_of_the_same_weights() {
        if !available() {
            return;
        }
        for (n, k, m) in [(33, 32 * 7, 1), (16, 896, 5), (9, 64, 20), (2, 32, 3)] {
            let x = random(n, k, 21)
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let blocks = crate::models::testing::mxfp4_blocks(&x);
            let q8 = crate::models::gguf::mxfp4_to_q8_0(&blocks).unwrap();
            let t = candle_core::quantized::ggml_file::qtensor_from_ggml(
                GgmlDType::Q8_0,
                &q8,
                vec![n, k],
                &Device::Cpu,
            )
            .unwrap();
            let q8_0 = Gemm::new(&Arc::new(t)).expect("the Q8_0 kernel");
            let mx = Gemm::mxfp4(&blocks, n, k).expect("the MXFP4 kernel");
            // The tiles give back the blocks: candle's Q8_0 copy is made from them.
            assert_eq!(*mx.qtensor().unwrap().data().unwrap(), q8[..]);
            let acts = random(m, k, 22);
            let a = q8_0.forward(&acts).unwrap().to_vec2::<f32>().unwrap();
            let b = mx.forward(&acts).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(a, b, "{n} x {k}, {m} rows");
            assert!(a.iter().flatten().any(|v| v.abs() > 1e-3));
        }
        // Blocks that do not fill the shape are refused.
        assert!(Gemm::mxfp4(&[0u8; 17], 2, 32).is_none());
    }

    #[test]
    fn iq4_equals_q8_0_of_the_same_weights() {
        use crate::models::testing::{iq4_nl_blocks, iq4_xs_blocks};
        if !available() {
            eprintln!("skipped: this CPU lacks AVX-512 VNNI");
            return;
        }
        // IQ4_NL (576: SmolLM2's width), and IQ4_XS as the loader gives it, IQ4_NL blocks.
        for (n, k, xs) in [(37, 576, false), (21, 512, true)] {
            let w = random(n, k, 4)
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let blocks = match xs {
                true => super::super::gguf::iq4_xs_to_iq4_nl(&iq4_xs_blocks(&w)).unwrap(),
                false => iq4_nl_blocks(&w),
            };
            let g = Gemm::iq4_nl(&blocks, n, k).unwrap();
            // The tiles give back the blocks: candle's Q8_0 copy is made from them.
            let q8 = Arc::new(g.qtensor().unwrap());
            let want = super::super::gguf::iq4_nl_to_q8_0(&blocks).unwrap();
            assert_eq!(*q8.data().unwrap(), want[..], "{n} x {k}");
            let q8g = Gemm::for_types(&q8, |_| true).unwrap();
            for m in [1, 3, 9, 17] {
                let x = random(m, k, 30 + m as u64);
                let a = g.forward(&x).unwrap().to_vec2::<f32>().unwrap();
                let b = q8g.forward(&x).unwrap().to_vec2::<f32>().unwrap();
                // The codes' table values are the Q8_0 copy's int8s: the same arithmetic.
                assert_eq!(a, b, "{n} x {k}, {m} rows");
                let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let exact = reference(&q8, &Acts::quantize(&xs, m, k, Kind::Q8_0));
                let scale = exact.iter().fold(0f64, |a, v| a.max(v.abs()));
                for (i, e) in exact.iter().enumerate() {
                    let got = a[i / n][i % n] as f64;
                    assert!((got - e).abs() <= 1e-5 * scale, "[{i}]: {got} vs {e}");
                }
            }
        }
        // Blocks that do not fill the shape are refused.
        assert!(Gemm::iq4_nl(&[0u8; 18], 2, 32).is_none());
    }

    #[test]
    fn every_type_unpacks_to_its_stored_blocks() {
        if !available() {
            return;
        }
        // Column counts that leave a part tile; block counts odd and even.
        for (dtype, n, k) in [
            (GgmlDType::Q4K, 35, 768),
            (GgmlDType::Q5K, 18, 512),
            (GgmlDType::Q6K, 19, 512),
            (GgmlDType::Q3K, 23, 768),
            (GgmlDType::Q2K, 29, 512),
            (GgmlDType::Q8_0, 21, 32 * 5),
            (GgmlDType::Q5_0, 33, 32 * 6),
            (GgmlDType::Q4_0, 20, 32 * 5),
            (GgmlDType::Q4_1, 17, 32 * 7),
            (GgmlDType::Q5_1, 22, 32 * 5),
        ] {
            let t = Arc::new(QTensor::quantize(&random(n, k, 5), dtype).unwrap());
            let g = Gemm::for_types(&t, |_| true).expect("a kernel for every type");
            let back = g.qtensor().unwrap();
            assert_eq!(back.dtype(), dtype);
            assert_eq!(back.shape().dims(), &[n, k]);
            assert_eq!(*back.data().unwrap(), *t.data().unwrap(), "{dtype:?}");
        }
    }

    #[test]
    fn q2k_matches_the_exact_sum() {
        check(GgmlDType::Q2K, 40, 512);
        check(GgmlDType::Q2K, 21, 768);
    }

    #[test]
    fn q3k_matches_the_exact_sum() {
        check(GgmlDType::Q3K, 40, 512);
        check(GgmlDType::Q3K, 21, 768);
    }

    #[test]
    fn q3k_scales_pack_back_like_ggml() {
        // Every 6-bit scale distinct, packed by ggml's rule (low nibbles in bytes 0..8, high
        // bit pairs in bytes 8..12), unpacked, and packed back.
        let sc: [u8; 16] = std::array::from_fn(|i| (i as u8 * 13 + 7) & 63);
        let mut s = [0u8; 12];
        for i in 0..16 {
            s[i % 8] |= (sc[i] & 15) << (4 * (i / 8));
            s[8 + i % 4] |= (sc[i] >> 4) << (2 * (i / 4));
        }
        assert_eq!(q3k_scales(&s), sc);
        assert_eq!(q3k_pack_scales(&sc), s);
    }

    #[test]
    fn q5k_matches_the_exact_sum() {
        check(GgmlDType::Q5K, 40, 512);
        check(GgmlDType::Q5K, 21, 768);
    }

    #[test]
    fn q4_0_matches_the_exact_sum() {
        check(GgmlDType::Q4_0, 35, 128 * 5);
        check(GgmlDType::Q4_0, 19, 32 * 6);
    }

    #[test]
    fn q5_0_matches_the_exact_sum() {
        check(GgmlDType::Q5_0, 35, 128 * 7);
        // Rows that are not whole 128-value groups (even block counts: candle's own kernel,
        // the comparison below, asserts that).
        check(GgmlDType::Q5_0, 19, 32 * 6);
    }

    #[test]
    fn q5_1_matches_the_exact_sum() {
        check(GgmlDType::Q5_1, 35, 576);
        check(GgmlDType::Q5_1, 18, 1536);
    }

    #[test]
    fn q4_1_matches_the_exact_sum() {
        // SmolLM2's widths: 576 and 1536.
        check(GgmlDType::Q4_1, 35, 576);
        check(GgmlDType::Q4_1, 18, 1536);
    }

    #[test]
    fn q5_0_and_q4_1_tiles_keep_every_value() {
        // 19 columns: a full tile and a tile of 3 (the rest zero).
        let (n, k) = (19, 96);
        let nb = k / QK8_0;
        // Value v of column j's block in a tile block, as the kernels read it.
        let nib = |blk: &[u8], j: usize, v: usize| {
            let (g, lo) = (v / 4, blk[64 * (v / 8) + 4 * j + v % 4]);
            (if g % 2 == 0 { lo & 15 } else { lo >> 4 }) as f32
        };
        let q5_0 = |blk: &[u8], j: usize, v: usize| {
            let bits = u64::from_le_bytes(blk[256 + 8 * (v / 4)..][..8].try_into().unwrap());
            let hi = ((bits >> (4 * j + v % 4)) & 1) as f32;
            f16_at(blk, 320 + 2 * j) * (nib(blk, j, v) + 16.0 * hi - 16.0)
        };
        let q4_1 = |blk: &[u8], j: usize, v: usize| {
            f16_at(blk, 256 + 2 * j) * nib(blk, j, v) + f16_at(blk, 288 + 2 * j)
        };
        type Pack = fn(&[u8], usize, usize) -> Vec<u8>;
        type Value<'a> = &'a dyn Fn(&[u8], usize, usize) -> f32;
        let cases: [(GgmlDType, Pack, usize, Value); 2] = [
            (GgmlDType::Q5_0, pack_q5_0, Q5_0_TILE_BYTES, &q5_0),
            (GgmlDType::Q4_1, pack_q4_1, Q4_1_TILE_BYTES, &q4_1),
        ];
        for (dtype, pack, bytes, value) in cases {
            let w = QTensor::quantize(&random(n, k, 17), dtype).unwrap();
            let deq = w
                .dequantize(&Device::Cpu)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let packed = pack(&w.data().unwrap(), n, k);
            assert_eq!(
                packed.len(),
                2 * nb * bytes,
                "{dtype:?}: the stored bytes, in tiles"
            );
            for c in 0..2 * TILE {
                let (t, j) = (c / TILE, c % TILE);
                for b in 0..nb {
                    let blk = &packed[(t * nb + b) * bytes..][..bytes];
                    for v in 0..QK8_0 {
                        let got = value(blk, j, v);
                        let want = deq.get(c).map_or(0.0, |col| col[QK8_0 * b + v]);
                        assert!(
                            (got - want).abs() <= 1e-6 * want.abs().max(1e-3),
                            "{dtype:?} column {c} block {b} value {v}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn q6k_packing_keeps_every_value() {
        // 19 columns: a full tile and a tile of 3 (the rest zero).
        let (n, k) = (19, 512);
        let w = QTensor::quantize(&random(n, k, 13), GgmlDType::Q6K).unwrap();
        let deq = w
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let packed = pack_q6k(&w.data().unwrap(), n, k);
        let nb = k / QK_K;
        assert_eq!(
            packed.len(),
            2 * nb * Q6K_TILE_BYTES,
            "the stored size, padded to tiles"
        );
        for c in 0..2 * TILE {
            let (t, j) = (c / TILE, c % TILE);
            for b in 0..nb {
                let blk = &packed[(t * nb + b) * Q6K_TILE_BYTES..][..Q6K_TILE_BYTES];
                let d = f16_at(blk, 256 + 2 * j);
                for v in 0..QK_K {
                    let (s, g, bb) = (v / 16, v % 16 / 4, v % 4);
                    let sub = &blk[320 + 192 * s..][..192];
                    let lo = sub[64 * (g / 2) + 4 * j + bb];
                    let nib = if g % 2 == 0 { lo & 15 } else { lo >> 4 };
                    let hi = (sub[128 + 4 * j + bb] >> (2 * g)) & 3;
                    let q = (nib | (hi << 4)) as f32 - 32.0;
                    let got = d * (blk[16 * s + j] as i8 as f32) * q;
                    let want = deq.get(c).map_or(0.0, |col| col[QK_K * b + v]);
                    assert!(
                        (got - want).abs() <= 1e-6 * want.abs(),
                        "column {c} block {b} value {v}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_row_does_not_depend_on_the_batch() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX-512 VNNI");
            return;
        }
        for dtype in [
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
            GgmlDType::Q8_0,
            GgmlDType::Q5_0,
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_1,
        ] {
            // Big enough to take the thread pool.
            let w = Arc::new(QTensor::quantize(&random(300, 1024, 7), dtype).unwrap());
            let g = Gemm::for_types(&w, |_| true).unwrap();
            let x = random(13, 1024, 8);
            let all = g.forward(&x).unwrap().to_vec2::<f32>().unwrap();
            for r in [0, 5, 12] {
                let one = g.forward(&x.narrow(0, r, 1).unwrap()).unwrap();
                assert_eq!(
                    one.to_vec2::<f32>().unwrap()[0],
                    all[r],
                    "{dtype:?} row {r}"
                );
            }
        }
    }

    #[test]
    fn a_column_does_not_depend_on_its_neighbours() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX-512 VNNI");
            return;
        }
        // Columns 1..4 are lanes 1..4 of the whole matrix's first tile and lanes 0..3 of the
        // part's (rows 1..4 of it).
        for (dtype, row_bytes) in [
            (GgmlDType::Q4K, 512 / QK_K * Q4K_BYTES),
            (GgmlDType::Q5K, 512 / QK_K * Q5K_BYTES),
            (GgmlDType::Q6K, 512 / QK_K * Q6K_BYTES),
            (GgmlDType::Q3K, 512 / QK_K * Q3K_BYTES),
            (GgmlDType::Q2K, 512 / QK_K * Q2K_BYTES),
            (GgmlDType::Q8_0, 512 / QK8_0 * Q8_0_BYTES),
            (GgmlDType::Q5_0, 512 / QK8_0 * Q5_0_BYTES),
            (GgmlDType::Q4_0, 512 / QK8_0 * Q4_0_BYTES),
            (GgmlDType::Q4_1, 512 / QK8_0 * Q4_1_BYTES),
            (GgmlDType::Q5_1, 512 / QK8_0 * Q5_1_BYTES),
        ] {
            let w = Arc::new(QTensor::quantize(&random(5, 512, 11), dtype).unwrap());
            let part = w.data().unwrap()[row_bytes..4 * row_bytes].to_vec();
            let st = candle_core::quantized::QStorage::from_data(
                std::borrow::Cow::Owned(part),
                &Device::Cpu,
                dtype,
            )
            .unwrap();
            let sub = Arc::new(QTensor::new(st, (3, 512)).unwrap());
            let (g, gs) = (
                Gemm::for_types(&w, |_| true).unwrap(),
                Gemm::for_types(&sub, |_| true).unwrap(),
            );
            for m in [1, 4] {
                let x = random(m, 512, 12);
                let all = g.forward(&x).unwrap().to_vec2::<f32>().unwrap();
                let some = gs.forward(&x).unwrap().to_vec2::<f32>().unwrap();
                for r in 0..m {
                    assert_eq!(all[r][1..4], some[r][..], "{dtype:?} m={m} row {r}");
                }
            }
        }
    }

    #[test]
    fn q4k_scales_unpack_like_ggml() {
        // Every 6-bit field set to a distinct value, packed as ggml packs them.
        let (sc, mn): ([u8; 8], [u8; 8]) = (
            std::array::from_fn(|i| (i as u8 * 7 + 3) & 63),
            std::array::from_fn(|i| (i as u8 * 11 + 5) & 63),
        );
        let mut s = [0u8; 12];
        for j in 0..4 {
            s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
            s[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
            s[j + 8] = (sc[j + 4] & 0x0f) | ((mn[j + 4] & 0x0f) << 4);
        }
        assert_eq!(q4k_scales_mins(&s), (sc, mn));
    }

    #[test]
    fn other_types_and_a_zero_row_are_handled() {
        let w = Arc::new(QTensor::quantize(&random(8, 32, 3), GgmlDType::F16).unwrap());
        assert!(
            Gemm::for_types(&w, |_| true).is_none(),
            "F16 stays on candle's kernel"
        );
        if !available() {
            return;
        }
        let w = Arc::new(QTensor::quantize(&random(16, 256, 3), GgmlDType::Q4K).unwrap());
        let g = Gemm::for_types(&w, |_| true).unwrap();
        let zeros = Tensor::zeros((2, 256), candle_core::DType::F32, &Device::Cpu).unwrap();
        let y = g.forward(&zeros).unwrap().to_vec2::<f32>().unwrap();
        assert!(y.iter().flatten().all(|&v| v == 0.0));
        assert!(
            g.forward(&random(1, 128, 4)).is_err(),
            "a wrong width is an error"
        );
    }
}
