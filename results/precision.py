"""The kernel's relative error against the step-by-step recurrence (the test's kernel_error and impulse_response),
worst case over dt in {1e-4, 1e-3, 1e-2, 0.1, 1, 10} (x 1, 1.3, 0.7 per channel), five seeds:
n in {1, 7, 64} with L up to 1024, and n = 128 at L = 2048; float64 and float32.

    git worktree add /tmp/old 1ea1983 && python results/precision.py /tmp/old > results/precision.txt
"""
import importlib.util
import os
import sys

import torch

here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, here)
from test_hope import impulse_response, kernel_error  # noqa: E402


def worst(hope, seeds=range(5)):
    out = {}
    for seed in seeds:
        torch.manual_seed(seed)
        for dt in (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0):
            for n, Ls in ((1, (1, 100, 1024)), (7, (3, 100, 1024)), (64, (2, 100, 1024)), (128, (2048,))):
                for L in Ls:
                    h = torch.randn(3, n, dtype=torch.float64)
                    dts = torch.full((3,), dt, dtype=torch.float64) * torch.tensor([1.0, 1.3, 0.7], dtype=torch.float64)
                    ref = impulse_response(h, dts, L)
                    row = out.setdefault("n <= 64, L <= 1024" if n < 128 else "n = 128, L = 2048", [0.0, 0.0])
                    row[0] = max(row[0], kernel_error(hope.hope_kernel(h, dts, L), ref, h))
                    row[1] = max(row[1], kernel_error(hope.hope_kernel(h.float(), dts.float(), L), ref, h))
    return out


folders = [here] + sys.argv[1:]
print(f"torch {torch.__version__}; worst relative error over dt 1e-4..10 and seeds 0-4")
for folder in folders:
    spec = importlib.util.spec_from_file_location(f"hope_{len(folder)}", os.path.join(folder, "hope.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for case, (e64, e32) in worst(module).items():
        print(f"{'this checkout' if folder == here else folder:16s} {case:20s} float64 {e64:.1e}  float32 {e32:.1e}")
