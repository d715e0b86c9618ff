"""CPU A/B of two checkouts of hope.py, timed round-robin in one process (new = this repository).

    git worktree add /tmp/old <commit> && python results/cpu-ab/ab.py /tmp/old > results/cpu-ab/ab.txt

Same cases as bench.py (forward + backward unless noted), same sizes: kernel spectra at H = 128, L = 2048;
one layer and the 4 x 128 training step at batch 8; 1,000 step() calls at batch 8 (no gradients).
"""
import importlib.util
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, here)
import bench  # noqa: E402
import train_scifar  # noqa: E402


def load(folder, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "hope.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cases(hope):
    torch.manual_seed(0)
    out = {}
    for n in (64, 128):
        layer = hope.HOPE(128, n, dt_min=0.1, dt_max=0.1)
        out[f"kernel-hope-n{n}"] = lambda l=layer: torch.view_as_real(
            hope.hope_kernel_spectrum(l.h, l.log_dt.exp(), 2048)).square().sum().backward()
        out[f"kernel-G2L-n{n}"] = lambda l=layer: torch.view_as_real(
            hope.hope_transfer(l.h, l.log_dt.exp(), 4096)).square().sum().backward()
    layer, u = hope.HOPE(128, 64), torch.randn(8, 128, 2048, requires_grad=True)
    out["layer-hope"] = lambda: layer(u).square().mean().backward()
    rec, v = hope.HOPE(128, 64).eval(), torch.randn(8, 128, 1000)

    @torch.no_grad()
    def recurrent():
        state = rec.default_state(8)
        for t in range(1000):
            _, state = rec.step(v[..., t], state)
    out["recurrent-1000-hope"] = recurrent
    model = train_scifar.SequenceClassifier(lambda: hope.HOPE(128, 64, 0.1, 0.1, 0.1, lr_dt=0.0), 3, 10, 128, 4, 0.1, 1024)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
    x, y = torch.randn(8, 3, 2048), torch.randint(0, 10, (8,))

    def step():
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    out["step-hope-fp32"] = step
    return out


def main(old_folder, reps=21):
    old, new = cases(load(old_folder, "hope_old")), cases(load(here, "hope_new"))
    print(f"CPU: {bench.cpu_model()}, {torch.get_num_threads()} threads; torch {torch.__version__}; {reps} round-robin runs "
          f"after 2 warm-ups: medians, and the ratio of the fastest runs (robust to a noisy machine)\nold: {old_folder}\nnew: {here}\n")
    print(f"{'case':24s} {'old ms':>9s} {'new ms':>9s} {'new/old':>8s} {'min ratio':>9s} {'old launches':>13s} {'new launches':>13s}")
    for name in old:
        fns = {"old": old[name], "new": new[name]}
        for fn in fns.values():
            fn(), fn()
        times = {k: [] for k in fns}
        for _ in range(reps):
            for k, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t) * 1e3)
        ms = {k: statistics.median(v) for k, v in times.items()}
        fastest = {k: min(v) for k, v in times.items()}
        counts = {k: bench.launches(fn) for k, fn in fns.items()}
        print(f"{name:24s} {ms['old']:9.1f} {ms['new']:9.1f} {ms['new'] / ms['old']:8.2f} {fastest['new'] / fastest['old']:9.2f} "
              f"{counts['old']:13d} {counts['new']:13d}",
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
