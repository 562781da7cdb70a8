//! verdict's own CPU matmul for GGUF's Q4_K, Q6_K and Q8_0 weights (x86-64 with AVX-512 VNNI).
//!
//! Why not candle's: its x86 fast path repacks Q4_K into tiles with unpacked f32 scales (33%
//! more bytes to stream per token) and runs Q6_K through a compact kernel for one row but
//! through 52%-larger tiles for several, which round differently; verdict had to feed single
//! rows as two to keep a k-token verification forward bit-identical to k single-token forwards.
//! Decoding is bound by the bytes streamed, so this kernel reads the GGUF blocks as stored (no
//! copy, no repack) and computes every output row with the same instructions in the same order
//! whatever the number of rows: batch size never changes a result.
//!
//! The activations are quantized per row like llama.cpp's: int8 with one f32 scale per 256
//! values (Q8_K, for the k-quants, with the sums per 32 that fold Q4_K's mins in) or per 32
//! values (for Q8_0). The integer dot products use `vpmaddubsw` + `vpdpwssd` (the k-quants:
//! the block scales multiply 16-bit pair sums in the same instruction) and `vpdpbusd` (Q8_0,
//! with the weight's sign moved onto the activation). Q5_0 is widened to Q8_0 at load
//! (`requant.rs`): a Q5_0 kernel reading the 22-byte blocks as stored measured slower here
//! than this one on the widened 34 (its per-32-value work dominates, not its bytes).
//!
//! `Gemm::new` returns `None` where this does not apply (another type, another CPU, the GPU, a
//! type left to candle by default (Q4_K: see `DEFAULT_TYPES`), or `VERDICT_CPU_GEMM=0` for A/B
//! measurements; `VERDICT_CPU_GEMM=q4k,q6k,q8_0` picks the types), and the caller keeps
//! candle's kernel.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Result, Tensor};
use half::f16;
use std::sync::Arc;

const QK_K: usize = 256;
const Q4K_BYTES: usize = 144;
const Q6K_BYTES: usize = 210;
const QK8_0: usize = 32;
const Q8_0_BYTES: usize = 34;
/// Output columns (weight rows) per work item handed to the thread pool.
const COLS_PER_ITEM: usize = 16;
/// Activation rows computed together against one unpacked weight block: each pass streams the
/// weights once, so this covers a verification forward at the default k_max of 16 (17 rows).
const ROWS_PER_PASS: usize = 17;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Q4K,
    Q6K,
    Q8_0,
}

/// A quantized `[n, k]` weight that this module multiplies (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct Gemm {
    w: Arc<QTensor>,
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
        Kind::Q6K => "q6k",
        Kind::Q8_0 => "q8_0",
    };
    match std::env::var("VERDICT_CPU_GEMM") {
        Ok(list) if list != "1" => list.split(',').any(|s| s.trim().eq_ignore_ascii_case(name)),
        _ => DEFAULT_TYPES.contains(&name),
    }
}

/// Q4_K stays on candle's 16-row tiles by default. Measured in one session on the 1.5B
/// (BENCHMARKS.md): this kernel decodes one row about as fast as the tiles (it streams 25% fewer
/// bytes but does more work per byte), and a 9-row verification forward took 259-353 ms
/// against the tiles' 195-237. Q6_K (compact here, 52%-larger tiles there) and Q8_0 win at both.
/// Q4_K's kernel stays for `VERDICT_CPU_GEMM=q4k,q6k,q8_0` and as the base for a multi-column
/// version.
const DEFAULT_TYPES: &[&str] = &["q6k", "q8_0"];

impl Gemm {
    /// `None` unless `w` is a CPU Q4_K, Q6_K or Q8_0 matrix and [`available`] holds.
    pub(crate) fn new(w: &Arc<QTensor>) -> Option<Gemm> {
        Self::for_types(w, enabled)
    }

    /// As [`Gemm::new`], for the types `take` accepts (tests run every kernel).
    fn for_types(w: &Arc<QTensor>, take: impl Fn(Kind) -> bool) -> Option<Gemm> {
        if !available() || !matches!(w.device(), Device::Cpu) {
            return None;
        }
        let kind = match w.dtype() {
            GgmlDType::Q4K => Kind::Q4K,
            GgmlDType::Q6K => Kind::Q6K,
            GgmlDType::Q8_0 => Kind::Q8_0,
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
        Some(Gemm {
            w: Arc::clone(w),
            kind,
            n,
            k,
        })
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
        let data = self.w.data()?;
        self.run(&data, &xs, m, &mut out);
        Tensor::from_vec(out, (m, self.n), &Device::Cpu)
    }

    fn run(&self, w: &[u8], xs: &[f32], m: usize, out: &mut [f32]) {
        let acts = Acts::quantize(xs, m, self.k, self.kind.block().0, self.kind == Kind::Q4K);
        let n = self.n;
        let groups = n.div_ceil(COLS_PER_ITEM);
        let out_ptr = out.as_mut_ptr() as usize;
        let work = |items: std::ops::Range<usize>| {
            for g in items {
                let cols = g * COLS_PER_ITEM..n.min((g + 1) * COLS_PER_ITEM);
                // SAFETY: each work item writes only its own columns of `out`.
                unsafe { self.columns(w, &acts, cols, out_ptr as *mut f32) }
            }
        };
        if m * n * self.k < 1 << 16 {
            work(0..groups);
        } else {
            candle_core::utils::barrier_pool().execute_chunked(groups, work);
        }
    }

    /// Output columns `cols` for every row. `out` is `[m, n]`.
    unsafe fn columns(&self, w: &[u8], acts: &Acts, cols: std::ops::Range<usize>, out: *mut f32) {
        let (blk, bytes) = self.kind.block();
        let row_bytes = self.k / blk * bytes;
        let mut sums = [0f32; ROWS_PER_PASS];
        for r0 in (0..acts.m).step_by(ROWS_PER_PASS) {
            let rows = r0..acts.m.min(r0 + ROWS_PER_PASS);
            for c in cols.clone() {
                let wr = &w[c * row_bytes..(c + 1) * row_bytes];
                let s = &mut sums[..rows.len()];
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    match self.kind {
                        Kind::Q4K => x86::q4k(wr, acts, rows.clone(), s),
                        Kind::Q6K => x86::q6k(wr, acts, rows.clone(), s),
                        Kind::Q8_0 => x86::q8_0(wr, acts, rows.clone(), s),
                    }
                }
                for (i, r) in rows.clone().enumerate() {
                    unsafe { *out.add(r * self.n + c) = s[i] };
                }
            }
        }
    }
}

impl Kind {
    /// (values per block, bytes per block)
    fn block(self) -> (usize, usize) {
        match self {
            Kind::Q4K => (QK_K, Q4K_BYTES),
            Kind::Q6K => (QK_K, Q6K_BYTES),
            Kind::Q8_0 => (QK8_0, Q8_0_BYTES),
        }
    }
}

/// Activation rows quantized to int8, one f32 scale per `blk` values, with the int sums per 32
/// values (Q4_K's mins are dot products with these).
struct Acts {
    m: usize,
    k: usize,
    blk: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
    sum32: Vec<i16>,
    /// Per 32-value scales only: each pair of blocks' two scales, each repeated over the 8
    /// lanes that `vpdpbusd` sums that block into (the Q8_0 kernel's one load per pair).
    lanes: Vec<f32>,
}

impl Acts {
    /// `q4k_order`: store each 128 values' 2nd and 3rd 32-value groups swapped, the order in
    /// which the Q4_K kernel unpacks 64 bytes of nibbles (the test reference's `Acts::position`).
    fn quantize(xs: &[f32], m: usize, k: usize, blk: usize, q4k_order: bool) -> Acts {
        let mut a = Acts {
            m,
            k,
            blk,
            qs: vec![0; m * k],
            d: vec![0.0; m * k / blk],
            sum32: vec![0; m * k / 32],
            lanes: Vec::new(),
        };
        for (b, (x, q)) in xs
            .chunks_exact(blk)
            .zip(a.qs.chunks_exact_mut(blk))
            .enumerate()
        {
            let amax = x.iter().fold(0f32, |acc, v| {
                if acc.is_nan() || v.is_nan() {
                    f32::NAN
                } else {
                    acc.max(v.abs())
                }
            });
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
                *qi = (xi * iscale).round().clamp(-127.0, 127.0) as i8;
            }
            a.d[b] = 1.0 / iscale;
        }
        if blk == 32 {
            let pairs = k / 64;
            a.lanes = vec![0.0; m * pairs * 16];
            for r in 0..m {
                for p in 0..pairs {
                    let dst = &mut a.lanes[(r * pairs + p) * 16..][..16];
                    dst[..8].fill(a.d[r * (k / 32) + 2 * p]);
                    dst[8..].fill(a.d[r * (k / 32) + 2 * p + 1]);
                }
            }
        }
        // Sums per natural 32-group; the swap moves whole groups, so they are taken first.
        for (s, q) in a.sum32.iter_mut().zip(a.qs.chunks_exact(32)) {
            *s = q.iter().map(|&v| v as i16).sum();
        }
        if q4k_order {
            for g in a.qs.chunks_exact_mut(128) {
                let (first, second) = g.split_at_mut(64);
                first[32..].swap_with_slice(&mut second[..32]);
            }
        }
        a
    }

    /// Where natural value `i` of a row is stored: itself, or with bits 5 and 6 of the index
    /// swapped in Q4_K order (an involution).
    #[cfg(test)]
    fn position(i: usize, q4k_order: bool) -> usize {
        if q4k_order {
            (i & !0x60) | ((i & 0x20) << 1) | ((i & 0x40) >> 1)
        } else {
            i
        }
    }

    fn row(&self, r: usize) -> &[i8] {
        &self.qs[r * self.k..(r + 1) * self.k]
    }
    fn scale(&self, r: usize, b: usize) -> f32 {
        self.d[r * (self.k / self.blk) + b]
    }
    fn pair_scales(&self, r: usize, p: usize) -> &[f32] {
        &self.lanes[(r * (self.k / 64) + p) * 16..][..16]
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// A Q4_K block's eight 6-bit sub-block scales and mins, unpacked from its 12 bytes
/// (branch-free, on three u32 words).
#[inline(always)]
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

    /// Bytes ahead of the block being read that the kernels prefetch: the next column's
    /// blocks follow in memory, and without it the loads stall (perf: ~25% of q4k's samples
    /// on the instruction after each weight load).
    const PREFETCH: usize = 1024;

    #[inline(always)]
    unsafe fn prefetch(p: *const u8, bytes: usize) {
        let mut o = 0;
        while o < bytes {
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH + o).cast()) };
            o += 64;
        }
    }

    /// One Q4_K weight row against activation rows `rows` (in Q4_K order); results into
    /// `out[i]` for row i.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn q4k(w: &[u8], acts: &Acts, rows: std::ops::Range<usize>, out: &mut [f32]) {
        let nb = acts.k / QK_K;
        let mut acc = [_mm512_setzero_ps(); ROWS_PER_PASS];
        let mut mins = [_mm_setzero_ps(); ROWS_PER_PASS];
        let low = _mm512_set1_epi8(0x0f);
        // 64 bytes of nibbles h hold sub-blocks 4h (low nibbles of the first 32 bytes), 4h+2
        // (low, last 32), 4h+1 and 4h+3 (high): the i16 scale lanes for each of the four.
        let idx: [__m512i; 4] = std::array::from_fn(|v| {
            let (h, hi) = (v / 2, v % 2);
            let lanes: [i16; 32] = std::array::from_fn(|i| (4 * h + hi + 2 * (i / 16)) as i16);
            unsafe { _mm512_loadu_si512(lanes.as_ptr().cast()) }
        });
        for sb in 0..nb {
            let blk = &w[sb * Q4K_BYTES..(sb + 1) * Q4K_BYTES];
            unsafe { prefetch(blk.as_ptr(), Q4K_BYTES) };
            let d = f16_at(blk, 0);
            let dmin = f16_at(blk, 2);
            let (sc, mn) = q4k_scales_mins(&blk[4..16]);
            let sc16 = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_set_epi64x(
                0,
                u64::from_le_bytes(sc) as i64,
            )));
            let mn16 = _mm_cvtepu8_epi16(_mm_set_epi64x(0, u64::from_le_bytes(mn) as i64));
            let mut wv = [_mm512_setzero_si512(); 4];
            for h in 0..2 {
                let x = unsafe { _mm512_loadu_si512(blk.as_ptr().add(16 + 64 * h).cast()) };
                wv[2 * h] = _mm512_and_si512(x, low);
                wv[2 * h + 1] = _mm512_and_si512(_mm512_srli_epi16(x, 4), low);
            }
            let sv: [__m512i; 4] = std::array::from_fn(|v| _mm512_permutexvar_epi16(idx[v], sc16));
            for (i, r) in rows.clone().enumerate() {
                let a = &acts.row(r)[sb * QK_K..(sb + 1) * QK_K];
                let mut dot = _mm512_setzero_si512();
                for v in 0..4 {
                    let av = unsafe { _mm512_loadu_si512(a.as_ptr().add(64 * v).cast()) };
                    dot = _mm512_dpwssd_epi32(dot, _mm512_maddubs_epi16(wv[v], av), sv[v]);
                }
                let da = acts.scale(r, sb);
                acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(d * da), acc[i]);
                let s32 = &acts.sum32[(r * acts.k + sb * QK_K) / 32..][..8];
                let b = unsafe { _mm_loadu_si128(s32.as_ptr().cast()) };
                let m = _mm_cvtepi32_ps(_mm_madd_epi16(mn16, b));
                mins[i] = _mm_fmadd_ps(m, _mm_set1_ps(dmin * da), mins[i]);
            }
        }
        for (i, o) in out.iter_mut().enumerate() {
            let m = mins[i];
            let m = _mm_add_ps(m, _mm_movehl_ps(m, m));
            let m = _mm_add_ss(m, _mm_movehdup_ps(m));
            *o = _mm512_reduce_add_ps(acc[i]) - _mm_cvtss_f32(m);
        }
    }

    /// One Q6_K weight row against activation rows `rows`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn q6k(w: &[u8], acts: &Acts, rows: std::ops::Range<usize>, out: &mut [f32]) {
        let nb = acts.k / QK_K;
        let mut acc = [_mm512_setzero_ps(); ROWS_PER_PASS];
        let low = _mm512_set1_epi8(0x0f);
        let two = _mm512_set1_epi8(0x03);
        let thirty_two = _mm512_set1_epi8(32);
        // Chunk c (64 values) takes scales 4c..4c+3, each over 8 of its 32 i16 pair sums.
        let idx: [__m512i; 4] = std::array::from_fn(|c| {
            let lanes: [i16; 32] = std::array::from_fn(|i| (4 * c + i / 8) as i16);
            unsafe { _mm512_loadu_si512(lanes.as_ptr().cast()) }
        });
        for sb in 0..nb {
            let blk = &w[sb * Q6K_BYTES..(sb + 1) * Q6K_BYTES];
            unsafe { prefetch(blk.as_ptr(), Q6K_BYTES) };
            let d = f16_at(blk, 208);
            let sc16 =
                unsafe { _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.as_ptr().add(192).cast())) };
            let sc512 = _mm512_castsi256_si512(sc16);
            let mut wv = [_mm512_setzero_si512(); 4];
            for h in 0..2 {
                let l = unsafe { _mm512_loadu_si512(blk.as_ptr().add(64 * h).cast()) };
                let qh = unsafe { _mm256_loadu_si256(blk.as_ptr().add(128 + 32 * h).cast()) };
                // bytes 0..32: qh (bits 0-1 for values 0..32), bytes 32..64: qh >> 2 (32..64)
                let hb =
                    _mm512_inserti64x4(_mm512_castsi256_si512(qh), _mm256_srli_epi16(qh, 2), 1);
                let hi0 = _mm512_slli_epi16(_mm512_and_si512(hb, two), 4);
                let hi1 = _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(hb, 4), two), 4);
                wv[2 * h] = _mm512_or_si512(_mm512_and_si512(l, low), hi0);
                wv[2 * h + 1] =
                    _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l, 4), low), hi1);
            }
            let sv: [__m512i; 4] = std::array::from_fn(|c| _mm512_permutexvar_epi16(idx[c], sc512));
            for (i, r) in rows.clone().enumerate() {
                let a = &acts.row(r)[sb * QK_K..(sb + 1) * QK_K];
                let mut dot = _mm512_setzero_si512();
                for c in 0..4 {
                    let av = unsafe { _mm512_loadu_si512(a.as_ptr().add(64 * c).cast()) };
                    // The stored 6-bit values are q + 32: sum (q + 32) a - 32 a over each pair.
                    let p = _mm512_sub_epi16(
                        _mm512_maddubs_epi16(wv[c], av),
                        _mm512_maddubs_epi16(thirty_two, av),
                    );
                    dot = _mm512_dpwssd_epi32(dot, p, sv[c]);
                }
                let s = _mm512_set1_ps(d * acts.scale(r, sb));
                acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), s, acc[i]);
            }
        }
        for (i, o) in out.iter_mut().enumerate() {
            *o = _mm512_reduce_add_ps(acc[i]);
        }
    }

    /// One Q8_0 weight row against activation rows `rows` (quantized per 32).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn q8_0(
        w: &[u8],
        acts: &Acts,
        rows: std::ops::Range<usize>,
        out: &mut [f32],
    ) {
        let nb = acts.k / QK8_0;
        let mut acc = [_mm512_setzero_ps(); ROWS_PER_PASS];
        let mut tail = [0f32; ROWS_PER_PASS];
        let zero = _mm512_setzero_si512();
        for p in 0..nb / 2 {
            let b0 = &w[2 * p * Q8_0_BYTES..];
            let b1 = &w[(2 * p + 1) * Q8_0_BYTES..];
            unsafe { prefetch(b0.as_ptr(), 2 * Q8_0_BYTES) };
            let q = unsafe {
                _mm512_inserti64x4(
                    _mm512_castsi256_si512(_mm256_loadu_si256(b0.as_ptr().add(2).cast())),
                    _mm256_loadu_si256(b1.as_ptr().add(2).cast()),
                    1,
                )
            };
            let dw = _mm512_mask_blend_ps(
                0xff00,
                _mm512_set1_ps(f16_at(b0, 0)),
                _mm512_set1_ps(f16_at(b1, 0)),
            );
            // |w| as u8 against sign(w) * a: the same products, in vpdpbusd's operand types.
            let absq = _mm512_abs_epi8(q);
            let neg = _mm512_movepi8_mask(q);
            for (i, r) in rows.clone().enumerate() {
                let a = unsafe { _mm512_loadu_si512(acts.row(r).as_ptr().add(64 * p).cast()) };
                let a = _mm512_mask_sub_epi8(a, neg, zero, a);
                let dp = _mm512_dpbusd_epi32(zero, absq, a);
                let da = unsafe { _mm512_loadu_ps(acts.pair_scales(r, p).as_ptr()) };
                let x = _mm512_mul_ps(_mm512_cvtepi32_ps(dp), da);
                acc[i] = _mm512_fmadd_ps(x, dw, acc[i]);
            }
        }
        if nb % 2 == 1 {
            let b = nb - 1;
            let blk = &w[b * Q8_0_BYTES..];
            let q = unsafe { _mm256_loadu_si256(blk.as_ptr().add(2).cast()) };
            let d = f16_at(blk, 0);
            let absq = _mm256_abs_epi8(q);
            let neg = _mm256_movepi8_mask(q);
            for (i, r) in rows.clone().enumerate() {
                let a = unsafe { _mm256_loadu_si256(acts.row(r).as_ptr().add(32 * b).cast()) };
                let a = _mm256_mask_sub_epi8(a, neg, _mm256_setzero_si256(), a);
                let dp = _mm256_dpbusd_epi32(_mm256_setzero_si256(), absq, a);
                let v = _mm512_castsi256_si512(dp);
                let isum = _mm512_reduce_add_epi32(_mm512_maskz_mov_epi32(0x00ff, v));
                tail[i] = d * acts.scale(r, b) * isum as f32;
            }
        }
        for (i, o) in out.iter_mut().enumerate() {
            *o = _mm512_reduce_add_ps(acc[i]) + tail[i];
        }
    }
}

#[cfg(test)]
mod tests {
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
    fn reference(w: &QTensor, acts: &Acts, q4k_order: bool) -> Vec<f64> {
        let deq = w
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let mut out = vec![0f64; acts.m * deq.len()];
        for r in 0..acts.m {
            let a: Vec<f64> = (0..acts.k)
                .map(|i| {
                    acts.row(r)[Acts::position(i, q4k_order)] as f64
                        * acts.scale(r, i / acts.blk) as f64
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
            let q4k = g.kind == Kind::Q4K;
            let want = reference(&w, &Acts::quantize(&xs, m, k, g.kind.block().0, q4k), q4k);
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

    #[test]
    fn a_row_does_not_depend_on_the_batch() {
        if !available() {
            eprintln!("skipped: this CPU lacks AVX-512 VNNI");
            return;
        }
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K, GgmlDType::Q8_0] {
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
        let w = Arc::new(QTensor::quantize(&random(8, 64, 3), GgmlDType::Q4_1).unwrap());
        assert!(
            Gemm::for_types(&w, |_| true).is_none(),
            "Q4_1 stays on candle's kernel"
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
