"""PyTorch DDP twin of the gpt step in benches/ddp.rs: the model and step of
benches/torch_gpt_step.py (variant `manual`: the same ops as the Rust model),
wrapped in DistributedDataParallel on gloo, each rank one thread, per-rank
batch B (the example's default 64), WORLD ranks on this machine
(torch_common.ddp_seconds, as ../shared/peers/torch_ddp.py does). WORLD 1
runs one process without DDP: the baseline of the scaling efficiency.

Each rank draws its own batch (seed 1 + rank). After 5 warm-up steps, STEPS
steps run between two barriers; the slowest rank's time counts.
Prints one line: `gpt<TAB>world<TAB>ms per step<TAB>samples/s`.

usage: python benches/torch_ddp_gpt.py WORLD [STEPS] [BATCH_PER_RANK]
"""
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch_common import ddp_seconds  # noqa: E402
from torch_gpt_step import Gpt  # noqa: E402


def make_step(bs, rank, world):
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

    return step


if __name__ == "__main__":
    world = int(sys.argv[1])
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 100
    bs = int(sys.argv[3]) if len(sys.argv) > 3 else 64
    dt = ddp_seconds(functools.partial(make_step, bs), world, 29534, 5, steps)
    print(f"gpt\t{world}\t{1e3 * dt / steps:.3f}\t{steps * world * bs / dt:.0f}")
