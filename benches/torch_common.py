"""Helpers shared by the PyTorch twins of the benches (imported from the
script's own folder, which Python puts first on sys.path)."""
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
