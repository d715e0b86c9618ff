"""Side-by-side timings of HOPE and S4D on the current device (CUDA if present, else CPU).

    python bench.py                  # full sizes: H = 128, L = 2048, 4 x 128 model
    python bench.py --json out.json  # the same, also written as JSON
    python bench.py --compile        # adds torch.compile rows (layers and training step)
    python bench.py --size tiny --reps 1  # every row at toy sizes in seconds: checks the script runs, measures nothing

Each figure: warm-up runs, then the median of several timed runs of forward + backward, taken
round-robin within the kernel, layer and step groups (a slow phase of the machine hits all alike). Peak
memory: torch.cuda.max_memory_allocated on CUDA; on CPU (Linux) the peak resident set of a fresh
child process during one run, above its size before (after a warm-up run; glibc's mmap
threshold pinned so that freed blocks are returned): every byte the run touches. All models come from hope.py, s4d.py and train_scifar.py.

Launches: the number of aten operations one run dispatches (forward + backward), counted on the CPU with
a TorchDispatchMode that tallies every operation except views (which only relabel memory). In eager
PyTorch each of them is one GPU kernel launch (~10-30 us on an H100 once Python and autograd are paid),
so the count is a device-independent figure for launch-bound sizes; compiled rows are not counted.

Kernel rows (H, L = 128, 2048 at --size paper; h and dt both get gradients): hope = the exact causal kernel's
spectrum at the 2L nodes, what the causal layer uses; G2L = the plain transfer function G at the
same nodes (the circular mode's evaluation, the exact kernel's lower bound); literal = Algorithm 1's
steps 1-4 as one (H, L, n) complex tensor, then iFFT (the authors' form); s4d = S4D's kernel.
Layer rows: one layer (d_state 64), forward + backward. recurrent-T rows: T step() calls from the zero state (the
first T outputs one at a time, no gradients; T = 1,000 at --size paper) next to forward-T, one forward pass over the
same T samples. State rows (issue 26; one layer, d_state 64, no gradients, at batch 1 and 8 as their names say with
-B1 and -B8): forward-L-<layer>-B<b> is forward(u) over L samples, forward-L-<layer>-B<b>-state-in-out the same with a
random starting state and return_state=True (the target: at most 2x the launches, 2.5x the time); a prompt of T
samples, recurrent-T-<layer>-B1 (T step() calls) next to forward-T-<layer>-B1-state-out (one forward(u[..., :T],
return_state=True), the state step() would hold after it). Rows without -B<b> run at the layer rows' batch.
Step rows: one training step of the 4 x 128 model (forward, backward, AdamW).
A new kind of row is a branch of case() (its name says what it runs), a name in row_names() and, for a
comparison, a line in ratios().
"""
import argparse
import collections
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import data
import train_scifar
from hope import HOPE, hope_kernel_spectrum, hope_transfer
from s4d import S4D

SIZES = {  # H channels, L steps, T step() calls, the training step's model depth
    "paper": dict(H=128, L=2048, T=1000, n_layers=4),
    "tiny": dict(H=4, L=32, T=10, n_layers=1),  # seconds for every row: for the test that bench.py still runs
}
STATE_BATCHES = (1, 8)  # the state rows' batches (issue 26), at every size: at H = 4, L = 32 batch 8 is tiny too


def literal_kernel(h, dt, L):
    """Algorithm 1, steps 1-4 vectorized as in the authors' code, then iFFT: the (H, L, n) form.

    arg(omega') from the Blaschke form (avoids the 0/0 at omega = -1); the powers omega'^(-i-1) as
    one complex-exponential tensor; the sum over i as an einsum; the circular kernel iFFT(g).
    """
    n = h.shape[1]
    theta = torch.arange(L, device=h.device) * (2 * math.pi / L)  # (L,)
    a = ((1 - dt) / (1 + dt))[:, None]  # (H, 1)
    angle = theta + 2 * torch.atan2(a * torch.sin(theta), 1 - a * torch.cos(theta))  # (H, L)
    powers = torch.exp(-1j * angle[..., None] * torch.arange(1, n + 1, device=h.device))  # (H, L, n)
    return torch.fft.ifft(torch.einsum("hln,hn->hl", powers, h.to(powers.dtype))).real


class LaunchCount(TorchDispatchMode):
    """Counts every aten operation dispatched inside it, views excepted (they launch nothing)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func.overloadpacket.__name__ != "_unsafe_view":
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def launches(fn):
    """Operations of one run of fn (after a warm-up run, so one-time setup is not counted)."""
    fn()
    with LaunchCount() as count:
        fn()
    return sum(count.ops.values())


def case(name, device, batch, size=SIZES["paper"]):
    """A zero-argument function running one forward + backward of the named case."""
    H, L = size["H"], size["L"]
    torch.manual_seed(0)
    if name.startswith("kernel-"):  # kernel-<hope|G2L|literal|s4d>-n<state size>; dt trains (gets a gradient)
        kind, n = name.split("-")[1], int(name.split("-n")[-1])
        layer = (S4D if kind == "s4d" else HOPE)(H, n, dt_min=0.1, dt_max=0.1).to(device)
        if kind == "literal":
            return lambda: literal_kernel(layer.h, layer.log_dt.exp(), L).square().sum().backward()
        if kind == "hope":  # what the causal layer uses: the exact kernel's spectrum at the 2L nodes
            return lambda: torch.view_as_real(hope_kernel_spectrum(layer.h, layer.log_dt.exp(), L)).square().sum().backward()
        if kind == "G2L":  # plain G at the same 2L nodes (the circular mode's evaluation): the exact kernel's floor
            return lambda: torch.view_as_real(hope_transfer(layer.h, layer.log_dt.exp(), 2 * L)).square().sum().backward()
        return lambda: layer.kernel(L).square().sum().backward()
    if name.startswith("layer-"):  # layer-<hope|s4d>[-compile]
        layer = (HOPE if name.startswith("layer-hope") else S4D)(H, 64).to(device)
        u = torch.randn(batch, H, L, device=device, requires_grad=True)
        forward = torch.compile(layer, fullgraph=True) if name.endswith("-compile") else layer
        return lambda: forward(u).square().mean().backward()
    if name.startswith(("recurrent-", "forward-")):  # inference, no gradients:
        # <recurrent|forward>-<T>-<hope|s4d>[-B<batch>][-state-out|-state-in-out], T samples; recurrent: step() calls
        kind, T, model, *rest = name.split("-")
        T, batch = int(T), int(rest.pop(0)[1:]) if rest and rest[0].startswith("B") else batch
        mode = "-".join(rest)  # "": forward(u); state-out: forward(u, return_state=True); state-in-out: and a state
        layer = (HOPE if model == "hope" else S4D)(H, 64).to(device).eval()
        u = torch.randn(batch, H, T, device=device)
        start = torch.randn_like(layer.default_state(batch)) if mode == "state-in-out" else None  # any state will do

        @torch.no_grad()
        def run():
            if kind == "forward":
                return layer(u, start, return_state=True) if mode else layer(u)
            state = layer.default_state(batch)
            for t in range(T):
                _, state = layer.step(u[..., t], state)
        return run
    model_name, variant = name.split("-")[1:]  # step-<model>-<fp32|bf16|compile>
    amp = variant == "bf16"
    _, args, _ = train_scifar.parse_args(["--model", model_name, "--device", str(device), "--d-model", str(H),
                                          "--n-layers", str(size["n_layers"])])
    model = train_scifar.build_model(args, 3, L // 2).to(device)
    forward = torch.compile(model) if variant == "compile" else model
    with open(os.devnull, "w") as quiet:
        stdout, sys.stdout = sys.stdout, quiet
        optimizer = train_scifar.make_optimizer(model, args, device)
        sys.stdout = stdout
    mean, std = (torch.tensor(v, device=device)[:, None] for v in data.NORMALIZATION["cifar10"])
    images = torch.randint(0, 256, (batch, 3, L // 2), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = forward(train_scifar.make_batch(images, mean, std, torch.rand(images.shape, device=device)))
        loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def row_names(size, compile):
    """The rows by group; each group is timed round-robin."""
    T, L, compiled = size["T"], size["L"], ["layer-hope-compile", "layer-s4d-compile", "step-hope-compile",
                                            "step-s4d-compile"] * compile
    return {"kernel": ["kernel-hope-n64", "kernel-hope-n128", "kernel-G2L-n64", "kernel-G2L-n128", "kernel-literal-n64",
                       "kernel-literal-n128", "kernel-s4d-n64"],
            "layer": ["layer-hope", "layer-s4d"] + compiled[:2],
            "recurrent": [f"recurrent-{T}-hope", f"recurrent-{T}-s4d", f"forward-{T}-hope", f"forward-{T}-s4d",
                          f"recurrent-{T}-hope-B1", f"recurrent-{T}-s4d-B1", f"forward-{T}-hope-B1-state-out",
                          f"forward-{T}-s4d-B1-state-out"],
            "state": [f"forward-{L}-{model}-B{b}{mode}" for b in STATE_BATCHES for model in ("hope", "s4d")
                      for mode in ("", "-state-in-out")],
            "step": ["step-hope-fp32", "step-s4d-fp32", "step-hope-bf16", "step-s4d-bf16"] + compiled[2:]}


def ratios(rows, size, compile):
    """{label: rows[a][field] / rows[b][field]}: the comparisons the README quotes."""
    T, L = size["T"], size["L"]
    pairs = [("exact/G2L time, n=64", "kernel-hope-n64", "kernel-G2L-n64", "ms"),
             ("exact/G2L time, n=128", "kernel-hope-n128", "kernel-G2L-n128", "ms"),
             ("exact/G2L memory, n=128", "kernel-hope-n128", "kernel-G2L-n128", "peak_mib"),
             ("literal/fast time, n=64", "kernel-literal-n64", "kernel-hope-n64", "ms"),
             ("literal/fast memory, n=64", "kernel-literal-n64", "kernel-hope-n64", "peak_mib"),
             ("literal/fast time, n=128", "kernel-literal-n128", "kernel-hope-n128", "ms"),
             ("literal/fast memory, n=128", "kernel-literal-n128", "kernel-hope-n128", "peak_mib"),
             ("HOPE/S4D kernel time (n=N=64)", "kernel-hope-n64", "kernel-s4d-n64", "ms"),
             ("HOPE/S4D layer time", "layer-hope", "layer-s4d", "ms"),
             ("HOPE/S4D layer launches", "layer-hope", "layer-s4d", "launches"),
             ("HOPE/S4D kernel launches", "kernel-hope-n64", "kernel-s4d-n64", "launches"),
             ("HOPE/S4D step() launches", f"recurrent-{T}-hope", f"recurrent-{T}-s4d", "launches"),
             (f"{T} step() / forward, HOPE", f"recurrent-{T}-hope", f"forward-{T}-hope", "ms"),
             (f"{T} step() / forward, S4D", f"recurrent-{T}-s4d", f"forward-{T}-s4d", "ms"),
             ("HOPE/S4D step time, fp32", "step-hope-fp32", "step-s4d-fp32", "ms"),
             ("HOPE/S4D step time, bf16", "step-hope-bf16", "step-s4d-bf16", "ms"),
             ("bf16/fp32 step time, HOPE", "step-hope-bf16", "step-hope-fp32", "ms")]
    fields = ("launches", "launches"), ("ms", "time")
    for model, label in ("hope", "HOPE"), ("s4d", "S4D"):  # issue 26: a state in and out, and a prompt before step()
        pairs += [(f"forward(u, state, return_state=True) / forward(u) {what}, {label}, B={b}",
                   f"forward-{L}-{model}-B{b}-state-in-out", f"forward-{L}-{model}-B{b}", field)
                  for field, what in fields for b in STATE_BATCHES]
        pairs += [(f"{T} step() / forward(u[..., :{T}], return_state=True) {what}, {label}, B=1",
                   f"recurrent-{T}-{model}-B1", f"forward-{T}-{model}-B1-state-out", field) for field, what in fields]
    pairs += [("compile/eager layer time, HOPE", "layer-hope-compile", "layer-hope", "ms"),
              ("compile/eager layer time, S4D", "layer-s4d-compile", "layer-s4d", "ms"),
              ("compile/eager step time, HOPE", "step-hope-compile", "step-hope-fp32", "ms"),
              ("compile/eager step time, S4D", "step-s4d-compile", "step-s4d-fp32", "ms"),
              ("HOPE/S4D step time, compile", "step-hope-compile", "step-s4d-compile", "ms")] * compile
    # a tiny run may touch no new page (a peak of 0 MiB): that ratio is None, not a crash
    return {label: rows[a][field] / rows[b][field] if rows[b][field] else None for label, a, b, field in pairs}


def cpu_model():
    """The processor's model name (Linux: /proc/cpuinfo), else what platform reports."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fns, device, warmup, reps):
    """Median ms of each function, timed round-robin (one run of each per round), so that a slow
    phase of a noisy machine hits every case alike and the ratios stay fair."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - t) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_mb(name, device, batch, size_name):
    """Peak memory of one run above what was allocated before it, in MiB."""
    if device.type == "cuda":
        fn = case(name, device, batch, SIZES[size_name])
        fn()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, __file__, "--child", name, "--batch", str(batch), "--size", size_name], env=env,
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def child(name, batch, size):
    """Runs in a fresh process: after a warm-up run, the peak resident set of one run above the size before it."""
    fn = case(name, torch.device("cpu"), batch, size)
    fn()  # one-time allocations (FFT plans, thread pools) are not part of a step's peak

    def status_kib(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak so far (import-time peaks included), to the current size
    base = status_kib("VmRSS")
    fn()
    print((status_kib("VmHWM") - base) / 1024)


def build_parser():
    p = argparse.ArgumentParser(description="HOPE vs S4D timings on the current device")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="batch for the layer and step rows (default: 64 on CUDA, 8 on CPU)")
    p.add_argument("--reps", type=int, default=None, help="timed runs per figure (default: 20 on CUDA, 9 on CPU)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--compile", action="store_true", help="add torch.compile rows for the layers and the training step (slow to compile)")
    p.add_argument("--size", choices=sorted(SIZES), default="paper", help="paper: the figures the README quotes; tiny: "
                   "every row in seconds, to check that the script runs (its figures mean nothing)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    size = SIZES[args.size]
    if args.child:
        return child(args.child, args.batch, size)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch or (64 if cuda else 8)
    reps = args.reps or (20 if cuda else 9)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU: {cpu_model()}, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; float32 weights, FFTs in float32; TF32 matmuls "
          f"{'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'} (PyTorch's default, as train_scifar.py); "
          f"bf16 rows: autocast for the dense parts; median of {reps} runs after warm-up")
    H, L = size["H"], size["L"]
    print(f"size {args.size}: kernel rows: H = {H}, L = {L}; layer and step rows: batch {batch}, L = {L}, d_model {H}"
          f"{'' if batch == 64 else ' (the paper trains at batch 64; smaller here to fit a CPU session)'}; "
          f"recurrent and forward rows: no gradients, d_model {H}, batch {batch} unless the name says -B<batch>\n")
    groups = row_names(size, args.compile)
    print(f"{'case':34s} {'ms':>10s} {'launches':>9s} {'peak MiB':>10s} {'samples/s':>10s} {'s/epoch (45k)':>14s}")
    ms, rows = {}, {}
    for group in groups.values():
        ms.update(time_ms({name: case(name, device, batch, size) for name in group}, device, 2 if not cuda else 5, reps))
    for case_name in ms:
        mb = peak_mb(case_name, device, batch, args.size)
        count = None if case_name.endswith("-compile") else launches(case(case_name, device, batch, size))
        row = {"ms": ms[case_name], "launches": count, "peak_mib": mb}
        extra = ""
        if case_name.startswith("step"):
            row["samples_per_s"] = batch * 1e3 / row["ms"]
            row["epoch_s"] = 45000 / row["samples_per_s"]
            extra = f"{row['samples_per_s']:10.0f} {row['epoch_s']:14.1f}"
        rows[case_name] = row
        print(f"{case_name:34s} {row['ms']:10.2f} {'-' if count is None else count:>9} {mb:10.1f} {extra}", flush=True)
    quotients = ratios(rows, size, args.compile)
    print("\nratios")
    width = max(map(len, quotients))
    for k, v in quotients.items():
        print(f"  {k:{width}s} {'-' if v is None else f'{v:6.2f}':>6s}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "size": args.size, "batch": batch, "reps": reps,
                       "rows": rows, "ratios": quotients}, f, indent=1)


if __name__ == "__main__":
    main()
