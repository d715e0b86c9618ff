"""What the state route costs on the CPU: forward(u) against forward(u, state, return_state=True) (B = 1 and 8), and a
1,000-sample prompt through one forward(.., return_state=True) against 1,000 step() calls (B = 1); H = 128,
n = N = 64, L = 2048, no gradients, both layers. Interleaved repetitions, the median after a warm-up.

    OMP_NUM_THREADS=2 python results/cpu-state/state_cost.py   # from the project folder

state_cost.txt also has git's commit and lscpu's model name on top; it was measured with the two training runs of
that session paused (SIGSTOP), so nothing else ran on the 2 cores.
"""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from hope import HOPE  # noqa: E402
from s4d import S4D  # noqa: E402


def median_ms(fns, reps=7):
    times = {name: [] for name in fns}
    for _ in range(reps + 1):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t[1:]) for name, t in times.items()}


torch.manual_seed(0)
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
with torch.no_grad():
    for cls in (HOPE, S4D):
        layer = cls(128, 64).eval()
        for B in (1, 8):
            u, x = torch.randn(B, 128, 2048), torch.randn_like(layer.default_state(B))
            ms = median_ms({"plain": lambda: layer(u), "state": lambda: layer(u, x, return_state=True)})
            print(f"{cls.__name__} B={B}: forward(u) {ms['plain']:.1f} ms, forward(u, state, return_state=True) "
                  f"{ms['state']:.1f} ms, ratio {ms['state'] / ms['plain']:.2f}")
        u = torch.randn(1, 128, 1000)

        def loop():
            state = None
            for t in range(1000):
                _, state = layer.step(u[..., t], state)
        ms = median_ms({"forward": lambda: layer(u, return_state=True), "steps": loop}, reps=3)
        print(f"{cls.__name__} prompt of 1,000: one forward(.., return_state=True) {ms['forward']:.1f} ms, "
              f"1,000 step() {ms['steps']:.1f} ms, ratio {ms['steps'] / ms['forward']:.1f}")
