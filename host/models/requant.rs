//! Load-time re-encoding of weights whose CPU kernel is slow into an equivalent fast type.
//!
//! candle 0.11 has no SIMD dot product for Q5_0 (it falls back to a scalar loop), while Q8_0 has
//! AVX2 and NEON kernels. A Q5_0 block is `d * q` with `q` in -16..=15 and one f16 scale per 32
//! values; a Q8_0 block is `d * q` with `q` an i8 and the same f16 scale per 32 values. Copying
//! `d` and widening `q` is therefore exact: every dequantized weight and every integer block dot
//! product is unchanged, only the bytes per weight grow (22 -> 34 per block). Qwen2.5-0.5B's
//! Q4_K_M file is mostly Q5_0 (its 896-wide rows do not fit 256-wide k-quants). Where verdict's
//! own Q5_0 kernel applies (`cpu_gemm`, AVX-512 VNNI), the weight stays Q5_0 instead.

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use std::borrow::Cow;
use std::sync::Arc;

const BLOCK: usize = 32;
const Q5_0_BYTES: usize = 22; // f16 d, u32 qh (5th bits), 16 bytes of nibbles
const Q8_0_BYTES: usize = 34; // f16 d, 32 x i8

/// Q5_0 blocks -> Q8_0 blocks, bit-exact in value.
pub(crate) fn q5_0_to_q8_0(raw: &[u8]) -> Option<Vec<u8>> {
    if !raw.len().is_multiple_of(Q5_0_BYTES) {
        return None;
    }
    let mut out = Vec::with_capacity(raw.len() / Q5_0_BYTES * Q8_0_BYTES);
    for b in raw.chunks_exact(Q5_0_BYTES) {
        out.extend_from_slice(&b[..2]); // d
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let qs = &b[6..];
        let mut q = [0u8; BLOCK];
        for j in 0..BLOCK / 2 {
            let hi0 = (((qh >> j) & 1) << 4) as u8;
            let hi1 = (((qh >> (j + 16)) & 1) << 4) as u8;
            q[j] = ((qs[j] & 0x0f) | hi0).wrapping_sub(16); // i8 two's complement
            q[j + BLOCK / 2] = ((qs[j] >> 4) | hi1).wrapping_sub(16);
        }
        out.extend_from_slice(&q);
    }
    Some(out)
}

/// The matmul form of a weight for this device: Q5_0 on the CPU becomes the equivalent Q8_0
/// unless verdict's Q5_0 kernel takes it; everything else is returned as is.
pub(crate) fn for_matmul(w: QMatMul) -> candle_core::Result<QMatMul> {
    let QMatMul::QTensor(t) = &w else {
        return Ok(w);
    };
    // VERDICT_KEEP_Q5_0=1 keeps the stored encoding (for A/B speed measurements).
    let keep = std::env::var("VERDICT_KEEP_Q5_0").is_ok_and(|v| v == "1");
    // verdict's own Q5_0 kernel reads Q5_0 at its own size (`cpu_gemm`); widen only for candle.
    if keep
        || t.dtype() != GgmlDType::Q5_0
        || !t.device().is_cpu()
        || super::cpu_gemm::takes_q5_0(t)
    {
        return Ok(w);
    }
    Ok(match widen(t)? {
        Some(q8) => QMatMul::QTensor(Arc::new(q8)),
        None => w,
    })
}

/// A Q5_0 matrix as the equivalent Q8_0 (`None` if its bytes are not whole blocks).
fn widen(t: &QTensor) -> candle_core::Result<Option<QTensor>> {
    let Some(q8) = q5_0_to_q8_0(&t.data()?) else {
        return Ok(None);
    };
    let storage = QStorage::from_data(Cow::Owned(q8), &t.device(), GgmlDType::Q8_0)?;
    Ok(Some(QTensor::new(storage, t.shape().clone())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Module, Tensor};

    #[test]
    fn q5_0_to_q8_0_is_exact() {
        let data: Vec<f32> = (0..64 * 128)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1.0 + (i % 13) as f32))
            .collect();
        let x = Tensor::from_vec(data, (64, 128), &Device::Cpu).unwrap();
        let q5 = QTensor::quantize(&x, GgmlDType::Q5_0).unwrap();
        let w8 = QMatMul::QTensor(Arc::new(widen(&q5).unwrap().unwrap()));
        let w5 = QMatMul::from_qtensor(q5).unwrap();
        let (QMatMul::QTensor(a), QMatMul::QTensor(b)) = (&w5, &w8) else {
            panic!("quantized weights expected");
        };
        assert_eq!(b.dtype(), GgmlDType::Q8_0);
        let da: Vec<f32> = a
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let db: Vec<f32> = b
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(da, db);
        // And the matmul agrees (integer block dots are identical; only f32 summation order of
        // the kernels may differ).
        let v = Tensor::from_vec(
            (0..128)
                .map(|i| (i as f32 * 0.37).sin())
                .collect::<Vec<_>>(),
            (1, 128),
            &Device::Cpu,
        )
        .unwrap();
        let ya: Vec<f32> = w5
            .forward(&v)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let yb: Vec<f32> = w8
            .forward(&v)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (p, q) in ya.iter().zip(&yb) {
            assert!((p - q).abs() <= 1e-4 * (1.0 + p.abs()), "{p} vs {q}");
        }
    }
}
