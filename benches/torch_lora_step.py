"""PyTorch eager twin of benches/lora_step.rs: one LoRA fine-tuning step of
a transformers LlamaForCausalLM (8 heads, 4 key-value heads, intermediate
--inter, 688 by default) with PEFT (r on q/k/v/o, alpha 16, dropout 0) on CPU, 2 threads:
forward, cross-entropy of every position against random targets, backward,
AdamW (lr 1e-4) over the adapters only, zero_grad(set_to_none).

Prints one line, `torch_peft<TAB>min ms<TAB>median ms<TAB>CPU ms<TAB>peak MiB<TAB>step MiB`:
CPU ms is the process CPU time per step (all threads), peak is VmHWM after
the steps, step is VmHWM minus VmRSS just before the first step.

With `--arch bert --model-dir DIR`: transformers' BertForSequenceClassification
(2 labels) from DIR (all-MiniLM-L6-v2) with PEFT task_type="SEQ_CLS" (r 8,
alpha 16, dropout 0 on query/key/value/attention.output.dense; the
classifier trained as modules_to_save), random tokens without padding
(attention mask all ones), random labels, cross-entropy, AdamW (lr 1e-4)
over the trained parameters only, eager attention.

usage: ~/.venv-torch/bin/python benches/torch_lora_step.py [--batch B] [--seq T]
       [--hidden C] [--layers L] [--vocab V] [--r R] [--steps N]
       [--arch bert --model-dir DIR]
"""
import argparse
import statistics

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from torch_common import timed_steps

torch.set_num_threads(2)



def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=688)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--model-dir")
    a = ap.parse_args()
    torch.manual_seed(0)
    if a.arch == "bert":
        return bert(a)
    cfg = LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.inter, num_hidden_layers=a.layers,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=max(a.seq, 128),
        tie_word_embeddings=False, attn_implementation="eager",
    )
    model = get_peft_model(
        LlamaForCausalLM(cfg),
        LoraConfig(r=a.r, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randint(0, a.vocab, (a.batch, a.seq))
    y = torch.randint(0, a.vocab, (a.batch * a.seq,))

    def step():
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.reshape(-1, a.vocab), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times, cpu_ms, rss0, hwm = timed_steps(step, 3, a.steps)
    print(
        f"torch_peft\t{1e3 * min(times):.3f}\t{1e3 * statistics.median(times):.3f}\t{cpu_ms:.1f}"
        f"\t{hwm / 1024:.1f}\t{(hwm - rss0) / 1024:.1f}"
    )


def bert(a):
    from transformers import BertForSequenceClassification

    base = BertForSequenceClassification.from_pretrained(a.model_dir, num_labels=2, attn_implementation="eager")
    model = get_peft_model(
        base,
        LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0,
                   target_modules=["query", "key", "value", "attention.output.dense"]),
    )
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randint(0, base.config.vocab_size, (a.batch, a.seq))
    mask = torch.ones_like(x)
    y = torch.randint(0, 2, (a.batch,))

    def step():
        logits = model(input_ids=x, attention_mask=mask).logits
        loss = F.cross_entropy(logits, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times, cpu_ms, rss0, hwm = timed_steps(step, 1, a.steps)
    print(
        f"torch_peft\t{1e3 * min(times):.3f}\t{1e3 * statistics.median(times):.3f}\t{cpu_ms:.1f}"
        f"\t{hwm / 1024:.1f}\t{(hwm - rss0) / 1024:.1f}"
    )


if __name__ == "__main__":
    main()
