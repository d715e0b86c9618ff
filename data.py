"""The data of train_scifar.py: where the files come from, their formats, and how they become uint8 tensors.

CIFAR-10 is read from the official python tarball (its pickles are unpacked without numpy, and nothing but the
arrays a batch holds may be unpickled); Fashion-MNIST from its four IDX files (gzip), in the folder given, else in
Debian's dataset-fashion-mnist package, else downloaded. A download is checked against its MD5 in memory and only
then written, atomically. Every failure is a DataError whose message says what to do.
"""
import codecs
import gzip
import hashlib
import math
import os
import pickle
import struct
import tarfile
import urllib.error
import urllib.request
import zlib

import torch

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FMNIST_FILES = {  # name: MD5 of the official download (Debian's recompressed copies differ, so IDX headers are checked)
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
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        atomic_write(path, lambda f: f.write(data))
    except OSError as e:  # e.g. a package's folder, read-only for users
        raise DataError(f"could not save the download to {path} ({e}); choose a --data-dir you can write"
                        f"{offline_hint}") from None


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
    return torch.frombuffer(bytearray(array.raw), dtype=torch.uint8).view(-1, 3, 1024)  # (N, RGB planes, 32 x 32)


def load_cifar10(data_dir, md5=CIFAR_MD5):
    """CIFAR-10 from the official python tarball (downloaded if absent): uint8 (N, 3, 1024) and labels, train
    and test, and the list of files read."""
    path = os.path.join(data_dir, os.path.basename(CIFAR_URL))
    if not os.path.exists(path):
        fmnist = any(os.path.exists(os.path.join(data_dir, name)) for name in FMNIST_FILES)
        hint = (f". {data_dir} holds Fashion-MNIST's IDX files, not CIFAR-10: to train on them, add --dataset fashion-mnist"
                if fmnist else "; or train offline on Fashion-MNIST with --dataset fashion-mnist")
        download(CIFAR_URL, path, md5, offline_hint=hint)
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
    if not search_debian and os.path.exists(os.path.join(FMNIST_DEBIAN_DIR, next(iter(FMNIST_FILES)))):
        hint = f"; or use Debian's copy, which is installed: --data-dir {FMNIST_DEBIAN_DIR} (or no --data-dir)"
    else:
        hint = f"; or, on Debian/Ubuntu, `apt-get install dataset-fashion-mnist` puts the files in {FMNIST_DEBIAN_DIR}"
    paths = {}
    for name, md5 in FMNIST_FILES.items():
        local, debian = os.path.join(data_dir, name), os.path.join(FMNIST_DEBIAN_DIR, name)
        if not os.path.exists(local) and not (search_debian and os.path.exists(debian)):
            download(FMNIST_URL + name, local, md5, offline_hint=hint)
        paths[name] = local if os.path.exists(local) else debian
    out = []
    for prefix in ("train", "t10k"):
        x = read_idx(paths[f"{prefix}-images-idx3-ubyte.gz"], 3)
        y = read_idx(paths[f"{prefix}-labels-idx1-ubyte.gz"], 1)
        if x.shape[0] != y.shape[0] or x.shape[1:] != (28, 28):
            raise DataError(f"Fashion-MNIST {prefix}: {x.shape[0]} images of {tuple(x.shape[1:])} "
                            f"but {y.shape[0]} labels; expected 28x28 images, one label each")
        out += [x.reshape(-1, 1, 784), y.long()]  # (N, 1, 784)
    return out + [sorted(os.path.abspath(p) for p in paths.values())]


def grayscale(x):
    """uint8 RGB (N, 3, L) -> uint8 luma (N, 1, L) exactly as PIL's convert("L"): ITU-R 601-2 weights in 16-bit
    fixed point, (19595 R + 38470 G + 7471 B + 2^15) >> 16 (Pillow's libImaging/Convert.c, L24)."""
    weights = torch.tensor([19595, 38470, 7471], dtype=torch.int32, device=x.device)[:, None]  # (3, 1)
    return (((x.int() * weights).sum(1, keepdim=True) + 0x8000) >> 16).to(torch.uint8)


def load(dataset, data_dir, val_size, gray=False, search_debian=True):
    """({"train", "val", "test"}: (uint8 images (N, C, L0), labels)), the files read, (mean, std) per channel.
    Validation is the first val_size of a fixed permutation (seed 42, the authors') of the training set, whatever
    the run's seed. gray: CIFAR-10 as one luma channel."""
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise DataError(f"--data-dir {data_dir} exists but is not a directory")
    if dataset == "cifar10":
        x_train, y_train, x_test, y_test, files = load_cifar10(data_dir)
        if gray:
            x_train, x_test = grayscale(x_train), grayscale(x_test)
    else:
        x_train, y_train, x_test, y_test, files = load_fashion_mnist(data_dir, search_debian)
    if val_size >= len(x_train):
        raise DataError(f"--val-size {val_size} must be below the {len(x_train)} training samples")
    perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(42))
    val, train = perm[:val_size], perm[val_size:]
    splits = {"train": (x_train[train], y_train[train]), "val": (x_train[val], y_train[val]), "test": (x_test, y_test)}
    return splits, files, NORMALIZATION[dataset + "-gray" * gray]
