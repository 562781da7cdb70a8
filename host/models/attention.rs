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

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

/// Attention of `n` new rows at positions `pos..pos + n` against `pos + n` cached keys.
///
/// A tensor-parallel shard holds query heads `head_offset..head_offset + n_heads` of the model
/// and the kv heads they read (`group` query heads per kv head in the whole model): local head
/// h reads local kv head `(head_offset + h) / group - head_offset / group`. Unsharded:
/// `head_offset = 0`, `group = n_heads / n_kv_heads`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CausalAttention {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    pub group: usize,
    pub head_offset: usize,
}

impl CausalAttention {
    /// Local kv head of local query head `h`.
    #[inline]
    fn kv_of(&self, h: usize) -> usize {
        (self.head_offset + h) / self.group - self.head_offset / self.group
    }

    /// Whether the kv heads match the query heads this op holds.
    fn consistent(&self) -> bool {
        self.group > 0 && self.n_heads > 0 && self.n_kv_heads == self.kv_of(self.n_heads - 1) + 1
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
        let att = q.matmul(&k.t()?)?; // [nkv, group*n, l]
        let att = if n > 1 {
            let pos = l - n;
            let mask: Vec<f32> = (0..n)
                .flat_map(|i| {
                    (0..l).map(move |j| if j <= pos + i { 0.0 } else { f32::NEG_INFINITY })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (n, l), q.device())?;
            att.reshape((nkv, group, n, l))?
                .broadcast_add(&mask)?
                .reshape((nkv, group * n, l))?
        } else {
            att
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        att.matmul(&v.contiguous()?)? // [nkv, group*n, hd]
            .reshape((nh, n, hd))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((n, nh * hd))
    }
}

/// A rank-3 f32 view: slice, start offset, strides of dims 0 and 1 (dim 2 must be unit-stride).
struct View<'a> {
    data: &'a [f32],
    start: usize,
    s0: usize,
    s1: usize,
    dims: [usize; 3],
}

fn view<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<View<'a>> {
    let data = match s {
        CpuStorage::F32(d) => d.as_slice(),
        other => candle_core::bail!("attention: {what} must be f32, got {:?}", other.dtype()),
    };
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

impl View<'_> {
    #[inline]
    fn row(&self, a: usize, b: usize) -> &[f32] {
        let o = self.start + a * self.s0 + b * self.s1;
        &self.data[o..o + self.dims[2]]
    }
}

/// Dot product with 8 independent partial sums (vectorises; fixed order, so deterministic).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
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
        let (q, k, v) = (view(qs, ql, "q")?, view(ks, kl, "k")?, view(vs, vl, "v")?);
        let [nh, n, hd] = q.dims;
        let [nkv, l, khd] = k.dims;
        if nh != self.n_heads
            || nkv != self.n_kv_heads
            || hd != self.head_dim
            || khd != hd
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
        // One unit = (row i, head h); units write disjoint hd-wide slices of `out`.
        let units = n * nh;
        let work = |range: std::ops::Range<usize>| {
            let mut scores: Vec<f32> = Vec::with_capacity(l);
            for u in range {
                let (i, h) = (u / nh, u % nh);
                let g = self.kv_of(h);
                let qrow = q.row(h, i);
                let len = pos + i + 1; // causal: keys 0..=pos+i
                scores.clear();
                let mut max = f32::NEG_INFINITY;
                for j in 0..len {
                    let s = dot(qrow, k.row(g, j)) * self.scale;
                    max = max.max(s);
                    scores.push(s);
                }
                let mut sum = 0f32;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                // SAFETY: unit u owns out[i*row_len + h*hd .. + hd]; no other unit touches it,
                // and `out` outlives the pool call.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(
                        (out_ptr as *mut f32).add(i * row_len + h * hd),
                        hd,
                    )
                };
                for (j, &p) in scores.iter().enumerate() {
                    for (o, &x) in dst.iter_mut().zip(v.row(g, j)) {
                        *o += p * x;
                    }
                }
                let inv = 1.0 / sum;
                dst.iter_mut().for_each(|o| *o *= inv);
            }
        };
        // Small problems (decode on short contexts) are not worth waking the pool.
        if units * l * hd < 1 << 15 {
            work(0..units);
        } else {
            candle_core::utils::barrier_pool().execute_chunked(units, work);
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
        let op = CausalAttention {
            n_heads: 6,
            n_kv_heads: 2,
            head_dim: 20,
            scale: 0.3,
            group: 3,
            head_offset: 0,
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
        assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
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
        assert_eq!(a, b);
    }
}
