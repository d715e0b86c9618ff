"""Prints the results table from results/ and draws the README's figures into figures/.

    python figures.py            # the table needs only the standard library; the figures need
                                 # matplotlib (pip install matplotlib), a figures-only extra: without it,
                                 # the table is printed, a note says so, and the exit status is 0

Table: one row per setting (task, dt fixed or how it was trained), test accuracy at the best validation epoch, mean over the
seeds and each seed, seconds per epoch (mean over the epochs of the setting's runs) and the commit(s) whose code made
the row's runs ("code" in their config.json).
Figures:
1. impulse_responses.png: |kernel| of a freshly initialized HOPE and S4D layer (128 channels,
   dt = 0.1, n = N = 64, float64) over 2048 steps: median and 10-90% band over the channels.
2. hankel_singular_values.png: normalized Hankel singular values of random-h HOPE systems and of
   S4D-Lin systems, n = 64 (64-by-64 Hankel matrices from 127 Markov parameters).
3. dt_sweep.png: the table's test accuracies against dt (log axis), trained-dt runs at the right.
4. accuracy.png: validation accuracy per epoch of every run in results/.
5. folded_kernel.png: the exact causal kernel k[0..L-1] of a freshly initialized HOPE layer (n = 64, dt = 0.01,
   L = 1024, float64) against the kernel that G at the 2L FFT nodes gives (the response folded with period 2L), one
   channel, and their difference; the title gives the relative error over all 128 channels.
"""
import glob
import json
import os
import statistics
import sys

COLORS = {"hope": "tab:blue", "s4d": "tab:red"}
LABELS = {"hope": "HOPE", "s4d": "S4D-Lin"}
TASKS = ("noise-padded", "no noise")


def load_runs(results="results"):
    """Every results/<run>/ with config.json and metrics.jsonl: its name, config, rows and best row.

    The best row is the first epoch with the highest validation accuracy, as train_scifar.py picks it."""
    runs = []
    for path in sorted(glob.glob(os.path.join(results, "*", "metrics.jsonl"))):
        folder = os.path.dirname(path)
        with open(os.path.join(folder, "config.json")) as f:
            config = json.load(f)
        with open(path) as f:
            rows = [json.loads(line) for line in f]
        if config["model"] == "s4d" and config["s4d_init"] != "lin":
            raise ValueError(f"{folder}: the table names S4D-Lin, but this run used init {config['s4d_init']}")
        runs.append({"name": os.path.basename(folder), "config": config, "rows": rows,
                     "best": max(rows, key=lambda r: r["val_acc"])})
    return runs


def setting(config):
    """(task, dt): dt is the fixed value (a float), or a description of how it was trained (a str)."""
    if config["dt_min"] == config["dt_max"] and config["lr_dt"] == 0:
        return TASKS[config["no_noise"]], config["dt_min"]
    return TASKS[config["no_noise"]], f"trained (init log-uniform [{config['dt_min']:g}, {config['dt_max']:g}], lr {config['lr_dt']:g})"


def grouped(runs):
    """{(task, dt): {model: runs sorted by seed}}, settings in table order."""
    groups = {}
    for run in sorted(runs, key=lambda r: r["config"]["seed"]):
        groups.setdefault(setting(run["config"]), {}).setdefault(run["config"]["model"], []).append(run)
    order = sorted(groups, key=lambda k: (TASKS.index(k[0]), isinstance(k[1], str), str(k[1]) if isinstance(k[1], str) else k[1]))
    return {k: groups[k] for k in order}


def table(runs):
    """The README's results table (Markdown), from the runs' metrics."""
    lines = ["| task | dt | HOPE, test % | S4D-Lin, test % | s / epoch, HOPE and S4D | code |",
             "| --- | --- | --- | --- | --- | --- |"]
    for (task, dt), models in grouped(runs).items():
        cells, seconds = [], []
        for model in ("hope", "s4d"):
            accs = [100 * r["best"]["test_acc"] for r in models.get(model, [])]
            each = f" ({', '.join(f'{a:.1f}' for a in accs)})" if len(accs) > 1 else ""
            cells.append(f"{statistics.mean(accs):.1f}{each}" if accs else "-")
            times = [row["seconds"] for r in models.get(model, []) for row in r["rows"]]
            seconds.append(f"{statistics.mean(times):.0f}" if times else "-")
        code = sorted({r["config"]["code"][:7] + "+dirty" * r["config"]["code"].endswith("+dirty")
                       for rs in models.values() for r in rs})
        lines.append(f"| {task} | {dt if isinstance(dt, str) else f'{dt:g}, fixed'} | {cells[0]} | {cells[1]} | "
                     f"{', '.join(seconds)} | {', '.join(code)} |")
    return "\n".join(lines)


def save(fig, path):
    """A PNG without the "Software" entry, where matplotlib writes its version; with data from plotted() (or exact
    data, as results/ gives), the same figure has the same bytes on every run and machine."""
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Software": None})


def plotted(t, floor):
    """A curve for a log axis whose bottom is floor, clamped there. float64 round-off differs between CPUs, BLAS
    builds and thread counts (about 1e-16 of the largest value): near 1e-12 of it, where the axes once ended, it
    moved pixels, and a line to a point below the axis moves the pixels of its visible part. Floors of 1e-8 and
    1e-10 keep round-off invisible (tested at 100 times its size)."""
    return t.clamp(min=floor)


def impulse_responses(plt, path, L=2048):
    import torch
    from hope import HOPE
    from s4d import S4D
    torch.manual_seed(0)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, layer in (("hope", HOPE(128, 64, dt_min=0.1, dt_max=0.1)), ("s4d", S4D(128, 64, dt_min=0.1, dt_max=0.1))):
        with torch.no_grad():
            k = layer.double().kernel(L).abs()  # (H, L); in float32 HOPE's tail stops at a ~1e-7 round-off floor
        k = k / k.max(-1, keepdim=True).values
        lo, med, hi = plotted(torch.quantile(k, torch.tensor([0.1, 0.5, 0.9], dtype=k.dtype), dim=0), 1e-8)
        label = "HOPE (n = 64)" if name == "hope" else "S4D-Lin (N = 64)"
        ax.semilogy(med, color=COLORS[name], lw=1, label=label + ", median over 128 channels")
        ax.fill_between(range(L), lo, hi, color=COLORS[name], alpha=0.2, lw=0)
    ax.axvline(640, color="gray", ls="--", lw=0.8)
    ax.text(660, 0.3, "n / dt = 640", color="gray")
    ax.set(xlabel="time step t", ylabel="|k[t]| / max |k|", ylim=(1e-8, 2), title="Impulse responses at init, dt = 0.1")
    ax.legend(loc="lower left", fontsize=8)
    save(fig, path)


def hankel_singular_values(plt, path, n=64, draws=20):
    import torch
    from s4d import init_A, s4d_kernel
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
        s = plotted((s / s[:, :1]).median(0).values, 1e-10)
        ax.semilogy(range(1, n + 1), s, label=label, color=COLORS["hope"] if i == 0 else plt.cm.Reds(0.4 + 0.2 * i))
    ax.axhline(0.01, color="gray", ls="--", lw=0.8)
    ax.set(xlabel="j", ylabel="sigma_j / sigma_1 (median of 20 draws)", ylim=(1e-10, 2),
           title="Hankel singular values, n = 64")
    ax.legend(fontsize=8)
    save(fig, path)


def folded_kernel(plt, path, n=64, L=1024, dt=0.01):
    import torch
    from hope import HOPE, hope_kernel, hope_transfer
    torch.manual_seed(0)
    layer = HOPE(128, n, dt_min=dt, dt_max=dt).double()
    h, dts = layer.h.detach(), layer.log_dt.detach().exp()
    exact = hope_kernel(h, dts, L)  # (H, L)
    folded = torch.fft.irfft(hope_transfer(h, dts, 2 * L), n=2 * L)[:, :L]  # sum_m k[t + 2L m]
    err = (folded - exact).norm(dim=1) / exact.norm(dim=1)  # (H,)
    c = err.argsort()[len(err) // 2].item()  # the channel with the median error
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 4.5), sharex=True, height_ratios=(3, 2))
    top.plot(exact[c], color=COLORS["hope"], lw=1, label="exact k[t] (hope_kernel)")
    top.plot(folded[c], color="k", lw=0.8, ls="--", label="folded: irfft of G at the 2L nodes")
    late = exact[c, 20:].abs().max().item()
    top.set_ylim(-1.5 * late, 1.5 * late)
    top.set(ylabel=f"k[t], channel {c}", title=f"HOPE at init, n = {n}, dt = {dt:g} (n / dt = {n / dt:.0f}), L = {L}")
    top.legend(fontsize=8, title_fontsize=7,
               title=f"y axis cut at 1.5 max |k[t >= 20]|: |k[t]| reaches {exact[c].abs().max() / late:.0f} times that")
    bottom.plot(folded[c] - exact[c], color="tab:orange", lw=1)
    bottom.set(xlabel="time step t", ylabel="folded - exact",
               title=f"||folded - exact|| / ||exact||: {100 * err[c]:.1f}% (the median channel), "
                     f"{100 * err.min():.1f}% to {100 * err.max():.1f}% over all {len(err)}")
    bottom.title.set_fontsize(9)
    save(fig, path)


def dt_sweep(plt, path, runs):
    """Test accuracy against fixed dt: every seed (dots), the mean (a dash, and a line through the means); trained dt
    at the right edge (stars and the mean's dash)."""
    groups = grouped(runs)
    fixed = sorted({dt for _, dt in groups if not isinstance(dt, str)})
    x_trained = fixed[-1] * 4  # one slot right of the largest fixed dt
    fig, ax = plt.subplots(figsize=(7, 4))
    for model in ("hope", "s4d"):
        for task, fill in zip(TASKS, (COLORS[model], "none")):
            style = dict(color=COLORS[model], markerfacecolor=fill, ls="-" if fill != "none" else ":")
            xs, means = [], []
            for (t, dt), models in groups.items():
                accs = [100 * r["best"]["test_acc"] for r in models.get(model, [])] if t == task else []
                if not accs:
                    continue
                trained = isinstance(dt, str)
                x = x_trained if trained else dt
                ax.plot([x] * len(accs), accs, marker="*" if trained else "o",
                        ms=10 if trained else 5, ls="none", **{k: v for k, v in style.items() if k != "ls"})
                ax.plot([x], [statistics.mean(accs)], marker="_", ms=14, mew=2, color=COLORS[model])  # the mean
                if not trained:
                    xs.append(dt)
                    means.append(statistics.mean(accs))
            if xs:
                ax.plot(xs, means, lw=1, label=f"{LABELS[model]}, {task}", **style)
    for label in sorted({dt for _, dt in groups if isinstance(dt, str)}):
        ax.plot([], [], "*", color="gray", ms=10, label=f"right: dt {label}")
    ax.axvline(fixed[-1] * 2, color="gray", lw=0.5)
    ax.set_xscale("log")
    ax.set_xticks(fixed + [x_trained], [f"{d:g}" for d in fixed] + ["trained"])
    ax.minorticks_off()
    shapes = {(r["config"]["dataset"], r["config"]["n_layers"], r["config"]["d_model"], r["config"]["epochs"]) for r in runs}
    title = "{}, {} x {}, {} epochs".format(*shapes.pop()) if len(shapes) == 1 else "mixed settings"
    ax.set(xlabel="dt (fixed for both models)", ylabel="test accuracy, % (best val. epoch)", title=title)
    ax.legend(fontsize=7, loc="lower left")
    save(fig, path)


def accuracy(plt, path, runs):
    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        rows, model = run["rows"], run["config"]["model"]
        ax.plot([r["epoch"] for r in rows], [100 * r["val_acc"] for r in rows], marker="o", lw=0.8, alpha=0.7,
                color=COLORS[model], ls=":" if run["config"]["no_noise"] else "-", label=run["name"])
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set(xlabel="epoch", ylabel="validation accuracy, %", title="Every run in results/ (dotted: no noise)")
    ax.legend(fontsize=6, ncol=2, loc="center left", bbox_to_anchor=(1.01, 0.5))
    save(fig, path)


if __name__ == "__main__":
    os.chdir(os.path.dirname(os.path.abspath(__file__)))  # results/ and figures/ are the project's, run from anywhere
    runs = load_runs()
    print(table(runs))
    try:
        import matplotlib
    except ImportError:  # the table above is the result; the PNGs are an extra, so this is no failure (exit status 0)
        print("no figures drawn: the PNGs need matplotlib (pip install matplotlib)", file=sys.stderr)
        sys.exit(0)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs("figures", exist_ok=True)
    impulse_responses(plt, "figures/impulse_responses.png")
    hankel_singular_values(plt, "figures/hankel_singular_values.png")
    folded_kernel(plt, "figures/folded_kernel.png")
    names = ["impulse_responses", "hankel_singular_values", "folded_kernel"]
    if runs:
        dt_sweep(plt, "figures/dt_sweep.png", runs)
        accuracy(plt, "figures/accuracy.png", runs)
        names += ["dt_sweep", "accuracy"]
    print("wrote " + ", ".join(f"figures/{n}.png" for n in names))
