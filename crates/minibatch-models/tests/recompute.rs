//! Gradient checkpointing of the three ports: with it on, a training step
//! gives the loss and every parameter's gradient of the same step without it,
//! bit for bit (dropout on in BERT and GPT-2: the masks are replayed), and
//! evaluation passes are unchanged.

use candle_core::{DType, Device, ModuleT, Tensor};
use candle_nn::{VarBuilder, VarMap};
use minibatch_models::{bert, gpt2, llama};
use minibatch_nn::{seeded_var_builder, set_rng_step};
use minibatch_testkit::{assert_close, Tol};

fn ids(b: usize, t: usize, vocab: u32) -> Tensor {
    let v: Vec<u32> = (0..b * t).map(|i| (i as u32 * 7 + 3) % vocab).collect();
    Tensor::from_vec(v, (b, t), &Device::Cpu).unwrap()
}

/// A fixed pseudo-random weighting of the output, `sin(1 + 0.37 i)`.
fn pattern(dims: (usize, usize, usize)) -> Tensor {
    let n = dims.0 * dims.1 * dims.2;
    let v: Vec<f32> = (0..n).map(|i| (1.0 + 0.37 * i as f32).sin()).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

/// Runs `loss` twice (checkpointing off, then on) with the same dropout key
/// and compares the losses and the gradients of every Var of `varmap`.
fn compare(varmap: &VarMap, what: &str, loss: impl Fn(bool) -> Tensor) {
    let step = |on: bool| {
        set_rng_step(11);
        let l = loss(on);
        let g = l.backward().unwrap();
        let mut vars = varmap
            .data()
            .lock()
            .unwrap()
            .clone()
            .into_iter()
            .collect::<Vec<_>>();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let grads: Vec<(String, Tensor)> = vars
            .into_iter()
            .map(|(name, v)| {
                let grad = g
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{what}: {name} got no gradient"))
                    .clone();
                (name, grad)
            })
            .collect();
        (l, grads)
    };
    let (l0, g0) = step(false);
    let (l1, g1) = step(true);
    assert_close(&l1, &l0, Tol::bits(), &format!("{what}: loss"));
    assert_eq!(g0.len(), g1.len());
    assert!(!g0.is_empty());
    for ((n1, a), (n0, b)) in g1.iter().zip(&g0) {
        assert_eq!(n1, n0);
        assert_close(a, b, Tol::bits(), &format!("{what}: gradient of {n0}"));
    }
}

#[test]
fn llama_gradients_are_the_same_with_checkpointing() {
    let cfg = llama::Config::small(40, 16, 3, 4, 2);
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, 1, DType::F32, &Device::Cpu);
    let model = llama::Llama::load(vb, &cfg).unwrap();
    assert!(!model.gradient_checkpointing());
    let x = ids(2, 6, 40);
    let r = pattern((2, 6, 40));
    compare(&varmap, "llama", |on| {
        let m = model.clone().with_gradient_checkpointing(on);
        (m.forward_t(&x, true).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
    });
    // Evaluation ignores the switch: the same logits, and no extra node.
    let m = model.clone().with_gradient_checkpointing(true);
    assert_close(
        &m.forward(&x).unwrap(),
        &model.forward(&x).unwrap(),
        Tol::bits(),
        "llama eval",
    );
}

#[test]
fn gpt2_gradients_are_the_same_with_checkpointing_and_dropout() {
    let cfg = gpt2::Config::from_json(
        r#"{"vocab_size": 30, "n_embd": 16, "n_layer": 3, "n_head": 2, "n_positions": 8,
            "resid_pdrop": 0.2, "attn_pdrop": 0.2, "embd_pdrop": 0.1}"#,
    )
    .unwrap();
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, 2, DType::F32, &Device::Cpu);
    let model = gpt2::Gpt2::load(vb, &cfg).unwrap();
    let x = ids(2, 8, 30);
    let r = pattern((2, 8, 30));
    compare(&varmap, "gpt2", |on| {
        let m = model.clone().with_gradient_checkpointing(on);
        (m.forward_t(&x, true).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
    });
}

#[test]
fn bert_gradients_are_the_same_with_checkpointing_padding_and_dropout() {
    let cfg = bert::Config::from_json(
        r#"{"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 32, "max_position_embeddings": 8,
            "hidden_dropout_prob": 0.2, "attention_probs_dropout_prob": 0.2}"#,
    )
    .unwrap();
    let varmap = VarMap::new();
    let vb: VarBuilder = seeded_var_builder(&varmap, 3, DType::F32, &Device::Cpu);
    let model = bert::BertModel::load(vb, &cfg).unwrap();
    let x = ids(2, 6, 50);
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    let r = pattern((2, 6, 16));
    compare(&varmap, "bert", |on| {
        let m = model.clone().with_gradient_checkpointing(on);
        let h = m
            .forward_t(&x, &x.zeros_like().unwrap(), Some(&mask), true)
            .unwrap();
        (h * &r).unwrap().sum_all().unwrap()
    });
}

#[test]
fn lora_adapter_gradients_are_the_same_with_checkpointing() {
    // The PEFT fixture: a frozen base (constants) and trainable adapters with
    // dropout in training, checkpointed per decoder layer.
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/lora_llama");
    let dev = Device::Cpu;
    let cfg = llama::Config::from_file(format!("{dir}/base/config.json")).unwrap();
    let adapter =
        minibatch_models::lora::load_adapter(format!("{dir}/adapter"), DType::F32, &dev).unwrap();
    let mut lora = adapter.config.clone();
    lora.dropout = 0.1;
    let base =
        minibatch_models::checkpoint::frozen_var_builder(format!("{dir}/base"), DType::F32, &dev)
            .unwrap();
    let varmap = VarMap::new();
    let model = llama::Llama::load_lora(
        base,
        &cfg,
        &lora,
        seeded_var_builder(&varmap, 0, DType::F32, &dev),
    )
    .unwrap();
    adapter.fill(&varmap).unwrap();
    let x = ids(2, 8, cfg.vocab_size as u32);
    let r = pattern((2, 8, cfg.vocab_size));
    compare(&varmap, "llama lora", |on| {
        let m = model.clone().with_gradient_checkpointing(on);
        (m.forward_t(&x, true).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
    });
}
