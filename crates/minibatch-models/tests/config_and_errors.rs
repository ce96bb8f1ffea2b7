//! Config parsing of both transformers generations, transformers' defaults,
//! and the errors: unsupported values, missing and misshapen tensors, token
//! ids out of range, sequences longer than the position table, sharded
//! checkpoints.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::fixture;
use minibatch_models::checkpoint::{frozen_var_builder, load_pretrained, safetensors_files};
use minibatch_models::rope::RopeScaling;
use minibatch_models::{bert, gpt2, llama, Activation};

const LLAMA3_V4: &str = r#"{
  "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
  "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
  "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
  "rope_theta": 500000.0,
  "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "tie_word_embeddings": true, "some_future_field": [1, 2, 3]
}"#;

#[test]
fn llama_configs_of_both_generations() {
    let v4 = llama::Config::from_json(LLAMA3_V4).unwrap();
    let r4 = v4.rope().unwrap();
    assert_eq!(r4.theta, 500000.0);
    assert_eq!((v4.kv_heads(), v4.head_size()), (8, 64));
    assert!(
        matches!(r4.scaling, RopeScaling::Llama3 { factor, original_max_position_embeddings: 8192, .. } if factor == 32.0)
    );
    // transformers 5 (what save_pretrained writes): rope_parameters.
    let v5 = llama::Config::from_file(fixture("llama3_tied/config.json")).unwrap();
    let r5 = v5.rope().unwrap();
    assert_eq!(r5.theta, 10000.0);
    assert!(matches!(r5.scaling, RopeScaling::Llama3 { .. }));
    assert_eq!(v5.head_size(), 6);
    // Defaults are LlamaConfig's.
    let d = llama::Config::from_json("{}").unwrap();
    assert_eq!(
        (
            d.vocab_size,
            d.hidden_size,
            d.num_hidden_layers,
            d.kv_heads()
        ),
        (32000, 4096, 32, 32)
    );
    assert_eq!(
        (
            d.rms_norm_eps,
            d.rope().unwrap().theta,
            d.max_position_embeddings
        ),
        (1e-6, 10000.0, 2048)
    );
    assert_eq!(d.activation().unwrap(), Activation::Silu);
}

#[test]
fn bert_and_gpt2_defaults() {
    let b = bert::Config::from_json("{}").unwrap();
    assert_eq!(
        (
            b.vocab_size,
            b.hidden_size,
            b.max_position_embeddings,
            b.type_vocab_size
        ),
        (30522, 768, 512, 2)
    );
    assert_eq!(
        (b.layer_norm_eps, b.pad_token_id, b.labels()),
        (1e-12, Some(0), 2)
    );
    assert_eq!(b.activation().unwrap(), Activation::Gelu);
    let g = gpt2::Config::from_json("{}").unwrap();
    assert_eq!(
        (g.vocab_size, g.n_positions, g.n_embd, g.inner()),
        (50257, 1024, 768, 3072)
    );
    assert_eq!(g.activation().unwrap(), Activation::GeluTanh);
    assert!(g.tie_word_embeddings && g.scale_attn_weights);
}

#[test]
fn unsupported_values_are_errors_that_name_them() {
    let cases = [
        (
            llama::Config::from_json(r#"{"hidden_act": "mish"}"#).map(|_| ()),
            "mish",
        ),
        (
            llama::Config::from_json(r#"{"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}"#)
                .map(|_| ()),
            "yarn",
        ),
        (
            llama::Config::from_json(
                r#"{"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}"#,
            )
            .map(|_| ()),
            "dynamic",
        ),
        (
            llama::Config::from_json(r#"{"num_attention_heads": 32, "num_key_value_heads": 5}"#)
                .map(|_| ()),
            "num_key_value_heads",
        ),
        (
            bert::Config::from_json(r#"{"position_embedding_type": "relative_key"}"#).map(|_| ()),
            "relative_key",
        ),
        (
            bert::Config::from_json(r#"{"hidden_act": "tanh"}"#).map(|_| ()),
            "hidden_act",
        ),
        (
            gpt2::Config::from_json(r#"{"activation_function": "quick_gelu"}"#).map(|_| ()),
            "quick_gelu",
        ),
        (
            gpt2::Config::from_json(r#"{"n_embd": 10, "n_head": 3}"#).map(|_| ()),
            "n_head",
        ),
        (
            gpt2::Config::from_json(r#"{"n_embd": "wide"}"#).map(|_| ()),
            "wide", // serde names the value and its position
        ),
    ];
    for (r, word) in cases {
        let e = r.expect_err(word).to_string();
        assert!(e.contains(word), "{word}: {e}");
    }
}

#[test]
fn missing_and_misshapen_tensors_are_errors_that_name_them() {
    let cfg = gpt2::Config::from_file(fixture("gpt2/config.json")).unwrap();
    let dev = Device::Cpu;
    let mut ts = candle_core::safetensors::load(fixture("gpt2/model.safetensors"), &dev).unwrap();
    let name = "transformer.h.1.mlp.c_fc.weight";
    let w = ts.remove(name).unwrap();
    let vb = VarBuilder::from_tensors(ts.clone(), DType::F32, &dev);
    let e = gpt2::Gpt2::load(vb, &cfg).unwrap_err().to_string();
    assert!(e.contains(name), "{e}");
    ts.insert(name.into(), w.t().unwrap().contiguous().unwrap());
    let vb = VarBuilder::from_tensors(ts, DType::F32, &dev);
    let e = gpt2::Gpt2::load(vb, &cfg).unwrap_err().to_string();
    assert!(e.contains(name) && e.contains("shape"), "{e}");
    // Filling a VarMap from a checkpoint that lacks one of its Vars.
    let varmap = VarMap::new();
    let mut big = cfg.clone();
    big.n_layer = 3;
    gpt2::Gpt2::load(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &big).unwrap();
    let e = load_pretrained(&varmap, fixture("gpt2"), None, false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("transformer.h.2.attn.c_attn.weight"), "{e}");
    let report = load_pretrained(&varmap, fixture("gpt2"), None, true).unwrap();
    assert_eq!(report.missing.len(), 12);
}

#[test]
fn bad_inputs_are_errors() {
    let dev = Device::Cpu;
    let cfg = llama::Config::from_file(fixture("llama/config.json")).unwrap();
    let m = llama::Llama::load(
        frozen_var_builder(fixture("llama"), DType::F32, &dev).unwrap(),
        &cfg,
    )
    .unwrap();
    let e = m
        .forward(&Tensor::new(&[[1u32, 32]], &dev).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("32") && e.contains("vocab"), "{e}");
    let e = m
        .forward(&Tensor::new(&[[1i64, -3]], &dev).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("negative"), "{e}");
    let e = m
        .forward(&Tensor::new(&[1u32, 2], &dev).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("(batch, seq)"), "{e}");
    let ids = Tensor::new(&[[1u32, 2, 3]], &dev).unwrap();
    let e = m
        .forward_masked(&ids, Some(&Tensor::new(&[[1u32, 1]], &dev).unwrap()), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("attention_mask"), "{e}");
    // Llama's rope extends past max_position_embeddings, as transformers'.
    let long = Tensor::zeros((1, cfg.max_position_embeddings + 3), DType::U32, &dev).unwrap();
    assert!(m.forward(&long).is_ok());
    // GPT-2 and BERT have learned position tables.
    let gcfg = gpt2::Config::from_file(fixture("gpt2/config.json")).unwrap();
    let g = gpt2::Gpt2::load(
        frozen_var_builder(fixture("gpt2"), DType::F32, &dev).unwrap(),
        &gcfg,
    )
    .unwrap();
    let long = Tensor::zeros((1, gcfg.n_positions + 1), DType::U32, &dev).unwrap();
    let e = g.forward(&long).unwrap_err().to_string();
    assert!(
        e.contains("longer than") && e.contains(&gcfg.n_positions.to_string()),
        "{e}"
    );
    let bcfg = bert::Config::from_file(fixture("bert/config.json")).unwrap();
    let b = bert::BertModel::load(
        frozen_var_builder(fixture("bert"), DType::F32, &dev).unwrap(),
        &bcfg,
    )
    .unwrap();
    let ids = Tensor::new(&[[1u32, 2]], &dev).unwrap();
    let e = b
        .forward(&ids, &Tensor::new(&[[0u32, 2]], &dev).unwrap(), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("token_type_ids"), "{e}");
}

#[test]
fn sharded_checkpoints_load() {
    let dev = Device::Cpu;
    let dir = tempfile::tempdir().unwrap();
    let ts = candle_core::safetensors::load(fixture("llama/model.safetensors"), &dev).unwrap();
    let mut names: Vec<&String> = ts.keys().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        let sub: std::collections::HashMap<String, Tensor> = part
            .iter()
            .map(|k| ((*k).clone(), ts[*k].clone()))
            .collect();
        candle_core::safetensors::save(&sub, dir.path().join(file)).unwrap();
        for k in part {
            map.insert((*k).clone(), file.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    assert_eq!(safetensors_files(dir.path()).unwrap().len(), 2);
    let cfg = llama::Config::from_file(fixture("llama/config.json")).unwrap();
    let varmap = VarMap::new();
    let m = llama::Llama::load(VarBuilder::from_varmap(&varmap, DType::F32, &dev), &cfg).unwrap();
    let report = load_pretrained(&varmap, dir.path(), None, false).unwrap();
    assert_eq!(report.loaded.len(), ts.len());
    assert!(report.unused.is_empty());
    let d = common::io("llama");
    let out = m
        .forward_masked(&d["input_ids"], Some(&d["attention_mask"]), false)
        .unwrap();
    minibatch_testkit::assert_close(
        &out,
        &d["out"],
        minibatch_testkit::Tol::rel_to_max(1e-4),
        "sharded llama",
    );
    // A directory without a checkpoint says so.
    let empty = tempfile::tempdir().unwrap();
    let e = safetensors_files(empty.path()).unwrap_err().to_string();
    assert!(e.contains("model.safetensors"), "{e}");
}
