//! `POST /v1/embeddings`: each input's pooled, unit-length hidden state from the target (see
//! `models::embed`), in OpenAI's response shape: floats, or base64 of little-endian f32 bytes
//! (what the `openai` client asks for unless told otherwise).

use base64::Engine as _;
use serde_json::{Value, json};

use super::api::{EmbedInput, EmbeddingsRequest};
use super::error::ApiError;
use super::http::Served;
use crate::models::embed::{Pooling, normalise};

/// Embeds every input in order (together, in batched forwards); `gone` says the client has left
/// (the rest is skipped). Returns the vectors and the tokens read.
pub(super) fn run(
    served: &Served,
    req: &EmbeddingsRequest,
    pooling: Pooling,
    gone: impl Fn() -> bool,
) -> Result<(Vec<Vec<f32>>, usize), ApiError> {
    let tokenizer = &*served.tokenizer;
    let hidden = served.engine.target().config().hidden_size;
    let context = served.engine.max_context();
    if let Some(d) = req.dimensions
        && d > hidden
    {
        return Err(ApiError::invalid(
            "dimensions",
            format!("dimensions is {d}, but this model's embeddings have {hidden}"),
        ));
    }
    let name = |i: usize| match (req.names.get(i), req.inputs.len()) {
        (Some(n), _) => n.clone(),
        (None, 1) => "input".to_string(),
        (None, _) => format!("input[{i}]"),
    };
    // Tokenize and check every input before the first forward: a bad one fails the request
    // without spending a model pass on the others.
    let mut all = Vec::with_capacity(req.inputs.len());
    for (i, input) in req.inputs.iter().enumerate() {
        let ids = match input {
            EmbedInput::Text(text) => {
                let mut ids = tokenizer.encode_prompt(text, true).map_err(|e| {
                    ApiError::invalid(name(i), format!("cannot tokenize the text: {e:#}"))
                })?;
                if let (true, Some(eos)) = (tokenizer.add_eos(), tokenizer.eos_id()) {
                    ids.push(eos);
                }
                ids
            }
            EmbedInput::Tokens(ids) => {
                let vocab = tokenizer.vocab_size();
                if let Some(j) = ids.iter().position(|&t| t as usize >= vocab) {
                    return Err(ApiError::invalid(
                        format!("{}[{j}]", name(i)),
                        format!(
                            "token id {} is outside the vocabulary (size {vocab})",
                            ids[j]
                        ),
                    ));
                }
                ids.clone()
            }
        };
        if ids.is_empty() {
            return Err(ApiError::invalid(
                name(i),
                format!("{} is empty (no tokens to embed)", name(i)),
            ));
        }
        if ids.len() > context {
            return Err(ApiError::invalid(
                name(i),
                format!(
                    "{} has {} tokens; this model reads at most {context}",
                    name(i),
                    ids.len()
                ),
            )
            .with_code("context_length_exceeded"));
        }
        all.push(ids);
    }
    let mut vectors = served
        .engine
        .embed(&all, pooling, |_| !gone())
        .map_err(|e| ApiError::internal(format!("embedding failed: {e:#}")))?;
    if vectors.len() < all.len() {
        return Err(ApiError::bad_request("the client closed the request"));
    }
    if let Some(d) = req.dimensions {
        for v in &mut vectors {
            v.truncate(d);
            normalise(v);
        }
    }
    Ok((vectors, all.iter().map(Vec::len).sum()))
}

/// How close two unit vectors are: their dot product (the cosine of their angle).
pub(super) fn similarity(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// `/v1/rerank`'s body: the documents by their similarity to the query (the first vector),
/// most similar first (ties: the earlier), the best `top_n`.
pub(super) fn rerank_body(
    id: String,
    model: &str,
    r: &super::api::RerankRequest,
    vectors: &[Vec<f32>],
    tokens: usize,
) -> Value {
    let (query, docs) = vectors
        .split_first()
        .map_or((&[][..], &[][..]), |(q, d)| (&q[..], d));
    let mut ranked: Vec<(usize, f64)> = docs
        .iter()
        .map(|d| similarity(query, d))
        .enumerate()
        .collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    ranked.truncate(r.top_n.unwrap_or(ranked.len()));
    let results: Vec<Value> = ranked
        .into_iter()
        .map(|(i, score)| {
            let mut v = json!({"index": i, "relevance_score": score});
            if r.return_documents {
                v["document"] = json!({"text": r.documents[i]});
            }
            v
        })
        .collect();
    json!({"id": id, "model": model, "results": results, "usage": {"total_tokens": tokens}})
}

/// OpenAI's response body.
pub(super) fn body(model: &str, base64: bool, vectors: &[Vec<f32>], tokens: usize) -> Value {
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = match base64 {
                true => {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
                }
                false => json!(v),
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })
}
