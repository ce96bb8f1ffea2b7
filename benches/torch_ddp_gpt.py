"""PyTorch DDP twin of the gpt step in benches/ddp.rs: the model and step of
benches/torch_gpt_step.py (variant `manual`: the same ops as the Rust model),
wrapped in DistributedDataParallel on gloo, each rank one thread, per-rank
batch B (the example's default 64), WORLD ranks on this machine
(torch.multiprocessing spawn, as ../shared/peers/torch_ddp.py does). WORLD 1
runs one process without DDP: the baseline of the scaling efficiency.

Each rank draws its own batch (seed 1 + rank). After 5 warm-up steps, STEPS
steps run between two barriers; the slowest rank's time counts.
Prints one line: `gpt<TAB>world<TAB>ms per step<TAB>samples/s`.

usage: python benches/torch_ddp_gpt.py WORLD [STEPS] [BATCH_PER_RANK]
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch_gpt_step import Gpt  # noqa: E402


def run(rank, world, steps, bs, q):
    torch.set_num_threads(1)
    if world > 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29534")
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    digits = 3
    vocab, t = 12, 3 * digits + 2
    answer = digits + 1
    model = Gpt(vocab, t, 128, 4, 2, False)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    g = torch.Generator().manual_seed(1 + rank)
    x = torch.randint(0, vocab, (bs, t), generator=g)
    y = torch.randint(0, 10, (bs, t), generator=g)
    mask = torch.zeros(bs, t)
    mask[:, t - answer:] = 1.0

    def step():
        logits = net(x)
        logp = F.log_softmax(logits, dim=-1)
        picked = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        loss = -(picked * mask).sum() / mask.sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    if world > 1:
        dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if world > 1:
        dist.barrier()
    dt = time.perf_counter() - t0
    if rank == 0:
        q.put(dt)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    world = int(sys.argv[1])
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    bs = int(sys.argv[3]) if len(sys.argv) > 3 else 64
    q = mp.get_context("spawn").SimpleQueue()
    if world == 1:
        run(0, 1, steps, bs, q)
    else:
        mp.start_processes(run, args=(world, steps, bs, q), nprocs=world, start_method="spawn")
    dt = q.get()
    print(f"gpt\t{world}\t{1e3 * dt / steps:.3f}\t{steps * world * bs / dt:.0f}")
