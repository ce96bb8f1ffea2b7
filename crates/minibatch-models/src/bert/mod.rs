//! BERT (`BertModel`, `BertForSequenceClassification`) with transformers'
//! parameter names:
//!
//! ```text
//! embeddings.{word,position,token_type}_embeddings.weight
//! embeddings.LayerNorm.{weight,bias}
//! encoder.layer.N.attention.self.{query,key,value}.{weight,bias}
//! encoder.layer.N.attention.output.dense.{weight,bias}
//! encoder.layer.N.attention.output.LayerNorm.{weight,bias}
//! encoder.layer.N.intermediate.dense.{weight,bias}
//! encoder.layer.N.output.dense.{weight,bias}
//! encoder.layer.N.output.LayerNorm.{weight,bias}
//! ```
//! and, for the classification head, `bert.` before all of these plus
//! `bert.pooler.dense.{weight,bias}` and `classifier.{weight,bias}`.

mod config;

pub use config::Config;

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use minibatch_nn::recompute::checkpoint;
use minibatch_nn::{Dropout, Embedding, LayerNorm};

use crate::activation::Activation;
use crate::error::ModelsError;
use crate::inputs::{check_ids, check_positions, key_padding_mask, padding_idx};
use crate::lora::{build_with, Adapt, LoraConfig, KEY_PREFIX};
use crate::projection::{normal, Projection, ONES, ZEROS};
use minibatch_nn::ops::multi_head_attention as attention;

fn layer_norm(size: usize, eps: f64, vb: VarBuilder) -> Result<LayerNorm> {
    let w = vb.get_with_hints(size, "weight", ONES)?;
    let b = vb.get_with_hints(size, "bias", ZEROS)?;
    Ok(LayerNorm::new(w, b, eps))
}

/// `embeddings`: word + position + token type, LayerNorm, dropout.
#[derive(Clone, Debug)]
pub struct Embeddings {
    /// `word_embeddings`.
    pub word_embeddings: Embedding,
    /// `position_embeddings`.
    pub position_embeddings: Embedding,
    /// `token_type_embeddings`.
    pub token_type_embeddings: Embedding,
    /// `LayerNorm`.
    pub layer_norm: LayerNorm,
    dropout: Dropout,
}

/// `encoder.layer.N`.
#[derive(Clone, Debug)]
pub struct Layer {
    /// `attention.self.query`.
    pub query: Projection,
    /// `attention.self.key`.
    pub key: Projection,
    /// `attention.self.value`.
    pub value: Projection,
    /// `attention.output.dense`.
    pub attention_output: Projection,
    /// `attention.output.LayerNorm`.
    pub attention_layer_norm: LayerNorm,
    /// `intermediate.dense`.
    pub intermediate: Projection,
    /// `output.dense`.
    pub output: Projection,
    /// `output.LayerNorm`.
    pub output_layer_norm: LayerNorm,
    heads: usize,
    act: Activation,
    attn_dropout: Dropout,
    dropout: Dropout,
}

/// `BertModel` without its pooler (as in candle-transformers): embeddings
/// and encoder, returning the last hidden state `(b, t, hidden)`.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use minibatch_models::bert::{BertModel, Config};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let cfg = Config::from_json(r#"{"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2,
///     "num_attention_heads": 4, "intermediate_size": 32, "max_position_embeddings": 8}"#)?;
/// let varmap = VarMap::new();
/// let bert = BertModel::load(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu), &cfg)?;
/// let ids = Tensor::new(&[[2i64, 7, 9, 0], [4, 5, 0, 0]], &Device::Cpu)?;
/// let mask = Tensor::new(&[[1i64, 1, 1, 0], [1, 1, 0, 0]], &Device::Cpu)?;
/// let h = bert.forward(&ids, &ids.zeros_like()?, Some(&mask))?;
/// assert_eq!(h.dims(), [2, 4, 16]);
/// // A sequence longer than the position table is an error that says so.
/// let long = Tensor::zeros((1, 9), DType::U32, &Device::Cpu)?;
/// let e = bert.forward(&long, &long, None).unwrap_err().to_string();
/// assert!(e.contains("longer than"), "{e}");
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct BertModel {
    /// `embeddings`.
    pub embeddings: Embeddings,
    /// `encoder.layer`.
    pub layers: Vec<Layer>,
    cfg: Config,
    gradient_checkpointing: bool,
}

impl Embeddings {
    fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let (e, std) = (cfg.hidden_size, cfg.initializer_range);
        let emb = |n: usize, name: &str| -> Result<Embedding> {
            let w = vb.pp(name).get_with_hints((n, e), "weight", normal(std))?;
            Ok(Embedding::new(w, e))
        };
        Ok(Self {
            word_embeddings: emb(cfg.vocab_size, "word_embeddings")?,
            position_embeddings: emb(cfg.max_position_embeddings, "position_embeddings")?,
            token_type_embeddings: emb(cfg.type_vocab_size, "token_type_embeddings")?,
            layer_norm: layer_norm(e, cfg.layer_norm_eps, vb.pp("LayerNorm"))?,
            dropout: Dropout::new(cfg.hidden_dropout_prob),
        })
    }
}

impl Layer {
    fn load(vb: VarBuilder, cfg: &Config, ad: &Adapt) -> Result<Self> {
        let (e, i, std, eps) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.initializer_range,
            cfg.layer_norm_eps,
        );
        let lin = |a: usize, b: usize, name: &str| {
            ad.wrap(name, Projection::linear(a, b, true, std, vb.pp(name))?)
        };
        Ok(Self {
            query: lin(e, e, "attention.self.query")?,
            key: lin(e, e, "attention.self.key")?,
            value: lin(e, e, "attention.self.value")?,
            attention_output: lin(e, e, "attention.output.dense")?,
            attention_layer_norm: layer_norm(e, eps, vb.pp("attention.output.LayerNorm"))?,
            intermediate: lin(e, i, "intermediate.dense")?,
            output: lin(i, e, "output.dense")?,
            output_layer_norm: layer_norm(e, eps, vb.pp("output.LayerNorm"))?,
            heads: cfg.num_attention_heads,
            act: cfg.activation()?,
            attn_dropout: Dropout::new(cfg.attention_probs_dropout_prob),
            dropout: Dropout::new(cfg.hidden_dropout_prob),
        })
    }

    fn forward(&self, x: &Tensor, mask: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let e = x.dim(2)?;
        // q, k, v and the context stay (b, t, heads · hd): the attention
        // reads and writes that layout itself.
        let (q, k, v) = (
            self.query.forward_t(x, train)?,
            self.key.forward_t(x, train)?,
            self.value.forward_t(x, train)?,
        );
        let scale = 1.0 / ((e / self.heads) as f64).sqrt();
        let ctx = attention(
            &q,
            &k,
            &v,
            self.heads,
            mask,
            false,
            Some(scale),
            &self.attn_dropout,
            train,
        )?;
        // dropout(dense(.)) + residual as one op each.
        let a = self.attention_output.forward_t(&ctx, train)?;
        let x = self
            .attention_layer_norm
            .forward(&self.dropout.forward_add(&a, x, train)?)?;
        let i = self.act.forward(&self.intermediate.forward_t(&x, train)?)?;
        let o = self.output.forward_t(&i, train)?;
        self.output_layer_norm
            .forward(&self.dropout.forward_add(&o, &x, train)?)
    }
}

impl BertModel {
    /// The model with every parameter read from (or created in) `vb` under
    /// transformers' names (see the [module docs](self)); pass
    /// `vb.pp("bert")` for a checkpoint of a model with a head. New
    /// parameters are initialised as transformers does (`N(0,
    /// initializer_range)` weights, zero biases, unit LayerNorms; the
    /// padding row of the word embeddings is not zeroed).
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        Self::build(vb, cfg, &Adapt::none())
    }

    /// The model with LoRA adapters ([`crate::lora`]): the base parameters
    /// from `base` (a frozen
    /// [`checkpoint::frozen_var_builder`](crate::checkpoint::frozen_var_builder);
    /// `base.pp("bert")` for a checkpoint saved with a head), the adapters
    /// of the projections `lora` targets (`query`, `key`, `value`, `dense`,
    /// `attention.output.dense`, `intermediate.dense`, `output.dense`)
    /// created in (or read from) `adapters` under the keys PEFT saves for a
    /// `BertModel`,
    /// `base_model.model.encoder.layer.N.attention.self.query.lora_A.weight`
    /// `(r, in)` and `...lora_B.weight` `(out, r)`.
    ///
    /// Errors: a bad `lora` ([`LoraConfig::validate`]), a target module
    /// that matches no module, and whatever [`load`](Self::load) reports.
    pub fn load_lora(
        base: VarBuilder,
        cfg: &Config,
        lora: &LoraConfig,
        adapters: VarBuilder,
    ) -> crate::Result<Self> {
        build_with(lora, adapters, |ad| Self::build(base, cfg, ad))
    }

    fn build(vb: VarBuilder, cfg: &Config, ad: &Adapt) -> Result<Self> {
        cfg.validate()?;
        let embeddings = Embeddings::load(vb.pp("embeddings"), cfg)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let name = format!("encoder.layer.{i}");
                Layer::load(vb.pp(&name), cfg, &ad.pp(&name))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings,
            layers,
            cfg: cfg.clone(),
            gradient_checkpointing: false,
        })
    }

    /// The same model with gradient checkpointing on or off
    /// (transformers' `gradient_checkpointing_enable()`): in training passes
    /// each encoder layer keeps only its input, and the backward pass
    /// recomputes its activations, dropout masks included (see
    /// [`minibatch_nn::recompute`]).
    pub fn with_gradient_checkpointing(mut self, on: bool) -> Self {
        self.gradient_checkpointing = on;
        self
    }

    /// Whether gradient checkpointing is on.
    pub fn gradient_checkpointing(&self) -> bool {
        self.gradient_checkpointing
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The last hidden state `(b, t, hidden)` in eval mode (no dropout), as
    /// candle-transformers' `BertModel::forward`. `input_ids` and
    /// `token_type_ids` are `(b, t)`, `u32` or `i64`; `attention_mask`
    /// `(b, t)` marks tokens with 1 and padding with 0 (integer or float).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.forward_t(input_ids, token_type_ids, attention_mask, false)
    }

    /// [`forward`](Self::forward) with the train flag (dropout on when `train`).
    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, t) = check_ids(
            input_ids,
            cfg.vocab_size,
            "input_ids",
            "the vocabulary (vocab_size)",
        )?;
        if token_type_ids.dims() != [b, t] {
            return Err(ModelsError::Input(format!(
                "token_type_ids must have input_ids' shape ({b}, {t}), got {:?}",
                token_type_ids.dims()
            ))
            .into());
        }
        check_ids(
            token_type_ids,
            cfg.type_vocab_size,
            "token_type_ids",
            "type_vocab_size",
        )?;
        check_positions(t, cfg.max_position_embeddings, "the position table")?;
        let mask = attention_mask
            .map(|m| key_padding_mask(m, b, t))
            .transpose()?;
        let e = &self.embeddings;
        let pos = Tensor::arange(0u32, t as u32, input_ids.device())?;
        let words = padding_idx(
            e.word_embeddings.forward(input_ids)?,
            input_ids,
            cfg.pad_token_id,
        )?;
        let x = words
            .add(&e.token_type_embeddings.forward(token_type_ids)?)?
            .broadcast_add(&e.position_embeddings.forward(&pos)?)?;
        let mut x = e.dropout.forward(&e.layer_norm.forward(&x)?, train)?;
        let on = self.gradient_checkpointing && train;
        for layer in &self.layers {
            x = if on {
                let (l, m) = (layer.clone(), mask.clone());
                checkpoint(move |h| l.forward(h, m.as_ref(), train), &x)?
            } else {
                layer.forward(&x, mask.as_ref(), train)?
            };
        }
        Ok(x)
    }
}

/// `BertForSequenceClassification`: `BertModel` under `bert.`, the pooler
/// `tanh(bert.pooler.dense(h[:, 0]))`, dropout and `classifier`, giving
/// logits `(b, num_labels)`.
#[derive(Clone, Debug)]
pub struct BertForSequenceClassification {
    /// `bert`.
    pub bert: BertModel,
    /// `bert.pooler.dense`.
    pub pooler: Projection,
    /// `classifier`.
    pub classifier: Projection,
    dropout: Dropout,
}

impl BertForSequenceClassification {
    /// The model under transformers' names, with `cfg.labels()` outputs.
    /// To fine-tune a `BertModel` checkpoint (no `bert.` prefix, no
    /// classifier), build it over a `VarMap` and fill it with
    /// [`load_pretrained(&varmap, dir, Some("bert"), true)`](crate::checkpoint::load_pretrained):
    /// the classifier (and a missing pooler) keep their random init.
    pub fn load(vb: VarBuilder, cfg: &Config) -> Result<Self> {
        let bert = BertModel::load(vb.pp("bert"), cfg)?;
        let (e, std) = (cfg.hidden_size, cfg.initializer_range);
        Ok(Self {
            bert,
            pooler: Projection::linear(e, e, true, std, vb.pp("bert.pooler.dense"))?,
            classifier: Projection::linear(e, cfg.labels(), true, std, vb.pp("classifier"))?,
            dropout: Dropout::new(cfg.classifier_dropout.unwrap_or(cfg.hidden_dropout_prob)),
        })
    }

    /// The model with LoRA adapters as PEFT's `task_type="SEQ_CLS"` makes
    /// it ([`crate::lora`]): the frozen base from `base` (a
    /// `BertForSequenceClassification` checkpoint, `bert.`-prefixed; the
    /// pooler is read from it and stays frozen), the adapters of the
    /// encoder modules `lora` targets created in (or read from) `adapters`
    /// under the keys PEFT saves,
    /// `base_model.model.bert.encoder.layer.N.attention.self.query.lora_A.weight`,
    /// and the `classifier` trained in full as PEFT's `modules_to_save`:
    /// `base_model.model.classifier.{weight,bias}` in `adapters`. A new
    /// classifier starts from the base checkpoint's `classifier` when it
    /// has one (of the right shape), otherwise from transformers' init
    /// (`N(0, initializer_range)` weight, zero bias; seeded with
    /// [`minibatch_nn::seeded_var_builder`]), as [`load`](Self::load).
    ///
    /// Errors: a bad `lora` ([`LoraConfig::validate`]), a target module
    /// that matches no module, a base classifier of another shape, and
    /// whatever [`load`](Self::load) reports.
    pub fn load_lora(
        base: VarBuilder,
        cfg: &Config,
        lora: &LoraConfig,
        adapters: VarBuilder,
    ) -> crate::Result<Self> {
        let (e, std) = (cfg.hidden_size, cfg.initializer_range);
        let bert = build_with(lora, adapters.clone(), |ad| {
            BertModel::build(base.pp("bert"), cfg, &ad.pp("bert"))
        })?;
        let pooler = Projection::linear(e, e, true, std, base.pp("bert.pooler.dense"))?;
        let head = adapters.pp(format!("{KEY_PREFIX}classifier"));
        let labels = cfg.labels();
        let fresh = !head.contains_tensor("weight");
        let classifier = Projection::linear(e, labels, true, std, head)?;
        if fresh && base.contains_tensor("classifier.weight") {
            // PEFT's ModulesToSaveWrapper starts from a copy of the module.
            let from = base.pp("classifier");
            let pairs = [
                (classifier.weight(), from.get((labels, e), "weight")),
                (
                    classifier.bias().unwrap_or(classifier.weight()),
                    from.get(labels, "bias"),
                ),
            ];
            for (t, src) in pairs {
                let src = src.map_err(|err| {
                    ModelsError::Lora(format!(
                        "the base checkpoint's classifier does not fit {labels} labels of hidden size {e}: {err}"
                    ))
                })?;
                t.slice_set(&src.to_dtype(t.dtype())?.to_device(t.device())?, 0, 0)?;
            }
        }
        Ok(Self {
            bert,
            pooler,
            classifier,
            dropout: Dropout::new(cfg.classifier_dropout.unwrap_or(cfg.hidden_dropout_prob)),
        })
    }

    /// Logits `(b, num_labels)` in eval mode.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.forward_t(input_ids, token_type_ids, attention_mask, false)
    }

    /// Logits `(b, num_labels)`, dropout on when `train`.
    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let h = self
            .bert
            .forward_t(input_ids, token_type_ids, attention_mask, train)?;
        let first = h.narrow(1, 0, 1)?.squeeze(1)?;
        let pooled = self.pooler.forward(&first)?.tanh()?;
        let pooled = self.dropout.forward(&pooled, train)?;
        self.classifier.forward(&pooled)
    }
}
