//! Text embeddings from a decoder: the final hidden states of a sequence (after the last norm)
//! pooled to one vector and scaled to unit length, as llama.cpp's `/v1/embeddings` computes them.
//! Embedding models built on a decoder name their pooling in the GGUF (`{arch}.pooling_type`:
//! Qwen3-Embedding pools its last token); for a generative model verdict pools the last token
//! too, as vLLM does.

use super::error::{ModelError, Result, candle_msg};
use super::transformer::{BatchItem, Model, Rows, forward_batch};
use candle_core::quantized::gguf_file;

/// How a sequence's hidden states become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The mean over every position.
    Mean,
    /// The first position's.
    Cls,
    /// The last position's: the only one that has read the whole text in a causal model.
    Last,
}

impl Pooling {
    pub fn parse(s: &str) -> Option<Pooling> {
        match s {
            "mean" => Some(Pooling::Mean),
            "cls" => Some(Pooling::Cls),
            "last" => Some(Pooling::Last),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
            Pooling::Last => "last",
        }
    }

    /// The pooling a GGUF declares (`{arch}.pooling_type`, llama.cpp's numbering: 1 mean, 2 cls,
    /// 3 last), or `None` where it declares none (0, or no key). Rank pooling (4, rerankers)
    /// gives no vector per text: an error.
    pub fn of_gguf(meta: &gguf_file::Content) -> std::result::Result<Option<Pooling>, String> {
        let arch = match meta.metadata.get("general.architecture") {
            Some(gguf_file::Value::String(a)) => a.clone(),
            _ => return Ok(None),
        };
        let key = format!("{arch}.pooling_type");
        let Some(v) = meta.metadata.get(&key) else {
            return Ok(None);
        };
        let n = v
            .to_u32()
            .or_else(|_| v.to_i32().map(|x| x as u32))
            .map_err(|e| format!("{key}: {}", candle_msg(&e)))?;
        match n {
            0 => Ok(None),
            1 => Ok(Some(Pooling::Mean)),
            2 => Ok(Some(Pooling::Cls)),
            3 => Ok(Some(Pooling::Last)),
            4 => Err(format!(
                "{key} is 4 (rank): a reranker scores pairs, it gives no embedding per text"
            )),
            other => Err(format!("{key} is {other}, not a pooling llama.cpp defines")),
        }
    }
}

/// Tokens one batched forward of [`embed_batch`] reads at most in the server (a longer text runs
/// alone). On the 2-vCPU VM, one-line texts ran faster batched at 512 than one by one, while
/// texts of 12 lines (~140 tokens) gained nothing at any size (BENCHMARKS.md, `verdict bench
/// embed`).
pub const BATCH_TOKENS: usize = 512;

/// The embedding of `ids` (`[hidden]`): their hidden states run through `model` in a fresh
/// session, pooled, and divided by their L2 norm.
pub fn embed(model: &Model, ids: &[u32], pooling: Pooling) -> Result<Vec<f32>> {
    if ids.is_empty() {
        return Err(ModelError::Invalid("nothing to embed: no tokens".into()));
    }
    let mut s = model.session();
    pool(&s.forward(ids, Rows::Hidden)?.hidden, pooling)
}

/// The embeddings of several texts, in order: consecutive texts of up to `batch_tokens` tokens
/// together ([`BATCH_TOKENS`] in the server; 0: one text per forward) run as one batched
/// forward (each text its own sequence), which reads the weights once for all of them. Each
/// text gets the vector it gets alone (up to the rounding of kernels whose result depends on
/// the row count). `each` runs after every forward with the texts done so far, and stops the
/// rest when it says so (the client left).
pub fn embed_batch(
    model: &Model,
    texts: &[Vec<u32>],
    pooling: Pooling,
    batch_tokens: usize,
    mut each: impl FnMut(usize) -> bool,
) -> Result<Vec<Vec<f32>>> {
    if let Some(i) = texts.iter().position(|t| t.is_empty()) {
        return Err(ModelError::Invalid(format!(
            "nothing to embed: text {i} has no tokens"
        )));
    }
    let mut out = Vec::with_capacity(texts.len());
    let mut at = 0;
    while at < texts.len() {
        // A tensor-parallel model runs its sequences one at a time.
        let mut end = at + 1;
        let mut tokens = texts[at].len();
        while model.shards() == 1 && end < texts.len() && tokens + texts[end].len() <= batch_tokens
        {
            tokens += texts[end].len();
            end += 1;
        }
        let mut sessions: Vec<_> = (at..end).map(|_| model.session()).collect();
        let mut items: Vec<BatchItem<'_>> = sessions
            .iter_mut()
            .zip(&texts[at..end])
            .map(|(session, t)| BatchItem {
                session,
                tokens: t,
                rows: Rows::Hidden,
            })
            .collect();
        for f in forward_batch(&mut items) {
            out.push(pool(&f?.hidden, pooling)?);
        }
        at = end;
        if at < texts.len() && !each(at) {
            break;
        }
    }
    Ok(out)
}

/// One text's hidden states (`[rows, hidden]`) pooled and scaled to unit length.
fn pool(hidden: &candle_core::Tensor, pooling: Pooling) -> Result<Vec<f32>> {
    let rows = hidden
        .to_dtype(candle_core::DType::F32)
        .and_then(|h| h.to_vec2::<f32>())
        .map_err(|e| ModelError::Invalid(format!("reading hidden states: {}", candle_msg(&e))))?;
    let mut v = match pooling {
        Pooling::Cls => rows[0].clone(),
        Pooling::Last => rows[rows.len() - 1].clone(),
        Pooling::Mean => {
            let mut sum = vec![0f64; rows[0].len()];
            for r in &rows {
                for (s, x) in sum.iter_mut().zip(r) {
                    *s += *x as f64;
                }
            }
            sum.iter().map(|s| (s / rows.len() as f64) as f32).collect()
        }
    };
    normalise(&mut v);
    Ok(v)
}

/// Scales `v` to unit L2 length (a zero vector stays zero).
pub fn normalise(v: &mut [f32]) {
    let norm = v.iter().map(|x| *x as f64 * *x as f64).sum::<f64>().sqrt();
    if norm > 0.0 {
        for x in v.iter_mut() {
            *x = (*x as f64 / norm) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gguf_file::{Content, Value, VersionedMagic};

    fn meta(pooling: Option<u32>) -> Content {
        let mut metadata = std::collections::HashMap::new();
        metadata.insert(
            "general.architecture".to_string(),
            Value::String("qwen3".into()),
        );
        if let Some(p) = pooling {
            metadata.insert("qwen3.pooling_type".to_string(), Value::U32(p));
        }
        Content {
            magic: VersionedMagic::GgufV3,
            metadata,
            tensor_infos: Default::default(),
            tensor_data_offset: 0,
        }
    }

    #[test]
    fn the_gguf_names_its_pooling() {
        assert_eq!(Pooling::of_gguf(&meta(None)), Ok(None));
        assert_eq!(Pooling::of_gguf(&meta(Some(0))), Ok(None));
        assert_eq!(Pooling::of_gguf(&meta(Some(1))), Ok(Some(Pooling::Mean)));
        assert_eq!(Pooling::of_gguf(&meta(Some(2))), Ok(Some(Pooling::Cls)));
        assert_eq!(Pooling::of_gguf(&meta(Some(3))), Ok(Some(Pooling::Last)));
        let rank = Pooling::of_gguf(&meta(Some(4))).unwrap_err();
        assert!(
            rank.contains("qwen3.pooling_type") && rank.contains("reranker"),
            "{rank}"
        );
        let odd = Pooling::of_gguf(&meta(Some(9))).unwrap_err();
        assert!(odd.contains("is 9"), "{odd}");
        for p in [Pooling::Mean, Pooling::Cls, Pooling::Last] {
            assert_eq!(Pooling::parse(p.name()), Some(p));
        }
        assert_eq!(Pooling::parse("max"), None);
    }

    #[test]
    fn normalising_keeps_direction_and_zero() {
        let mut v = [3.0, 4.0];
        normalise(&mut v);
        assert_eq!(v, [0.6, 0.8]);
        let mut z = [0.0; 3];
        normalise(&mut z);
        assert_eq!(z, [0.0; 3]);
    }
}
