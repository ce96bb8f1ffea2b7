"""PyTorch / transformers twin of benches/models_step.rs: one fine-tuning step
(forward, loss, backward, AdamW step, zero_grad(set_to_none)) of

  minilm  BertForSequenceClassification with all-MiniLM-L6-v2's config
          (from MINILM_DIR when set, else random init of the same config),
          2 labels, train mode (dropout 0.1), batch 32, sequence 128, every
          token attended (mask of ones), cross-entropy on random labels
          (MODELS_STEP_DROPOUT=0: dropout off);
  llama   LlamaForCausalLM: hidden 512, 8 layers, 8 heads, 4 KV heads,
          intermediate 1024, vocab 8192, tied embeddings (23.1M parameters),
          batch 8, sequence 256, next-token cross-entropy over every
          position of random tokens;

transformers eager attention (attn_implementation="eager"), CPU,
torch.set_num_threads(2), AdamW(lr 1e-4, betas 0.9/0.999, weight decay 0.01).

It is a server, so that the Rust bench can interleave its steps with ours:
started with `--workload W`, it builds the model and batch, prints
`ready<TAB>parameters<TAB>weights`, then answers each line `steps N` on stdin
with `times<TAB>ms,ms,...<TAB>cpu_ms,cpu_ms,...` (wall and CPU time of each
step, CPU from getrusage(RUSAGE_SELF): user + system, all threads), and
`quit` with `mem<TAB>peak MiB<TAB>step MiB` (VmHWM of this fresh process, and
VmHWM minus the VmRSS just before the first step), then exits.

usage: ~/.venv-torch/bin/python benches/torch_models_step.py --workload minilm|llama
"""
import argparse
import os
import resource
import sys
import time

import torch
import torch.nn.functional as F

from torch_common import status_kib

torch.set_num_threads(2)



def cpu_s():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def minilm():
    from transformers import BertConfig, BertForSequenceClassification

    d = os.environ.get("MINILM_DIR")
    p = 0.0 if os.environ.get("MODELS_STEP_DROPOUT") == "0" else 0.1
    if d:
        model = BertForSequenceClassification.from_pretrained(
            d, num_labels=2, attn_implementation="eager",
            hidden_dropout_prob=p, attention_probs_dropout_prob=p,
        )
        weights = f"all-MiniLM-L6-v2 from {d}"
    else:
        cfg = BertConfig(
            vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
            intermediate_size=1536, hidden_act="gelu", hidden_dropout_prob=p,
            attention_probs_dropout_prob=p, max_position_embeddings=512, type_vocab_size=2,
            initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0, num_labels=2,
            attn_implementation="eager",
        )
        model = BertForSequenceClassification(cfg)
        weights = "random init of all-MiniLM-L6-v2's config"
    b, t = 32, 128
    ids = torch.randint(1000, 30522, (b, t))
    mask = torch.ones(b, t, dtype=torch.long)
    types = torch.zeros(b, t, dtype=torch.long)
    labels = torch.randint(0, 2, (b,))

    def loss():
        logits = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        return F.cross_entropy(logits, labels)

    return model, loss, weights


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = 8192
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
        rms_norm_eps=1e-6, tie_word_embeddings=True, attn_implementation="eager",
    )
    model = LlamaForCausalLM(cfg)
    b, t = 8, 256
    x = torch.randint(0, vocab, (b, t))
    y = torch.randint(0, vocab, (b, t))

    def loss():
        logits = model(input_ids=x).logits
        return F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))

    return model, loss, "random init"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workload", choices=["minilm", "llama"], required=True)
    a = ap.parse_args()
    torch.manual_seed(0)
    model, loss_fn, weights = {"minilm": minilm, "llama": llama}[a.workload]()
    if hasattr(model.config, "_attn_implementation"):
        assert model.config._attn_implementation == "eager", model.config._attn_implementation
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01)
    n_params = sum(p.numel() for p in model.parameters())

    def step():
        loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    rss0 = status_kib("VmRSS")
    print(f"ready\t{n_params}\t{weights}", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] == "steps":
            wall, cpu = [], []
            for _ in range(int(cmd[1])):
                c0, t0 = cpu_s(), time.perf_counter()
                step()
                wall.append(1e3 * (time.perf_counter() - t0))
                cpu.append(1e3 * (cpu_s() - c0))
            print(
                "times\t" + ",".join(f"{v:.3f}" for v in wall) + "\t"
                + ",".join(f"{v:.3f}" for v in cpu),
                flush=True,
            )
        elif cmd[0] == "quit":
            hwm = status_kib("VmHWM")
            print(f"mem\t{hwm / 1024:.1f}\t{(hwm - rss0) / 1024:.1f}", flush=True)
            return


if __name__ == "__main__":
    main()
