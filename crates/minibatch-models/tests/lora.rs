//! LoRA against PEFT (fixtures from `fixtures/make_lora.py` and
//! `fixtures/make_lora_ports.py`): PEFT's adapter files loaded into the
//! ports, outputs to 1e-4, three plain-SGD steps on the tiny Llama (losses
//! and every adapter weight after each step to 1e-4), `merge_and_unload`'s
//! weights, the files `save_adapter` writes against PEFT's, and each bad
//! input's error.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::{fixture, max_abs};
use minibatch_models::checkpoint::{frozen_var_builder, load_tensors, safetensors_files};
use minibatch_models::lora::{self, Adapter, LoraConfig};
use minibatch_models::{bert, gpt2, llama, Projection};
use minibatch_nn::seeded_var_builder;
use minibatch_testkit::{assert_close, Tol};

const DEV: Device = Device::Cpu;

fn data(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name), &DEV).unwrap()
}

fn base_tensors(dir: &Path) -> HashMap<String, Tensor> {
    load_tensors(&safetensors_files(dir).unwrap(), DType::F32, &DEV).unwrap()
}

fn llama_cfg() -> llama::Config {
    llama::Config::from_file(fixture("lora_llama/base/config.json")).unwrap()
}

fn lora_cfg(targets: &[&str]) -> LoraConfig {
    LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: targets.iter().map(|t| t.to_string()).collect(),
    }
}

/// The fixture Llama with PEFT's saved adapter in a fresh VarMap.
fn peft_llama() -> (llama::Llama, VarMap, LoraConfig) {
    let adapter = lora::load_adapter(fixture("lora_llama/adapter"), DType::F32, &DEV).unwrap();
    let base = frozen_var_builder(fixture("lora_llama/base"), DType::F32, &DEV).unwrap();
    let varmap = VarMap::new();
    let model = llama::Llama::load_lora(
        base,
        &llama_cfg(),
        &adapter.config,
        seeded_var_builder(&varmap, 0, DType::F32, &DEV),
    )
    .unwrap();
    adapter.fill(&varmap).unwrap();
    (model, varmap, adapter.config)
}

/// transformers' causal-LM loss: mean cross-entropy of logits[:, :-1]
/// against input_ids[:, 1:].
fn causal_lm_loss(logits: &Tensor, ids: &Tensor) -> Tensor {
    let (b, t, v) = logits.dims3().unwrap();
    let x = logits
        .narrow(1, 0, t - 1)
        .unwrap()
        .reshape((b * (t - 1), v))
        .unwrap();
    let y = ids
        .narrow(1, 1, t - 1)
        .unwrap()
        .reshape(b * (t - 1))
        .unwrap()
        .to_dtype(DType::U32)
        .unwrap();
    minibatch_nn::loss::cross_entropy(&x, &y).unwrap()
}

#[test]
fn llama_matches_peft_logits_sgd_steps_and_merge() {
    let d = data("lora.safetensors");
    let (model, varmap, cfg) = peft_llama();
    // Only the adapters are Vars: 2 layers × (q_proj, v_proj) × (A, B).
    {
        let vars = varmap.data().lock().unwrap();
        assert_eq!(vars.len(), 8, "{:?}", vars.keys().collect::<Vec<_>>());
        assert!(
            vars.keys().all(|k| k.contains(".lora_")),
            "{:?}",
            vars.keys()
        );
    }
    let logits0 = model.forward(&d["input_ids.0"]).unwrap();
    assert_close(&logits0, &d["logits0"], Tol::rel_to_max(1e-4), "logits0");

    let lr = 0.5;
    for s in 0..3 {
        let ids = &d[&format!("input_ids.{s}")];
        let logits = model.forward_masked(ids, None, true).unwrap();
        let loss = causal_lm_loss(&logits, ids);
        assert_close(
            &loss.reshape(1).unwrap(),
            &d[&format!("loss.{s}")],
            Tol::new(1e-4, 1e-4),
            &format!("loss {s}"),
        );
        let grads = loss.backward().unwrap();
        let vars = varmap.data().lock().unwrap();
        for (name, var) in vars.iter() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name} got no gradient"));
            var.set(&(var.as_tensor() - (g * lr).unwrap()).unwrap())
                .unwrap();
        }
        for (name, var) in vars.iter() {
            assert_close(
                var.as_tensor(),
                &d[&format!("after.{s}.{name}")],
                Tol::rel_to_max(1e-4),
                &format!("{name} after step {s}"),
            );
        }
    }

    // merge_and_unload's weights, and the merged model computes the adapted one.
    let base = base_tensors(&fixture("lora_llama/base"));
    let merged = lora::merge(&base, &Adapter::from_varmap(&varmap, &cfg).unwrap()).unwrap();
    let mut n = 0;
    for (k, want) in d.iter().filter(|(k, _)| k.starts_with("merged.")) {
        let name = &k["merged.".len()..];
        assert_close(&merged[name], want, Tol::rel_to_max(1e-4), name);
        n += 1;
    }
    assert_eq!(n, 4);
    let q = model.layers[1].self_attn.q_proj.lora().unwrap();
    assert_close(
        &q.merged_weight().unwrap(),
        &d["merged.model.layers.1.self_attn.q_proj.weight"],
        Tol::rel_to_max(1e-4),
        "LoraLayer::merged_weight",
    );
    for (k, t) in &base {
        if !k.contains("q_proj") && !k.contains("v_proj") {
            assert_close(&merged[k], t, Tol::bits(), k);
        }
    }
    let plain = llama::Llama::load(
        VarBuilder::from_tensors(merged, DType::F32, &DEV),
        &llama_cfg(),
    )
    .unwrap();
    let ids = &d["input_ids.1"];
    assert_close(
        &plain.forward(ids).unwrap(),
        &model.forward(ids).unwrap(),
        Tol::rel_to_max(1e-5),
        "merged model",
    );
}

/// Reads a JSON file.
fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// `save_adapter` of `varmap` matches PEFT's directory `peft_dir`: the
/// same config (every field), the same keys and shapes; and it loads back
/// to the same tensors and config.
fn check_saved(varmap: &VarMap, cfg: &LoraConfig, peft_dir: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("adapter");
    lora::save_adapter(varmap, cfg, &out).unwrap();
    let mut files: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(files, ["adapter_config.json", "adapter_model.safetensors"]);
    // PEFT writes target_modules from a Python set: its order is the
    // process's string hash order, so compare it as a set.
    let sorted_targets = |mut j: serde_json::Value| {
        if let Some(serde_json::Value::Array(a)) = j.get_mut("target_modules") {
            a.sort_by_key(|v| v.to_string());
        }
        j
    };
    assert_eq!(
        sorted_targets(json(&out.join("adapter_config.json"))),
        sorted_targets(json(&peft_dir.join("adapter_config.json"))),
        "adapter_config.json differs from PEFT's"
    );
    let ours = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &DEV).unwrap();
    let peft =
        candle_core::safetensors::load(peft_dir.join("adapter_model.safetensors"), &DEV).unwrap();
    let shapes = |m: &HashMap<String, Tensor>| {
        let mut v: Vec<(String, Vec<usize>)> = m
            .iter()
            .map(|(k, t)| (k.clone(), t.dims().to_vec()))
            .collect();
        v.sort();
        v
    };
    assert_eq!(shapes(&ours), shapes(&peft));
    // Round trip: the same config and the same bits.
    let back = lora::load_adapter(&out, DType::F32, &DEV).unwrap();
    let mut want = cfg.clone();
    want.target_modules.sort();
    assert_eq!(back.config, want);
    let vars = varmap.data().lock().unwrap();
    for (k, t) in &back.tensors {
        assert_close(t, vars[k].as_tensor(), Tol::bits(), k);
    }
}

#[test]
fn saved_llama_adapter_is_peft_s_and_round_trips() {
    let (_, varmap, cfg) = peft_llama();
    check_saved(&varmap, &cfg, &fixture("lora_llama/adapter"));
    // PEFT's own file loads bit for bit.
    let peft = data("lora_llama/adapter/adapter_model.safetensors");
    let vars = varmap.data().lock().unwrap();
    for (k, t) in &peft {
        assert_close(vars[k].as_tensor(), t, Tol::bits(), k);
    }
    drop(vars);
    // load_adapter_into fills a model's Vars as well.
    let other = VarMap::new();
    llama::Llama::load_lora(
        frozen_var_builder(fixture("lora_llama/base"), DType::F32, &DEV).unwrap(),
        &llama_cfg(),
        &cfg,
        seeded_var_builder(&other, 7, DType::F32, &DEV),
    )
    .unwrap();
    let got = lora::load_adapter_into(&other, fixture("lora_llama/adapter")).unwrap();
    assert_eq!(got, cfg);
    for (k, t) in &peft {
        assert_close(
            other.data().lock().unwrap()[k].as_tensor(),
            t,
            Tol::bits(),
            k,
        );
    }
}

/// Loads `fixtures/lora_<name>` (base + PEFT adapter) with `build`, checks
/// the output and the merged weights against PEFT and the saved files.
fn check_port(
    name: &str,
    build: impl Fn(
        VarBuilder<'static>,
        &LoraConfig,
        VarBuilder<'static>,
    ) -> Box<dyn Fn(&Tensor) -> Tensor>,
) {
    let d = data(&format!("lora_{name}.safetensors"));
    let adir = fixture(&format!("lora_{name}/adapter"));
    let bdir = fixture(&format!("lora_{name}/base"));
    let adapter = lora::load_adapter(&adir, DType::F32, &DEV).unwrap();
    let varmap = VarMap::new();
    let forward = build(
        frozen_var_builder(&bdir, DType::F32, &DEV).unwrap(),
        &adapter.config,
        seeded_var_builder(&varmap, 0, DType::F32, &DEV),
    );
    assert_eq!(varmap.all_vars().len(), adapter.tensors.len());
    adapter.fill(&varmap).unwrap();
    assert_close(
        &forward(&d["input_ids"]),
        &d["out"],
        Tol::rel_to_max(1e-4),
        &format!("{name} output"),
    );
    let merged = lora::merge(&base_tensors(&bdir), &adapter).unwrap();
    for (k, want) in d.iter().filter(|(k, _)| k.starts_with("merged.")) {
        let key = &k["merged.".len()..];
        assert_close(&merged[key], want, Tol::rel_to_max(1e-5), key);
    }
    check_saved(&varmap, &adapter.config, &adir);
    // merge_checkpoint writes a plain checkpoint with the same weights.
    let out = tempfile::tempdir().unwrap();
    lora::merge_checkpoint(&bdir, &adir, out.path()).unwrap();
    assert!(out.path().join("config.json").is_file());
    let written = base_tensors(out.path());
    assert_eq!(written.len(), merged.len());
    for (k, t) in &merged {
        assert_close(&written[k], t, Tol::bits(), k);
    }
}

#[test]
fn gpt2_conv1d_matches_peft() {
    check_port("gpt2", |base, lora, adapters| {
        let cfg = gpt2::Config::from_file(fixture("lora_gpt2/base/config.json")).unwrap();
        let m = gpt2::Gpt2::load_lora(base, &cfg, lora, adapters).unwrap();
        assert!(m.blocks[0].c_attn.lora().is_some() && m.blocks[0].c_fc.lora().is_none());
        Box::new(move |ids| m.forward(ids).unwrap())
    });
}

#[test]
fn gpt2_lora_layer_merges_conv1d_as_peft() {
    let d = data("lora_gpt2.safetensors");
    let adapter = lora::load_adapter(fixture("lora_gpt2/adapter"), DType::F32, &DEV).unwrap();
    assert!(adapter.meta.fan_in_fan_out);
    let cfg = gpt2::Config::from_file(fixture("lora_gpt2/base/config.json")).unwrap();
    let varmap = VarMap::new();
    let m = gpt2::Gpt2::load_lora(
        frozen_var_builder(fixture("lora_gpt2/base"), DType::F32, &DEV).unwrap(),
        &cfg,
        &adapter.config,
        VarBuilder::from_varmap(&varmap, DType::F32, &DEV),
    )
    .unwrap();
    adapter.fill(&varmap).unwrap();
    let l = m.blocks[1].c_attn.lora().unwrap();
    assert_eq!(l.module(), "transformer.h.1.attn.c_attn");
    assert_eq!(l.lora_a().dims(), [2, 16]);
    assert_eq!(l.lora_b().dims(), [48, 2]);
    let w = l.merged_weight().unwrap();
    assert_eq!(w.dims(), [16, 48], "Conv1D layout (in, out)");
    assert_close(
        &w,
        &d["merged.transformer.h.1.attn.c_attn.weight"],
        Tol::rel_to_max(1e-5),
        "merged c_attn",
    );
}

#[test]
fn bert_matches_peft() {
    check_port("bert", |base, lora, adapters| {
        let cfg = bert::Config::from_file(fixture("lora_bert/base/config.json")).unwrap();
        let m = bert::BertModel::load_lora(base, &cfg, lora, adapters).unwrap();
        Box::new(move |ids| m.forward(ids, &ids.zeros_like().unwrap(), None).unwrap())
    });
}

fn bert_cls_model(varmap: &VarMap, cfg: &LoraConfig) -> bert::BertForSequenceClassification {
    let bdir = fixture("lora_bert_cls/base");
    let bcfg = bert::Config::from_file(bdir.join("config.json")).unwrap();
    bert::BertForSequenceClassification::load_lora(
        frozen_var_builder(&bdir, DType::F32, &DEV).unwrap(),
        &bcfg,
        cfg,
        seeded_var_builder(varmap, 0, DType::F32, &DEV),
    )
    .unwrap()
}

/// PEFT's `task_type="SEQ_CLS"`: LoRA on query/value of a
/// `BertForSequenceClassification` with the classifier trained in full
/// (`modules_to_save`): PEFT's files load, three plain-SGD steps with a
/// padding mask give PEFT's losses and weights, the saved adapter is
/// PEFT's (keys, shapes, every config field) and merges.
#[test]
fn bert_seq_cls_matches_peft_sgd_steps_save_and_merge() {
    let d = data("lora_bert_cls.safetensors");
    let adir = fixture("lora_bert_cls/adapter");
    let bdir = fixture("lora_bert_cls/base");
    let adapter = lora::load_adapter(&adir, DType::F32, &DEV).unwrap();
    assert_eq!(adapter.meta.task_type.as_deref(), Some("SEQ_CLS"));
    assert_eq!(
        adapter.meta.modules_to_save,
        Some(vec!["classifier".to_string(), "score".to_string()])
    );
    let base = base_tensors(&bdir);

    // A fresh adapter: the classifier is a copy of the base's, B is zero.
    let fresh = VarMap::new();
    let _ = bert_cls_model(&fresh, &adapter.config);
    {
        let vars = fresh.data().lock().unwrap();
        // 2 layers x (query, value) x (A, B) + classifier weight and bias.
        assert_eq!(vars.len(), 10, "{:?}", vars.keys().collect::<Vec<_>>());
        for k in ["weight", "bias"] {
            assert_close(
                vars[&format!("base_model.model.classifier.{k}")].as_tensor(),
                &base[&format!("classifier.{k}")],
                Tol::bits(),
                &format!("fresh classifier.{k}"),
            );
        }
    }

    let varmap = VarMap::new();
    let model = bert_cls_model(&varmap, &adapter.config);
    assert!(model.bert.layers[0].query.lora().is_some());
    assert!(model.bert.layers[0].key.lora().is_none());
    assert!(model.pooler.lora().is_none());
    adapter.fill(&varmap).unwrap();
    let lr = 0.5;
    for s in 0..3 {
        let ids = &d[&format!("input_ids.{s}")];
        let mask = &d[&format!("attention_mask.{s}")];
        let labels = d[&format!("labels.{s}")].to_dtype(DType::U32).unwrap();
        let logits = model
            .forward_t(ids, &ids.zeros_like().unwrap(), Some(mask), true)
            .unwrap();
        let loss = minibatch_nn::loss::cross_entropy(&logits, &labels).unwrap();
        assert_close(
            &loss.reshape(1).unwrap(),
            &d[&format!("loss.{s}")],
            Tol::new(1e-4, 1e-4),
            &format!("loss {s}"),
        );
        let grads = loss.backward().unwrap();
        let vars = varmap.data().lock().unwrap();
        for (name, var) in vars.iter() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name} got no gradient"));
            var.set(&(var.as_tensor() - (g * lr).unwrap()).unwrap())
                .unwrap();
        }
        let mut n = 0;
        for (name, var) in vars.iter() {
            assert_close(
                var.as_tensor(),
                &d[&format!("after.{s}.{name}")],
                Tol::rel_to_max(1e-4),
                &format!("{name} after step {s}"),
            );
            n += 1;
        }
        let want = d
            .keys()
            .filter(|k| k.starts_with(&format!("after.{s}.")))
            .count();
        assert_eq!(n, want, "PEFT saves {want} tensors after step {s}");
    }

    // Saved: PEFT's keys, shapes and config (modules_to_save, task_type).
    check_saved(&varmap, &adapter.config, &adir);
    let trained = Adapter::from_varmap(&varmap, &adapter.config).unwrap();
    assert_eq!(trained.meta, adapter.meta);

    // Merged: the classifier written in, the merged plain model computes
    // the adapted one.
    let merged = lora::merge(&base, &trained).unwrap();
    assert_close(
        &merged["classifier.weight"],
        &trained.tensors["base_model.model.classifier.weight"],
        Tol::bits(),
        "merged classifier",
    );
    let bcfg = bert::Config::from_file(bdir.join("config.json")).unwrap();
    let plain = bert::BertForSequenceClassification::load(
        VarBuilder::from_tensors(merged, DType::F32, &DEV),
        &bcfg,
    )
    .unwrap();
    let (ids, mask) = (&d["input_ids.1"], &d["attention_mask.1"]);
    let tt = ids.zeros_like().unwrap();
    assert_close(
        &plain.forward(ids, &tt, Some(mask)).unwrap(),
        &model.forward(ids, &tt, Some(mask)).unwrap(),
        Tol::rel_to_max(1e-5),
        "merged model",
    );

    // Another model's adapter (no classifier; BertModel keys) does not fit.
    let other = lora::load_adapter(fixture("lora_bert/adapter"), DType::F32, &DEV).unwrap();
    let e = err(other.fill(&varmap));
    assert!(e.contains("does not fit"), "{e}");
    // A classifier of another shape in the adapter is an error naming it.
    let mut bad = trained.clone();
    bad.tensors.insert(
        "base_model.model.classifier.weight".into(),
        Tensor::zeros((2, 16), DType::F32, &DEV).unwrap(),
    );
    let e = err(bad.fill(&varmap));
    assert!(e.contains("classifier.weight"), "{e}");
    let e = err(lora::merge(&base, &bad));
    assert!(e.contains("classifier.weight"), "{e}");
}

/// The difference of the adapted and the base model at init (B = 0).
#[test]
fn zero_b_leaves_every_port_unchanged() {
    let ids = Tensor::new(&[[1u32, 5, 9, 2], [3, 3, 0, 7]], &DEV).unwrap();
    let vb = |m: &VarMap, seed| seeded_var_builder(m, seed, DType::F32, &DEV);
    let all = |m: &VarMap| m.all_vars().len();

    let cfg = llama::Config::small(16, 32, 2, 4, 2);
    let base = VarMap::new();
    let plain = llama::Llama::load(vb(&base, 1), &cfg).unwrap();
    let adapters = VarMap::new();
    let targets = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "lm_head",
    ];
    let m =
        llama::Llama::load_lora(vb(&base, 1), &cfg, &lora_cfg(&targets), vb(&adapters, 2)).unwrap();
    assert_eq!(all(&adapters), 2 * (2 * 7 + 1));
    let (a, b) = (m.forward(&ids).unwrap(), plain.forward(&ids).unwrap());
    assert_close(&a, &b, Tol::bits(), "llama at init");

    let gcfg = gpt2::Config::from_json(
        r#"{"vocab_size": 16, "n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 8}"#,
    )
    .unwrap();
    let base = VarMap::new();
    let plain = gpt2::Gpt2::load(vb(&base, 1), &gcfg).unwrap();
    let adapters = VarMap::new();
    let m = gpt2::Gpt2::load_lora(
        vb(&base, 1),
        &gcfg,
        &lora_cfg(&["c_attn", "c_proj", "c_fc"]),
        vb(&adapters, 2),
    )
    .unwrap();
    // c_proj names both attn.c_proj and mlp.c_proj, as in PEFT.
    assert_eq!(all(&adapters), 2 * 2 * 4);
    assert_close(
        &m.forward(&ids).unwrap(),
        &plain.forward(&ids).unwrap(),
        Tol::bits(),
        "gpt2 at init",
    );

    let bcfg = bert::Config::from_json(
        r#"{"vocab_size": 16, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 8}"#,
    )
    .unwrap();
    let base = VarMap::new();
    let plain = bert::BertModel::load(vb(&base, 1), &bcfg).unwrap();
    let adapters = VarMap::new();
    let m = bert::BertModel::load_lora(
        vb(&base, 1),
        &bcfg,
        &lora_cfg(&["query", "dense"]),
        vb(&adapters, 2),
    )
    .unwrap();
    assert_eq!(all(&adapters), 2 * 2 * 4);
    let tt = ids.zeros_like().unwrap();
    assert_close(
        &m.forward(&ids, &tt, None).unwrap(),
        &plain.forward(&ids, &tt, None).unwrap(),
        Tol::bits(),
        "bert at init",
    );
}

#[test]
fn init_is_peft_s_and_seeded() {
    let cfg = llama::Config::small(16, 256, 1, 4, 4);
    let build = |seed| {
        let base = VarMap::new();
        let adapters = VarMap::new();
        let m = llama::Llama::load_lora(
            seeded_var_builder(&base, 0, DType::F32, &DEV),
            &cfg,
            &LoraConfig {
                r: 64,
                ..lora_cfg(&["q_proj"])
            },
            seeded_var_builder(&adapters, seed, DType::F32, &DEV),
        )
        .unwrap();
        let l = m.layers[0].self_attn.q_proj.lora().unwrap().clone();
        (l.lora_a().clone(), l.lora_b().clone())
    };
    let (a, b) = build(3);
    assert_eq!(a.dims(), [64, 256]);
    assert_eq!(b.dims(), [256, 64]);
    assert_eq!(max_abs(&b), 0.0, "B starts at zero");
    // kaiming_uniform_(a=√5): U(-1/√in, 1/√in), variance bound²/3.
    let bound = 1.0 / 256f64.sqrt();
    let v: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    assert!(v.iter().all(|x| (*x as f64).abs() <= bound * (1.0 + 1e-6)));
    let n = v.len() as f64;
    let mean = v.iter().map(|x| *x as f64).sum::<f64>() / n;
    let var = v.iter().map(|x| (*x as f64 - mean).powi(2)).sum::<f64>() / n;
    // 16384 draws: the mean's standard error is bound/√(3n) ≈ 2.8e-4.
    assert!(mean.abs() < 5.0 * bound / (3.0 * n).sqrt(), "mean {mean}");
    assert!(
        (var / (bound * bound / 3.0) - 1.0).abs() < 0.05,
        "var {var}"
    );
    let max = v.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
    assert!(max > 0.99 * bound, "max {max} of {bound}");
    // Seeded: the same seed gives the same bits, another seed other values.
    assert_close(&build(3).0, &a, Tol::bits(), "same seed");
    let other = build(4).0;
    assert!(max_abs(&(other - &a).unwrap()) > 0.0);
}

#[test]
fn dropout_applies_to_the_adapter_input_in_training_only() {
    let cfg = llama::Config::small(16, 32, 1, 4, 4);
    let base = VarMap::new();
    let adapters = VarMap::new();
    let lora = LoraConfig {
        dropout: 0.5,
        ..lora_cfg(&["q_proj", "v_proj"])
    };
    let m = llama::Llama::load_lora(
        seeded_var_builder(&base, 0, DType::F32, &DEV),
        &cfg,
        &lora,
        seeded_var_builder(&adapters, 1, DType::F32, &DEV),
    )
    .unwrap();
    // Non-zero B so that the adapter counts.
    for v in adapters.all_vars() {
        v.set(&v.as_tensor().ones_like().unwrap().affine(0.3, 0.0).unwrap())
            .unwrap();
    }
    let q = &m.layers[0].self_attn.q_proj;
    let x = Tensor::ones((2, 3, 32), DType::F32, &DEV).unwrap();
    let eval = q.forward_t(&x, false).unwrap();
    assert_close(
        &q.forward_t(&x, false).unwrap(),
        &eval,
        Tol::bits(),
        "eval is deterministic",
    );
    let train = q.forward_t(&x, true).unwrap();
    assert!(
        max_abs(&(&train - &eval).unwrap()) > 1e-3,
        "dropout changed nothing"
    );
    // The base part is untouched by dropout: with the adapter's A zeroed,
    // training and eval agree.
    let l = q.lora().unwrap();
    let layer = lora::LoraLayer::new(
        l.base().clone(),
        l.module(),
        l.lora_a().zeros_like().unwrap(),
        l.lora_b().clone(),
        lora.scaling(),
        lora.dropout,
    )
    .unwrap();
    let p = Projection::Lora(Box::new(layer));
    assert_close(
        &p.forward_t(&x, true).unwrap(),
        &l.base().forward_t(&x, false).unwrap(),
        Tol::bits(),
        "base part",
    );
    // The loss still reaches the adapters through the dropout.
    let logits = m
        .forward_masked(&Tensor::new(&[[1u32, 2, 3]], &DEV).unwrap(), None, true)
        .unwrap();
    let grads = logits.sum_all().unwrap().backward().unwrap();
    for v in adapters.all_vars() {
        assert!(grads.get(v.as_tensor()).is_some());
    }
}

fn err(r: impl std::fmt::Debug) -> String {
    format!("{r:?}")
}

#[test]
fn bad_inputs_are_errors_naming_the_problem() {
    let cfg = llama_cfg();
    let base = || frozen_var_builder(fixture("lora_llama/base"), DType::F32, &DEV).unwrap();
    let load = |lora: &LoraConfig, varmap: &VarMap| {
        llama::Llama::load_lora(
            base(),
            &cfg,
            lora,
            seeded_var_builder(varmap, 0, DType::F32, &DEV),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    };
    let ok = lora_cfg(&["q_proj", "v_proj"]);

    let e = load(&lora_cfg(&["q_proj", "attention.query"]), &VarMap::new()).unwrap_err();
    assert!(
        e.contains("attention.query") && e.contains("match no module") && e.contains("v_proj"),
        "{e}"
    );
    let e = load(&LoraConfig { r: 0, ..ok.clone() }, &VarMap::new()).unwrap_err();
    assert!(e.contains("r = 0"), "{e}");
    for alpha in [f64::NAN, f64::INFINITY] {
        let e = load(
            &LoraConfig {
                alpha,
                ..ok.clone()
            },
            &VarMap::new(),
        )
        .unwrap_err();
        assert!(e.contains("alpha") && e.contains("finite"), "{e}");
    }
    let e = load(
        &LoraConfig {
            dropout: 1.0,
            ..ok.clone()
        },
        &VarMap::new(),
    )
    .unwrap_err();
    assert!(e.contains("dropout"), "{e}");
    let e = load(&lora_cfg(&[]), &VarMap::new()).unwrap_err();
    assert!(e.contains("nothing would be trained"), "{e}");

    // An adapter of another rank: the shapes differ.
    let varmap = VarMap::new();
    load(&LoraConfig { r: 8, ..ok.clone() }, &varmap).unwrap();
    let adapter = lora::load_adapter(fixture("lora_llama/adapter"), DType::F32, &DEV).unwrap();
    let e = adapter.fill(&varmap).unwrap_err().to_string();
    assert!(
        e.contains("another rank") && e.contains("[4, 32]") && e.contains("[8, 32]"),
        "{e}"
    );
    // An adapter for other target modules / another model: keys missing.
    let varmap = VarMap::new();
    load(&lora_cfg(&["q_proj", "k_proj"]), &varmap).unwrap();
    let e = adapter.fill(&varmap).unwrap_err().to_string();
    assert!(
        e.contains("another model") && e.contains("k_proj") && e.contains("v_proj"),
        "{e}"
    );
    let varmap = VarMap::new();
    load(&ok, &varmap).unwrap();
    let gpt2_adapter = lora::load_adapter(fixture("lora_gpt2/adapter"), DType::F32, &DEV).unwrap();
    let e = gpt2_adapter.fill(&varmap).unwrap_err().to_string();
    assert!(
        e.contains("another model") && e.contains("transformer.h.0.attn.c_attn"),
        "{e}"
    );
    let e = lora::merge(&base_tensors(&fixture("lora_llama/base")), &gpt2_adapter)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("another model") && e.contains("transformer.h.0.attn.c_attn.weight"),
        "{e}"
    );
    // Nothing to load into, nothing to save, no adapter directory.
    let e =
        err(lora::load_adapter_into(&VarMap::new(), fixture("lora_llama/adapter")).unwrap_err());
    assert!(e.contains("no LoRA adapter weights"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let e = lora::save_adapter(&VarMap::new(), &ok, dir.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("no LoRA adapter weights"), "{e}");
    let e = lora::load_adapter(dir.path().join("nope"), DType::F32, &DEV)
        .unwrap_err()
        .to_string();
    assert!(e.contains("adapter_config.json"), "{e}");
    // save_adapter with a config of another rank than the Vars.
    let e = lora::save_adapter(&varmap, &LoraConfig { r: 2, ..ok.clone() }, dir.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank r = 2"), "{e}");
    // A config PEFT features this port does not implement.
    let adir = dir.path().join("rslora");
    lora::save_adapter(&varmap, &ok, &adir).unwrap();
    let p = adir.join("adapter_config.json");
    let text = std::fs::read_to_string(&p)
        .unwrap()
        .replace("\"use_rslora\": false", "\"use_rslora\": true");
    std::fs::write(&p, text).unwrap();
    let e = lora::load_adapter(&adir, DType::F32, &DEV)
        .unwrap_err()
        .to_string();
    assert!(e.contains("use_rslora"), "{e}");
}
