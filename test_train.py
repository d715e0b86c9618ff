"""train_scifar.py on tiny data files made here in the real formats (no network, no Debian package)."""
import gzip
import io
import json
import os
import pickle
import signal
import struct
import tarfile

import sys
import types

import pytest
import torch

import train_scifar as ts


def fake_numpy(monkeypatch):
    """Modules named like numpy's, so that pickle writes a uint8 array exactly as numpy would."""
    np, core, multiarray = (types.ModuleType(m) for m in ("numpy", "numpy.core", "numpy.core.multiarray"))

    def _reconstruct(cls, shape, code):
        raise AssertionError("never called while pickling")

    class ndarray:
        def __init__(self, t):
            self.t = t

        def __reduce__(self):
            state = (1, tuple(self.t.shape), dtype("u1", False, True), False, bytes(self.t.flatten().tolist()))
            return _reconstruct, (ndarray, (0,), b"b"), state

    class dtype:
        def __init__(self, *args):
            self.args = args

        def __reduce__(self):
            return dtype, self.args, (3, "|", None, None, None, -1, -1, 0)

    _reconstruct.__module__, _reconstruct.__qualname__ = "numpy.core.multiarray", "_reconstruct"
    for cls in (ndarray, dtype):
        cls.__module__, cls.__qualname__ = "numpy", cls.__name__
    np.ndarray, np.dtype, multiarray._reconstruct = ndarray, dtype, _reconstruct
    for module in (np, core, multiarray):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return ndarray


def write_cifar(monkeypatch, data_dir, n_train=10, n_test=6):
    """A CIFAR-10 python tarball with 5 train batches of n_train images and one test batch."""
    ndarray = fake_numpy(monkeypatch)
    g = torch.Generator().manual_seed(0)
    batches = {}
    for name, n in [(f"data_batch_{i}", n_train) for i in range(1, 6)] + [("test_batch", n_test)]:
        x = torch.randint(0, 256, (n, 3072), dtype=torch.uint8, generator=g)
        y = torch.randint(0, 10, (n,), generator=g)
        batches[name] = (x, y)
    path = os.path.join(data_dir, "cifar-10-python.tar.gz")
    os.makedirs(data_dir, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, (x, y) in batches.items():
            blob = pickle.dumps({b"data": ndarray(x), b"labels": y.tolist()}, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path, batches


def write_idx(path, tensor):
    header = struct.pack(">I", 0x800 + tensor.ndim) + struct.pack(f">{tensor.ndim}I", *tensor.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + bytes(tensor.flatten().tolist()))


def write_fashion_mnist(data_dir, n_train=40, n_test=12):
    g = torch.Generator().manual_seed(1)
    os.makedirs(data_dir, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        arrays[prefix] = (torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g),
                          torch.randint(0, 10, (n,), dtype=torch.uint8, generator=g))
        write_idx(os.path.join(data_dir, f"{prefix}-images-idx3-ubyte.gz"), arrays[prefix][0])
        write_idx(os.path.join(data_dir, f"{prefix}-labels-idx1-ubyte.gz"), arrays[prefix][1])
    return arrays


def test_cifar_loader_reads_exactly(tmp_path, monkeypatch):
    path, batches = write_cifar(monkeypatch, str(tmp_path))
    x_train, y_train, x_test, y_test = ts.load_cifar10(str(tmp_path), md5=ts.md5sum(path))
    expected = torch.cat([batches[f"data_batch_{i}"][0] for i in range(1, 6)]).view(-1, 3, 1024)
    assert torch.equal(x_train, expected) and x_train.dtype == torch.uint8
    assert torch.equal(y_train, torch.cat([batches[f"data_batch_{i}"][1] for i in range(1, 6)]))
    assert torch.equal(x_test, batches["test_batch"][0].view(-1, 3, 1024))
    assert torch.equal(y_test, batches["test_batch"][1])


def test_cifar_bad_md5_and_truncated_archive(tmp_path, monkeypatch):
    path, _ = write_cifar(monkeypatch, str(tmp_path))
    with pytest.raises(ts.DataError, match="wrong MD5.*Delete it and run again"):
        ts.load_cifar10(str(tmp_path))  # the tiny file is not the real tarball
    with open(path, "rb") as f:
        blob = f.read()
    with open(path, "wb") as f:
        f.write(blob[: len(blob) // 2])
    with pytest.raises(ts.DataError, match="could not be read as the CIFAR-10 python tarball"):
        ts.load_cifar10(str(tmp_path), md5=ts.md5sum(path))


def test_no_network_error_names_url_file_and_folder(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise ts.urllib.error.URLError("no network")
    monkeypatch.setattr(ts.urllib.request, "urlopen", offline)
    with pytest.raises(ts.DataError) as e:
        ts.load_cifar10(str(tmp_path / "d"))
    assert ts.CIFAR_URL in str(e.value) and "cifar-10-python.tar.gz" in str(e.value) and str(tmp_path / "d") in str(e.value)
    assert not os.listdir(tmp_path / "d")  # no partial file left behind


def test_fashion_mnist_loader_reads_exactly_and_checks_headers(tmp_path):
    arrays = write_fashion_mnist(str(tmp_path))
    x_train, y_train, x_test, y_test = ts.load_fashion_mnist(str(tmp_path))
    assert torch.equal(x_train, arrays["train"][0].view(-1, 1, 784))
    assert torch.equal(y_train, arrays["train"][1].long())
    assert torch.equal(x_test, arrays["t10k"][0].view(-1, 1, 784))
    bad = os.path.join(tmp_path, "train-labels-idx1-ubyte.gz")
    write_idx(bad, torch.zeros(4, 2, dtype=torch.uint8))  # a 2-D file where labels (1-D) belong
    with pytest.raises(ts.DataError, match="not an IDX file of 1 dimension"):
        ts.load_fashion_mnist(str(tmp_path))
    with gzip.open(bad, "wb") as f:
        f.write(struct.pack(">II", 0x801, 40) + bytes(39))  # one label short
    with pytest.raises(ts.DataError, match="truncated or corrupt"):
        ts.load_fashion_mnist(str(tmp_path))


def test_noise_padded_batch():
    x = torch.randint(0, 256, (4, 3, 1024), dtype=torch.uint8)
    mean, std = (torch.tensor(v)[:, None] for v in ts.NORMALIZATION["cifar10"])
    out = ts.make_batch(x, mean, std, noise=True)
    assert out.shape == (4, 3, 2048) and out.dtype == torch.float32
    torch.testing.assert_close(out[..., :1024] * std + mean, x.float() / 255)
    noise = out[..., 1024:]
    assert noise.min() >= 0 and noise.max() < 1 and abs(noise.mean().item() - 0.5) < 0.01
    assert not torch.equal(noise, ts.make_batch(x, mean, std, noise=True)[..., 1024:])  # fresh each time
    assert ts.make_batch(x, mean, std, noise=False).shape == (4, 3, 1024)


def small_args(tmp_path, *extra):
    return ["--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
            "--d-model", "8", "--n-layers", "1", "--d-state", "4", "--batch-size", "8", "--val-size", "8",
            "--epochs", "2", "--device", "cpu", *extra]


def test_training_run_writes_every_file(tmp_path):
    write_fashion_mnist(str(tmp_path / "data"))
    state = ts.main(small_args(tmp_path, "--max-steps", "3"))
    assert state["global_step"] == 3
    run = tmp_path / "run"
    assert (run / "config.json").exists() and (run / "last.pt").exists()
    state = ts.main(small_args(tmp_path, "--model", "s4d"))  # 2 full epochs of 4 steps
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("train_loss", "train_acc", "val_acc", "test_acc", "lr", "seconds"):
        assert all(torch.isfinite(torch.tensor(float(r[key]))) for r in rows)
    ckpt = torch.load(run / "best.pt", weights_only=False)
    assert {"model", "optimizer", "scheduler", "rng_cpu", "perm_gen", "config", "state"} <= set(ckpt)
    assert not [p for p in os.listdir(run) if p.endswith(".tmp")]


@pytest.mark.parametrize("model", ["hope", "s4d"])
def test_resume_matches_uninterrupted_run(tmp_path, model):
    write_fashion_mnist(str(tmp_path / "data"))
    full = ts.main(small_args(tmp_path, "--model", model, "--out", str(tmp_path / "a")))
    ts.main(small_args(tmp_path, "--model", model, "--out", str(tmp_path / "b"), "--max-steps", "6"))
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=False)["state"]["global_step"] == 6
    resumed = ts.main(small_args(tmp_path, "--out", str(tmp_path / "b"), "--resume"))
    assert resumed["global_step"] == full["global_step"] == 8
    assert resumed["history"] == [dict(r, seconds=s["seconds"]) for r, s in zip(full["history"], resumed["history"])]
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    write_fashion_mnist(str(tmp_path / "data"))
    ts.main(small_args(tmp_path, "--epochs", "1"))
    good = (tmp_path / "run" / "last.pt").read_bytes()
    with pytest.raises(SystemExit, match="non-finite loss"):
        ts.main(small_args(tmp_path, "--epochs", "1", "--lr", "1e30"))
    assert (tmp_path / "run" / "last.pt").read_bytes() == good


def test_ctrl_c_saves_and_resume_continues(tmp_path, monkeypatch):
    """A real SIGINT in the middle of epoch 1: the step finishes, last.pt is saved, --resume goes on."""
    write_fashion_mnist(str(tmp_path / "data"))
    full = ts.main(small_args(tmp_path, "--out", str(tmp_path / "a")))
    calls, make_batch = [], ts.make_batch

    def interrupting_make_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)
        return make_batch(*args, **kwargs)
    monkeypatch.setattr(ts, "make_batch", interrupting_make_batch)
    stopped = ts.main(small_args(tmp_path, "--out", str(tmp_path / "b")))
    assert stopped["global_step"] == 3 and stopped["epoch"] == 0
    monkeypatch.setattr(ts, "make_batch", make_batch)
    resumed = ts.main(small_args(tmp_path, "--out", str(tmp_path / "b"), "--resume"))
    assert [r["val_acc"] for r in resumed["history"]] == [r["val_acc"] for r in full["history"]]
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
