"""CPU A/B of two checkouts of hope.py, timed round-robin in one process (new = this repository).

    git worktree add /tmp/old <commit> && python results/cpu-ab/ab.py /tmp/old > results/cpu-ab/ab.txt

The cases are bench.py's own (forward + backward unless noted; same sizes and launch counts), built and run with
bench's and train_scifar's HOPE names pointing at one checkout's hope.py at a time: kernel spectra at H = 128,
L = 2048; one layer and the 4 x 128 training step at batch 8; 1,000 step() calls at batch 8 (no gradients).
"""
import contextlib
import importlib.util
import os
import statistics
import sys
import time

import torch

here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, here)
import bench  # noqa: E402
import train_scifar  # noqa: E402

CASES = ["kernel-hope-n64", "kernel-G2L-n64", "kernel-hope-n128", "kernel-G2L-n128", "layer-hope", "recurrent-1000-hope",
         "step-hope-fp32"]


def load(folder, name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "hope.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def using(hope):
    """bench's and train_scifar's HOPE names bound to this hope module (restored afterwards)."""
    names = [(bench, "HOPE"), (bench, "hope_kernel_spectrum"), (bench, "hope_transfer"), (train_scifar, "HOPE")]
    saved = [getattr(module, name) for module, name in names]
    for module, name in names:
        setattr(module, name, getattr(hope, name))
    try:
        yield
    finally:
        for (module, name), value in zip(names, saved):
            setattr(module, name, value)


def cases(hope):
    """bench.case's functions for this hope module; each run rebinds the names (the kernel cases look them up then)."""
    def bound(fn):
        def run():
            with using(hope):
                fn()
        return run
    out = {}
    for name in CASES:
        with using(hope):
            out[name] = bound(bench.case(name, torch.device("cpu"), 8))
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
