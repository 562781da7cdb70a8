//! Per-sequence KV cache: one `[kv_heads, capacity, head_dim]` buffer per layer for K and for V,
//! written in place and truncated by length.
//!
//! Appending writes the new rows into the buffer (`slice_set`), never concatenates; readers get a
//! narrowed view of the positions a layer holds, which the attention matmul consumes as strided
//! input (no copy). The buffer grows in chunks (at least doubling), so a long generation copies
//! each position O(1) times amortised. Truncation (speculation rollback) only moves the length.
//!
//! A sliding-window layer (Gemma's local layers, Mistral 7B v0.1) reads only its last `window`
//! keys, so it holds only those and [`WINDOW_SLACK`] more: the buffer starts at a later position
//! (`base`), and once it holds a chunk more than that, its oldest positions are dropped (copied
//! into a smaller buffer). Attention reads keys relative to the buffer's start, so nothing else
//! changes; a long Gemma 3 context costs its global layers' length, not every layer's.
//!
//! The buffers hold f32, or f16 / bf16 ([`KvCache::with_dtype`]): half the memory, and half the
//! bytes a long context's attention reads per row. Rows are rounded once, when appended, and
//! every row (the new ones too) is read back from the buffer, so a k-row forward still equals k
//! one-row forwards.

use super::error::{ModelError, Result};
use candle_core::{DType, Device, Tensor};

/// Positions added per growth step at minimum.
const CHUNK: usize = 256;

/// Positions a sliding-window layer keeps before its window: how far back a sequence may roll
/// (speculation rolls back at most its k + 1 <= 65 positions) or be copied from (the prompt
/// cache hands out a sequence's prefix for a prompt that shares nearly all of it).
pub const WINDOW_SLACK: usize = 256;

#[derive(Debug)]
struct LayerCache {
    k: Tensor,
    v: Tensor,
    /// The position of buffer row 0 (0 but in sliding-window layers that dropped positions).
    base: usize,
    /// Buffer rows.
    capacity: usize,
}

/// Not `Clone`: tensors share storage and appends write in place, so a copy must be deep
/// ([`KvCache::fork`]).
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    /// Each layer's sliding window, where it has one.
    windows: Vec<Option<usize>>,
    n_layers: usize,
    n_kv_heads: usize,
    head_dim: usize,
    len: usize,
    max_len: usize,
    device: Device,
    /// Element type of the buffers: F32, F16 or BF16.
    dtype: DType,
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
            windows: vec![None; n_layers],
            n_layers,
            n_kv_heads,
            head_dim,
            len: 0,
            max_len,
            device: device.clone(),
            dtype: DType::F32,
        }
    }

    /// The same cache storing its rows as `dtype`: F32, F16 or BF16 ([`check_dtype`]; the
    /// attention reads no other).
    pub fn with_dtype(mut self, dtype: DType) -> KvCache {
        self.dtype = dtype;
        self
    }

    /// Element type of the buffers.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The same cache with layer `i` attending to its last `windows[i]` positions only (and
    /// holding those and [`WINDOW_SLACK`] more). Layers past `windows` attend to everything.
    pub fn with_windows(mut self, windows: &[Option<usize>]) -> KvCache {
        for (w, &s) in self.windows.iter_mut().zip(windows) {
            *w = s.filter(|&s| s > 0);
        }
        self
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

    /// Positions held over all layers (a sliding-window layer holds at most its window, the
    /// slack and a chunk).
    pub fn positions_held(&self) -> usize {
        self.layers.iter().map(|l| self.len - l.base).sum()
    }

    /// Buffer rows allocated over all layers (each `kv_heads * head_dim` elements for K and for
    /// V).
    pub fn rows_allocated(&self) -> usize {
        self.layers.iter().map(|l| l.capacity).sum()
    }

    /// Bytes of the buffers allocated over all layers, K and V.
    pub fn bytes_allocated(&self) -> usize {
        2 * self.rows_allocated() * self.n_kv_heads * self.head_dim * self.dtype.size_in_bytes()
    }

    fn buffer(&self, rows: usize) -> Result<(Tensor, Tensor)> {
        let shape = (self.n_kv_heads, rows, self.head_dim);
        Ok((
            Tensor::zeros(shape, self.dtype, &self.device)?,
            Tensor::zeros(shape, self.dtype, &self.device)?,
        ))
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
        if self.layers.is_empty() {
            for _ in 0..self.n_layers {
                let (k, v) = self.buffer(0)?;
                self.layers.push(LayerCache {
                    k,
                    v,
                    base: 0,
                    capacity: 0,
                });
            }
        }
        for i in 0..self.layers.len() {
            let (base, capacity) = (self.layers[i].base, self.layers[i].capacity);
            let rows = need - base;
            if rows <= capacity {
                continue;
            }
            let new_cap = rows
                .max(capacity * 2)
                .max(CHUNK)
                .next_multiple_of(CHUNK)
                .min(self.max_len - base);
            let (k, v) = self.buffer(new_cap)?;
            let held = self.len - base;
            let old = &self.layers[i];
            if held > 0 {
                k.slice_set(&old.k.narrow(1, 0, held)?.contiguous()?, 1, 0)?;
                v.slice_set(&old.v.narrow(1, 0, held)?.contiguous()?, 1, 0)?;
            }
            self.layers[i] = LayerCache {
                k,
                v,
                base,
                capacity: new_cap,
            };
        }
        Ok(())
    }

    /// Writes `k`, `v` (`[kv_heads, n, head_dim]`, contiguous) for `layer` at positions
    /// `len..len + n` and returns views of the positions the layer holds, through `len + n`
    /// (from 0, or from its first kept position in a sliding-window layer). `reserve(n)` must
    /// have been called for this forward; `commit(n)` moves the length once all layers are
    /// written.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let n = k.dim(1)?;
        let lc = self.layers.get(layer).ok_or_else(|| {
            ModelError::Invalid(format!("kv cache: layer {layer} of {}", self.layers.len()))
        })?;
        let at = self.len - lc.base;
        if at + n > lc.capacity {
            return Err(ModelError::Invalid(format!(
                "kv cache: append of {n} positions at {} without reserve (capacity {})",
                self.len, lc.capacity
            )));
        }
        if k.dtype() == self.dtype {
            lc.k.slice_set(k, 1, at)?;
            lc.v.slice_set(v, 1, at)?;
        } else {
            lc.k.slice_set(&k.to_dtype(self.dtype)?, 1, at)?;
            lc.v.slice_set(&v.to_dtype(self.dtype)?, 1, at)?;
        }
        Ok((lc.k.narrow(1, 0, at + n)?, lc.v.narrow(1, 0, at + n)?))
    }

    /// A deep copy of all positions.
    pub fn fork(&self) -> Result<KvCache> {
        self.copy_prefix(self.len)
    }

    /// The first position a layer must hold for the sequence to go on from `len` positions:
    /// the oldest key its next row reads.
    fn first_needed(&self, layer: usize, len: usize) -> usize {
        match self.windows[layer] {
            Some(w) => len.saturating_sub(w - 1),
            None => 0,
        }
    }

    /// Whether the sequence can go on from `len` positions (truncated or copied there): every
    /// sliding-window layer still holds the keys its next row reads. Starting over (0) needs
    /// none.
    pub fn can_resume_at(&self, len: usize) -> bool {
        len == 0
            || len <= self.len
                && self
                    .layers
                    .iter()
                    .enumerate()
                    .all(|(i, l)| l.base <= self.first_needed(i, len))
    }

    fn check_resume(&self, len: usize) -> Result<()> {
        check_truncate(len, self.len)?;
        if len == 0 {
            return Ok(());
        }
        match (0..self.layers.len()).find(|&i| self.layers[i].base > self.first_needed(i, len)) {
            Some(i) => Err(ModelError::Invalid(format!(
                "going back to {len} positions needs layer {i}'s keys from position {}, but its sliding window of {} keeps positions {} on (at most {WINDOW_SLACK} before the window)",
                self.first_needed(i, len),
                self.windows[i].unwrap_or(0),
                self.layers[i].base
            ))),
            None => Ok(()),
        }
    }

    /// A deep copy of the first `len` positions only, in buffers sized for them (the prompt
    /// cache keeps and hands out such copies: a long cached sequence shared for a few positions
    /// copies only those). A sliding-window layer copies what it holds.
    pub fn copy_prefix(&self, len: usize) -> Result<KvCache> {
        self.check_resume(len)?;
        let mut c = KvCache::new(
            self.n_layers,
            self.n_kv_heads,
            self.head_dim,
            self.max_len,
            &self.device,
        )
        .with_windows(&self.windows)
        .with_dtype(self.dtype);
        if len == 0 || self.layers.is_empty() {
            return Ok(c);
        }
        for src in &self.layers {
            let rows = len - src.base;
            let capacity = rows
                .max(1)
                .next_multiple_of(CHUNK)
                .min(self.max_len - src.base);
            let (k, v) = c.buffer(capacity)?;
            if rows > 0 {
                k.slice_set(&src.k.narrow(1, 0, rows)?.contiguous()?, 1, 0)?;
                v.slice_set(&src.v.narrow(1, 0, rows)?.contiguous()?, 1, 0)?;
            }
            c.layers.push(LayerCache {
                k,
                v,
                base: src.base,
                capacity,
            });
        }
        c.len = len;
        Ok(c)
    }

    /// Makes `n` appended positions part of the cache. A sliding-window layer then holding a
    /// chunk more than its window and [`WINDOW_SLACK`] drops its oldest positions.
    pub fn commit(&mut self, n: usize) {
        self.len += n;
        // Dropping is only a saving: where it fails (no memory for the smaller buffer), the
        // layer keeps what it holds, and the cache stays whole.
        if let Err(e) = self.drop_before_windows() {
            tracing::warn!("kv cache: keeping the positions before a sliding window: {e}");
        }
    }

    fn drop_before_windows(&mut self) -> Result<()> {
        for i in 0..self.layers.len() {
            let Some(w) = self.windows[i] else { continue };
            let keep = w - 1 + WINDOW_SLACK;
            let (base, len) = (self.layers[i].base, self.len);
            let held = len - base;
            if held <= keep + CHUNK {
                continue;
            }
            let capacity = (keep + CHUNK).next_multiple_of(CHUNK);
            let (k, v) = self.buffer(capacity)?;
            let old = &self.layers[i];
            k.slice_set(&old.k.narrow(1, held - keep, keep)?.contiguous()?, 1, 0)?;
            v.slice_set(&old.v.narrow(1, held - keep, keep)?.contiguous()?, 1, 0)?;
            self.layers[i] = LayerCache {
                k,
                v,
                base: len - keep,
                capacity,
            };
        }
        Ok(())
    }

    /// Rolls back to `len` positions (the data past it is overwritten by later appends). A
    /// sliding-window layer must still hold the keys the next row reads ([`WINDOW_SLACK`]).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        self.check_resume(len)?;
        self.len = len;
        if len == 0 {
            // Empty again: every layer's buffer starts at position 0.
            for l in &mut self.layers {
                l.base = 0;
            }
        }
        Ok(())
    }
}

/// The element types a KV cache stores.
pub fn check_dtype(dtype: DType) -> Result<()> {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => Ok(()),
        other => Err(ModelError::Invalid(format!(
            "a KV cache holds f32, f16 or bf16, not {other:?}"
        ))),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `[1, n, 2]` rows whose values name their position.
    fn rows(from: usize, n: usize) -> Tensor {
        let data: Vec<f32> = (from..from + n)
            .flat_map(|p| [p as f32, -(p as f32)])
            .collect();
        Tensor::from_vec(data, (1, n, 2), &Device::Cpu).unwrap()
    }

    fn feed(c: &mut KvCache, n: usize) -> Tensor {
        c.reserve(n).unwrap();
        let from = c.len();
        let mut view = None;
        for layer in 0..c.n_layers() {
            view = Some(c.append(layer, &rows(from, n), &rows(from, n)).unwrap().0);
        }
        c.commit(n);
        view.unwrap()
    }

    fn first_position(view: &Tensor) -> f32 {
        view.narrow(1, 0, 1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0]
    }

    #[test]
    fn a_window_layer_holds_its_window_and_the_slack() {
        let w = 8;
        let keep = w - 1 + WINDOW_SLACK;
        // Layer 0 attends to everything, layer 1 to a window of 8.
        let mut c = KvCache::new(2, 1, 2, 8192, &Device::Cpu).with_windows(&[None, Some(w)]);
        let mut full = KvCache::new(2, 1, 2, 8192, &Device::Cpu);
        for step in 0..300 {
            let n = [1, 7, 64, 3][step % 4];
            let view = feed(&mut c, n);
            feed(&mut full, n);
            // The window layer's view ends at the sequence's end and starts where it holds.
            let held = view.dim(1).unwrap();
            let start = c.len() - held;
            assert_eq!(first_position(&view) as usize, start);
            assert!(held >= keep.min(c.len()), "step {step}: {held}");
            assert!(held <= keep + CHUNK + n, "step {step}: {held}");
        }
        assert_eq!(c.len(), full.len());
        assert!(c.positions_held() < full.positions_held() / 2 + keep + CHUNK);
        assert!(c.rows_allocated() < full.rows_allocated() / 2 + 2 * (keep + CHUNK));
        // Back within the slack: fine; further: an error naming the layer and window.
        let len = c.len();
        assert!(c.can_resume_at(len - WINDOW_SLACK));
        c.truncate(len - 65).unwrap();
        let far = len - keep - 10;
        assert!(!c.can_resume_at(far));
        let e = c.truncate(far).unwrap_err().to_string();
        assert!(e.contains("layer 1") && e.contains("window of 8"), "{e}");
        assert!(c.copy_prefix(far).is_err());
        // A copy holds the same positions; starting over is always possible.
        let copy = c.copy_prefix(c.len() - 3).unwrap();
        assert_eq!(copy.len(), c.len() - 3);
        assert_eq!(copy.positions_held(), c.positions_held() - 6);
        c.truncate(0).unwrap();
        assert_eq!(c.positions_held(), 0);
        let view = feed(&mut c, 5);
        assert_eq!(first_position(&view), 0.0);
    }

    /// An f16 / bf16 cache stores each appended row rounded once, half the bytes of f32, and
    /// rolls back, copies and drops positions like the f32 one.
    #[test]
    fn a_half_precision_cache_rounds_rows_once_and_holds_half_the_bytes() {
        for dt in [DType::F16, DType::BF16] {
            let w = 4;
            let mut c = KvCache::new(2, 1, 2, 8192, &Device::Cpu)
                .with_windows(&[None, Some(w)])
                .with_dtype(dt);
            let mut full = KvCache::new(2, 1, 2, 8192, &Device::Cpu).with_windows(&[None, Some(w)]);
            assert!(check_dtype(dt).is_ok());
            // 0.1-steps are not exact in either type.
            let frac = |from: usize, n: usize| {
                let data: Vec<f32> = (from..from + n)
                    .flat_map(|p| [p as f32 * 0.1, -(p as f32) * 0.1])
                    .collect();
                Tensor::from_vec(data, (1, n, 2), &Device::Cpu).unwrap()
            };
            for n in [3, 300, 1, 40] {
                for cache in [&mut c, &mut full] {
                    cache.reserve(n).unwrap();
                    let from = cache.len();
                    for layer in 0..2 {
                        let (k, _) = cache.append(layer, &frac(from, n), &frac(from, n)).unwrap();
                        assert_eq!(k.dtype(), cache.dtype());
                    }
                    cache.commit(n);
                }
            }
            assert_eq!(c.rows_allocated(), full.rows_allocated());
            assert_eq!(2 * c.bytes_allocated(), full.bytes_allocated());
            // Layer 0's view: every position's f32 value rounded to the type.
            c.reserve(1).unwrap();
            let (k, _) = c.append(0, &frac(c.len(), 1), &frac(c.len(), 1)).unwrap();
            let got = k.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
            let want = frac(0, c.len() + 1)
                .to_dtype(dt)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap();
            assert_eq!(
                got.to_vec1::<f32>().unwrap(),
                want.to_vec1::<f32>().unwrap()
            );
            assert_ne!(
                got.to_vec1::<f32>().unwrap(),
                frac(0, c.len() + 1)
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            );
            // Copies keep the type; rollbacks and starting over work as in f32.
            let copy = c.copy_prefix(c.len() - 5).unwrap();
            assert_eq!(copy.dtype(), dt);
            assert_eq!(copy.positions_held(), c.positions_held() - 10);
            c.truncate(c.len() - 3).unwrap();
            c.truncate(0).unwrap();
            assert_eq!(c.dtype(), dt);
        }
        let e = check_dtype(DType::U8).unwrap_err().to_string();
        assert!(e.contains("U8") && e.contains("f16"), "{e}");
    }
}
