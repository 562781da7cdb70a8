//! LoRA adapters (`verdict::models::lora`) on tiny random models: llama.cpp's logits with the
//! same GGUF adapters, PEFT adapters against the weights merged by hand, the forward's row
//! independence, and every bad adapter's error.

use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use verdict::models::testing::{
    TinyLora, TinySpec, peer_loras, peer_spec, write_tiny_gguf, write_tiny_lora_gguf,
    write_tiny_lora_gguf_as, write_tiny_peft, write_tiny_safetensors,
    write_tiny_safetensors_merged,
};
use verdict::models::{LoraAdapter, Model, Rows};

fn rows(m: &Model, tokens: &[u32]) -> Vec<Vec<f32>> {
    m.session()
        .forward(tokens, Rows::All)
        .unwrap()
        .logits
        .to_vec2::<f32>()
        .unwrap()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

fn sha256(path: &Path) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

fn gguf(dir: &Path, name: &str, spec: &TinySpec) -> PathBuf {
    let p = dir.join(format!("{name}.gguf"));
    write_tiny_gguf(&p, spec).unwrap();
    p
}

fn lora(path: &Path, scale: f32) -> LoraAdapter {
    LoraAdapter::load(path, scale).unwrap()
}

const TOKENS: [u32; 12] = [5, 77, 140, 12, 3, 77, 140, 9, 200, 31, 64, 250];

#[derive(serde::Deserialize)]
struct Fixture {
    tokens: Vec<u32>,
    probe_ids: Vec<usize>,
    models: HashMap<String, Base>,
    loras: HashMap<String, Run>,
}

#[derive(serde::Deserialize)]
struct Base {
    sha256: String,
    probes: Vec<Vec<f32>>,
}

#[derive(serde::Deserialize)]
struct Run {
    sha256: String,
    scale: f32,
    probes: Vec<Vec<f32>>,
    argmax: Vec<usize>,
}

/// llama.cpp (`Llama(lora_path=..., lora_scale=0.7)`, scripts/make-fixtures.py peer) and verdict
/// read the same adapter files alike: every projection and the lm_head of llama (whose q and k
/// rows the adapter holds permuted), qwen2's q and v beside their biases, phi3's fused q/k/v
/// and gate/up with alpha 0. Within f32 rounding, where alpha left out of the scale or a fused
/// matrix cut in the wrong order fails; and each adapter moves the base's logits by more than
/// 0.05.
#[test]
fn lora_adapters_match_llama_cpp() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peer.json"),
    )
    .unwrap();
    let fx: Fixture = serde_json::from_str(&text).unwrap();
    let loras = peer_loras();
    assert_eq!(
        loras.len(),
        fx.loras.len(),
        "peer.json is for other adapters"
    );
    let dir = tempfile::tempdir().unwrap();
    for (base, spec_lora) in loras {
        let run = &fx.loras[base];
        let spec = peer_spec(base).unwrap();
        let base_path = gguf(dir.path(), base, &spec);
        assert_eq!(
            sha256(&base_path),
            fx.models[base].sha256,
            "{base}: base bytes"
        );
        let path = dir.path().join(format!("lora-{base}.gguf"));
        write_tiny_lora_gguf(&path, &spec, &spec_lora).unwrap();
        assert_eq!(
            sha256(&path),
            run.sha256,
            "{base}: the adapter's bytes changed; rerun scripts/make-fixtures.py peer"
        );
        let model = Model::load_gguf(&base_path, &Device::Cpu)
            .unwrap()
            .with_lora(&[lora(&path, run.scale)])
            .unwrap();
        let out = rows(&model, &fx.tokens);
        let probes: Vec<Vec<f32>> = out
            .iter()
            .map(|r| fx.probe_ids.iter().map(|&i| r[i]).collect())
            .collect();
        let d = max_diff(&probes, &run.probes);
        assert!(d < 1e-3, "{base}: {d} from llama.cpp");
        let moved = max_diff(&run.probes, &fx.models[base].probes);
        assert!(
            moved > 0.05,
            "{base}: the adapter moved llama.cpp's logits by {moved} only"
        );
        for (i, r) in out.iter().enumerate() {
            let a = verdict::sample::argmax(r) as usize;
            let b = run.argmax[i];
            assert!(
                a == b || r[a] - r[b] < 2e-3,
                "{base} position {i}: {a} vs {b}"
            );
        }
    }
}

/// A PEFT adapter equals its update merged into the weights (`W + scale * alpha / rank * B A`),
/// on the Hugging Face checkpoint and on the GGUF of the same weights (where llama's q and k
/// rows are permuted, and so must B's be); the GGUF adapter of the same numbers (B's rows
/// permuted as llama.cpp's converter does) gives the same on both. Scale 0 changes no bit;
/// two adapters add up.
#[test]
fn peft_and_gguf_adapters_equal_the_merged_weights() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    const SCALE: f32 = 0.7;
    for (base, spec_lora) in peer_loras() {
        let spec = peer_spec(base).unwrap();
        let (st, merged, peft) = (
            d.join(format!("{base}-hf")),
            d.join(format!("{base}-merged")),
            d.join(format!("{base}-peft")),
        );
        write_tiny_safetensors(&st, &spec).unwrap();
        write_tiny_safetensors_merged(&merged, &spec, &spec_lora, SCALE).unwrap();
        write_tiny_peft(&peft, &spec, &spec_lora).unwrap();
        let g = Model::load_gguf(&gguf(d, base, &spec), &Device::Cpu).unwrap();
        let adapter = d.join(format!("lora-{base}.gguf"));
        write_tiny_lora_gguf(&adapter, &spec, &spec_lora).unwrap();
        let st = Model::load_safetensors(&st, &Device::Cpu).unwrap();
        let want = rows(
            &Model::load_safetensors(&merged, &Device::Cpu).unwrap(),
            &TOKENS,
        );
        let cases = [
            ("hf + peft", st.with_lora(&[lora(&peft, SCALE)]).unwrap()),
            ("gguf + peft", g.with_lora(&[lora(&peft, SCALE)]).unwrap()),
            (
                "gguf + gguf adapter",
                g.with_lora(&[lora(&adapter, SCALE)]).unwrap(),
            ),
            (
                "hf + gguf adapter",
                st.with_lora(&[lora(&adapter, SCALE)]).unwrap(),
            ),
            (
                "two halves",
                g.with_lora(&[lora(&adapter, SCALE / 2.0), lora(&adapter, SCALE / 2.0)])
                    .unwrap(),
            ),
        ];
        for (what, m) in &cases {
            let diff = max_diff(&rows(m, &TOKENS), &want);
            assert!(diff < 1e-4, "{base} {what}: {diff} from the merged weights");
        }
        let moved = max_diff(&rows(&g, &TOKENS), &want);
        assert!(
            moved > 0.05,
            "{base}: the update moved logits by {moved} only"
        );
        // Adapters stored in half precision (convert_lora_to_gguf.py's --outtype, PEFT saved
        // in bf16) give the same update to their rounding (llama's bf16: 0.06 where the update
        // moves logits by 6.6; half types read as each other would be far off).
        let mut halves = Vec::new();
        for dtype in [GgmlDType::F16, GgmlDType::BF16] {
            let p = d.join(format!("lora-{base}-{dtype:?}.gguf"));
            write_tiny_lora_gguf_as(&p, &spec, &spec_lora, dtype).unwrap();
            halves.push((format!("gguf {dtype:?}"), lora(&p, SCALE)));
        }
        let bf16 = d.join(format!("{base}-peft-bf16"));
        std::fs::create_dir_all(&bf16).unwrap();
        std::fs::copy(
            peft.join("adapter_config.json"),
            bf16.join("adapter_config.json"),
        )
        .unwrap();
        let st =
            candle_core::safetensors::load(peft.join("adapter_model.safetensors"), &Device::Cpu)
                .unwrap()
                .into_iter()
                .map(|(k, t)| (k, t.to_dtype(candle_core::DType::BF16).unwrap()))
                .collect::<HashMap<_, _>>();
        candle_core::safetensors::save(&st, bf16.join("adapter_model.safetensors")).unwrap();
        halves.push(("peft bf16".into(), lora(&bf16, SCALE)));
        for (what, adapter) in halves {
            let diff = max_diff(&rows(&g.with_lora(&[adapter]).unwrap(), &TOKENS), &want);
            assert!(
                diff < moved / 10.0,
                "{base} {what}: {diff} (the update: {moved})"
            );
        }
        let off = g.with_lora(&[lora(&adapter, 0.0)]).unwrap();
        assert_eq!(rows(&off, &TOKENS), rows(&g, &TOKENS), "{base}: scale 0");
    }
}

/// With an adapter, a row's logits still do not depend on how many rows a forward computes
/// (what makes a k-token verification equal k single-token steps), nor does batching change
/// them.
#[test]
fn lora_forwards_are_row_independent() {
    let dir = tempfile::tempdir().unwrap();
    // Also a wider model with a rank-16 adapter, whose multi-row updates run on the thread
    // pool (one-row ones do not).
    let wide = (
        "wide",
        TinyLora {
            rank: 16,
            alpha: 16.0,
            targets: vec![
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "ffn_up",
                "ffn_down",
            ],
            seed: 4,
        },
    );
    for (base, spec_lora) in peer_loras().into_iter().chain([wide]) {
        let spec = match base {
            "wide" => TinySpec {
                hidden: 256,
                intermediate: 544,
                heads: 4,
                kv_heads: 2,
                layers: 2,
                ..TinySpec::default()
            },
            _ => peer_spec(base).unwrap(),
        };
        let adapter = dir.path().join(format!("lora-{base}.gguf"));
        write_tiny_lora_gguf(&adapter, &spec, &spec_lora).unwrap();
        // Quantized, as real models are: verdict's kernel sums a row alike in any batch (f32
        // weights go through candle's matmul, which does not).
        let q8 = TinySpec {
            dtype: candle_core::quantized::GgmlDType::Q8_0,
            ..spec.clone()
        };
        let m = Model::load_gguf(&gguf(dir.path(), base, &q8), &Device::Cpu)
            .unwrap()
            .with_lora(&[lora(&adapter, 1.0)])
            .unwrap();
        let all = rows(&m, &TOKENS);
        let mut s = m.session();
        let one: Vec<Vec<f32>> = TOKENS
            .iter()
            .map(|&t| {
                s.forward(&[t], Rows::All)
                    .unwrap()
                    .logits
                    .to_vec2::<f32>()
                    .unwrap()[0]
                    .clone()
            })
            .collect();
        assert_eq!(all, one, "{base}: all rows at once vs one at a time");
        // Three rows at a time from a prefix: the same bits.
        let mut s = m.session();
        s.forward(&TOKENS[..6], Rows::All).unwrap();
        let tail = s
            .forward(&TOKENS[6..9], Rows::All)
            .unwrap()
            .logits
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(tail, all[6..9].to_vec(), "{base}: a 3-row step");
    }
}

fn err_of<T>(r: verdict::models::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

fn assert_names(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "{msg:?} should name {p:?}");
    }
}

/// Each bad adapter is refused with an error naming the file, the tensor or key, and what is
/// wrong; none is applied in part.
#[test]
fn bad_adapters_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let llama = peer_spec("llama").unwrap();
    let (llama_lora, qwen_lora) = {
        let mut l = peer_loras().into_iter();
        (l.next().unwrap().1, l.next().unwrap().1)
    };
    let base = Model::load_gguf(&gguf(d, "llama", &llama), &Device::Cpu).unwrap();
    let good = d.join("good.gguf");
    write_tiny_lora_gguf(&good, &llama, &llama_lora).unwrap();

    // A model where an adapter belongs.
    let e = err_of(LoraAdapter::load(&d.join("llama.gguf"), 1.0));
    assert_names(&e, &["llama.gguf", "general.type", "not a LoRA adapter"]);
    // No such file.
    let e = err_of(LoraAdapter::load(&d.join("missing.gguf"), 1.0));
    assert_names(&e, &["missing.gguf", "LoRA adapter", "no such file"]);
    // A scale that is not a number.
    let e = err_of(LoraAdapter::load(&good, f32::NAN));
    assert_names(&e, &["good.gguf", "scale"]);

    // Another family's adapter.
    let qwen2 = peer_spec("qwen2").unwrap();
    let other = d.join("qwen2-lora.gguf");
    write_tiny_lora_gguf(&other, &qwen2, &qwen_lora).unwrap();
    let e = err_of(base.with_lora(&[lora(&other, 1.0)]));
    assert_names(
        &e,
        &["qwen2-lora.gguf", "general.architecture", "qwen2", "llama"],
    );
    // The same family at another size.
    let wide = TinySpec {
        hidden: 96,
        ..llama.clone()
    };
    let wide_lora = d.join("wide.gguf");
    write_tiny_lora_gguf(&wide_lora, &wide, &llama_lora).unwrap();
    let e = err_of(base.with_lora(&[lora(&wide_lora, 1.0)]));
    assert_names(&e, &["wide.gguf", "another model"]);
    // An lm_head update for a model whose lm_head is its embedding.
    let tied = Model::load_gguf(
        &gguf(
            d,
            "tied",
            &TinySpec {
                tied: true,
                ..llama.clone()
            },
        ),
        &Device::Cpu,
    )
    .unwrap();
    let e = err_of(tied.with_lora(&[lora(&good, 1.0)]));
    assert_names(&e, &["good.gguf", "output.weight", "tied embeddings"]);
    // A phi3 adapter's fused names on llama: no such projection.
    let phi3 = peer_spec("phi3").unwrap();
    let phi3_peft = d.join("phi3-peft");
    write_tiny_peft(&phi3_peft, &phi3, &peer_loras()[2].1).unwrap();
    let e = err_of(base.with_lora(&[lora(&phi3_peft, 1.0)]));
    assert_names(
        &e,
        &[
            "phi3-peft",
            "model.layers.0.mlp.gate_up_proj",
            "no such projection",
        ],
    );
    // Sharding an adapted model, and adapting a sharded one.
    let adapted = base.with_lora(&[lora(&good, 1.0)]).unwrap();
    let e = err_of(adapted.shard(2));
    assert_names(&e, &["LoRA", "tensor-parallel"]);
    let e = err_of(base.shard(2).unwrap().with_lora(&[lora(&good, 1.0)]));
    assert_names(&e, &["LoRA", "tensor-parallel"]);

    // An adapted lm_head cut to part of the vocabulary (a draft's), or the other way round.
    let fresh = base.with_lora(&[lora(&good, 1.0)]).unwrap();
    let e = err_of(fresh.with_draft_vocab(100, &[]));
    assert_names(&e, &["output.weight", "LoRA"]);
    let cut = Model::load_gguf(&d.join("llama.gguf"), &Device::Cpu)
        .unwrap()
        .with_draft_vocab(100, &[])
        .unwrap();
    let e = err_of(cut.with_lora(&[lora(&good, 1.0)]));
    assert_names(&e, &["LoRA", "vocabulary is cut"]);

    // PEFT directories.
    let peft = |name: &str, edit: &dyn Fn(&mut serde_json::Value, &mut HashMap<String, Tensor>)| {
        let p = d.join(name);
        write_tiny_peft(&p, &llama, &llama_lora).unwrap();
        let cfg_path = p.join("adapter_config.json");
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
        let st = p.join("adapter_model.safetensors");
        let mut tensors = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
        edit(&mut cfg, &mut tensors);
        std::fs::write(&cfg_path, cfg.to_string()).unwrap();
        candle_core::safetensors::save(&tensors, &st).unwrap();
        p
    };
    let dora = peft("dora", &|c, _| c["use_dora"] = true.into());
    assert_names(
        &err_of(LoraAdapter::load(&dora, 1.0)),
        &["adapter_config.json", "use_dora", "DoRA"],
    );
    let saved = peft("saved", &|c, _| {
        c["modules_to_save"] = serde_json::json!(["lm_head"])
    });
    assert_names(
        &err_of(LoraAdapter::load(&saved, 1.0)),
        &["modules_to_save"],
    );
    let no_alpha = peft("no-alpha", &|c, _| {
        c.as_object_mut().unwrap().remove("lora_alpha");
    });
    assert_names(
        &err_of(LoraAdapter::load(&no_alpha, 1.0)),
        &["adapter_config.json", "lora_alpha", "missing"],
    );
    let half = peft("half", &|_, t| {
        t.remove("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight");
    });
    assert_names(
        &err_of(LoraAdapter::load(&half, 1.0)),
        &[
            "adapter_model.safetensors",
            "model.layers.0.self_attn.q_proj",
            "only one of lora_A and lora_B",
        ],
    );
    let transposed = peft("transposed", &|_, t| {
        let k = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight";
        let a = t[k].t().unwrap().contiguous().unwrap();
        t.insert(k.into(), a);
    });
    assert_names(
        &err_of(LoraAdapter::load(&transposed, 1.0)),
        &["model.layers.1.mlp.down_proj", "do not share a rank"],
    );
    let inf = peft("inf", &|_, t| {
        let k = "base_model.model.lm_head.lora_B.weight";
        let b = (t[k].clone() / 0.0).unwrap();
        t.insert(k.into(), b);
    });
    assert_names(
        &err_of(LoraAdapter::load(&inf, 1.0)),
        &["lm_head", "not finite"],
    );
    let experts = peft("experts", &|_, t| {
        let a = Tensor::zeros((4, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros((96, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let p = "base_model.model.model.layers.0.mlp.experts.0.gate_proj";
        t.insert(format!("{p}.lora_A.weight"), a);
        t.insert(format!("{p}.lora_B.weight"), b);
    });
    assert_names(
        &err_of(base.with_lora(&[lora(&experts, 1.0)])),
        &["experts", "not supported"],
    );
    let embed = peft("embed", &|_, t| {
        let a = Tensor::zeros((4, 300), candle_core::DType::F32, &Device::Cpu).unwrap();
        t.insert(
            "base_model.model.model.embed_tokens.lora_embedding_A".into(),
            a,
        );
    });
    assert_names(
        &err_of(LoraAdapter::load(&embed, 1.0)),
        &["embed_tokens", "token embeddings"],
    );
    let no_config = peft("no-config", &|_, _| {});
    std::fs::remove_file(no_config.join("adapter_config.json")).unwrap();
    assert_names(
        &err_of(LoraAdapter::load(&no_config, 1.0)),
        &["adapter_config.json"],
    );
}
