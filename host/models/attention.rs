//! Causal grouped-query attention over the KV cache.
//!
//! On the CPU this is a custom op with one fixed summation order per (head, row): a row's result
//! does not depend on how many rows are computed together. Combined with row-wise matmuls that is
//! what makes a k-token forward produce the same logits as k single-token forwards, bit for bit
//! (a general gemm picks different kernels and blockings for m = 1 and m = 8, and the int8
//! activation quantization of the next matmul turns those 1e-7 differences into visible ones).
//! It also reads K/V straight from the cache buffer (strided, no copy, no repeat_kv) and writes
//! `[rows, heads * head_dim]`, the layout the output projection wants.
//!
//! Other devices use the same math composed from tensor ops.

use super::kv_cache::{Q8_BLOCK, Q8_BLOCK_BYTES};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

/// Attention of `n` new rows at positions `pos..pos + n` against `pos + n` cached keys.
///
/// A tensor-parallel shard holds query heads `head_offset..head_offset + n_heads` of the model
/// and the kv heads they read (`group` query heads per kv head in the whole model): local head
/// h reads local kv head `(head_offset + h) / group - head_offset / group`. Unsharded:
/// `head_offset = 0`, `group = n_heads / n_kv_heads`.
#[derive(Debug, Clone)]
pub(crate) struct CausalAttention {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub group: usize,
    pub head_offset: usize,
    /// Sliding-window attention (Gemma 3's local layers): a row at position p reads keys
    /// `p - window + 1 ..= p` only. 0: every earlier key.
    pub window: usize,
    /// Gemma 2's soft cap on the scaled scores, `c * tanh(s / c)`. 0: none.
    pub softcap: f32,
    /// gpt-oss's attention sinks: per query head of the whole model (index `head_offset + h`),
    /// a score that joins the softmax's denominator and attends to nothing, so a row may give
    /// its keys less than all of its weight (ggml's `soft_max_add_sinks`).
    pub sinks: Option<std::sync::Arc<[f32]>>,
}

impl CausalAttention {
    /// Local kv head of local query head `h`.
    #[inline]
    fn kv_of(&self, h: usize) -> usize {
        (self.head_offset + h) / self.group - self.head_offset / self.group
    }

    /// A scaled score after the soft cap, if any.
    #[inline]
    fn capped(&self, s: f32) -> f32 {
        if self.softcap > 0.0 {
            self.softcap * (s / self.softcap).tanh()
        } else {
            s
        }
    }

    /// Whether the kv heads match the query heads this op holds, and the sinks the model's
    /// heads.
    fn consistent(&self) -> bool {
        self.group > 0
            && self.n_heads > 0
            && self.n_kv_heads == self.kv_of(self.n_heads - 1) + 1
            && self
                .sinks
                .as_ref()
                .is_none_or(|s| s.len() >= self.head_offset + self.n_heads)
    }

    /// The sink of local query head `h`, if the model has sinks.
    #[inline]
    fn sink(&self, h: usize) -> Option<f32> {
        self.sinks.as_ref().map(|s| s[self.head_offset + h])
    }
}

impl CausalAttention {
    /// `q`: `[heads, n, head_dim]` contiguous; `k`, `v`: `[kv_heads, len, head_dim]` views of
    /// the cache (`len = pos + n`). Returns `[n, heads * head_dim]`.
    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
        if q.device().is_cpu() {
            q.apply_op3_no_bwd(k, v, self)
        } else {
            self.forward_tensors(q, k, v)
        }
    }

    /// The same computation from tensor ops (any device).
    fn forward_tensors(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> candle_core::Result<Tensor> {
        if k.dtype() == candle_core::DType::U8 {
            candle_core::bail!("attention: a q8_0 KV cache is read on the CPU only");
        }
        // An f16 / bf16 cache is read as f32, as the CPU op reads it.
        let (k, v) = (&k.to_dtype(q.dtype())?, &v.to_dtype(q.dtype())?);
        let (nh, n, hd) = q.dims3()?;
        let l = k.dim(1)?;
        let (nkv, group) = (self.n_kv_heads, self.group);
        if !self.head_offset.is_multiple_of(group) || nh != nkv * group {
            candle_core::bail!(
                "attention: a shard whose query heads split a kv group runs on the CPU only ({self:?})"
            );
        }
        // The query heads sharing one kv head become rows of one matmul.
        let q = (q.reshape((nkv, group * n, hd))? * self.scale as f64)?;
        let mut att = q.matmul(&k.t()?)?; // [nkv, group*n, l]
        if self.softcap > 0.0 {
            let c = self.softcap as f64;
            att = ((att / c)?.tanh()? * c)?;
        }
        let window = self.window;
        let att = if n > 1 || (window > 0 && l > window) {
            let pos = l - n;
            let seen =
                move |i: usize, j: usize| j <= pos + i && (window == 0 || pos + i - j < window);
            let mask: Vec<f32> = (0..n)
                .flat_map(|i| (0..l).map(move |j| if seen(i, j) { 0.0 } else { f32::NEG_INFINITY }))
                .collect();
            let mask = Tensor::from_vec(mask, (n, l), q.device())?;
            att.reshape((nkv, group, n, l))?
                .broadcast_add(&mask)?
                .reshape((nkv, group * n, l))?
        } else {
            att
        };
        let att = match &self.sinks {
            None => candle_nn::ops::softmax_last_dim(&att)?,
            // One more column per row, its head's sink, in the softmax and then dropped. Row r
            // of kv head g is query head g * group + r / n.
            Some(_) if !self.consistent() => {
                candle_core::bail!("attention: sinks do not cover the heads of {self:?}")
            }
            Some(_) => {
                let col: Vec<f32> = (0..nkv * group * n)
                    .map(|i| {
                        let (g, r) = (i / (group * n), i % (group * n));
                        self.sink(g * group + r / n).unwrap_or(0.0)
                    })
                    .collect();
                let col = Tensor::from_vec(col, (nkv, group * n, 1), q.device())?
                    .to_dtype(att.dtype())?;
                candle_nn::ops::softmax_last_dim(&Tensor::cat(&[&att, &col], 2)?)?
                    .narrow(2, 0, l)?
            }
        };
        att.matmul(&v.contiguous()?)? // [nkv, group*n, hd]
            .reshape((nh, n, hd))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((n, nh * hd))
    }
}

/// A rank-3 view: slice, start offset, strides of dims 0 and 1 (dim 2 must be unit-stride).
struct View<'a, T> {
    data: &'a [T],
    start: usize,
    s0: usize,
    s1: usize,
    dims: [usize; 3],
}

fn view<'a, T>(data: &'a [T], l: &Layout, what: &str) -> candle_core::Result<View<'a, T>> {
    let dims: [usize; 3] = l.dims().try_into().map_err(|_| {
        candle_core::Error::Msg(format!(
            "attention: {what} must be rank 3, got {:?}",
            l.dims()
        ))
    })?;
    let st = l.stride();
    if st[2] != 1 {
        candle_core::bail!("attention: {what} needs a unit stride on the last dim, got {st:?}");
    }
    Ok(View {
        data,
        start: l.start_offset(),
        s0: st[0],
        s1: st[1],
        dims,
    })
}

impl<T> View<'_, T> {
    #[inline]
    fn row(&self, a: usize, b: usize) -> &[T] {
        let o = self.start + a * self.s0 + b * self.s1;
        &self.data[o..o + self.dims[2]]
    }
}

/// An element of a KV cache buffer: f32; f16 / bf16, which widen to f32 exactly; or a byte of
/// a row of Q8_0 blocks, whose values `d * q` (an f16 times an int8) are exact in f32 too. A
/// narrow row is widened once per work item ([`widen`]; every unit of the item reads it) and
/// the arithmetic is the f32 cache's, so a row's result still does not depend on what is
/// computed with it. Widening V a block of keys at a time keeps the narrow types at f32's speed
/// (converting at each unit's read cost Q8_0 15-17%: BENCHMARKS.md).
trait Kv: Copy + Send + Sync {
    /// Elements a row of `hd` values takes.
    fn stored(hd: usize) -> usize {
        hd
    }
    /// The row itself where it is f32 already (nothing to widen).
    fn as_f32(_row: &[Self]) -> Option<&[f32]> {
        None
    }
    /// Value `i` of a stored row.
    fn at(row: &[Self], i: usize) -> f32;
    /// Values `8c..8c + 8` of a stored row as f32 lanes.
    ///
    /// # Safety
    /// The row must hold those values.
    #[cfg(all(target_arch = "x86_64", target_feature = "avx"))]
    unsafe fn load8(row: &[Self], c: usize) -> std::arch::x86_64::__m256;
}

impl Kv for f32 {
    #[inline]
    fn as_f32(row: &[f32]) -> Option<&[f32]> {
        Some(row)
    }
    #[inline]
    fn at(row: &[f32], i: usize) -> f32 {
        row[i]
    }
    #[cfg(all(target_arch = "x86_64", target_feature = "avx"))]
    #[inline]
    unsafe fn load8(row: &[f32], c: usize) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller's.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(row.as_ptr().add(c * 8)) }
    }
}

impl Kv for half::f16 {
    #[inline]
    fn at(row: &[half::f16], i: usize) -> f32 {
        row[i].to_f32()
    }
    #[cfg(all(target_arch = "x86_64", target_feature = "avx"))]
    #[inline]
    unsafe fn load8(row: &[half::f16], c: usize) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller's; F16C converts exactly, as `to_f32` does.
        #[cfg(target_feature = "f16c")]
        unsafe {
            use std::arch::x86_64::*;
            _mm256_cvtph_ps(_mm_loadu_si128(row.as_ptr().add(c * 8).cast()))
        }
        #[cfg(not(target_feature = "f16c"))]
        unsafe {
            load8_by_value(row, c)
        }
    }
}

impl Kv for half::bf16 {
    #[inline]
    fn at(row: &[half::bf16], i: usize) -> f32 {
        row[i].to_f32()
    }
    #[cfg(all(target_arch = "x86_64", target_feature = "avx"))]
    #[inline]
    unsafe fn load8(row: &[half::bf16], c: usize) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller's. A bf16 is an f32's upper 16 bits.
        #[cfg(target_feature = "avx2")]
        unsafe {
            use std::arch::x86_64::*;
            let w = _mm256_cvtepu16_epi32(_mm_loadu_si128(row.as_ptr().add(c * 8).cast()));
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w))
        }
        #[cfg(not(target_feature = "avx2"))]
        unsafe {
            load8_by_value(row, c)
        }
    }
}

/// A byte of a row of Q8_0 blocks (`kv_cache::q8_0_rows`): per 32 values an f16 scale, then
/// 32 int8.
impl Kv for u8 {
    fn stored(hd: usize) -> usize {
        hd / Q8_BLOCK * Q8_BLOCK_BYTES
    }
    #[inline]
    fn at(row: &[u8], i: usize) -> f32 {
        let b = &row[i / Q8_BLOCK * Q8_BLOCK_BYTES..];
        half::f16::from_le_bytes([b[0], b[1]]).to_f32() * (b[2 + i % Q8_BLOCK] as i8) as f32
    }
    #[cfg(all(target_arch = "x86_64", target_feature = "avx"))]
    #[inline]
    unsafe fn load8(row: &[u8], c: usize) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller's: block c / 4 of the row holds values 8c..8c + 8.
        #[cfg(target_feature = "avx2")]
        unsafe {
            use std::arch::x86_64::*;
            let b = row.as_ptr().add(c / 4 * Q8_BLOCK_BYTES);
            let d = half::f16::from_le_bytes([*b, *b.add(1)]).to_f32();
            let q = _mm_loadl_epi64(b.add(2 + c % 4 * 8).cast());
            _mm256_mul_ps(
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)),
                _mm256_set1_ps(d),
            )
        }
        #[cfg(not(target_feature = "avx2"))]
        unsafe {
            load8_by_value(row, c)
        }
    }
}

/// [`Kv::load8`] one value at a time, where the conversion has no instruction of its own.
///
/// # Safety
/// As `load8`.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx",
    not(all(target_feature = "f16c", target_feature = "avx2"))
))]
#[inline]
unsafe fn load8_by_value<K: Kv>(row: &[K], c: usize) -> std::arch::x86_64::__m256 {
    let x: [f32; 8] = std::array::from_fn(|i| K::at(row, c * 8 + i));
    // SAFETY: reads the 8 floats of `x`.
    unsafe { std::arch::x86_64::_mm256_loadu_ps(x.as_ptr()) }
}

/// The `out.len()` values of a stored row, in f32 (exactly).
#[inline]
fn widen<K: Kv>(row: &[K], out: &mut [f32]) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx"))]
    let done = {
        for c in 0..out.len() / 8 {
            // SAFETY: the row holds `out.len()` values (the op checks the shapes); each store
            // writes out[8c..8c + 8] within `out`.
            unsafe {
                std::arch::x86_64::_mm256_storeu_ps(out.as_mut_ptr().add(c * 8), K::load8(row, c))
            };
        }
        out.len() / 8 * 8
    };
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx")))]
    let done = 0;
    for (i, o) in out.iter_mut().enumerate().skip(done) {
        *o = K::at(row, i);
    }
}

/// Rows per work item: the scores of a block's rows and heads stay in L2, their outputs in L1.
const ROWS_PER_ITEM: usize = 8;

/// Dot product with 8 partial sums in a fixed order, so that a row's scores never depend on
/// what is computed with it (vectorises along the 8 lanes).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    finish(&acc, a, b)
}

/// [`dot`] of four vectors with one `k`, each with exactly `dot`'s operations in its order. The
/// four chains of additions are independent, so they overlap instead of each waiting on its own
/// previous addition (one `dot` is bound by that latency).
#[inline]
fn dot4(q: [&[f32]; 4], k: &[f32]) -> [f32; 4] {
    let n = q.iter().fold(k.len(), |n, q| n.min(q.len())) / 8;
    let mut acc = [[0f32; 8]; 4];
    #[cfg(all(target_arch = "x86_64", target_feature = "avx"))]
    // SAFETY: AVX is enabled at compile time; every load reads 8 floats at c * 8 < n * 8, within
    // `k` and each `q[i]`. Multiply then add, lane by lane, as `dot` does (no fused multiply-add:
    // the same roundings).
    unsafe {
        use std::arch::x86_64::*;
        let mut a = [_mm256_setzero_ps(); 4];
        for c in 0..n {
            let y = _mm256_loadu_ps(k.as_ptr().add(c * 8));
            for (ai, qi) in a.iter_mut().zip(&q) {
                let x = _mm256_loadu_ps(qi.as_ptr().add(c * 8));
                *ai = _mm256_add_ps(*ai, _mm256_mul_ps(x, y));
            }
        }
        for (dst, ai) in acc.iter_mut().zip(&a) {
            _mm256_storeu_ps(dst.as_mut_ptr(), *ai);
        }
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx")))]
    for c in 0..n {
        let y = &k[c * 8..c * 8 + 8];
        for (a, qi) in acc.iter_mut().zip(&q) {
            let x = &qi[c * 8..c * 8 + 8];
            for l in 0..8 {
                a[l] += x[l] * y[l];
            }
        }
    }
    [
        finish(&acc[0], q[0], k),
        finish(&acc[1], q[1], k),
        finish(&acc[2], q[2], k),
        finish(&acc[3], q[3], k),
    ]
}

/// Keys whose V rows one pass of [`accumulate`] adds to every unit.
const KEYS_PER_BLOCK: usize = 32;

/// `dst += ps[t] * vrow(t)` for t in order, element by element (each element's additions in
/// key order, whatever the blocks). With AVX and rows of a multiple of 64, 64 outputs at a time
/// stay in registers across the keys instead of going through memory for each key.
#[inline]
fn accumulate<'v>(dst: &mut [f32], ps: &[f32], vrow: impl Fn(usize) -> &'v [f32]) {
    // Every V row is a row of one view, as long as `dst` (the op checks the shapes).
    #[cfg(all(target_arch = "x86_64", target_feature = "avx"))]
    if dst.len().is_multiple_of(64) && ps.first().is_none_or(|_| vrow(0).len() == dst.len()) {
        // SAFETY: AVX is enabled at compile time; the V rows have dst.len() floats (checked on
        // the first; all are rows of one view), and every access is below dst.len().
        unsafe {
            use std::arch::x86_64::*;
            for o in (0..dst.len()).step_by(64) {
                let d = dst.as_mut_ptr().add(o);
                let mut acc = [_mm256_setzero_ps(); 8];
                for (c, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_loadu_ps(d.add(c * 8));
                }
                for (t, &p) in ps.iter().enumerate() {
                    let (p, r) = (_mm256_set1_ps(p), vrow(t).as_ptr().add(o));
                    for (c, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_add_ps(*a, _mm256_mul_ps(p, _mm256_loadu_ps(r.add(c * 8))));
                    }
                }
                for (c, a) in acc.iter().enumerate() {
                    _mm256_storeu_ps(d.add(c * 8), *a);
                }
            }
            return;
        }
    }
    for (t, &p) in ps.iter().enumerate() {
        for (o, &x) in dst.iter_mut().zip(vrow(t)) {
            *o += p * x;
        }
    }
}

/// The partial sums of [`dot`] added in its fixed order, then the tail past the last 8.
#[inline]
fn finish(acc: &[f32; 8], a: &[f32], b: &[f32]) -> f32 {
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    let tail = a.len().min(b.len()) / 8 * 8;
    for (x, y) in a[tail..].iter().zip(&b[tail..]) {
        s += x * y;
    }
    s
}

impl CustomOp3 for CausalAttention {
    fn name(&self) -> &'static str {
        "verdict-causal-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let q = match qs {
            CpuStorage::F32(d) => view(d, ql, "q")?,
            other => candle_core::bail!("attention: q must be f32, got {:?}", other.dtype()),
        };
        match (ks, vs) {
            (CpuStorage::F32(k), CpuStorage::F32(v)) => {
                self.attend(q, view(k, kl, "k")?, view(v, vl, "v")?)
            }
            (CpuStorage::F16(k), CpuStorage::F16(v)) => {
                self.attend(q, view(k, kl, "k")?, view(v, vl, "v")?)
            }
            (CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                self.attend(q, view(k, kl, "k")?, view(v, vl, "v")?)
            }
            // Q8_0 blocks (the only byte format a KV cache holds).
            (CpuStorage::U8(k), CpuStorage::U8(v)) if self.head_dim.is_multiple_of(Q8_BLOCK) => {
                self.attend(q, view(k, kl, "k")?, view(v, vl, "v")?)
            }
            (k, v) => candle_core::bail!(
                "attention: k and v must both be f32, f16, bf16 or q8_0 blocks (a head size of a multiple of 32), got {:?} and {:?}",
                k.dtype(),
                v.dtype()
            ),
        }
    }
}

impl CausalAttention {
    /// The CPU op on a cache of element type `K`.
    fn attend<K: Kv>(
        &self,
        q: View<'_, f32>,
        k: View<'_, K>,
        v: View<'_, K>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let [nh, n, hd] = q.dims;
        let [nkv, l, khd] = k.dims;
        if nh != self.n_heads
            || nkv != self.n_kv_heads
            || hd != self.head_dim
            || khd != K::stored(hd)
            || v.dims != k.dims
            || l < n
            || !self.consistent()
        {
            candle_core::bail!(
                "attention: shapes q {:?} k {:?} v {:?} do not fit {self:?}",
                q.dims,
                k.dims,
                v.dims
            );
        }
        let pos = l - n;
        let row_len = nh * hd;
        let mut out = vec![0f32; n * row_len];
        let out_ptr = out.as_mut_ptr() as usize;
        // The query heads of each kv head, computed together: every K and V row is read once
        // for all of them (and for a block of rows) instead of once per head and row.
        let groups: Vec<Vec<usize>> = (0..nkv)
            .map(|g| (0..nh).filter(|&h| self.kv_of(h) == g).collect())
            .collect();
        let blocks = n.div_ceil(ROWS_PER_ITEM);
        let block = n.div_ceil(blocks);
        // One item = (kv head, block of rows); items write disjoint units of `out`.
        let items = nkv * blocks;
        let work = |range: std::ops::Range<usize>| {
            let mut scores: Vec<f32> = Vec::new();
            let mut sums: Vec<f32> = Vec::new();
            // A narrow cache's rows widened once per item (each is read by every unit of it):
            // one K row, a block of V rows.
            let mut kbuf = vec![0f32; hd];
            let mut vbuf = vec![0f32; KEYS_PER_BLOCK * hd];
            for it in range {
                let (g, b) = (it / blocks, it % blocks);
                let heads = &groups[g];
                let rows = b * block..((b + 1) * block).min(n);
                // Unit u = (row rows.start + u / heads.len(), head heads[u % heads.len()]),
                // which reads keys from(u)..len(u) (causal, within the window).
                let nu = rows.len() * heads.len();
                let len = |u: usize| pos + rows.start + u / heads.len() + 1;
                let from = |u: usize| match self.window {
                    0 => 0,
                    w => len(u).saturating_sub(w),
                };
                let lmax = pos + rows.end;
                // The block's first row reads from the earliest key.
                let jmin = from(0);
                let qrow = |u: usize| q.row(heads[u % heads.len()], rows.start + u / heads.len());
                scores.clear();
                scores.resize(nu * lmax, 0.0);
                for j in jmin..lmax {
                    let krow = match K::as_f32(k.row(g, j)) {
                        Some(r) => r,
                        None => {
                            widen(k.row(g, j), &mut kbuf);
                            &kbuf
                        }
                    };
                    // Units before `first` (earlier rows) do not see key j.
                    let first = j.saturating_sub(pos + rows.start).min(rows.len()) * heads.len();
                    let mut u = first;
                    while u + 4 <= nu {
                        let d = dot4([qrow(u), qrow(u + 1), qrow(u + 2), qrow(u + 3)], krow);
                        for (t, x) in d.into_iter().enumerate() {
                            scores[(u + t) * lmax + j] = self.capped(x * self.scale);
                        }
                        u += 4;
                    }
                    for u in u..nu {
                        scores[u * lmax + j] = self.capped(dot(qrow(u), krow) * self.scale);
                    }
                }
                sums.clear();
                for u in 0..nu {
                    let s = &mut scores[u * lmax + from(u)..u * lmax + len(u)];
                    // A sink joins the maximum and, after the keys, the sum (as ggml adds it).
                    let sink = self.sink(heads[u % heads.len()]);
                    let start = sink.unwrap_or(f32::NEG_INFINITY);
                    let max = s.iter().fold(start, |m, &x| m.max(x));
                    let mut sum = 0f32;
                    for x in s.iter_mut() {
                        *x = (*x - max).exp();
                        sum += *x;
                    }
                    if let Some(k) = sink {
                        sum += (k - max).exp();
                    }
                    sums.push(sum);
                }
                let dst = |u: usize| {
                    let (i, h) = (rows.start + u / heads.len(), heads[u % heads.len()]);
                    // SAFETY: unit (i, h) owns out[i*row_len + h*hd .. + hd]; no other unit
                    // touches it, and `out` outlives the pool call.
                    unsafe {
                        std::slice::from_raw_parts_mut(
                            (out_ptr as *mut f32).add(i * row_len + h * hd),
                            hd,
                        )
                    }
                };
                // Each output element still adds p_j * v_j in key order, as one row alone does;
                // a block of V rows stays in L1 while every unit adds it.
                for j0 in (jmin..lmax).step_by(KEYS_PER_BLOCK) {
                    let j1 = (j0 + KEYS_PER_BLOCK).min(lmax);
                    if K::as_f32(v.row(g, j0)).is_none() {
                        for j in j0..j1 {
                            widen(v.row(g, j), &mut vbuf[(j - j0) * hd..][..hd]);
                        }
                    }
                    let vrow = |j: usize| match K::as_f32(v.row(g, j)) {
                        Some(r) => r,
                        None => &vbuf[(j - j0) * hd..][..hd],
                    };
                    for u in 0..nu {
                        let (beg, end) = (from(u).max(j0), len(u).min(j1));
                        if end > beg {
                            let ps = &scores[u * lmax + beg..u * lmax + end];
                            accumulate(dst(u), ps, |t| vrow(beg + t));
                        }
                    }
                }
                for (u, &sum) in sums.iter().enumerate() {
                    let inv = 1.0 / sum;
                    dst(u).iter_mut().for_each(|o| *o *= inv);
                }
            }
        };
        // Small problems (decode on short contexts) are not worth waking the pool.
        if n * nh * l * hd < 1 << 15 {
            work(0..items);
        } else {
            candle_core::utils::barrier_pool().execute_chunked(items, work);
        }
        Ok((CpuStorage::F32(out), Shape::from((n, row_len))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, IndexOp};

    fn rand(shape: (usize, usize, usize), seed: u64) -> Tensor {
        let n = shape.0 * shape.1 * shape.2;
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let data: Vec<f32> = (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn custom_op_matches_tensor_ops_and_is_row_independent() {
        // Whole causal attention, and sliding windows shorter than the rows' reach.
        for (window, softcap) in [(0, 0.0), (3, 0.0), (8, 0.0), (0, 0.5), (3, 0.5)] {
            row_independent_with(window, softcap, None);
        }
        // gpt-oss's sinks, with and without a window.
        let sinks: std::sync::Arc<[f32]> = vec![0.5, -1.0, 2.0, 0.0, 3.0, -2.5].into();
        for window in [0, 3] {
            row_independent_with(window, 0.0, Some(sinks.clone()));
        }
    }

    fn row_independent_with(window: usize, softcap: f32, sinks: Option<std::sync::Arc<[f32]>>) {
        let op = CausalAttention {
            n_heads: 6,
            n_kv_heads: 2,
            head_dim: 20,
            scale: 0.3,
            group: 3,
            head_offset: 0,
            window,
            softcap,
            sinks,
        };
        // A cache buffer of capacity 16 holding 11 positions, viewed like the KV cache does.
        let kbuf = rand((2, 16, 20), 1);
        let vbuf = rand((2, 16, 20), 2);
        let (k, v) = (
            kbuf.narrow(1, 0, 11).unwrap(),
            vbuf.narrow(1, 0, 11).unwrap(),
        );
        let q = rand((6, 4, 20), 3); // rows at positions 7..11
        let fast = op.forward(&q, &k, &v).unwrap();
        let slow = op.forward_tensors(&q, &k, &v).unwrap();
        let d = (fast.clone() - slow)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(d.to_scalar::<f32>().unwrap() < 1e-5, "window {window}");
        // Row 2 alone (position 9, keys 0..=9) gives exactly the same numbers.
        let q2 = q.narrow(1, 2, 1).unwrap().contiguous().unwrap();
        let one = op
            .forward(
                &q2,
                &k.narrow(1, 0, 10).unwrap(),
                &v.narrow(1, 0, 10).unwrap(),
            )
            .unwrap();
        let a: Vec<f32> = one.i(0).unwrap().to_vec1().unwrap();
        let b: Vec<f32> = fast.i(2).unwrap().to_vec1().unwrap();
        assert_eq!(a, b, "window {window}");
        if window > 0 {
            // Keys before the window change nothing.
            let kfar = (k.narrow(1, 0, 2).unwrap() * 7.0).unwrap();
            let k2 = Tensor::cat(&[&kfar, &k.narrow(1, 2, 8).unwrap()], 1).unwrap();
            let moved = op.forward(&q2, &k2, &v.narrow(1, 0, 10).unwrap()).unwrap();
            let m: Vec<f32> = moved.i(0).unwrap().to_vec1().unwrap();
            assert_eq!(m, a, "window {window}");
        }
    }

    /// The op's dot product before heads were computed together, kept as the reference.
    fn dot_ref(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; 8];
        let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
        let (ra, rb) = (ca.remainder(), cb.remainder());
        for (x, y) in ca.zip(cb) {
            for l in 0..8 {
                acc[l] += x[l] * y[l];
            }
        }
        let mut s =
            ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        for (x, y) in ra.iter().zip(rb) {
            s += x * y;
        }
        s
    }

    /// One (row, head) at a time, keys in order: the summation order the op must keep.
    fn per_unit(op: &CausalAttention, q: &Tensor, k: &Tensor, v: &Tensor) -> Vec<f32> {
        let (nh, n, hd) = q.dims3().unwrap();
        let l = k.dim(1).unwrap();
        let (q, k, v) = (
            q.to_vec3::<f32>().unwrap(),
            k.to_vec3::<f32>().unwrap(),
            v.to_vec3::<f32>().unwrap(),
        );
        let mut out = vec![0f32; n * nh * hd];
        for i in 0..n {
            for h in 0..nh {
                let g = op.kv_of(h);
                let len = l - n + i + 1;
                let s: Vec<f32> = (0..len)
                    .map(|j| dot_ref(&q[h][i], &k[g][j]) * op.scale)
                    .collect();
                // A sink joins the maximum, then the sum after the keys.
                let sink = op.sinks.as_ref().map(|s| s[op.head_offset + h]);
                let max = s
                    .iter()
                    .fold(sink.unwrap_or(f32::NEG_INFINITY), |m, &x| m.max(x));
                let p: Vec<f32> = s.iter().map(|&x| (x - max).exp()).collect();
                let sum =
                    p.iter().fold(0f32, |a, &x| a + x) + sink.map_or(0.0, |k| (k - max).exp());
                let dst = &mut out[i * nh * hd + h * hd..][..hd];
                for (j, &pj) in p.iter().enumerate() {
                    for (o, &x) in dst.iter_mut().zip(&v[g][j]) {
                        *o += pj * x;
                    }
                }
                let inv = 1.0 / sum;
                dst.iter_mut().for_each(|o| *o *= inv);
            }
        }
        out
    }

    #[test]
    fn heads_and_rows_computed_together_keep_each_units_summation_order() {
        // Many rows (several blocks, the last one short), a long context (the pool runs), the
        // real models' head sizes (128 and 64, the vector paths), a shard's heads (offset 2,
        // groups of 4: local heads 0-1 read kv head 0, 2-5 kv head 1), a head size that is not
        // a multiple of 8.
        for (op, n, l) in [
            (
                CausalAttention {
                    n_heads: 6,
                    n_kv_heads: 2,
                    head_dim: 128,
                    scale: 0.2,
                    group: 3,
                    head_offset: 0,
                    window: 0,
                    softcap: 0.0,
                    sinks: None,
                },
                19,
                300,
            ),
            (
                CausalAttention {
                    n_heads: 7,
                    n_kv_heads: 1,
                    head_dim: 64,
                    scale: 0.125,
                    group: 7,
                    head_offset: 0,
                    window: 0,
                    softcap: 0.0,
                    sinks: None,
                },
                3,
                70,
            ),
            (
                CausalAttention {
                    n_heads: 6,
                    n_kv_heads: 2,
                    head_dim: 20,
                    scale: 0.4,
                    group: 4,
                    head_offset: 2,
                    window: 0,
                    softcap: 0.0,
                    // The model's 8 heads' sinks: this shard reads 2..8 (the 9s are others').
                    sinks: Some(vec![9.0, 9.0, 0.5, -1.0, 1.5, 0.0, -3.0, 2.0].into()),
                },
                9,
                40,
            ),
            (
                CausalAttention {
                    n_heads: 4,
                    n_kv_heads: 1,
                    head_dim: 8,
                    scale: 1.0,
                    group: 4,
                    head_offset: 0,
                    window: 0,
                    softcap: 0.0,
                    sinks: None,
                },
                1,
                5,
            ),
        ] {
            let k = rand((op.n_kv_heads, l, op.head_dim), 4);
            let v = rand((op.n_kv_heads, l, op.head_dim), 5);
            let q = rand((op.n_heads, n, op.head_dim), 6);
            let got: Vec<f32> = op
                .forward(&q, &k, &v)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(got, per_unit(&op, &q, &k, &v), "{op:?}, {n} rows, {l} keys");
        }
    }

    /// An f16, bf16 or Q8_0 cache gives exactly what the f32 op gives on the same values
    /// widened (the conversion is exact, the arithmetic after it the same), through the vector
    /// paths (head sizes 128, 64, 32), the scalar tail (20: no Q8_0, which needs whole blocks) and
    /// several blocks of rows; the tensor ops other devices run read f16 and bf16 too.
    #[test]
    fn a_narrow_cache_reads_as_its_values_in_f32() {
        use crate::models::kv_cache::{KvDtype, q8_0_rows, widened};
        use candle_core::DType;
        for (hd, n, l) in [(128, 19, 300), (64, 3, 70), (32, 9, 40), (20, 9, 40)] {
            let op = CausalAttention {
                n_heads: 6,
                n_kv_heads: 2,
                head_dim: hd,
                scale: 0.2,
                group: 3,
                head_offset: 0,
                window: 0,
                softcap: 0.0,
                sinks: None,
            };
            let q = rand((6, n, hd), 10);
            let (k, v) = (rand((2, l, hd), 11), rand((2, l, hd), 12));
            for dt in [KvDtype::F16, KvDtype::Bf16, KvDtype::Q8_0] {
                if dt == KvDtype::Q8_0 && hd % 32 != 0 {
                    let e = q8_0_rows(&k).unwrap_err().to_string();
                    assert!(e.contains("multiple of 32"), "{e}");
                    let bytes = Tensor::zeros((2, l, hd), DType::U8, &Device::Cpu).unwrap();
                    let e = op.forward(&q, &bytes, &bytes).unwrap_err().to_string();
                    assert!(e.contains("multiple of 32"), "{e}");
                    continue;
                }
                let store = |x: &Tensor| match dt {
                    KvDtype::Q8_0 => q8_0_rows(x).unwrap(),
                    _ => x.to_dtype(dt.storage()).unwrap(),
                };
                let (ks, vs) = (store(&k), store(&v));
                let (kw, vw) = (widened(dt, &ks, hd), widened(dt, &vs, hd));
                let run = |k: &Tensor, v: &Tensor| -> Vec<f32> {
                    let o = op.forward(&q, k, v).unwrap();
                    o.flatten_all().unwrap().to_vec1().unwrap()
                };
                let got = run(&ks, &vs);
                assert_eq!(got, run(&kw, &vw), "{dt}, head size {hd}");
                // Rounding moved the values, but not far.
                let moved = (&kw - &k).unwrap().abs().unwrap().max_all().unwrap();
                let moved = moved.to_scalar::<f32>().unwrap();
                assert!(moved > 0.0 && moved < 0.01, "{dt}: {moved}");
                if dt != KvDtype::Q8_0 {
                    let slow = op.forward_tensors(&q, &ks, &vs).unwrap();
                    let slow: Vec<f32> = slow.flatten_all().unwrap().to_vec1().unwrap();
                    let d = slow.iter().zip(&got).map(|(a, b)| (a - b).abs());
                    let d = d.fold(0f32, f32::max);
                    assert!(d < 1e-5, "{dt}, head size {hd}: {d}");
                }
            }
            // Mixed types are refused, naming both.
            let e = op
                .forward(&q, &k.to_dtype(DType::F16).unwrap(), &v)
                .unwrap_err()
                .to_string();
            assert!(e.contains("F16") && e.contains("F32"), "{e}");
        }
    }

    /// A sink far below the scores changes nothing; one far above them takes the weight from
    /// every key, so the output shrinks towards 0.
    #[test]
    fn sinks_take_weight_from_the_keys() {
        let op = |sink: f32| CausalAttention {
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 16,
            scale: 0.25,
            group: 2,
            head_offset: 0,
            window: 0,
            softcap: 0.0,
            sinks: Some(vec![sink, 0.0].into()),
        };
        let (q, k, v) = (
            rand((2, 3, 16), 7),
            rand((1, 5, 16), 8),
            rand((1, 5, 16), 9),
        );
        let none = CausalAttention {
            sinks: None,
            ..op(0.0)
        };
        let of = |o: &CausalAttention| -> Vec<Vec<f32>> {
            o.forward(&q, &k, &v).unwrap().to_vec2().unwrap()
        };
        assert_eq!(
            of(&op(-1e30)).iter().map(|r| &r[..16]).collect::<Vec<_>>(),
            of(&none).iter().map(|r| &r[..16]).collect::<Vec<_>>()
        );
        let big = of(&op(60.0));
        let plain = of(&none);
        for (b, p) in big.iter().zip(&plain) {
            // Head 0's outputs vanish; head 1's sink (0) is near its scores: it moves them.
            assert!(b[..16].iter().all(|x| x.abs() < 1e-20), "{b:?}");
            assert!(
                b[16..]
                    .iter()
                    .zip(&p[16..])
                    .any(|(x, y)| (x - y).abs() > 1e-3)
            );
        }
    }
}
