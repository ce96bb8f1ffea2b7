//! The ports against transformers (fixtures from `fixtures/make_models.py`):
//! each tiny random model is loaded from the files `save_pretrained` wrote,
//! run on the recorded inputs (padding masks, token types) in eval mode,
//! and compared: outputs to 1e-4 and the gradient of `sum(out * r)` of every
//! parameter to 1e-3, each relative to the largest expected value (at
//! least a millionth of the model's largest gradient). Every
//! parameter is a Var of the map, and each one receives a gradient.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::{fixture, io, max_abs};
use minibatch_models::checkpoint::load_pretrained;
use minibatch_models::{bert, gpt2, llama};
use minibatch_testkit::{assert_close, Tol};

/// Builds a model over a fresh VarMap, fills it from `fixtures/<name>/`,
/// runs `forward` and checks the output and every gradient.
fn check(name: &str, forward: impl Fn(VarBuilder, &HashMap<String, Tensor>) -> Tensor) {
    let data = io(name);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    // Building creates every Var; loading then fills each from the checkpoint.
    let out_random = forward(vb.clone(), &data);
    drop(out_random);
    let report = load_pretrained(&varmap, fixture(name), None, false).expect("load");
    assert!(
        report.missing.is_empty(),
        "{name}: missing {:?}",
        report.missing
    );
    let out = forward(vb, &data);
    assert_close(
        &out,
        &data["out"],
        Tol::rel_to_max(1e-4),
        &format!("{name} output"),
    );
    let grads = (&out * &data["r"])
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let vars = varmap.data().lock().unwrap();
    let want: Vec<&String> = data.keys().filter(|k| k.starts_with("grad.")).collect();
    assert_eq!(
        vars.len(),
        want.len(),
        "{name}: {} Vars but transformers has {} parameters",
        vars.len(),
        want.len()
    );
    // Gradients that are zero in exact arithmetic (attention key biases:
    // the softmax ignores a shift shared by a row) hold rounding noise in
    // the fixture; they are compared at the scale of the model's gradients.
    let floor = want.iter().map(|k| max_abs(&data[*k])).fold(0.0, f64::max) * 1e-6;
    for key in want {
        let pname = &key["grad.".len()..];
        let var = vars
            .get(pname)
            .unwrap_or_else(|| panic!("{name}: no Var named {pname}"));
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: {pname} got no gradient"));
        assert_close(
            g,
            &data[key],
            Tol::rel_to_max(1e-3).floor(floor),
            &format!("{name} grad {pname}"),
        );
    }
}

#[test]
fn bert_matches_transformers() {
    let cfg = bert::Config::from_file(fixture("bert/config.json")).unwrap();
    check("bert", |vb, d| {
        let m = bert::BertModel::load(vb, &cfg).unwrap();
        m.forward(
            &d["input_ids"],
            &d["token_type_ids"],
            Some(&d["attention_mask"]),
        )
        .unwrap()
    });
}

#[test]
fn bert_classifier_matches_transformers() {
    let cfg = bert::Config::from_file(fixture("bert_cls/config.json")).unwrap();
    assert_eq!(cfg.labels(), 3);
    check("bert_cls", |vb, d| {
        let m = bert::BertForSequenceClassification::load(vb, &cfg).unwrap();
        m.forward(
            &d["input_ids"],
            &d["token_type_ids"],
            Some(&d["attention_mask"]),
        )
        .unwrap()
    });
}

#[test]
fn llama_gqa_untied_matches_transformers() {
    let cfg = llama::Config::from_file(fixture("llama/config.json")).unwrap();
    assert_eq!((cfg.num_attention_heads, cfg.kv_heads()), (4, 2));
    assert!(!cfg.tie_word_embeddings);
    check("llama", |vb, d| {
        let m = llama::Llama::load(vb, &cfg).unwrap();
        m.forward_masked(&d["input_ids"], Some(&d["attention_mask"]), false)
            .unwrap()
    });
}

#[test]
fn llama3_rope_tied_biases_matches_transformers() {
    let cfg = llama::Config::from_file(fixture("llama3_tied/config.json")).unwrap();
    assert!(cfg.tie_word_embeddings && cfg.attention_bias && cfg.mlp_bias);
    assert_eq!(cfg.head_size(), 6);
    check("llama3_tied", |vb, d| {
        let m = llama::Llama::load(vb, &cfg).unwrap();
        // u32 ids and a float mask give the same result as i64.
        let ids = d["input_ids"].to_dtype(DType::U32).unwrap();
        let mask = d["attention_mask"].to_dtype(DType::F32).unwrap();
        m.forward_masked(&ids, Some(&mask), false).unwrap()
    });
}

#[test]
fn gpt2_matches_transformers() {
    let cfg = gpt2::Config::from_file(fixture("gpt2/config.json")).unwrap();
    check("gpt2", |vb, d| {
        let m = gpt2::Gpt2::load(vb, &cfg).unwrap();
        m.forward_masked(&d["input_ids"], Some(&d["attention_mask"]), false)
            .unwrap()
    });
}

/// Without a mask the unpadded rows are unchanged (the first row of each
/// fixture has no padding).
#[test]
fn unmasked_forward_matches_the_unpadded_row() {
    let cfg = gpt2::Config::from_file(fixture("gpt2/config.json")).unwrap();
    let d = io("gpt2");
    let vb =
        minibatch_models::checkpoint::frozen_var_builder(fixture("gpt2"), DType::F32, &Device::Cpu)
            .unwrap();
    let m = gpt2::Gpt2::load(vb, &cfg).unwrap();
    let row = d["input_ids"].narrow(0, 0, 1).unwrap();
    let out = m.forward(&row).unwrap();
    assert_close(
        &out,
        &d["out"].narrow(0, 0, 1).unwrap(),
        Tol::rel_to_max(1e-4),
        "gpt2 row 0",
    );
}
