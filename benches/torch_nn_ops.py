"""PyTorch eager twin of benches/nn_ops.rs: forward + backward of softmax,
log-softmax, layer norm, RMS norm and rotary embeddings on the same shapes,
CPU, 2 threads (or RAYON_NUM_THREADS). Each step is y = op(x), (y * r).sum().backward(), with x (and
the norms' weight and bias) requiring grad and the rope tables constant.
torch has no rope op: rope is written in torch ops (x*cos + rotate_half(x)*sin,
as HF transformers do), rope_i with strided pairs.

usage: ~/.venv-torch/bin/python benches/torch_nn_ops.py
Also the step without any op ("no op": (x * r).sum().backward()) and, under
torch.no_grad(), the forward passes alone ("fwd ...").

prints `name<TAB>best seconds per step` (best of NN_OPS_ROUNDS = 7 rounds of
NN_OPS_ITERS = 20 steps after a warm-up); `cargo bench --bench nn_ops` runs it and prints the ratios.
"""
import os
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(int(os.environ.get("RAYON_NUM_THREADS", "2")))
ROUNDS = int(os.environ.get("NN_OPS_ROUNDS", "7"))
ITERS = int(os.environ.get("NN_OPS_ITERS", "20"))
torch.manual_seed(0)


def rand(*shape):
    return torch.rand(*shape) * 2 - 1


def best(fn, rounds=ROUNDS, iters=ITERS):
    for _ in range(5):
        fn()
    t_best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(iters):
            fn()
        t_best = min(t_best, (time.perf_counter() - t) / iters)
    return t_best


x = rand(16, 64, 128).requires_grad_()
w = (rand(128) * 0.1 + 1).requires_grad_()
b = (rand(128) * 0.1).requires_grad_()
r = rand(16, 64, 128)
s = (rand(16, 4, 64, 64) * 3).requires_grad_()
rs = rand(16, 4, 64, 64)
q = rand(16, 4, 64, 32).requires_grad_()
theta = rand(64, 16) * 3
cos, sin = theta.cos(), theta.sin()
rq = rand(16, 4, 64, 32)
qt = rand(16, 64, 4, 32).requires_grad_()
rqt = rand(16, 64, 4, 32)


def rope(x, cos, sin, layout):
    c, s_ = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    if layout == "thd":
        c, s_ = c[:, None, :], s_[:, None, :]
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * c + rot * s_


def rope_i(x, cos, sin):
    x0, x1 = x[..., 0::2], x[..., 1::2]
    y0 = x0 * cos - x1 * sin
    y1 = x0 * sin + x1 * cos
    return torch.stack([y0, y1], -1).flatten(-2)


CASES = {
    "layer_norm (16,64,128)": lambda: (F.layer_norm(x, (128,), w, b, 1e-5) * r).sum().backward(),
    "rms_norm (16,64,128)": lambda: (F.rms_norm(x, (128,), w, 1e-5) * r).sum().backward(),
    "softmax_last_dim (16,4,64,64)": lambda: (torch.softmax(s, -1) * rs).sum().backward(),
    "log_softmax (16,4,64,64)": lambda: (torch.log_softmax(s, -1) * rs).sum().backward(),
    "rope (16,4,64,32)": lambda: (rope(q, cos, sin, "bhtd") * rq).sum().backward(),
    "rope_i (16,4,64,32)": lambda: (rope_i(q, cos, sin) * rq).sum().backward(),
    "rope_thd (16,64,4,32)": lambda: (rope(qt, cos, sin, "thd") * rqt).sum().backward(),
    "no op (16,64,128)": lambda: (x * r).sum().backward(),
    "no op (16,4,64,64)": lambda: (s * rs).sum().backward(),
    "no op (16,4,64,32)": lambda: (q * rq).sum().backward(),
}


def no_grad(fn):
    def run():
        with torch.no_grad():
            fn()
    return run


FORWARD = {
    "fwd layer_norm (16,64,128)": lambda: F.layer_norm(x, (128,), w, b, 1e-5),
    "fwd rms_norm (16,64,128)": lambda: F.rms_norm(x, (128,), w, 1e-5),
    "fwd softmax_last_dim (16,4,64,64)": lambda: torch.softmax(s, -1),
    "fwd rope (16,4,64,32)": lambda: rope(q, cos, sin, "bhtd"),
    "fwd rope_i (16,4,64,32)": lambda: rope_i(q, cos, sin),
    "fwd rope_thd (16,64,4,32)": lambda: rope(qt, cos, sin, "thd"),
}
CASES.update({k: no_grad(f) for k, f in FORWARD.items()})

for name, fn in CASES.items():
    print(f"{name}\t{best(fn):.9f}", flush=True)
