//! Per-sequence KV cache: one `[kv_heads, capacity, head_dim]` buffer per layer for K and for V,
//! written in place and truncated by length.
//!
//! Appending writes the new rows into the buffer (`slice_set`), never concatenates; readers get a
//! narrowed view of the first `len` positions, which the attention matmul consumes as strided
//! input (no copy). The buffer grows in chunks (at least doubling), so a long generation copies
//! each position O(1) times amortised. Truncation (speculation rollback) only moves the length.

use super::error::{ModelError, Result};
use candle_core::{DType, Device, Tensor};

/// Positions added per growth step at minimum.
const CHUNK: usize = 256;

#[derive(Debug)]
struct LayerCache {
    k: Tensor,
    v: Tensor,
}

/// Not `Clone`: tensors share storage and appends write in place, so a copy must be deep
/// ([`KvCache::fork`]).
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    n_layers: usize,
    n_kv_heads: usize,
    head_dim: usize,
    len: usize,
    capacity: usize,
    max_len: usize,
    device: Device,
}

impl KvCache {
    /// An empty cache; memory is allocated on the first `reserve`.
    pub fn new(
        n_layers: usize,
        n_kv_heads: usize,
        head_dim: usize,
        max_len: usize,
        device: &Device,
    ) -> KvCache {
        KvCache {
            layers: Vec::new(),
            n_layers,
            n_kv_heads,
            head_dim,
            len: 0,
            capacity: 0,
            max_len,
            device: device.clone(),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn n_layers(&self) -> usize {
        self.n_layers
    }

    /// Makes room for `extra` more positions (called once per forward, before any layer writes).
    pub fn reserve(&mut self, extra: usize) -> Result<()> {
        let need = self.len + extra;
        if need > self.max_len {
            return Err(ModelError::ContextOverflow {
                len: self.len,
                new: extra,
                max: self.max_len,
            });
        }
        if need <= self.capacity {
            return Ok(());
        }
        let new_cap = need
            .max(self.capacity * 2)
            .max(CHUNK)
            .next_multiple_of(CHUNK)
            .min(self.max_len);
        let shape = (self.n_kv_heads, new_cap, self.head_dim);
        let mut layers = Vec::with_capacity(self.n_layers);
        for i in 0..self.n_layers {
            let k = Tensor::zeros(shape, DType::F32, &self.device)?;
            let v = Tensor::zeros(shape, DType::F32, &self.device)?;
            if let (Some(old), true) = (self.layers.get(i), self.len > 0) {
                k.slice_set(&old.k.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                v.slice_set(&old.v.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
            }
            layers.push(LayerCache { k, v });
        }
        self.layers = layers;
        self.capacity = new_cap;
        Ok(())
    }

    /// Writes `k`, `v` (`[kv_heads, n, head_dim]`, contiguous) for `layer` at positions
    /// `len..len + n` and returns views of positions `0..len + n`. `reserve(n)` must have been
    /// called for this forward; `commit(n)` moves the length once all layers are written.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = k.dim(1)?;
        if self.len + n > self.capacity {
            return Err(ModelError::Invalid(format!(
                "kv cache: append of {n} positions at {} without reserve (capacity {})",
                self.len, self.capacity
            )));
        }
        let lc = self.layers.get(layer).ok_or_else(|| {
            ModelError::Invalid(format!("kv cache: layer {layer} of {}", self.layers.len()))
        })?;
        lc.k.slice_set(k, 1, self.len)?;
        lc.v.slice_set(v, 1, self.len)?;
        let total = self.len + n;
        Ok((lc.k.narrow(1, 0, total)?, lc.v.narrow(1, 0, total)?))
    }

    /// A deep copy of all positions.
    pub fn fork(&self) -> Result<KvCache> {
        self.copy_prefix(self.len)
    }

    /// A deep copy of the first `len` positions only, in a buffer sized for them (the prompt
    /// cache keeps and hands out such copies: a long cached sequence shared for a few positions
    /// copies only those).
    pub fn copy_prefix(&self, len: usize) -> Result<KvCache> {
        check_truncate(len, self.len)?;
        let mut c = KvCache::new(
            self.n_layers,
            self.n_kv_heads,
            self.head_dim,
            self.max_len,
            &self.device,
        );
        if len == 0 {
            return Ok(c);
        }
        c.reserve(len)?;
        for (dst, src) in c.layers.iter().zip(&self.layers) {
            dst.k
                .slice_set(&src.k.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
            dst.v
                .slice_set(&src.v.narrow(1, 0, len)?.contiguous()?, 1, 0)?;
        }
        c.len = len;
        Ok(c)
    }

    /// Makes `n` appended positions part of the cache.
    pub fn commit(&mut self, n: usize) {
        self.len += n;
    }

    /// Rolls back to `len` positions (the data past it is overwritten by later appends).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        check_truncate(len, self.len)?;
        self.len = len;
        Ok(())
    }
}

/// A rollback to `len` positions of a sequence holding `held` (any KV cache's rule).
pub(crate) fn check_truncate(len: usize, held: usize) -> Result<()> {
    if len > held {
        return Err(ModelError::Invalid(format!(
            "truncate to {len} positions, but the session holds only {held}"
        )));
    }
    Ok(())
}
