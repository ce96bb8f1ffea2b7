"""Helpers shared by the PyTorch twins of the benches (imported from the
script's own folder, which Python puts first on sys.path)."""
import os
import time


def status_kib(key):
    """The value of `key` ("VmRSS", "VmHWM", ...) of /proc/self/status in KiB; 0 if absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def timed_steps(step, warmup, steps):
    """Runs `step` `warmup` times, then `steps` timed times.

    Returns (seconds of each timed step, CPU ms per timed step, VmRSS in KiB
    before the first step, VmHWM in KiB after the last)."""
    rss0 = status_kib("VmRSS")
    for _ in range(warmup):
        step()
    times = []
    cpu0 = time.process_time()
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    cpu_ms = 1e3 * (time.process_time() - cpu0) / steps
    return times, cpu_ms, rss0, status_kib("VmHWM")


def _ddp_rank(rank, world, port, make_step, warmup, steps, q):
    """One rank of `ddp_seconds`: 1 thread, gloo when world > 1."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if world > 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    step = make_step(rank, world)
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


def ddp_seconds(make_step, world, port, warmup, steps):
    """Seconds of `steps` training steps at `world` ranks on this machine.

    Each rank (torch.multiprocessing spawn, 1 thread, DDP on gloo at
    127.0.0.1:`port`; world 1 runs one process without DDP) calls
    `make_step(rank, world)` for its step function, runs `warmup` steps, then
    `steps` steps between two barriers; the slowest rank's time counts.
    `make_step` must pickle (a module-level function or a partial of one)."""
    import torch.multiprocessing as mp

    q = mp.get_context("spawn").SimpleQueue()
    args = (world, port, make_step, warmup, steps, q)
    if world == 1:
        _ddp_rank(0, *args)
    else:
        mp.start_processes(_ddp_rank, args=args, nprocs=world, start_method="spawn")
    return q.get()
