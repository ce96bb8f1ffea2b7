//! The licence-sentence task shared by the `finetune_bert` and `lora --arch
//! bert` examples: which licence (Apache-2.0, GPL-3, MPL-2.0, the texts in
//! `data/licenses`) a sentence comes from. The sentences, the stratified
//! seeded split, the tokenization and the accuracy (see `finetune_bert`'s
//! module docs).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, D};
use minibatch::data::DataLoader;
use minibatch::models::bert::BertForSequenceClassification;
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// The labels: 0 Apache-2.0, 1 GPL-3, 2 MPL-2.0.
pub const LICENCES: [&str; 3] = ["Apache-2.0", "GPL-3", "MPL-2.0"];

/// The sentences of one licence text (see the module docs), in text order.
fn sentences(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut para = String::new();
    let flush = |para: &mut String, out: &mut Vec<String>| {
        let words: Vec<&str> = para.split_whitespace().collect();
        let mut cur: Vec<&str> = Vec::new();
        for w in words {
            cur.push(w);
            if w.ends_with(['.', ';', '?', '!']) {
                if cur.len() >= 5 {
                    out.push(cur.join(" "));
                }
                cur.clear();
            }
        }
        if cur.len() >= 5 {
            out.push(cur.join(" "));
        }
        para.clear();
    };
    for line in text.lines() {
        if line.trim().is_empty() {
            flush(&mut para, &mut out);
        } else {
            para.push(' ');
            para.push_str(line);
        }
    }
    flush(&mut para, &mut out);
    out
}

/// `(train, test)` lists of `(sentence, label)`.
pub type Split = (Vec<(String, u32)>, Vec<(String, u32)>);

/// The stratified seeded split: each licence's sentences that occur in no
/// other licence, shuffled by `seed`, `test_share` of each to the test set.
pub fn build_split(data_dir: &Path, test_share: f64, seed: u64) -> Result<Split> {
    if !(test_share > 0.0 && test_share < 1.0) {
        bail!("--test-share must be in (0, 1), got {test_share}");
    }
    let mut per_licence = Vec::new();
    // sentence -> the licences it occurs in
    let mut seen: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (label, name) in LICENCES.iter().enumerate() {
        let path = data_dir.join(name);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read the licence text {}", path.display()))?;
        let mut unique = Vec::new();
        for s in sentences(&text) {
            let entry = seen.entry(s.clone()).or_default();
            if !entry.contains(&label) {
                entry.push(label);
                unique.push(s);
            }
        }
        per_licence.push(unique);
    }
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for (label, list) in per_licence.into_iter().enumerate() {
        let mut list: Vec<String> = list.into_iter().filter(|s| seen[s].len() == 1).collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ (0x11ce_0000 + label as u64));
        list.shuffle(&mut rng);
        let n_test = ((list.len() as f64) * test_share).round() as usize;
        for (i, s) in list.into_iter().enumerate() {
            let item = (s, label as u32);
            if i < n_test {
                test.push(item);
            } else {
                train.push(item);
            }
        }
    }
    Ok((train, test))
}

/// `(ids, mask, labels)`: `(n, max_len)` u32, `(n, max_len)` u32, `(n,)` u32.
pub fn encode(
    tok: &tokenizers::Tokenizer,
    items: &[(String, u32)],
    dev: &Device,
) -> Result<Vec<Tensor>> {
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    let mut labels = Vec::new();
    let mut len = 0;
    for (s, label) in items {
        let e = tok
            .encode(s.as_str(), true)
            .map_err(|e| anyhow::anyhow!("cannot tokenize {s:?}: {e}"))?;
        len = e.get_ids().len();
        ids.extend_from_slice(e.get_ids());
        mask.extend_from_slice(e.get_attention_mask());
        labels.push(*label);
    }
    let n = items.len();
    Ok(vec![
        Tensor::from_vec(ids, (n, len), dev)?,
        Tensor::from_vec(mask, (n, len), dev)?,
        Tensor::from_vec(labels, n, dev)?,
    ])
}

/// Share of `test` the model classifies right (eval mode: no dropout).
pub fn accuracy(model: &BertForSequenceClassification, test: &DataLoader) -> Result<f64> {
    let (mut right, mut n) = (0usize, 0usize);
    for batch in test.epoch(0) {
        let batch = batch?;
        let [ids, mask, y] = batch.tensors() else {
            bail!("want (ids, mask, label) batches")
        };
        let logits = model.forward(ids, &ids.zeros_like()?, Some(mask))?;
        let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let y = y.to_vec1::<u32>()?;
        right += pred.iter().zip(&y).filter(|(p, y)| p == y).count();
        n += y.len();
    }
    Ok(right as f64 / n.max(1) as f64)
}
