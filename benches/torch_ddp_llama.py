"""PyTorch DDP twin of the llama workload of benches/ddp.rs: the ~20M Llama of
benches/torch_models_step.py (transformers' LlamaForCausalLM, random init:
hidden 512, 8 layers, 8 heads, 4 KV heads, intermediate 1024, vocab 8192,
tied embeddings, eager attention), wrapped in DistributedDataParallel on
gloo, each rank one thread, per-rank batch BATCH sequences of SEQ tokens,
next-token cross-entropy over every position, AdamW (lr 1e-4, betas
0.9/0.999, weight decay 0.01). WORLD ranks on this machine
(torch_common.ddp_seconds, as torch_ddp_gpt.py); WORLD 1 runs one process
without DDP: the baseline of the scaling efficiency.

Every rank starts from the same init (seed 0; DDP broadcasts rank 0's
weights too) and draws its own batch (seed 1 + rank). After WARMUP steps,
STEPS steps run between two barriers; the slowest rank's time counts.
Prints one line: `llama<TAB>world<TAB>ms per step<TAB>samples/s`.

The bench runs it with its allocator setting in the environment
(MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_, see benches/common).

usage: python benches/torch_ddp_llama.py WORLD [STEPS] [BATCH_PER_RANK] [SEQ] [WARMUP]
"""
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch_common import ddp_seconds  # noqa: E402

VOCAB = 8192


def build():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
        rms_norm_eps=1e-6, tie_word_embeddings=True, attn_implementation="eager",
    )
    model = LlamaForCausalLM(cfg)
    assert model.config._attn_implementation == "eager", model.config._attn_implementation
    return model


def make_step(bs, t, rank, world):
    torch.manual_seed(0)
    model = build()
    model.train()
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.01)
    g = torch.Generator().manual_seed(1 + rank)
    x = torch.randint(0, VOCAB, (bs, t), generator=g)
    y = torch.randint(0, VOCAB, (bs * t,), generator=g)

    def step():
        logits = net(input_ids=x).logits
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


if __name__ == "__main__":
    world = int(sys.argv[1])
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    bs = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    t = int(sys.argv[4]) if len(sys.argv) > 4 else 256
    warmup = int(sys.argv[5]) if len(sys.argv) > 5 else 2
    dt = ddp_seconds(functools.partial(make_step, bs, t), world, 29535, warmup, steps)
    print(f"llama\t{world}\t{1e3 * dt / steps:.3f}\t{steps * world * bs / dt:.3f}")
