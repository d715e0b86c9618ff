"""Noise-padded sequential CIFAR-10 (HOPE paper, Experiment II): HOPE vs S4D under one protocol.

    python train_scifar.py --model hope                 # the paper's setup, CUDA if present
    python train_scifar.py --model s4d                  # the S4D-Lin baseline
    python train_scifar.py --dataset fashion-mnist      # runs offline (Debian dataset-fashion-mnist)

Each image becomes a sequence of pixels (1024 x 3 for CIFAR-10), normalized per channel, followed
by as many steps of uniform [0, 1) noise (a fresh draw whenever a sample is used). The classifier
mean-pools over the noise positions only, so the model must carry the image through the noise.
The whole dataset lives on the device as uint8; batches are built there, with no DataLoader.
Everything a run writes goes to --out: config.json, metrics.jsonl, last.pt, best.pt.
"""
import argparse
import codecs
import gzip
import hashlib
import json
import math
import os
import pickle
import signal
import struct
import tarfile
import time
import urllib.error
import urllib.request
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from hope import HOPE
from s4d import S4D

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FMNIST_FILES = {  # name: MD5 of the official download (Debian's recompressed copies differ)
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FMNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
NORMALIZATION = {  # (mean, std) per channel, on the [0, 1] scale
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar10-gray": ((122.6 / 255,), (61.0 / 255,)),  # the LRA Image task's values
    "fashion-mnist": ((0.2860,), (0.3530,)),
}


class DataError(RuntimeError):
    """A data file is missing, corrupt or unreachable; the message says what to do."""


# ---------------------------------------------------------------------------------------- data
def md5sum(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url, path, md5):
    """Fetch url to path via path + '.part', renamed only after the MD5 matches."""
    part = path + ".part"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(part, "wb") as f:
            total, done = int(r.headers.get("Content-Length") or 0), 0
            for chunk in iter(lambda: r.read(1 << 20), b""):
                f.write(chunk)
                done += len(chunk)
                print(f"\rdownloading {os.path.basename(path)}: {done / 2**20:.1f}"
                      f"{f' / {total / 2**20:.1f}' if total else ''} MB", end="", flush=True)
        print()
    except (urllib.error.URLError, OSError) as e:
        if os.path.exists(part):
            os.remove(part)
        raise DataError(f"could not download {url} ({e}). Without network access, download it "
                        f"elsewhere and put {os.path.basename(path)} in {os.path.dirname(path) or '.'}/") from None
    if md5sum(part) != md5:
        os.remove(part)
        raise DataError(f"download of {url} has the wrong MD5 (expected {md5}); it was deleted, run again")
    os.replace(part, path)


class _NumpyArray:
    """Stands in for a pickled numpy array: keeps its shape, dtype and raw bytes, so numpy is not needed."""

    def __init__(self, *reconstruct_args):
        self.shape, self.dtype, self.raw = None, None, None

    def __setstate__(self, state):  # numpy's array state: (version, shape, dtype, is_fortran, raw bytes)
        self.shape, self.dtype, self.raw = state[1], state[2].code, state[4]


class _NumpyDtype:
    def __init__(self, code, *flags):
        self.code = code

    def __setstate__(self, state):
        pass


class _CifarUnpickler(pickle.Unpickler):
    """Reads CIFAR-10 batches without numpy, and refuses every object a batch does not contain."""

    def find_class(self, module, name):
        allowed = {("numpy.core.multiarray", "_reconstruct"): _NumpyArray, ("numpy._core.multiarray", "_reconstruct"): _NumpyArray,
                   ("numpy", "ndarray"): _NumpyArray, ("numpy", "dtype"): _NumpyDtype, ("_codecs", "encode"): codecs.encode}
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR-10 batch")
        return allowed[module, name]


def _uint8_images(array):
    if not isinstance(array, _NumpyArray) or array.dtype != "u1" or len(array.raw) != math.prod(array.shape):
        raise TypeError("b'data' is not a uint8 array")
    return torch.frombuffer(bytearray(array.raw), dtype=torch.uint8).view(-1, 3, 1024)


def load_cifar10(data_dir, md5=CIFAR_MD5):
    """CIFAR-10 from the official python tarball (downloaded if absent): uint8 (N, 3, 1024) and labels."""
    path = os.path.join(data_dir, os.path.basename(CIFAR_URL))
    if not os.path.exists(path):
        download(CIFAR_URL, path, md5)
    if md5sum(path) != md5:
        raise DataError(f"{path} has the wrong MD5 (expected {md5}): it is corrupt or incomplete. "
                        "Delete it and run again to download it afresh.")
    splits = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for split, names in (("train", [f"data_batch_{i}" for i in range(1, 6)]), ("test", ["test_batch"])):
                xs, ys = [], []
                for name in names:
                    batch = _CifarUnpickler(tar.extractfile(f"cifar-10-batches-py/{name}"), encoding="bytes").load()
                    xs.append(_uint8_images(batch[b"data"]))
                    ys.append(torch.tensor(batch[b"labels"], dtype=torch.long))
                splits[split] = (torch.cat(xs), torch.cat(ys))
    except (tarfile.TarError, EOFError, zlib.error, pickle.UnpicklingError, KeyError, TypeError, RuntimeError) as e:
        raise DataError(f"{path} could not be read as the CIFAR-10 python tarball ({type(e).__name__}: {e}). "
                        "Delete it and run again to download it afresh.") from None
    return splits["train"] + splits["test"]


def read_idx(path, ndim):
    """An IDX file (gzip) of unsigned bytes with `ndim` dimensions, checked against its header."""
    try:
        with gzip.open(path) as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} is not a readable .gz file ({e}); replace it with a good copy") from None
    magic = 0x800 + ndim  # 0x08: unsigned byte data
    header = 4 + 4 * ndim
    if len(raw) < header or struct.unpack(">I", raw[:4])[0] != magic:
        raise DataError(f"{path} is not an IDX file of {ndim} dimension(s) (expected magic number {magic:#06x}); "
                        "replace it with a good copy")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != math.prod(dims):
        raise DataError(f"{path}: header says {dims} = {math.prod(dims)} bytes, file has {len(raw) - header}; "
                        "it is truncated or corrupt, replace it with a good copy")
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).view(dims)


def load_fashion_mnist(data_dir):
    """Fashion-MNIST from data_dir, else Debian's package folder, else downloaded to data_dir."""
    paths = {}
    for name, md5 in FMNIST_FILES.items():
        local, debian = os.path.join(data_dir, name), os.path.join(FMNIST_DEBIAN_DIR, name)
        if not os.path.exists(local) and not os.path.exists(debian):
            download(FMNIST_URL + name, local, md5)
        paths[name] = local if os.path.exists(local) else debian
    out = []
    for prefix in ("train", "t10k"):
        x = read_idx(paths[f"{prefix}-images-idx3-ubyte.gz"], 3)
        y = read_idx(paths[f"{prefix}-labels-idx1-ubyte.gz"], 1)
        if x.shape[0] != y.shape[0] or x.shape[1:] != (28, 28):
            raise DataError(f"Fashion-MNIST {prefix}: {x.shape[0]} images of {tuple(x.shape[1:])} "
                            f"but {y.shape[0]} labels; expected 28x28 images, one label each")
        out += [x.reshape(-1, 1, 784), y.long()]
    return out


def load_data(args, device):
    """Train/val/test uint8 sequences (N, C, L) and labels, on the device, with the normalization."""
    if args.dataset == "cifar10":
        x_train, y_train, x_test, y_test = load_cifar10(args.data_dir)
        if args.grayscale:  # ITU-R 601 luma, as PIL's convert("L")
            luma = torch.tensor([0.299, 0.587, 0.114])[:, None]
            x_train, x_test = [(x.float() * luma).sum(1, keepdim=True).round().to(torch.uint8) for x in (x_train, x_test)]
        norm = NORMALIZATION["cifar10-gray" if args.grayscale else "cifar10"]
    else:
        x_train, y_train, x_test, y_test = load_fashion_mnist(args.data_dir)
        norm = NORMALIZATION["fashion-mnist"]
    if not 0 < args.val_size < len(x_train):
        raise ValueError(f"--val-size must be in (0, {len(x_train)}), got {args.val_size}")
    perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(42))  # the fixed split
    val, train = perm[:args.val_size], perm[args.val_size:]
    data = {"train": (x_train[train], y_train[train]), "val": (x_train[val], y_train[val]), "test": (x_test, y_test)}
    data = {k: (x.to(device), y.to(device)) for k, (x, y) in data.items()}
    mean, std = (torch.tensor(v, device=device)[:, None] for v in norm)  # (C, 1)
    return data, mean, std


def make_batch(x, mean, std, noise, generator=None):
    """uint8 (B, C, L0) -> normalized float (B, C, L0), then L0 steps of U[0, 1) noise if noise."""
    x = (x.float() / 255 - mean) / std
    if not noise:
        return x
    return torch.cat([x, torch.rand(x.shape, device=x.device, generator=generator)], -1)  # (B, C, 2 L0)


# --------------------------------------------------------------------------------------- model
class SequenceClassifier(nn.Module):
    """Linear encoder -> n_layers x (SSM layer, dropout, residual, post-LayerNorm) -> mean-pool -> linear.

    Activations stay (B, H, L); pool_from = the first position averaged (the noise, or 0).
    """

    def __init__(self, make_layer, d_input, d_output, d_model, n_layers, dropout, pool_from):
        super().__init__()
        self.pool_from = pool_from
        self.encoder = nn.Conv1d(d_input, d_model, kernel_size=1)
        self.layers = nn.ModuleList(make_layer() for _ in range(n_layers))
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(n_layers))
        self.dropout = nn.Dropout1d(dropout) if dropout > 0 else nn.Identity()
        self.decoder = nn.Linear(d_model, d_output)

    def forward(self, x):  # (B, C, L)
        x = self.encoder(x)  # (B, H, L)
        for layer, norm in zip(self.layers, self.norms):
            x = norm((x + self.dropout(layer(x))).transpose(-1, -2)).transpose(-1, -2)  # (B, H, L)
        return self.decoder(x[..., self.pool_from:].mean(-1))  # (B, classes)


def build_model(args, d_input, seq_len):
    if args.model == "hope":
        def make_layer():
            return HOPE(args.d_model, args.d_state, args.dt_min, args.dt_max, args.dropout, lr_dt=args.lr_dt,
                        lr_h=args.lr_h, circular=args.circular)
    else:
        def make_layer():
            return S4D(args.d_model, args.d_state, args.dt_min, args.dt_max, args.dropout, init=args.s4d_init,
                       real_param=args.s4d_real, lr=args.lr_ssm, lr_dt=args.lr_dt)
    return SequenceClassifier(make_layer, d_input, 10, args.d_model, args.n_layers, args.dropout,
                              pool_from=seq_len if not args.no_noise else 0)


def make_optimizer(model, args, device):
    """AdamW: parameters with an _optim hint (the SSM's A, h or dt) get their own group."""
    groups = {}
    for name, p in model.named_parameters():
        hint = getattr(p, "_optim", {})
        key = tuple(sorted(hint.items()))
        groups.setdefault(key, {"params": [], "names": [], **hint})
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    opt = torch.optim.AdamW(list(groups.values()), lr=args.lr, weight_decay=args.weight_decay,
                            fused=device.type == "cuda")
    for g in opt.param_groups:
        print(f"optimizer group: lr {g['lr']:g}, weight_decay {g['weight_decay']:g}, "
              f"{sum(p.numel() for p in g['params']):,} params: {', '.join(sorted(set(n.split('.')[-1] for n in g['names'])))}")
    return opt


# ------------------------------------------------------------------------------------ training
def atomic_write(path, write):
    """write(f) to a temporary file, fsync, then rename: no crash leaves a half-written file."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@torch.no_grad()
def evaluate(model, x_all, y_all, batch, args, autocast):
    """Loss and accuracy; the noise comes from a fixed seed, so every evaluation sees the same noise."""
    model.eval()
    gen = torch.Generator(device=x_all.device).manual_seed(args.seed + 1)
    loss, correct = 0.0, 0
    for i in range(0, len(x_all), args.eval_batch_size):
        x, y = batch(x_all[i:i + args.eval_batch_size], gen), y_all[i:i + args.eval_batch_size]
        with autocast:
            logits = model(x)
        loss += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
    model.train()
    return loss / len(x_all), correct / len(x_all)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=["hope", "s4d"], default="hope")
    p.add_argument("--dataset", choices=["cifar10", "fashion-mnist"], default="cifar10")
    p.add_argument("--no-noise", action="store_true", help="plain sequential task, no noise padding")
    p.add_argument("--grayscale", action="store_true", help="CIFAR-10 as 1024 x 1 (the LRA Image task)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--eval-batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--d-state", type=int, default=64, help="HOPE: n (n-by-n Hankel matrix); S4D: N")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--dt-min", type=float, default=0.1)
    p.add_argument("--dt-max", type=float, default=0.1)
    p.add_argument("--lr-dt", type=float, default=0.0, help="learning rate of dt; 0 keeps dt fixed")
    p.add_argument("--lr-h", type=float, default=None, help="HOPE: learning rate of h (default: --lr, as in the paper; the authors' code uses 0.001)")
    p.add_argument("--lr-ssm", type=float, default=0.001, help="S4D: learning rate of A")
    p.add_argument("--circular", action="store_true", help="HOPE: the paper's circular convolution instead of causal")
    p.add_argument("--s4d-init", choices=["lin", "inv", "legs"], default="lin")
    p.add_argument("--s4d-real", choices=["exp", "softplus", "direct", "stable"], default="exp")
    p.add_argument("--val-size", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=["auto", "bf16", "off"], default="auto", help="bf16 autocast for the dense parts (auto: on for CUDA); FFTs stay float32")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (complex FFT parts stay eager)")
    p.add_argument("--data-dir", default="./data")
    p.add_argument("--out", default=None, help="run folder (default runs/<model>-<dataset>-s<seed>)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps in total (smoke runs)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    args = p.parse_args(argv)
    if args.out is None:
        tags = [args.model, args.dataset] + ["nonoise"] * args.no_noise + ["gray"] * args.grayscale
        args.out = os.path.join("runs", "-".join(tags) + f"-s{args.seed}")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    last_path = os.path.join(args.out, "last.pt")
    ckpt = None
    if args.resume:
        if not os.path.exists(last_path):
            raise SystemExit(f"--resume: no checkpoint at {last_path}")
        ckpt = torch.load(last_path, map_location="cpu", weights_only=False)
        resumed = {k: v for k, v in ckpt["config"].items() if k not in ("resume", "max_steps", "device")}
        vars(args).update(resumed)  # the run continues with its own configuration
    print(json.dumps(vars(args), indent=1))
    atomic_write(os.path.join(args.out, "config.json"), lambda f: f.write(json.dumps(vars(args), indent=1).encode()))
    torch.manual_seed(args.seed)
    use_bf16 = args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)

    try:
        data, mean, std = load_data(args, device)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    x_train, y_train = data["train"]
    C, L0 = x_train.shape[1:]
    model = build_model(args, C, L0).to(device)
    print(f"model: {args.model}, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"sequence length {2 * L0 if not args.no_noise else L0} x {C}, {len(x_train):,} training samples")
    optimizer = make_optimizer(model, args, device)
    steps_per_epoch = len(x_train) // args.batch_size
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * steps_per_epoch)
    step_fn = torch.compile(model) if args.compile else model
    perm_gen = torch.Generator().manual_seed(args.seed)

    def batch(x, generator=None):
        return make_batch(x, mean, std, not args.no_noise, generator)

    # Everything needed to continue a run exactly, mid-epoch included.
    state = {"epoch": 0, "step": 0, "global_step": 0, "perm": None, "sums": [0.0, 0],
             "history": [], "best": None}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        perm_gen.set_state(ckpt["perm_gen"])
        torch.set_rng_state(ckpt["rng_cpu"])
        if device.type == "cuda" and ckpt["rng_cuda"] is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"])
        state = ckpt["state"]
        print(f"resumed from {last_path} at epoch {state['epoch'] + 1}, step {state['step']}/{steps_per_epoch}")

    def checkpoint():
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "perm_gen": perm_gen.get_state(), "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "state": state, "config": vars(args)}

    stop = {"requested": False}

    def on_sigint(signum, frame):
        stop["requested"] = True
        print("\ninterrupt: finishing this step, then saving last.pt (Ctrl-C again to abort without saving)")
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def should_stop():
        return stop["requested"] or state["global_step"] >= (args.max_steps or math.inf)

    previous_handler = signal.signal(signal.SIGINT, on_sigint)
    try:
        while state["epoch"] < args.epochs:
            if state["perm"] is None:
                state["perm"] = torch.randperm(len(x_train), generator=perm_gen)
            perm = state["perm"].to(device)
            sums = torch.tensor(state["sums"], dtype=torch.float64, device=device)  # loss sum, correct
            t0, step0, last_print = time.time(), state["step"], 0.0
            model.train()
            while state["step"] < steps_per_epoch:
                idx = perm[state["step"] * args.batch_size:(state["step"] + 1) * args.batch_size]
                x, y = batch(x_train[idx]), y_train[idx]
                with autocast:
                    logits = step_fn(x)
                loss = F.cross_entropy(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                sums += torch.stack([loss.detach() * len(y), (logits.argmax(-1) == y).sum()]).double()
                state["step"] += 1
                state["global_step"] += 1
                done = state["step"] == steps_per_epoch
                halt = should_stop()
                if time.time() - last_print > 1.0 or done or halt:  # the only host syncs of the loop
                    last_print = time.time()
                    state["sums"] = sums.tolist()
                    seen = state["step"] * args.batch_size  # every batch is full
                    if not math.isfinite(state["sums"][0]):
                        raise FloatingPointError(
                            f"non-finite loss at epoch {state['epoch'] + 1}, step {state['step']}; "
                            f"stopping. {last_path} holds the last good state; try a lower --lr")
                    rate = (state["step"] - step0) * args.batch_size / (time.time() - t0)
                    eta = (steps_per_epoch - state["step"]) * args.batch_size / max(rate, 1e-9)
                    print(f"\repoch {state['epoch'] + 1}/{args.epochs} step {state['step']}/{steps_per_epoch} "
                          f"loss {state['sums'][0] / seen:.4f} acc {state['sums'][1] / seen:.4f} "
                          f"{rate:.0f} samples/s ETA {eta:.0f}s   ", end="", flush=True)
                if halt and not done:
                    atomic_write(last_path, lambda f: torch.save(checkpoint(), f))
                    print(f"\nstopped at step {state['global_step']}; saved {last_path} (continue with --resume)")
                    return state
            print()
            val_loss, val_acc = evaluate(model, *data["val"], batch, args, autocast)
            test_loss, test_acc = evaluate(model, *data["test"], batch, args, autocast)
            (loss_sum, correct), count = state["sums"], steps_per_epoch * args.batch_size
            row = {"epoch": state["epoch"] + 1, "train_loss": loss_sum / count, "train_acc": correct / count,
                   "val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss, "test_acc": test_acc,
                   "lr": optimizer.param_groups[0]["lr"], "seconds": time.time() - t0}
            state["history"].append(row)
            is_best = state["best"] is None or val_acc > state["best"]["val_acc"]
            if is_best:
                state["best"] = row
            state.update(epoch=state["epoch"] + 1, step=0, perm=None, sums=[0.0, 0])
            ckpt_now = checkpoint()
            atomic_write(last_path, lambda f: torch.save(ckpt_now, f))
            if is_best:
                atomic_write(os.path.join(args.out, "best.pt"), lambda f: torch.save(ckpt_now, f))
            metrics = "".join(json.dumps(r) + "\n" for r in state["history"])
            atomic_write(os.path.join(args.out, "metrics.jsonl"), lambda f: f.write(metrics.encode()))
            print(f"epoch {row['epoch']}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | "
                  f"val loss {val_loss:.4f} acc {val_acc:.4f} | test loss {test_loss:.4f} acc {test_acc:.4f} | "
                  f"lr {row['lr']:.2e} | {row['seconds']:.1f}s")
            if should_stop():
                print(f"stopped after epoch {row['epoch']}; saved {last_path} (continue with --resume)")
                return state
    except FloatingPointError as e:
        raise SystemExit(f"\nerror: {e}")
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    best = state["best"]
    print(f"best val acc {best['val_acc']:.4f} at epoch {best['epoch']}; test acc there {best['test_acc']:.4f}")
    return state


if __name__ == "__main__":
    main()
