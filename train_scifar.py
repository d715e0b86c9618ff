"""Noise-padded sequential CIFAR-10 (HOPE paper, Experiment II): HOPE vs S4D under one protocol.

    python train_scifar.py --model hope                 # the paper's setup, CUDA if present
    python train_scifar.py --model s4d                  # the S4D-Lin baseline
    python train_scifar.py --dataset fashion-mnist      # runs offline (Debian dataset-fashion-mnist)
    python train_scifar.py --preset lra-image           # the authors' LRA Image recipe (bidirectional)

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
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import warnings
import zlib

warnings.filterwarnings("ignore", "Failed to initialize NumPy")  # torch's warning at import when numpy (optional) is absent
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hope import HOPE  # noqa: E402
from s4d import S4D  # noqa: E402

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


PRESETS = {"lra-image": {  # the authors' run_cifar.sh / run_cifar.py for LRA Image (README: Presets)
    "all": dict(dataset="cifar10", grayscale=True, no_noise=True, n_layers=6, d_model=128, dropout=0.1, batch_size=32,
                lr=0.004, weight_decay=0.01, lr_dt=0.001, dt_min=0.001, warmup_epochs=10, epochs=200, bidirectional=True),
    "hope": dict(d_state=128, lr_h=0.001, dt_max=10.0),
    "s4d": dict(d_state=64, lr_ssm=0.001, dt_max=0.1),  # not in the authors' script: this project's choice
}}


class DataError(RuntimeError):
    """A data file is missing, corrupt or unreachable; the message says what to do."""


# ---------------------------------------------------------------------------------------- data
def md5sum(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(path, write):
    """write(f) to a temporary file, fsync, then rename: no crash leaves a half-written file."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def download(url, path, md5, offline_hint=""):
    """Fetch url into memory and write it to path only once its MD5 matches: a failed download leaves nothing."""
    print(f"downloading {url} to {path}")
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            data = b"".join(iter(lambda: r.read(1 << 20), b""))  # (170 MB for CIFAR-10)
    except (urllib.error.URLError, OSError) as e:
        raise DataError(f"could not download {url} ({e}). Without network access, download it elsewhere and put "
                        f"{os.path.basename(path)} in {os.path.dirname(path) or '.'}/{offline_hint}") from None
    if hashlib.md5(data).hexdigest() != md5:
        raise DataError(f"download of {url} has the wrong MD5 (expected {md5}); nothing was saved, run again")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    atomic_write(path, lambda f: f.write(data))


class _NumpyArray:
    """Stands in for a pickled numpy array: keeps its shape, dtype and raw bytes, so numpy is not needed."""

    def __init__(self, *reconstruct_args):
        self.shape, self.dtype, self.raw = None, None, None

    def __setstate__(self, state):  # numpy's array state: (version, shape, dtype, is_fortran, raw bytes)
        self.shape, self.dtype, self.raw = state[1], state[2].code, state[4]


class _NumpyDtype:
    def __init__(self, code, *flags):  # Python 2 pickles (the real CIFAR-10 files) give the code as bytes
        self.code = code.decode("latin-1") if isinstance(code, bytes) else code

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
    """CIFAR-10 from the official python tarball (downloaded if absent): uint8 (N, 3, 1024) and labels, train
    and test, and the list of files read."""
    path = os.path.join(data_dir, os.path.basename(CIFAR_URL))
    if not os.path.exists(path):
        download(CIFAR_URL, path, md5, offline_hint="; or train offline on Fashion-MNIST with --dataset fashion-mnist")
    if md5sum(path) != md5:
        raise DataError(f"{path} has the wrong MD5 (expected {md5}): it is corrupt or incomplete. "
                        "Delete it and run again to download it afresh.")
    try:
        with tarfile.open(path, "r:gz") as tar:
            batches = [_CifarUnpickler(tar.extractfile(f"cifar-10-batches-py/{name}"), encoding="bytes").load()
                       for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]]
            x = [_uint8_images(batch[b"data"]) for batch in batches]
            y = [torch.tensor(batch[b"labels"], dtype=torch.long) for batch in batches]
    except (tarfile.TarError, EOFError, zlib.error, pickle.UnpicklingError, KeyError, TypeError, RuntimeError) as e:
        raise DataError(f"{path} could not be read as the CIFAR-10 python tarball ({type(e).__name__}: {e}). "
                        "Delete it and run again to download it afresh.") from None
    return torch.cat(x[:5]), torch.cat(y[:5]), x[5], y[5], [os.path.abspath(path)]


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


def load_fashion_mnist(data_dir, search_debian=True):
    """Fashion-MNIST from data_dir, else (search_debian) Debian's package folder, else downloaded to data_dir:
    uint8 (N, 1, 784) and labels, train and test, and the list of files read."""
    paths = {}
    for name, md5 in FMNIST_FILES.items():
        local, debian = os.path.join(data_dir, name), os.path.join(FMNIST_DEBIAN_DIR, name)
        if not os.path.exists(local) and not (search_debian and os.path.exists(debian)):
            download(FMNIST_URL + name, local, md5, offline_hint=f"; or, on Debian/Ubuntu, `apt-get install "
                     f"dataset-fashion-mnist` puts the files in {FMNIST_DEBIAN_DIR}")
        paths[name] = local if os.path.exists(local) else debian
    out = []
    for prefix in ("train", "t10k"):
        x = read_idx(paths[f"{prefix}-images-idx3-ubyte.gz"], 3)
        y = read_idx(paths[f"{prefix}-labels-idx1-ubyte.gz"], 1)
        if x.shape[0] != y.shape[0] or x.shape[1:] != (28, 28):
            raise DataError(f"Fashion-MNIST {prefix}: {x.shape[0]} images of {tuple(x.shape[1:])} "
                            f"but {y.shape[0]} labels; expected 28x28 images, one label each")
        out += [x.reshape(-1, 1, 784), y.long()]
    return out + [sorted(os.path.abspath(p) for p in paths.values())]


def grayscale(x):
    """uint8 RGB (N, 3, L) -> uint8 luma (N, 1, L) exactly as PIL's convert("L"): ITU-R 601-2 weights in 16-bit
    fixed point, (19595 R + 38470 G + 7471 B + 2^15) >> 16 (Pillow's libImaging/Convert.c, L24)."""
    weights = torch.tensor([19595, 38470, 7471], dtype=torch.int32, device=x.device)[:, None]
    return (((x.int() * weights).sum(1, keepdim=True) + 0x8000) >> 16).to(torch.uint8)


def make_batch(x, mean, std, noise=None):
    """uint8 (B, C, L0) -> normalized float (B, C, L0), followed by the noise (B, C, L0) if given."""
    x = (x.float() / 255 - mean) / std
    return x if noise is None else torch.cat([x, noise], -1)  # (B, C, 2 L0)


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
                        lr_h=args.lr_h, circular=args.circular, bidirectional=args.bidirectional)
    else:
        def make_layer():
            return S4D(args.d_model, args.d_state, args.dt_min, args.dt_max, args.dropout, init=args.s4d_init,
                       real_param=args.s4d_real, lr=args.lr_ssm, lr_dt=args.lr_dt, bidirectional=args.bidirectional)
    return SequenceClassifier(make_layer, d_input, 10, args.d_model, args.n_layers, args.dropout,
                              pool_from=seq_len if not args.no_noise else 0)


def make_optimizer(model, args, device):
    """AdamW: parameters with an _optim hint (the SSM's A, h or dt) get their own group."""
    groups = {}
    for name, p in model.named_parameters():
        hint = getattr(p, "_optim", {})
        group = groups.setdefault(tuple(sorted(hint.items())), {"params": [], "names": [], **hint})
        group["params"].append(p)
        group["names"].append(name.split(".")[-1])
    opt = torch.optim.AdamW(list(groups.values()), lr=args.lr, weight_decay=args.weight_decay,
                            fused=device.type == "cuda")
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]  # the schedule scales it
        print(f"optimizer group: lr {g['lr']:g}, weight_decay {g['weight_decay']:g}, "
              f"{sum(p.numel() for p in g['params']):,} params: {', '.join(sorted(set(g['names'])))}")
    return opt


# ------------------------------------------------------------------------------------ training
def lr_factor(step, schedule):
    """Linear warm-up to 1 over steps [0, warmup), then a cosine from schedule["factor"] at step start to 0 at end."""
    if step < schedule["warmup"]:
        return (step + 1) / schedule["warmup"]
    start, end = schedule["start"], schedule["end"]
    return schedule["factor"] * 0.5 * (1 + math.cos(math.pi * min(step - start, end - start) / max(end - start, 1)))


@torch.no_grad()
def evaluate(model, x_all, y_all, noise_all, mean, std, args, autocast):
    """Loss and accuracy; the noise was drawn once per split, so every evaluation sees the same numbers."""
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(x_all), args.eval_batch_size):
        x, y = x_all[i:i + args.eval_batch_size], y_all[i:i + args.eval_batch_size]
        noise = None if noise_all is None else noise_all[i:i + args.eval_batch_size]
        with autocast:
            logits = model(make_batch(x, mean, std, noise))
        loss += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
    model.train()
    return loss / len(x_all), correct / len(x_all)


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
non_negative_int = _typed(int, 0, low_ok=True)
CHANGEABLE_ON_RESUME = {"epochs", "device", "amp", "compile", "data_dir", "max_steps", "resume", "out"}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=["hope", "s4d"], default="hope", help="the SSM layer")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a published recipe (README: Presets); explicit flags win")
    p.add_argument("--dataset", choices=["cifar10", "fashion-mnist"], default="cifar10", help="the images")
    p.add_argument("--no-noise", action="store_true", help="plain sequential task, no noise padding (pool over all positions)")
    p.add_argument("--grayscale", action="store_true", help="CIFAR-10 as 1024 x 1 (the LRA Image task)")
    p.add_argument("--epochs", type=positive_int, default=100, help="the cosine's length; on --resume, a larger value "
                   "extends the run (a new cosine from the current lr)")
    p.add_argument("--warmup-epochs", type=non_negative_int, default=0, help="linear warm-up of the lr, per step, then the cosine")
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
    p.add_argument("--lr-h", type=positive, help="HOPE: lr of h (default --lr, as in the paper; the authors' code: 0.001)")
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
    p.add_argument("--out", default=None, help="run folder (default: runs/<model>-<dataset>-s<seed>)")
    p.add_argument("--max-steps", type=positive_int, help="stop (and save) after this many optimizer steps in total")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    return p


def parse_args(argv=None):
    """The options (a --preset's values replace the defaults), and the set of those given on the command line."""
    parser, bare = build_parser(), build_parser()
    args = parser.parse_args(argv)
    if args.preset:
        parser.set_defaults(**PRESETS[args.preset]["all"], **PRESETS[args.preset][args.model])
        args = parser.parse_args(argv)
    if args.out is None:
        tags = [args.model, args.dataset] + ["nonoise"] * args.no_noise + ["gray"] * args.grayscale + ["bi"] * args.bidirectional
        args.out = os.path.join("runs", "-".join(tags) + f"-s{args.seed}")
    for action in bare._actions:
        action.default = argparse.SUPPRESS
    return parser, args, set(vars(bare.parse_args(argv)))


def code_version():
    """The git commit of this file's checkout, '+dirty' if a file a run executes has changed, else 'unknown'."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "hope.py", "s4d.py", "train_scifar.py"],
                               cwd=here, capture_output=True).returncode
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit.stdout.strip() + ("+dirty" if dirty else "")


def resolve(parser, args, given):
    """Checks every flag; on --resume, the run folder's config with the flags that may change. -> (config, ckpt)."""
    if args.dt_min > args.dt_max:
        parser.error(f"--dt-min {args.dt_min} is larger than --dt-max {args.dt_max}")
    if args.warmup_epochs >= args.epochs:
        parser.error(f"--warmup-epochs {args.warmup_epochs} must be below --epochs {args.epochs}")
    if args.circular and args.bidirectional:
        parser.error("--circular and --bidirectional exclude each other (the bidirectional layer never wraps around)")
    if args.grayscale and args.dataset != "cifar10":
        parser.error(f"--grayscale turns CIFAR-10's color images into one channel; {args.dataset} is grayscale already: "
                     "drop --grayscale")
    try:
        torch.empty(0, device=args.device)  # a bad name, or a device type, index or backend this build or machine lacks
    except (RuntimeError, AssertionError):
        parser.error(f"--device {args.device} is not available with this PyTorch build (torch {torch.__version__}) "
                     f"on this machine; use --device cpu{' or --device cuda' if torch.cuda.is_available() else ''}")
    last = os.path.join(args.out, "last.pt")
    if not args.resume:
        if os.path.exists(last) or os.path.exists(os.path.join(args.out, "best.pt")):
            parser.error(f"{args.out} holds an earlier run: continue it with --resume, or choose another --out")
        return dict(vars(args), data_dir_explicit="data_dir" in given), None
    if not os.path.exists(last):
        parser.error(f"--resume: no checkpoint at {last}")
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    saved = ckpt["config"]
    conflicts = [f"--{k.replace('_', '-')} {getattr(args, k)} (the run has {saved.get(k)})"
                 for k in sorted(given - CHANGEABLE_ON_RESUME) if getattr(args, k) != saved.get(k)]
    if conflicts:
        parser.error("--resume continues the run in --out with its own settings; these flags contradict it: " + ", ".join(conflicts))
    if "epochs" in given and args.epochs < saved["epochs"]:
        parser.error(f"--epochs {args.epochs}: the run was planned for {saved['epochs']}; --resume can only extend it")
    config = dict(saved, out=args.out, resume=True, device=args.device, amp=args.amp, compile=args.compile,
                  max_steps=args.max_steps, **{k: getattr(args, k) for k in given & {"epochs", "data_dir"}})
    return dict(config, data_dir_explicit=saved["data_dir_explicit"] or "data_dir" in given), ckpt


def load_data(parser, args, device):
    """Train/val/test: uint8 (N, C, L0), labels and (val, test) fixed noise, all on the device; normalization.

    The evaluation noise is drawn on the CPU from seed + 1, so it is the same numbers on every device."""
    if os.path.exists(args.data_dir) and not os.path.isdir(args.data_dir):
        raise DataError(f"--data-dir {args.data_dir} exists but is not a directory")
    if args.dataset == "cifar10":
        x_train, y_train, x_test, y_test, args.data_files = load_cifar10(args.data_dir)
        if args.grayscale:
            x_train, x_test = grayscale(x_train), grayscale(x_test)
    else:
        x_train, y_train, x_test, y_test, args.data_files = load_fashion_mnist(args.data_dir, search_debian=not args.data_dir_explicit)
    norm = NORMALIZATION[args.dataset + "-gray" * args.grayscale]
    print(f"data: {', '.join(args.data_files)}")
    if args.val_size >= len(x_train):
        parser.error(f"--val-size {args.val_size} must be below the {len(x_train)} training samples")
    perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(42))  # the fixed split
    val, train = perm[:args.val_size], perm[args.val_size:]
    data, noise_gen = {}, torch.Generator().manual_seed(args.seed + 1)
    for split, (x, y) in {"train": (x_train[train], y_train[train]), "val": (x_train[val], y_train[val]),
                          "test": (x_test, y_test)}.items():
        noise = None if args.no_noise or split == "train" else torch.rand(x.shape, generator=noise_gen)  # (N, C, L0)
        data[split] = (x.to(device), y.to(device), None if noise is None else noise.to(device))
    mean, std = (torch.tensor(v, device=device)[:, None] for v in norm)  # (C, 1)
    return data, mean, std


def setup(args, ckpt, device, n_train, C, L0):
    """Model, optimizer, batch-order generator and training state: fresh, or exactly as saved."""
    torch.manual_seed(args.seed)
    model = build_model(args, C, L0).to(device)
    print(f"model: {args.model}, {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"sequence length {L0 if args.no_noise else 2 * L0} x {C}, {n_train:,} training samples")
    optimizer = make_optimizer(model, args, device)
    perm_gen = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = n_train // args.batch_size
    end, warmup = args.epochs * steps_per_epoch, args.warmup_epochs * steps_per_epoch  # in steps
    state = {"epoch": 0, "step": 0, "global_step": 0, "perm": None, "sums": [0.0, 0], "history": [], "best": None,
             "schedule": {"warmup": warmup, "start": warmup, "end": end, "factor": 1.0}}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        perm_gen.set_state(ckpt["perm_gen"])
        torch.set_rng_state(ckpt["rng_cpu"])
        if device.type == "cuda" and ckpt["rng_cuda"] is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
        state = ckpt["state"]
        schedule, step = state["schedule"], state["global_step"]
        if end != schedule["end"] and step >= schedule["warmup"]:  # --epochs extended: a new cosine from here
            schedule.update(start=step, factor=lr_factor(step, schedule))
        schedule["end"] = end
        if ckpt["config"].get("code") != args.code:
            print(f"warning: this run was made by code {ckpt['config'].get('code')}; resuming with {args.code}")
        print(f"resumed from {os.path.join(args.out, 'last.pt')} at epoch {state['epoch'] + 1}, step {state['step']}/{steps_per_epoch}")
    return model, optimizer, perm_gen, state


def save_checkpoint(args, model, optimizer, perm_gen, state, device, best=False):
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "perm_gen": perm_gen.get_state(),
            "rng_cpu": torch.get_rng_state(), "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "state": state, "config": vars(args)}
    for name in ("last.pt", "best.pt") if best else ("last.pt",):
        atomic_write(os.path.join(args.out, name), lambda f: torch.save(ckpt, f))


def train_epoch(args, step_fn, optimizer, data, mean, std, perm_gen, state, autocast, should_stop):
    """Steps until the epoch ends or should_stop(); returns True if the epoch is complete."""
    x_train, y_train, _ = data["train"]
    steps_per_epoch = len(x_train) // args.batch_size
    if state["perm"] is None:
        state["perm"] = torch.randperm(len(x_train), generator=perm_gen)
    perm = state["perm"].to(x_train.device)
    sums = torch.tensor(state["sums"], dtype=torch.float64, device=x_train.device)  # loss sum, correct
    t0, step0, last_print = time.time(), state["step"], 0.0
    while state["step"] < steps_per_epoch:
        idx = perm[state["step"] * args.batch_size:(state["step"] + 1) * args.batch_size]
        x, y = x_train[idx], y_train[idx]
        noise = None if args.no_noise else torch.rand(x.shape, device=x.device)
        with autocast:
            logits = step_fn(make_batch(x, mean, std, noise))
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        factor = lr_factor(state["global_step"], state["schedule"])
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor
        optimizer.step()
        sums += torch.stack([loss.detach() * len(y), (logits.argmax(-1) == y).sum()]).double()
        state["step"] += 1
        state["global_step"] += 1
        done, halt = state["step"] == steps_per_epoch, should_stop()
        if time.time() - last_print > 1.0 or done or halt:  # the only host syncs of the loop
            last_print = time.time()
            state["sums"] = sums.tolist()
            seen = state["step"] * args.batch_size  # every batch is full
            if not math.isfinite(state["sums"][0]):
                raise SystemExit(f"\nerror: non-finite loss at epoch {state['epoch'] + 1}, step {state['step']}; stopping. "
                                 f"{os.path.join(args.out, 'last.pt')} holds the last good state; try a lower --lr")
            rate = (state["step"] - step0) * args.batch_size / (time.time() - t0)
            eta = (steps_per_epoch - state["step"]) * args.batch_size / max(rate, 1e-9)
            print(f"\repoch {state['epoch'] + 1}/{args.epochs} step {state['step']}/{steps_per_epoch} "
                  f"loss {state['sums'][0] / seen:.4f} acc {state['sums'][1] / seen:.4f} "
                  f"{rate:.0f} samples/s ETA {eta:.0f}s   ", end="", flush=True)
        if halt and not done:
            return False
    print()
    return True


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
    atomic_write(path, lambda f: f.write(text.encode()))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser, args, given = parse_args(argv)
    config, ckpt = resolve(parser, args, given)
    args = argparse.Namespace(**dict(config, code=code_version(), torch=str(torch.__version__)))
    device = torch.device(args.device)
    try:
        data, mean, std = load_data(parser, args, device)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    args.device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(json.dumps(vars(args), indent=1))
    record(args, argv)
    use_bf16 = args.amp == "bf16" or (args.amp == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
    x_train = data["train"][0]
    model, optimizer, perm_gen, state = setup(args, ckpt, device, len(x_train), *x_train.shape[1:])
    step_fn = torch.compile(model) if args.compile else model
    stop = {"requested": False}

    def on_signal(signum, frame):  # SIGINT (Ctrl-C) or SIGTERM (what schedulers and `timeout` send first)
        stop["requested"] = True
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving last.pt (a second signal aborts without saving)")
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def should_stop():
        return stop["requested"] or state["global_step"] >= (args.max_steps or math.inf)

    previous_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while state["epoch"] < args.epochs:
            t0 = time.time()
            if not train_epoch(args, step_fn, optimizer, data, mean, std, perm_gen, state, autocast, should_stop):
                save_checkpoint(args, model, optimizer, perm_gen, state, device)
                print(f"\nstopped at step {state['global_step']}; saved {args.out}/last.pt (continue with --resume)")
                return state
            val_loss, val_acc = evaluate(model, *data["val"], mean, std, args, autocast)
            test_loss, test_acc = evaluate(model, *data["test"], mean, std, args, autocast)
            (loss_sum, correct), count = state["sums"], state["step"] * args.batch_size  # full batches only
            row = {"epoch": state["epoch"] + 1, "train_loss": loss_sum / count, "train_acc": correct / count,
                   "val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss, "test_acc": test_acc,
                   "lr": optimizer.param_groups[0]["lr"], "seconds": time.time() - t0}
            state["history"].append(row)
            is_best = state["best"] is None or val_acc > state["best"]["val_acc"]
            state["best"] = row if is_best else state["best"]
            state.update(epoch=state["epoch"] + 1, step=0, perm=None, sums=[0.0, 0])
            save_checkpoint(args, model, optimizer, perm_gen, state, device, best=is_best)
            metrics = "".join(json.dumps(r) + "\n" for r in state["history"])
            atomic_write(os.path.join(args.out, "metrics.jsonl"), lambda f: f.write(metrics.encode()))
            print(f"epoch {row['epoch']}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f} | "
                  f"val loss {val_loss:.4f} acc {val_acc:.4f} | test loss {test_loss:.4f} acc {test_acc:.4f} | "
                  f"lr {row['lr']:.2e} | {row['seconds']:.1f}s")
            if should_stop():
                print(f"stopped after epoch {row['epoch']}; saved {args.out}/last.pt (continue with --resume)")
                return state
    finally:
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
    best = state["best"]
    print(f"best val acc {best['val_acc']:.4f} at epoch {best['epoch']}; test acc there {best['test_acc']:.4f}")
    return state


if __name__ == "__main__":
    main()
