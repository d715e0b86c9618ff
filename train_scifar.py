"""Noise-padded sequential CIFAR-10 (HOPE paper, Experiment II): HOPE vs S4D under one protocol.

    python train_scifar.py --model hope                 # the paper's setup, CUDA if present
    python train_scifar.py --model s4d                  # the S4D-Lin baseline
    python train_scifar.py --dataset fashion-mnist      # runs offline (Debian dataset-fashion-mnist)
    python train_scifar.py --preset lra-image           # the authors' LRA Image recipe (bidirectional)

Each image becomes a sequence of pixels (1024 x 3 for CIFAR-10), normalized per channel, followed by as many
steps of uniform [0, 1) noise (fresh at every training use, drawn once for validation and test). The classifier
pools over the noise positions only, so the model must carry the image through the noise. The whole dataset lives
on the device as uint8 and batches are built there. A run writes config.json, metrics.jsonl, last.pt and best.pt
to --out; data.py holds the data's files and formats.
"""
import argparse
import functools
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
from hope import HOPE
from s4d import S4D


# --------------------------------------------------------------------------------------- model
class SequenceClassifier(nn.Module):
    """Linear encoder -> n_layers x (SSM layer, dropout, residual, post-LayerNorm) -> mean-pool -> linear.

    Activations stay (B, H, L); pool_from = the first position averaged (the noise, or 0).
    """

    def __init__(self, make_layer, d_input, d_output, d_model, n_layers, dropout, pool_from):
        super().__init__()
        self.pool_from = pool_from
        self.encoder = nn.Conv1d(d_input, d_model, kernel_size=1)  # a Linear(d_input, d_model) at every position
        self.layers = nn.ModuleList(make_layer() for _ in range(n_layers))
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(n_layers))
        self.dropout = nn.Dropout1d(dropout) if dropout > 0 else nn.Identity()  # whole channels, as the authors'
        self.decoder = nn.Linear(d_model, d_output)

    def forward(self, x):  # (B, C, L)
        x = self.encoder(x)  # (B, H, L)
        for layer, norm in zip(self.layers, self.norms):
            x = norm((x + self.dropout(layer(x))).transpose(-1, -2)).transpose(-1, -2)  # (B, H, L)
        return self.decoder(x[..., self.pool_from:].mean(-1))  # (B, classes)


def build_model(args, d_input, L0):
    """The classifier for sequences of L0 image steps (followed by L0 noise steps unless --no-noise)."""
    shared = dict(d_model=args.d_model, d_state=args.d_state, dt_min=args.dt_min, dt_max=args.dt_max, dropout=args.dropout,
                  lr_dt=args.lr_dt, bidirectional=args.bidirectional)
    if args.model == "hope":
        make_layer = functools.partial(HOPE, **shared, lr_h=args.lr_h, circular=args.circular)
    else:
        make_layer = functools.partial(S4D, **shared, init=args.s4d_init, real_param=args.s4d_real, lr=args.lr_ssm)
    return SequenceClassifier(make_layer, d_input, 10, args.d_model, args.n_layers, args.dropout,
                              pool_from=0 if args.no_noise else L0)


# ------------------------------------------------------------------------------ data and batch
def load_data(args, device):
    """{"train", "val", "test"}: (uint8 images (N, C, L0), labels, noise (N, C, L0)) on the device, and the per-channel
    mean and std. Validation and test noise is drawn once, on the CPU from seed + 1: the same on every device."""
    splits, args.data_files, norm = data.load(args.dataset, args.data_dir, args.val_size, args.grayscale,
                                              search_debian=not args.data_dir_explicit)
    print(f"data: {', '.join(args.data_files)}")
    if args.batch_size > len(splits["train"][0]):
        raise data.DataError(f"--batch-size {args.batch_size} is larger than the {len(splits['train'][0])} training "
                             f"samples left after --val-size {args.val_size}")
    noise_gen = torch.Generator().manual_seed(args.seed + 1)
    for name, (x, y) in splits.items():
        noise = None if args.no_noise or name == "train" else torch.rand(x.shape, generator=noise_gen)  # (N, C, L0)
        splits[name] = (x.to(device), y.to(device), None if noise is None else noise.to(device))
    mean, std = (torch.tensor(v, device=device)[:, None] for v in norm)  # (C, 1)
    return splits, mean, std


def make_batch(x, mean, std, noise=None):
    """uint8 (B, C, L0) -> normalized float (B, C, L0), followed by the noise (B, C, L0) if given."""
    x = (x.float() / 255 - mean) / std
    return x if noise is None else torch.cat([x, noise], -1)  # (B, C, 2 L0)


# ------------------------------------------------------------------------------------ training
def make_optimizer(model, args, device):
    """AdamW: parameters with an _optim hint (the SSM's A, h or dt) get their own group."""
    groups = {}
    for name, p in model.named_parameters():
        hint = getattr(p, "_optim", {})
        group = groups.setdefault(tuple(sorted(hint.items())), {"params": [], "names": [], **hint})
        group["params"].append(p)
        group["names"].append(name.split(".")[-1])
    opt = torch.optim.AdamW(list(groups.values()), lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda")
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]  # the schedule scales it
        print(f"optimizer group: lr {g['lr']:g}, weight_decay {g['weight_decay']:g}, "
              f"{sum(p.numel() for p in g['params']):,} params: {', '.join(sorted(set(g['names'])))}")
    return opt


def lr_factor(step, warmup, total):
    """Linear warm-up to 1 over steps [0, warmup), then a cosine to 0 at step total. A run extended with --resume
    --epochs follows the schedule it would have had, had it been planned for the new length from the start."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def train_epoch(args, step_fn, optimizer, splits, mean, std, perm_gen, state, autocast, should_stop):
    """Steps until the epoch ends or should_stop(); returns True if the epoch is complete."""
    x_train, y_train, _ = splits["train"]
    steps_per_epoch = len(x_train) // args.batch_size  # full batches only
    warmup, total = args.warmup_epochs * steps_per_epoch, args.epochs * steps_per_epoch
    if state["perm"] is None:
        state["perm"] = torch.randperm(len(x_train), generator=perm_gen)
    perm = state["perm"].to(x_train.device)
    sums = torch.tensor(state["sums"], dtype=torch.float64, device=x_train.device)  # loss sum, correct
    t0, step0, seconds0, last_print = time.time(), state["step"], state["seconds"], 0.0
    while state["step"] < steps_per_epoch and not should_stop():
        idx = perm[state["step"] * args.batch_size:(state["step"] + 1) * args.batch_size]
        x, y = x_train[idx], y_train[idx]
        noise = None if args.no_noise else torch.rand(x.shape, device=x.device)  # (B, C, L0), fresh every use
        with autocast:
            logits = step_fn(make_batch(x, mean, std, noise))
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(state["global_step"], warmup, total)
        optimizer.step()
        sums += torch.stack([loss.detach() * len(y), (logits.argmax(-1) == y).sum()]).double()
        state["step"] += 1
        state["global_step"] += 1
        if time.time() - last_print > 1.0 or state["step"] == steps_per_epoch or should_stop():  # the only host syncs
            last_print = time.time()
            state["sums"], state["seconds"] = sums.tolist(), seconds0 + time.time() - t0
            if not math.isfinite(state["sums"][0]):
                raise SystemExit(f"\nerror: non-finite loss at epoch {state['epoch'] + 1}, step {state['step']}; stopping. "
                                 f"{os.path.join(args.out, 'last.pt')} holds the last good state; try a lower --lr")
            seen, rate = state["step"] * args.batch_size, (state["step"] - step0) / (time.time() - t0)  # steps/s
            run_left = (total - state["global_step"]) / rate + (args.epochs - state["epoch"]) * state["eval_seconds"]
            print(f"\repoch {state['epoch'] + 1}/{args.epochs} step {state['step']}/{steps_per_epoch} loss "
                  f"{state['sums'][0] / seen:.4f} acc {state['sums'][1] / seen:.4f} {rate * args.batch_size:.0f} samples/s, "
                  f"ETA epoch {(steps_per_epoch - state['step']) / rate / 60:.1f} min, run {run_left / 3600:.1f} h"
                  f"{'' if state['eval_seconds'] else ' + evaluations'}   ", end="", flush=True)
    print()
    return state["step"] == steps_per_epoch


# ---------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, x_all, y_all, noise_all, mean, std, args, autocast, interrupted=lambda: False):
    """(loss, accuracy), or None once interrupted() is true (it is asked before every batch); the noise was drawn
    once per split, so every evaluation sees the same numbers."""
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(x_all), args.eval_batch_size):
        if interrupted():
            break
        x, y = x_all[i:i + args.eval_batch_size], y_all[i:i + args.eval_batch_size]
        noise = None if noise_all is None else noise_all[i:i + args.eval_batch_size]
        with autocast:
            logits = model(make_batch(x, mean, std, noise))
        loss += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
    model.train()
    return None if interrupted() else (loss / len(x_all), correct / len(x_all))


# ------------------------------------------------------------------------------ run management
PRESETS = {"lra-image": {  # the authors' run_cifar.sh / run_cifar.py for LRA Image (README: Presets)
    "all": dict(dataset="cifar10", grayscale=True, no_noise=True, n_layers=6, d_model=128, dropout=0.1, batch_size=32,
                lr=0.004, weight_decay=0.01, lr_dt=0.001, dt_min=0.001, warmup_epochs=10, epochs=200, bidirectional=True),
    "hope": dict(d_state=128, lr_h=0.001, dt_max=10.0),
    "s4d": dict(d_state=64, lr_ssm=0.001, dt_max=0.1),  # not in the authors' script: this project's choice
}}
MODEL_FLAGS = {"hope": {"lr_h", "circular"}, "s4d": {"lr_ssm", "s4d_init", "s4d_real"}}  # each does nothing for the other
CHANGEABLE_ON_RESUME = {"epochs", "device", "amp", "compile", "data_dir", "max_steps", "resume", "out"}


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the whole usage
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # a default of None is explained in the help text itself
        return action.help if action.default is None else super()._get_help_string(action)


def _typed(kind, low, high=math.inf, low_ok=False):
    def parse(text):
        value = kind(text)
        if not ((low <= value) if low_ok else (low < value)) or not value < high:
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {'>=' if low_ok else '>'} {low}"
                                             + (f" and < {high}" if high < math.inf else ""))
        return value
    parse.__name__ = kind.__name__
    return parse


positive_int, positive, non_negative = _typed(int, 0), _typed(float, 0.0), _typed(float, 0.0, low_ok=True)


def build_parser():
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--model", choices=["hope", "s4d"], default="hope", help="the SSM layer")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a published recipe (README: Presets); explicit flags win")
    p.add_argument("--dataset", choices=["cifar10", "fashion-mnist"], default="cifar10", help="the images")
    p.add_argument("--no-noise", action="store_true", help="plain sequential task, no noise padding (pool over all positions)")
    p.add_argument("--grayscale", action="store_true", help="CIFAR-10 as 1024 x 1 (the LRA Image task)")
    p.add_argument("--epochs", type=positive_int, default=100, help="the cosine's length; on --resume, a larger value "
                   "extends the run (the schedule then is that of a run planned for the new length)")
    p.add_argument("--warmup-epochs", type=_typed(int, 0, low_ok=True), default=0, help="linear warm-up of the lr, per step")
    p.add_argument("--batch-size", type=positive_int, default=64, help="training batch")
    p.add_argument("--eval-batch-size", type=positive_int, default=256, help="evaluation batch (does not change the numbers)")
    p.add_argument("--lr", type=positive, default=0.01, help="AdamW learning rate of every parameter without its own")
    p.add_argument("--weight-decay", type=non_negative, default=0.01, help="AdamW weight decay, h included; A and dt take none")
    p.add_argument("--d-model", type=positive_int, default=128, help="H, channels")
    p.add_argument("--n-layers", type=positive_int, default=4, help="residual SSM blocks")
    p.add_argument("--d-state", type=positive_int, default=64, help="HOPE: n (n-by-n Hankel matrix); S4D: N")
    p.add_argument("--dropout", type=_typed(float, 0.0, 1.0, low_ok=True), default=0.1, help="dropout rate")
    p.add_argument("--dt-min", type=positive, default=0.1, help="dt is log-uniform in [dt-min, dt-max] per channel")
    p.add_argument("--dt-max", type=positive, default=0.1, help="see --dt-min (the paper fixes dt = 0.1)")
    p.add_argument("--lr-dt", type=non_negative, default=0.0, help="learning rate of dt; 0 keeps dt fixed")
    p.add_argument("--lr-h", type=positive, help="HOPE: lr of h (default: --lr, as in the paper; the authors' code: 0.001)")
    p.add_argument("--lr-ssm", type=non_negative, default=0.001, help="S4D: learning rate of A (0 keeps A fixed)")
    p.add_argument("--circular", action="store_true", help="HOPE: the paper's circular convolution instead of causal")
    p.add_argument("--bidirectional", action="store_true", help="an anti-causal kernel too (meant for --no-noise)")
    p.add_argument("--s4d-init", choices=["lin", "inv", "legs"], default="lin", help="S4D: initialization of A")
    p.add_argument("--s4d-real", choices=["exp", "softplus", "direct", "stable"], default="exp", help="S4D: Re(A) = f(w)")
    p.add_argument("--val-size", type=positive_int, default=5000, help="validation samples taken from the training set")
    p.add_argument("--seed", type=int, default=0, help="model init, batch order, training noise; evaluation noise uses seed + 1")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--amp", choices=["auto", "bf16", "off"], default="auto", help="bf16 autocast of the dense parts "
                   "(auto: where CUDA has bf16); FFTs and kernels stay float32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (complex FFT parts stay eager; needs a "
                   "C++ compiler on the CPU, where it measured 1.19x the eager training step: README section 6)")
    p.add_argument("--data-dir", default="./data", help="dataset folder (Fashion-MNIST: Debian's folder too, unless given)")
    p.add_argument("--out", help="run folder (default: runs/<model>-<dataset>-s<seed>)")
    p.add_argument("--max-steps", type=positive_int, help="stop (and save) once the run has made this many optimizer steps")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    return p


def parse_args(argv=None):
    """(parser, options, names of the flags given): defaults, then the --preset's values, then the flags given."""
    parser, unset = build_parser(), object()
    dests = [a.dest for a in parser._actions if a.default is not argparse.SUPPRESS]
    given = vars(parser.parse_args(argv, argparse.Namespace(**{d: unset for d in dests})))  # defaults stay unset
    given = {k: v for k, v in given.items() if v is not unset}
    preset = PRESETS.get(given.get("preset"), {})
    model = given.get("model", parser.get_default("model"))
    defaults = {d: parser.get_default(d) for d in dests}
    args = argparse.Namespace(**{**defaults, **preset.get("all", {}), **preset.get(model, {}), **given})
    if args.dataset != "cifar10" and "grayscale" not in given:
        args.grayscale = False  # a preset's grayscale is for CIFAR-10; the other datasets are grayscale already
    if args.out is None:
        tags = [args.model, args.dataset] + ["nonoise"] * args.no_noise + ["gray"] * args.grayscale + ["bi"] * args.bidirectional
        args.out = os.path.join("runs", "-".join(tags) + f"-s{args.seed}")
    return parser, args, set(given)


def code_version():
    """The git commit of this file's checkout, '+dirty' if a file a run executes has changed, else 'unknown'."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "hope.py", "s4d.py", "data.py", "train_scifar.py"],
                               cwd=here, capture_output=True).returncode
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit.stdout.strip() + ("+dirty" if dirty else "")


def resume_command(parser, args):
    """The whole command that continues the run in --out: --resume reads the run's settings there, except --device, --amp
    and --compile, which come from its own flags (so this session's are repeated where they are not the defaults)."""
    own = [s for k in ("device", "amp") if getattr(args, k) != parser.get_default(k) for s in (f"--{k}", getattr(args, k))]
    return shlex.join(["python", os.path.relpath(__file__), "--resume", "--out", args.out, *own] + ["--compile"] * args.compile)


def resolve(parser, args, given):
    """Checks every flag; on --resume, the run folder's config with the flags that may change. -> (config, ckpt)."""
    other_models = set().union(*MODEL_FLAGS.values()) - MODEL_FLAGS[args.model]
    unused = ", ".join("--" + k.replace("_", "-") for k in sorted(given & other_models))
    for wrong, message in [
            (args.dt_min > args.dt_max, f"--dt-min {args.dt_min} is larger than --dt-max {args.dt_max}"),
            (args.warmup_epochs >= args.epochs, f"--warmup-epochs {args.warmup_epochs} must be below --epochs {args.epochs}"),
            (args.circular and args.bidirectional, "--circular and --bidirectional exclude each other"),
            (args.grayscale and args.dataset != "cifar10", f"--grayscale is for CIFAR-10's colors; {args.dataset} is grayscale already"),
            (unused, f"{unused}: nothing for --model {args.model}; drop them")]:
        if wrong:
            parser.error(message)
    try:
        torch.empty(0, device=args.device)  # a bad name, or a device type, index or backend this build or machine lacks
    except (RuntimeError, AssertionError):
        parser.error(f"--device {args.device} is not available with this PyTorch build (torch {torch.__version__}) "
                     f"on this machine; use --device cpu{' or --device cuda' if torch.cuda.is_available() else ''}")
    parent = args.out  # the nearest folder that exists: --out is made in it (later, once the data is read)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not args.out or not os.path.isdir(parent or ".") or not os.access(parent or ".", os.W_OK | os.X_OK):
        why = "is empty" if not args.out else "is a file" if os.path.isfile(args.out) else f"cannot be made in {parent}"
        parser.error(f"--out {args.out!r} {why}: name a folder the run can write")
    last = os.path.join(args.out, "last.pt")
    if not args.resume:
        if os.path.exists(last) or os.path.exists(os.path.join(args.out, "best.pt")):
            metrics, resume = os.path.join(args.out, "metrics.jsonl"), resume_command(parser, args)
            if os.path.exists(metrics) and len(open(metrics).readlines()) >= args.epochs:  # a line per finished epoch
                parser.error(f"{args.out} holds a finished run: choose another --out, or train it on with {resume} "
                             f"--epochs N (N > {args.epochs})")
            parser.error(f"{args.out} holds an earlier run: continue it with {resume}, or choose another --out")
        return dict(vars(args), data_dir_explicit="data_dir" in given), None
    if not os.path.exists(last):
        parser.error(f"--resume: no checkpoint at {last}")
    try:
        ckpt = torch.load(last, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many kinds for a damaged file
        parser.error(f"--resume: {last} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'empty'}); "
                     "it is truncated or corrupt. " + ("best.pt holds the best epoch: copy it to last.pt to go on from there"
                     if os.path.exists(os.path.join(args.out, "best.pt")) else "Start the run again in another --out"))
    saved, state = ckpt["config"], ckpt["state"]
    conflicts = ", ".join(f"--{k.replace('_', '-')} {getattr(args, k)} (the run has {saved.get(k)})"
                          for k in sorted(given - CHANGEABLE_ON_RESUME) if getattr(args, k) != saved.get(k))
    epochs = args.epochs if "epochs" in given else saved["epochs"]
    for wrong, message in [
            (conflicts, f"--resume continues the run in --out with its settings; these flags contradict it: {conflicts}"),
            (epochs < saved["epochs"], f"--epochs {epochs}: the run was planned for {saved['epochs']}; --resume only extends"),
            (state["epoch"] >= epochs, f"--resume: the run in {args.out} has finished its {epochs} epochs; "
                                       "to train on, give a larger --epochs"),
            ((args.max_steps or math.inf) <= state["global_step"],
             f"--max-steps {args.max_steps}: the run is at step {state['global_step']} already (it counts the run's steps)")]:
        if wrong:
            parser.error(message)
    changed = {k: getattr(args, k) for k in CHANGEABLE_ON_RESUME if k in given or k not in ("epochs", "data_dir")}
    return dict(saved, **changed, data_dir_explicit=saved["data_dir_explicit"] or "data_dir" in given), ckpt


def setup(args, ckpt, device, n_train, C, L0):
    """Model, optimizer, batch-order generator and training state: fresh, or exactly as saved."""
    torch.manual_seed(args.seed)
    model = build_model(args, C, L0).to(device)
    print(f"model: {args.model}, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"sequence length {L0 if args.no_noise else 2 * L0} x {C}, {n_train:,} training samples")
    optimizer = make_optimizer(model, args, device)
    perm_gen = torch.Generator().manual_seed(args.seed)
    state = {"epoch": 0, "step": 0, "global_step": 0, "perm": None, "sums": [0.0, 0], "seconds": 0.0,
             "eval_seconds": 0.0, "history": [], "best": None}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        perm_gen.set_state(ckpt["perm_gen"])
        torch.set_rng_state(ckpt["rng_cpu"])
        if device.type == "cuda" and ckpt["rng_cuda"] is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
        state = dict(state, **ckpt["state"])  # a key added since the run began keeps its fresh value
        if ckpt["config"].get("code") != args.code:
            print(f"warning: this run was made by code {ckpt['config'].get('code')}; resuming with {args.code}")
        print(f"resumed from {os.path.join(args.out, 'last.pt')} at epoch {state['epoch'] + 1}/{args.epochs}, "
              f"step {state['step']}/{n_train // args.batch_size}")
    return model, optimizer, perm_gen, state


def save_checkpoint(args, model, optimizer, perm_gen, state, device, best=False):
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "perm_gen": perm_gen.get_state(),
            "rng_cpu": torch.get_rng_state(), "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "state": state, "config": vars(args)}
    for name in ("last.pt", "best.pt") if best else ("last.pt",):
        data.atomic_write(os.path.join(args.out, name), lambda f: torch.save(ckpt, f))


def record(args, argv):
    """config.json: the run's settings, written by its first session; a resumed session appends its own record
    (flags, code version, device, data files) to the list under "resumes" and changes nothing else."""
    path, config = os.path.join(args.out, "config.json"), dict(vars(args))
    if args.resume:
        if os.path.exists(path):
            with open(path) as f:
                config = json.load(f)
        resume = {k: getattr(args, k) for k in ("code", "torch", "device", "device_name", "epochs", "max_steps", "data_files")}
        config.setdefault("resumes", []).append(dict(resume, argv=argv, time=time.strftime("%Y-%m-%d %H:%M:%S")))
    text = json.dumps(config, indent=1)
    os.makedirs(args.out, exist_ok=True)
    data.atomic_write(path, lambda f: f.write(text.encode()))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, args, given = parse_args(argv)
    config, ckpt = resolve(parser, args, given)
    args = argparse.Namespace(**dict(config, code=code_version(), torch=str(torch.__version__)))
    device = torch.device(args.device)
    args.device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    try:
        splits, mean, std = load_data(args, device)
    except data.DataError as e:
        parser.error(str(e))
    print(json.dumps(vars(args), indent=1))
    try:
        record(args, argv)
    except OSError as e:
        parser.error(f"--out {args.out}: the run folder cannot be written ({e.strerror}); choose another --out")
    use_bf16 = args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
    x_train = splits["train"][0]
    model, optimizer, perm_gen, state = setup(args, ckpt, device, len(x_train), *x_train.shape[1:])
    step_fn = torch.compile(model) if args.compile else model
    stop = {"signal": None}

    def on_signal(signum, frame):  # SIGINT (Ctrl-C) or SIGTERM (what schedulers and `timeout` send first)
        stop["signal"] = signal.Signals(signum).name
        print(f"\n{stop['signal']}: stopping after this training step or evaluation batch, then saving last.pt "
              "(a second signal aborts without saving)")
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def should_stop():
        return stop["signal"] is not None or state["global_step"] >= (args.max_steps or math.inf)

    previous_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while state["epoch"] < args.epochs:
            trained = train_epoch(args, step_fn, optimizer, splits, mean, std, perm_gen, state, autocast, should_stop)
            t0, signaled = time.time(), lambda: stop["signal"] is not None
            val = trained and evaluate(model, *splits["val"], mean, std, args, autocast, signaled)
            test = val and evaluate(model, *splits["test"], mean, std, args, autocast, signaled)
            if not test:  # stopped; after a complete epoch, train_epoch returned at once (one stop path)
                save_checkpoint(args, model, optimizer, perm_gen, state, device)
                print(f"stopped at step {state['global_step']}{' (the epoch is evaluated on --resume)' if trained else ''}; "
                      f"saved {args.out}/last.pt; continue with: {resume_command(parser, args)}")
                return state
            state["eval_seconds"] = time.time() - t0
            (loss_sum, correct), count = state["sums"], state["step"] * args.batch_size  # full batches only
            row = {"epoch": state["epoch"] + 1, "train_loss": loss_sum / count, "train_acc": correct / count,
                   "val_loss": val[0], "val_acc": val[1], "test_loss": test[0], "test_acc": test[1],
                   "lr": optimizer.param_groups[0]["lr"], "seconds": state["seconds"] + state["eval_seconds"]}
            state["history"].append(row)
            is_best = state["best"] is None or row["val_acc"] > state["best"]["val_acc"]
            state["best"] = row if is_best else state["best"]
            state.update(epoch=state["epoch"] + 1, step=0, perm=None, sums=[0.0, 0], seconds=0.0)
            save_checkpoint(args, model, optimizer, perm_gen, state, device, best=is_best)
            metrics = "".join(json.dumps(r) + "\n" for r in state["history"])
            data.atomic_write(os.path.join(args.out, "metrics.jsonl"), lambda f: f.write(metrics.encode()))
            print(f"epoch {row['epoch']}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | "
                  f"val loss {val[0]:.4f} acc {val[1]:.4f} | test loss {test[0]:.4f} acc {test[1]:.4f} | "
                  f"lr {row['lr']:.2e} | {row['seconds']:.1f}s")
    finally:
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
    best = state["best"]
    print(f"finished {args.epochs} epochs; best val acc {best['val_acc']:.4f} at epoch {best['epoch']}, "
          f"test acc there {best['test_acc']:.4f}")
    return state


if __name__ == "__main__":
    main()
