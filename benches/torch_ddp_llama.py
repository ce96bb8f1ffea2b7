"""PyTorch DDP twin of the llama workload of benches/ddp.rs: the ~20M Llama of
benches/torch_models_step.py (transformers' LlamaForCausalLM, random init:
hidden 512, 8 layers, 8 heads, 4 KV heads, intermediate 1024, vocab 8192,
tied embeddings, eager attention), wrapped in DistributedDataParallel on
gloo, each rank one thread, per-rank batch BATCH sequences of SEQ tokens,
next-token cross-entropy over every position, AdamW (lr 1e-4, betas
0.9/0.999, weight decay 0.01). WORLD ranks on this machine
(torch.multiprocessing spawn, as torch_ddp_gpt.py does); WORLD 1 runs one
process without DDP: the baseline of the scaling efficiency.

Every rank starts from the same init (seed 0; DDP broadcasts rank 0's
weights too) and draws its own batch (seed 1 + rank). After WARMUP steps,
STEPS steps run between two barriers; the slowest rank's time counts.
Prints one line: `llama<TAB>world<TAB>ms per step<TAB>samples/s`.

The bench runs it with its allocator setting in the environment
(MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_, see benches/common).

usage: python benches/torch_ddp_llama.py WORLD [STEPS] [BATCH_PER_RANK] [SEQ] [WARMUP]
"""
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

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


def run(rank, world, steps, bs, t, warmup, q):
    torch.set_num_threads(1)
    if world > 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29535")
        dist.init_process_group("gloo", rank=rank, world_size=world)
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

    for _ in range(warmup):
        step()
    if world > 1:
        dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if world > 1:
        dist.barrier()
    dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
    if rank == 0:
        q.put(dt.item())
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    world = int(sys.argv[1])
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    bs = int(sys.argv[3]) if len(sys.argv) > 3 else 8
    t = int(sys.argv[4]) if len(sys.argv) > 4 else 256
    warmup = int(sys.argv[5]) if len(sys.argv) > 5 else 2
    q = mp.get_context("spawn").SimpleQueue()
    args = (world, steps, bs, t, warmup, q)
    if world == 1:
        run(0, *args)
    else:
        mp.start_processes(run, args=args, nprocs=world, start_method="spawn")
    dt = q.get()
    print(f"llama\t{world}\t{1e3 * dt / steps:.3f}\t{steps * world * bs / dt:.3f}")
