"""PyTorch eager twin of benches/gpt_step.rs: one training step of the gpt
example's model (examples/gpt/model.rs) on CPU, 2 threads.

Model: GPT-2 layout, token + learned position embeddings, N pre-norm blocks
(LayerNorm, causal self-attention with separate q/k/v projections, LayerNorm,
MLP 4x with GELU tanh), final LayerNorm, linear head without bias. Step: forward, the
masked loss -sum(mask * log_softmax(logits)[target]) / sum(mask), backward,
clip_grad_norm_(1.0), AdamW (betas 0.9/0.99, weight decay 0.1) step,
zero_grad (set_to_none). Same shapes as the Rust bench (the example's
defaults); random tokens, mask on the answer positions.

Variants (one line each, `name<TAB>min ms<TAB>median ms<TAB>CPU ms<TAB>peak MiB<TAB>step MiB`,
CPU ms: process CPU time per step, all threads):
  manual   the same ops as the Rust model: q k^T, + causal mask, softmax, @ v;
           log_softmax + gather + mask for the loss
  sdpa_ce  idiomatic PyTorch: F.scaled_dot_product_attention(is_causal=True)
           and F.cross_entropy(ignore_index=-100)
Memory: `peak` is VmHWM of this process (/proc/self/status) after the timed
steps, `step` is VmHWM minus VmRSS just before the first step of that variant,
each variant in a fresh process (the script re-runs itself with --variant).

usage: ~/.venv-torch/bin/python benches/torch_gpt_step.py [--batch B] [--digits D]
       [--d-model C] [--heads H] [--layers L] [--steps N] [--variant V]
"""
import argparse
import math
import statistics
import subprocess
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_common import timed_steps

torch.set_num_threads(2)



class Block(nn.Module):
    def __init__(self, d, h, sdpa):
        super().__init__()
        self.h, self.sdpa = h, sdpa
        self.ln_1 = nn.LayerNorm(d)
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.attn_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.c_fc = nn.Linear(d, 4 * d)
        self.mlp_proj = nn.Linear(4 * d, d)

    def attn(self, x, causal):
        b, t, d = x.shape
        h, hd = self.h, d // self.h
        q, k, v = (p(x).view(b, t, h, hd).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
            att = torch.softmax(att + causal[:t, :t], dim=-1)
            y = att @ v
        return self.attn_proj(y.transpose(1, 2).reshape(b, t, d))

    def forward(self, x, causal):
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class Gpt(nn.Module):
    def __init__(self, vocab, block, d, h, n_layer, sdpa):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block, d)
        self.h = nn.ModuleList([Block(d, h, sdpa) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.register_buffer(
            "causal", torch.full((block, block), float("-inf")).triu(1), persistent=False
        )
        for name, p in self.named_parameters():
            if "ln_" in name:
                continue
            if name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe.weight[:t]
        for blk in self.h:
            x = blk(x, self.causal)
        return self.lm_head(self.ln_f(x))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--digits", type=int, default=3)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--variant", choices=["manual", "sdpa_ce"])
    a = ap.parse_args()
    if a.variant is None:
        # each variant in a fresh process, so its peak memory is its own
        for v in ["manual", "sdpa_ce"]:
            out = subprocess.run(
                [sys.executable, __file__, "--variant", v] + sys.argv[1:],
                check=True, capture_output=True, text=True,
            ).stdout
            print(out, end="", flush=True)
        return

    torch.manual_seed(0)
    vocab, t = 12, 3 * a.digits + 2
    answer = a.digits + 1
    model = Gpt(vocab, t, a.d_model, a.heads, a.layers, a.variant == "sdpa_ce")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    x = torch.randint(0, vocab, (a.batch, t))
    y = torch.randint(0, 10, (a.batch, t))
    mask = torch.zeros(a.batch, t)
    mask[:, t - answer:] = 1.0
    y_ignore = y.masked_fill(mask == 0, -100)

    def step():
        logits = model(x)
        if a.variant == "manual":
            logp = F.log_softmax(logits, dim=-1)
            picked = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
            loss = -(picked * mask).sum() / mask.sum()
        else:
            loss = F.cross_entropy(logits.reshape(-1, vocab), y_ignore.reshape(-1), ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    times, cpu_ms, rss0, hwm = timed_steps(step, 5, a.steps)
    print(
        f"{a.variant}\t{1e3 * min(times):.3f}\t{1e3 * statistics.median(times):.3f}\t{cpu_ms:.1f}"
        f"\t{hwm / 1024:.1f}\t{(hwm - rss0) / 1024:.1f}"
    )


if __name__ == "__main__":
    main()
