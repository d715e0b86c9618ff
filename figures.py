"""Draws the README's figures into figures/ (needs matplotlib: pip install matplotlib).

    python figures.py

1. impulse_responses.png: |kernel| of a freshly initialized HOPE and S4D layer (128 channels,
   dt = 0.1, n = N = 64, float64) over 2048 steps: median and 10-90% band over the channels.
2. hankel_singular_values.png: normalized Hankel singular values of random-h HOPE systems and of
   S4D-Lin systems, n = 64 (64-by-64 Hankel matrices from 127 Markov parameters).
3. accuracy.png: validation accuracy per epoch of the runs in results/ (their metrics.jsonl).
"""
import glob
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from hope import HOPE  # noqa: E402
from s4d import S4D, init_A, s4d_kernel  # noqa: E402

COLORS = {"hope": "tab:blue", "s4d": "tab:red"}


def impulse_responses(path, L=2048):
    torch.manual_seed(0)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, layer in (("hope", HOPE(128, 64, dt_min=0.1, dt_max=0.1)), ("s4d", S4D(128, 64, dt_min=0.1, dt_max=0.1))):
        with torch.no_grad():
            k = layer.double().kernel(L).abs()  # (H, L); in float32 HOPE's tail stops at a ~1e-7 round-off floor
        k = k / k.max(-1, keepdim=True).values
        lo, med, hi = torch.quantile(k, torch.tensor([0.1, 0.5, 0.9], dtype=k.dtype), dim=0)
        label = "HOPE (n = 64)" if name == "hope" else "S4D-Lin (N = 64)"
        ax.semilogy(med, color=COLORS[name], lw=1, label=label + ", median over 128 channels")
        ax.fill_between(range(L), lo.clamp(min=1e-12), hi, color=COLORS[name], alpha=0.2, lw=0)
    ax.axvline(640, color="gray", ls="--", lw=0.8)
    ax.text(660, 0.3, "n / dt = 640", color="gray")
    ax.set(xlabel="time step t", ylabel="|k[t]| / max |k|", ylim=(1e-12, 2), title="Impulse responses at init, dt = 0.1")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def hankel_singular_values(path, n=64, draws=20):
    torch.manual_seed(0)
    idx = torch.arange(n)[:, None] + torch.arange(n)[None, :]  # (n, n)
    h = torch.cat([torch.randn(draws, n, dtype=torch.float64), torch.zeros(draws, n - 1, dtype=torch.float64)], -1)
    curves = {"HOPE, random h": h}
    A, _ = init_A(draws, n, "lin")
    C = torch.randn(draws, n // 2, dtype=torch.complex128)
    for dt in (1e-3, 1e-2, 1e-1):
        curves[f"S4D-Lin, dt = {dt:g}"] = s4d_kernel(torch.full((draws,), dt, dtype=torch.float64), A, C, 2 * n - 1)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, (label, markov) in enumerate(curves.items()):
        s = torch.linalg.svdvals(markov[:, idx])
        s = (s / s[:, :1]).median(0).values
        ax.semilogy(range(1, n + 1), s, label=label, color=COLORS["hope"] if i == 0 else plt.cm.Reds(0.4 + 0.2 * i))
    ax.axhline(0.01, color="gray", ls="--", lw=0.8)
    ax.set(xlabel="j", ylabel="sigma_j / sigma_1 (median of 20 draws)", ylim=(1e-16, 2),
           title="Hankel singular values, n = 64")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def accuracy(path, results="results"):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for run in sorted(glob.glob(os.path.join(results, "*", "metrics.jsonl"))):
        name = os.path.basename(os.path.dirname(run))
        rows = [json.loads(line) for line in open(run)]
        ax.plot([r["epoch"] for r in rows], [r["val_acc"] for r in rows], marker="o",
                color=COLORS[name.split("-")[0]], ls=":" if "nonoise" in name else "-", label=name)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set(xlabel="epoch", ylabel="validation accuracy", title="Noise-padded (solid) and plain (dotted) sequential Fashion-MNIST")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    os.makedirs("figures", exist_ok=True)
    impulse_responses("figures/impulse_responses.png")
    hankel_singular_values("figures/hankel_singular_values.png")
    accuracy("figures/accuracy.png")
    print("wrote figures/impulse_responses.png, figures/hankel_singular_values.png, figures/accuracy.png")
