//! The gpt example's model: a small decoder-only transformer (GPT-2's
//! layout), shared by `examples/gpt.rs` and `benches/gpt_step.rs`.
//!
//! ```text
//! tokens (b, t) ─ wte + wpe ─ [ x + attn(ln_1(x)) ; x + mlp(ln_2(x)) ] × n_layer ─ ln_f ─ lm_head ─ logits (b, t, vocab)
//! attn: q_proj, k_proj, v_proj (d → d), causal softmax(q kᵀ / √(d/h)) v per head, c_proj (d → d)
//! mlp:  c_fc (d → 4d), GELU (tanh approximation), c_proj (4d → d)
//! ```
//!
//! The same parameters (same `VarBuilder` names) can be driven by three sets
//! of layers ([`Layers`]): `minibatch::nn`'s, candle-nn's (whose fused layer
//! norm and `softmax_last_dim` have no backward pass), or plain candle tensor
//! ops (candle-nn's generic `ops::softmax` and a layer norm written in tensor
//! ops: the baseline of the step benchmark).

// Each user of this file uses part of it.
#![allow(dead_code)]

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng};

/// Which layers compute the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layers {
    /// `minibatch::nn`: `Embedding`, `Linear`, `LayerNorm`,
    /// `ops::scaled_dot_product_attention` (causal), `ops::gelu`,
    /// `ops::log_softmax`, with real, fused backward passes.
    Minibatch,
    /// candle-nn 0.11's: `Linear`, `LayerNorm` and `ops::softmax_last_dim`
    /// (fused, without backward: the parameters below the last layer norm
    /// receive no gradient).
    CandleNn,
    /// Plain candle tensor ops: `candle_nn::Linear` (matmul + broadcast add),
    /// a layer norm written in tensor ops, candle-nn's generic
    /// `ops::softmax` / `ops::log_softmax`. Trains correctly, slowly.
    CandleOps,
}

/// The model's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GptConfig {
    /// Number of token ids.
    pub vocab: usize,
    /// Longest sequence (number of position embeddings).
    pub block: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Attention heads (`d_model` must be a multiple).
    pub n_head: usize,
    /// Transformer blocks.
    pub n_layer: usize,
}

const LN_EPS: f64 = 1e-5;

/// The example's default problem and model (`cargo run --example gpt` with no
/// flags); the step benchmarks time this shape.
pub mod defaults {
    /// Digits per operand.
    pub const DIGITS: usize = 3;
    /// Token ids: `0`-`9`, `+`, `=`.
    pub const VOCAB: usize = 12;
    /// Width of the residual stream.
    pub const D_MODEL: usize = 128;
    /// Attention heads.
    pub const HEADS: usize = 4;
    /// Transformer blocks.
    pub const LAYERS: usize = 2;
    /// Problems per batch.
    pub const BATCH: usize = 64;
    /// Tokens the model sees per problem: `a+b=` and all answer digits but the last.
    pub const fn seq_len(digits: usize) -> usize {
        3 * digits + 2
    }
    /// Answer digits (`digits + 1`), the masked positions.
    pub const fn answer_len(digits: usize) -> usize {
        digits + 1
    }
}

enum Lin {
    Mb(minibatch::nn::Linear),
    Cn(candle_nn::Linear),
}

impl Lin {
    fn new(i: usize, o: usize, bias: bool, layers: Layers, vb: VarBuilder) -> Result<Self> {
        Ok(match layers {
            Layers::Minibatch => Lin::Mb(minibatch::nn::linear_b(i, o, bias, vb)?),
            _ => Lin::Cn(candle_nn::linear_b(i, o, bias, vb)?),
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Lin::Mb(l) => l.forward(x),
            Lin::Cn(l) => l.forward(x),
        }
    }
}

enum Emb {
    Mb(minibatch::nn::Embedding),
    Cn(candle_nn::Embedding),
}

impl Emb {
    fn new(n: usize, d: usize, layers: Layers, vb: VarBuilder) -> Result<Self> {
        Ok(match layers {
            Layers::Minibatch => Emb::Mb(minibatch::nn::embedding(n, d, vb)?),
            _ => Emb::Cn(candle_nn::embedding(n, d, vb)?),
        })
    }
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Emb::Mb(e) => e.forward(ids),
            Emb::Cn(e) => e.forward(ids),
        }
    }
    fn table(&self) -> &Tensor {
        match self {
            Emb::Mb(e) => e.embeddings(),
            Emb::Cn(e) => e.embeddings(),
        }
    }
}

enum Norm {
    Mb(minibatch::nn::LayerNorm),
    Cn(candle_nn::LayerNorm),
    /// `(x - mean) / sqrt(var + eps) * w + b` in candle tensor ops.
    Ops {
        w: Tensor,
        b: Tensor,
    },
}

impl Norm {
    fn new(d: usize, layers: Layers, vb: VarBuilder) -> Result<Self> {
        Ok(match layers {
            Layers::Minibatch => Norm::Mb(minibatch::nn::layer_norm(d, LN_EPS, vb)?),
            Layers::CandleNn => Norm::Cn(candle_nn::layer_norm(d, LN_EPS, vb)?),
            Layers::CandleOps => {
                let ln = candle_nn::layer_norm(d, LN_EPS, vb)?;
                let b = ln.bias().expect("layer_norm has a bias").clone();
                Norm::Ops {
                    w: ln.weight().clone(),
                    b,
                }
            }
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Norm::Mb(n) => n.forward(x),
            Norm::Cn(n) => n.forward(x),
            Norm::Ops { w, b } => {
                let mean = x.mean_keepdim(D::Minus1)?;
                let xc = x.broadcast_sub(&mean)?;
                let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
                let xn = xc.broadcast_div(&(var + LN_EPS)?.sqrt()?)?;
                xn.broadcast_mul(w)?.broadcast_add(b)
            }
        }
    }
}

struct Block {
    ln_1: Norm,
    q_proj: Lin,
    k_proj: Lin,
    v_proj: Lin,
    attn_proj: Lin,
    ln_2: Norm,
    c_fc: Lin,
    mlp_proj: Lin,
}

/// The transformer. `forward` maps token ids `(b, t)` (`u32`) to logits
/// `(b, t, vocab)`.
pub struct Gpt {
    cfg: GptConfig,
    layers: Layers,
    wte: Emb,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: Norm,
    lm_head: Lin,
    /// `(block, block)`: 0 on and below the diagonal, -inf above.
    causal: Tensor,
}

impl Gpt {
    /// Creates (or reads) the parameters under `vb`: `wte.weight`,
    /// `wpe.weight`, `h.{i}.{ln_1,attn.{q,k,v}_proj,attn.c_proj,ln_2,mlp.c_fc,mlp.c_proj}.*`,
    /// `ln_f.*`, `lm_head.weight` (GPT-2's names, with separate query, key and
    /// value projections: no split of a fused `c_attn` output to copy and
    /// differentiate).
    pub fn new(cfg: GptConfig, layers: Layers, vb: VarBuilder) -> Result<Self> {
        let d = cfg.d_model;
        if cfg.n_head == 0 || !d.is_multiple_of(cfg.n_head) {
            candle_core::bail!("d_model {d} is not a multiple of n_head {}", cfg.n_head);
        }
        let wte = Emb::new(cfg.vocab, d, layers, vb.pp("wte"))?;
        // Positions 0..t of every sequence: the first t rows of the table.
        let wpe = Emb::new(cfg.block, d, layers, vb.pp("wpe"))?
            .table()
            .clone();
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let vb = vb.pp("h").pp(i);
            blocks.push(Block {
                ln_1: Norm::new(d, layers, vb.pp("ln_1"))?,
                q_proj: Lin::new(d, d, true, layers, vb.pp("attn").pp("q_proj"))?,
                k_proj: Lin::new(d, d, true, layers, vb.pp("attn").pp("k_proj"))?,
                v_proj: Lin::new(d, d, true, layers, vb.pp("attn").pp("v_proj"))?,
                attn_proj: Lin::new(d, d, true, layers, vb.pp("attn").pp("c_proj"))?,
                ln_2: Norm::new(d, layers, vb.pp("ln_2"))?,
                c_fc: Lin::new(d, 4 * d, true, layers, vb.pp("mlp").pp("c_fc"))?,
                mlp_proj: Lin::new(4 * d, d, true, layers, vb.pp("mlp").pp("c_proj"))?,
            });
        }
        let ln_f = Norm::new(d, layers, vb.pp("ln_f"))?;
        let lm_head = Lin::new(d, cfg.vocab, false, layers, vb.pp("lm_head"))?;
        let t = cfg.block;
        let mask: Vec<f32> = (0..t * t)
            .map(|i| {
                if i % t > i / t {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let causal = Tensor::from_vec(mask, (t, t), vb.device())?.to_dtype(vb.dtype())?;
        Ok(Self {
            cfg,
            layers,
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
            causal,
        })
    }

    /// The model's shape.
    pub fn config(&self) -> GptConfig {
        self.cfg
    }

    fn softmax_last_dim(&self, x: &Tensor) -> Result<Tensor> {
        match self.layers {
            Layers::Minibatch => minibatch::nn::ops::softmax_last_dim(x),
            Layers::CandleNn => candle_nn::ops::softmax_last_dim(x),
            Layers::CandleOps => candle_nn::ops::softmax(x, D::Minus1),
        }
    }

    /// `log_softmax` over the last dimension with this model's layers.
    pub fn log_softmax(&self, x: &Tensor) -> Result<Tensor> {
        match self.layers {
            Layers::Minibatch => minibatch::nn::ops::log_softmax(x, D::Minus1),
            _ => candle_nn::ops::log_softmax(x, D::Minus1),
        }
    }

    fn attention(&self, blk: &Block, x: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let h = self.cfg.n_head;
        let hd = d / h;
        if self.layers == Layers::Minibatch {
            // One fused op (forward and backward) reading the heads through
            // their strides: no contiguous copies, no per-head matmuls.
            let heads = |l: &Lin| l.forward(x)?.reshape((b, t, h, hd))?.transpose(1, 2);
            let (q, k, v) = (
                heads(&blk.q_proj)?,
                heads(&blk.k_proj)?,
                heads(&blk.v_proj)?,
            );
            let y = minibatch::nn::ops::scaled_dot_product_attention(&q, &k, &v, true, None)?;
            let y = y.transpose(1, 2)?.reshape((b, t, d))?;
            return blk.attn_proj.forward(&y);
        }
        // (b, t, d) -> (b, h, t, hd), contiguous for the batched matmuls
        let heads = |l: &Lin| {
            l.forward(x)?
                .reshape((b, t, h, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (
            heads(&blk.q_proj)?,
            heads(&blk.k_proj)?,
            heads(&blk.v_proj)?,
        );
        let att = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?; // (b, h, t, t)
        let att = att.broadcast_add(&self.causal.narrow(0, 0, t)?.narrow(1, 0, t)?)?;
        let att = self.softmax_last_dim(&att)?;
        let y = att.matmul(&v)?; // (b, h, t, hd)
        let y = y.transpose(1, 2)?.reshape((b, t, d))?;
        blk.attn_proj.forward(&y)
    }

    fn mlp(&self, blk: &Block, x: &Tensor) -> Result<Tensor> {
        let h = blk.c_fc.forward(x)?;
        let h = match self.layers {
            Layers::Minibatch => minibatch::nn::ops::gelu(&h)?,
            Layers::CandleNn | Layers::CandleOps => h.gelu()?,
        };
        blk.mlp_proj.forward(&h)
    }
}

impl Module for Gpt {
    fn forward(&self, tokens: &Tensor) -> Result<Tensor> {
        let (_b, t) = tokens.dims2()?;
        if t > self.cfg.block {
            candle_core::bail!(
                "sequence of {t} tokens, the model takes at most {}",
                self.cfg.block
            );
        }
        let mut x = self
            .wte
            .forward(tokens)?
            .broadcast_add(&self.wpe.narrow(0, 0, t)?)?;
        for blk in &self.blocks {
            x = (&x + self.attention(blk, &blk.ln_1.forward(&x)?)?)?;
            x = (&x + self.mlp(blk, &blk.ln_2.forward(&x)?)?)?;
        }
        self.lm_head.forward(&self.ln_f.forward(&x)?)
    }
}

/// The mean negative log-likelihood of `targets` over the positions where
/// `mask` is 1: `-Σ mask·log_softmax(logits)[target] / Σ mask`.
///
/// `logits` `(b, t, vocab)`, `targets` `(b, t)` `u32`, `mask` `(b, t)` `f32`
/// (0 or 1, at least one 1). Runs on the device, no host read.
pub fn masked_loss(
    model: &Gpt,
    logits: &Tensor,
    targets: &Tensor,
    mask: &Tensor,
) -> Result<Tensor> {
    let logp = model.log_softmax(logits)?;
    let picked = logp
        .gather(&targets.unsqueeze(D::Minus1)?, D::Minus1)?
        .squeeze(D::Minus1)?;
    let total = (picked * mask)?.sum_all()?;
    total.neg()?.div(&mask.sum_all()?)
}

/// Seeded GPT-2 initialisation of every variable in `vm`, independent of the
/// order the variables were created in (sorted by name, one ChaCha8 stream):
/// linear and embedding weights normal(0, 0.02), the residual projections
/// (`*.c_proj.weight`) normal(0, 0.02/√(2·n_layer)), biases 0, layer-norm
/// weights 1.
pub fn seeded_init(vm: &VarMap, n_layer: usize, seed: u64) -> Result<()> {
    let data = vm.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x6770_7400);
    for name in names {
        let var = &data[name];
        let n = var.elem_count();
        let vals: Vec<f32> = if name.contains("ln_") {
            vec![if name.ends_with("weight") { 1.0 } else { 0.0 }; n]
        } else if name.ends_with("bias") {
            vec![0.0; n]
        } else {
            let std = if name.ends_with("c_proj.weight") {
                0.02 / ((2 * n_layer) as f32).sqrt()
            } else {
                0.02
            };
            (0..n).map(|_| std * normal(&mut rng)).collect()
        };
        let t = Tensor::from_vec(vals, var.shape(), &Device::Cpu)?
            .to_dtype(var.dtype())?
            .to_device(var.device())?;
        var.set(&t)?;
    }
    Ok(())
}

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut impl Rng) -> f32 {
    let u1: f32 = rng.random_range(f32::EPSILON..1.0);
    let u2: f32 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
}

/// Builds the model's parameters in a fresh `VarMap` on `device` (`f32`),
/// seeded: created by `seeded_var_builder` (a function of seed and name),
/// then given GPT-2's initialisation by [`seeded_init`].
pub fn build(cfg: GptConfig, layers: Layers, device: &Device, seed: u64) -> Result<(Gpt, VarMap)> {
    let vm = VarMap::new();
    let vb = minibatch::nn::seeded_var_builder(&vm, seed, DType::F32, device);
    let model = Gpt::new(cfg, layers, vb)?;
    seeded_init(&vm, cfg.n_layer, seed)?;
    Ok((model, vm))
}
