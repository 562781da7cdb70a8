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
//! The buffers hold f32, f16 / bf16 (half the memory) or Q8_0 blocks (32 int8 values and an
//! f16 scale: 8.5 bits per value, llama.cpp's `q8_0` cache type), [`KvDtype`]. Rows are rounded
//! once, when appended, and every row (the new ones too) is read back from the buffer, so a
//! k-row forward still equals k one-row forwards.

use super::error::{ModelError, Result};
use candle_core::{DType, Device, Tensor};

/// What a KV cache stores per value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    #[default]
    F32,
    F16,
    Bf16,
    /// Blocks of 32 values: an f16 scale `d` (`max |x| / 127`) then 32 int8 `round(x / d)`, as
    /// ggml's Q8_0; a row's blocks one after the other, in a U8 buffer. Needs a head size that
    /// is a multiple of 32.
    Q8_0,
}

impl KvDtype {
    /// `f32`, `f16`, `bf16` or `q8_0`.
    pub fn parse(s: &str) -> std::result::Result<KvDtype, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" => Ok(KvDtype::F32),
            "f16" => Ok(KvDtype::F16),
            "bf16" => Ok(KvDtype::Bf16),
            "q8_0" => Ok(KvDtype::Q8_0),
            _ => Err(format!("`{s}`: a KV cache holds f32, f16, bf16 or q8_0")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
            KvDtype::Bf16 => "bf16",
            KvDtype::Q8_0 => "q8_0",
        }
    }

    /// The buffers' element type.
    pub(crate) fn storage(self) -> DType {
        match self {
            KvDtype::F32 => DType::F32,
            KvDtype::F16 => DType::F16,
            KvDtype::Bf16 => DType::BF16,
            KvDtype::Q8_0 => DType::U8,
        }
    }

    /// Elements of the buffer one row of `head_dim` values takes.
    pub(crate) fn stored_len(self, head_dim: usize) -> usize {
        match self {
            KvDtype::Q8_0 => head_dim / Q8_BLOCK * Q8_BLOCK_BYTES,
            _ => head_dim,
        }
    }

    /// Bytes one row of `head_dim` values takes.
    pub fn row_bytes(self, head_dim: usize) -> usize {
        self.stored_len(head_dim) * self.storage().size_in_bytes()
    }

    /// Whether rows of `head_dim` values fit this type (Q8_0: whole blocks).
    pub fn check_head_dim(self, head_dim: usize) -> Result<()> {
        if self == KvDtype::Q8_0 && !head_dim.is_multiple_of(Q8_BLOCK) {
            return Err(ModelError::Invalid(format!(
                "a q8_0 KV cache needs a head size that is a multiple of {Q8_BLOCK}, this model's is {head_dim}"
            )));
        }
        Ok(())
    }
}

impl std::fmt::Display for KvDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a model's sessions keep their KV caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct CacheSpec {
    pub dtype: KvDtype,
    /// At most this many positions; 0: the context the model declares.
    pub max_len: usize,
}

impl CacheSpec {
    /// The positions a sequence of a model of `cfg` may hold.
    pub(crate) fn max_len(&self, cfg: &super::gguf::ModelConfig) -> usize {
        match self.max_len {
            0 => cfg.context_length,
            n => n.min(cfg.context_length),
        }
    }
}

/// Values per Q8_0 block, and the bytes it takes (an f16 scale, then the int8 values).
pub(crate) const Q8_BLOCK: usize = 32;
pub(crate) const Q8_BLOCK_BYTES: usize = 2 + Q8_BLOCK;

/// `x` (`[a, b, head_dim]`, f32) as Q8_0 blocks, `[a, b, head_dim / 32 * 34]` u8. The scale is
/// rounded to f16 after the values are divided by it unrounded, as ggml's `quantize_row_q8_0`
/// defines the type.
pub(crate) fn q8_0_rows(x: &Tensor) -> Result<Tensor> {
    let (a, b, hd) = x.dims3()?;
    KvDtype::Q8_0.check_head_dim(hd)?;
    let data = x.flatten_all()?.to_vec1::<f32>()?;
    let mut out = Vec::with_capacity(data.len() / Q8_BLOCK * Q8_BLOCK_BYTES);
    for block in data.chunks_exact(Q8_BLOCK) {
        let amax = block.iter().fold(0f32, |m, &v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|&v| (v * id).round() as i8 as u8));
    }
    Ok(Tensor::from_vec(
        out,
        (a, b, hd / Q8_BLOCK * Q8_BLOCK_BYTES),
        x.device(),
    )?)
}

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
    /// What the buffers store per value.
    dtype: KvDtype,
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
            dtype: KvDtype::F32,
        }
    }

    /// The same cache storing its rows as `dtype` (Q8_0: the head size must be a multiple of
    /// 32, [`KvDtype::check_head_dim`]).
    pub fn with_dtype(mut self, dtype: KvDtype) -> KvCache {
        self.dtype = dtype;
        self
    }

    /// What the buffers store per value.
    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    /// The type and length another cache needs to be like this one.
    pub(crate) fn spec(&self) -> CacheSpec {
        CacheSpec {
            dtype: self.dtype,
            max_len: self.max_len,
        }
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
        2 * self.rows_allocated() * self.n_kv_heads * self.dtype.row_bytes(self.head_dim)
    }

    fn buffer(&self, rows: usize) -> Result<(Tensor, Tensor)> {
        let shape = (self.n_kv_heads, rows, self.dtype.stored_len(self.head_dim));
        let dt = self.dtype.storage();
        Ok((
            Tensor::zeros(shape, dt, &self.device)?,
            Tensor::zeros(shape, dt, &self.device)?,
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
        match self.dtype {
            KvDtype::F32 => {
                lc.k.slice_set(k, 1, at)?;
                lc.v.slice_set(v, 1, at)?;
            }
            KvDtype::Q8_0 => {
                lc.k.slice_set(&q8_0_rows(k)?, 1, at)?;
                lc.v.slice_set(&q8_0_rows(v)?, 1, at)?;
            }
            d => {
                lc.k.slice_set(&k.to_dtype(d.storage())?, 1, at)?;
                lc.v.slice_set(&v.to_dtype(d.storage())?, 1, at)?;
            }
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

/// A rollback to `len` positions of a sequence holding `held` (any KV cache's rule).
pub(crate) fn check_truncate(len: usize, held: usize) -> Result<()> {
    if len > held {
        return Err(ModelError::Invalid(format!(
            "truncate to {len} positions, but the session holds only {held}"
        )));
    }
    Ok(())
}

/// A stored `[a, b, row]` buffer's values in f32, `[a, b, head_dim]`: the tests' reference
/// reading of each type, written from its definition apart from the attention's.
#[cfg(test)]
pub(crate) fn widened(dtype: KvDtype, t: &Tensor, head_dim: usize) -> Tensor {
    let (a, b, _) = t.dims3().unwrap();
    if dtype != KvDtype::Q8_0 {
        return t.to_dtype(DType::F32).unwrap();
    }
    let bytes: Vec<u8> = t.flatten_all().unwrap().to_vec1().unwrap();
    let values: Vec<f32> = bytes
        .chunks_exact(Q8_BLOCK_BYTES)
        .flat_map(|blk| {
            let d = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
            blk[2..].iter().map(move |&q| d * (q as i8) as f32)
        })
        .collect();
    Tensor::from_vec(values, (a, b, head_dim), t.device()).unwrap()
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

    /// An f16 / bf16 / Q8_0 cache stores each appended row rounded once, in half the bytes of
    /// f32 (Q8_0: 34 per 32 values), and rolls back, copies and drops positions like the f32 one.
    fn flat(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn a_narrow_cache_rounds_rows_once_and_holds_fewer_bytes() {
        let hd = 32;
        // Values that are exact in none of the types.
        let frac = |from: usize, n: usize| {
            let data: Vec<f32> = (from..from + n)
                .flat_map(|p| (0..hd).map(move |j| p as f32 * 0.1 - j as f32 * 0.013))
                .collect();
            Tensor::from_vec(data, (1, n, hd), &Device::Cpu).unwrap()
        };
        // What a type keeps of the values, widened to f32.
        let kept = |dt: KvDtype, x: &Tensor| -> Vec<f32> {
            let stored = match dt {
                KvDtype::Q8_0 => q8_0_rows(x).unwrap(),
                _ => x.to_dtype(dt.storage()).unwrap(),
            };
            flat(&widened(dt, &stored, hd))
        };
        for (dt, bytes) in [(KvDtype::F16, 64), (KvDtype::Bf16, 64), (KvDtype::Q8_0, 34)] {
            assert_eq!(dt.row_bytes(hd), bytes);
            let w = 4;
            let mut c = KvCache::new(2, 1, hd, 8192, &Device::Cpu)
                .with_windows(&[None, Some(w)])
                .with_dtype(dt);
            let mut full =
                KvCache::new(2, 1, hd, 8192, &Device::Cpu).with_windows(&[None, Some(w)]);
            for n in [3, 300, 1, 40] {
                for cache in [&mut c, &mut full] {
                    cache.reserve(n).unwrap();
                    let from = cache.len();
                    for layer in 0..2 {
                        let (k, _) = cache.append(layer, &frac(from, n), &frac(from, n)).unwrap();
                        assert_eq!(k.dtype(), cache.dtype().storage());
                    }
                    cache.commit(n);
                }
            }
            assert_eq!(c.rows_allocated(), full.rows_allocated());
            assert_eq!(c.bytes_allocated() * 128, full.bytes_allocated() * bytes);
            // Layer 0's view: every position's f32 values as the type keeps them.
            c.reserve(1).unwrap();
            let (k, _) = c.append(0, &frac(c.len(), 1), &frac(c.len(), 1)).unwrap();
            let all = frac(0, c.len() + 1);
            let got = flat(&widened(dt, &k, hd));
            assert_eq!(got, kept(dt, &all), "{dt}");
            let exact: Vec<f32> = all.flatten_all().unwrap().to_vec1().unwrap();
            assert_ne!(got, exact, "{dt}");
            // Within a few steps of each type's precision (bf16: 8 bits) of the largest value.
            let err = got
                .iter()
                .zip(&exact)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            let top = exact.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(err < 0.01 * top, "{dt}: {err} of {top}");
            // Copies keep the type; rollbacks and starting over work as in f32.
            let copy = c.copy_prefix(c.len() - 5).unwrap();
            assert_eq!(copy.dtype(), dt);
            assert_eq!(copy.positions_held(), c.positions_held() - 10);
            c.truncate(c.len() - 3).unwrap();
            c.truncate(0).unwrap();
            assert_eq!(c.dtype(), dt);
        }
        let e = KvDtype::Q8_0.check_head_dim(20).unwrap_err().to_string();
        assert!(e.contains("multiple of 32") && e.contains("20"), "{e}");
        assert!(
            KvDtype::Q8_0.check_head_dim(64).is_ok() && KvDtype::F16.check_head_dim(20).is_ok()
        );
        assert_eq!(KvDtype::parse(" Q8_0 "), Ok(KvDtype::Q8_0));
        let e = KvDtype::parse("q4_0").unwrap_err();
        assert!(e.contains("q4_0") && e.contains("f16"), "{e}");
    }
}
