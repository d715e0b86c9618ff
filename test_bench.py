"""bench.py and results/gpu/run.sh still run: every row at a tiny size, and every flag the GPU script passes."""
import io
import json
import math
import os
import subprocess
import sys
import types
from contextlib import redirect_stdout

import torch

import bench
import train_scifar as ts

HERE = os.path.dirname(os.path.abspath(__file__))


def test_every_row_runs_at_tiny_size_and_keeps_the_published_rows(tmp_path, monkeypatch):
    """`bench.py --size tiny --compile --json`: every row has a finite positive time and (eager rows) an integer launch
    count, and every row and ratio of results/bench_cpu.json (the README's figures) is still produced. The per-row
    memory children run in this process (a fresh interpreter per row costs seconds; the next test runs one for real),
    and torch.compile is the identity (compiling takes minutes here; test_hope.py and test_train.py compile for real)."""
    def child_here(cmd, **kwargs):
        assert cmd[:2] == [sys.executable, bench.__file__] and kwargs["env"]["MALLOC_MMAP_THRESHOLD_"] == "65536"
        assert cmd[cmd.index("--size") + 1] == "tiny"  # the child measures the size being timed
        with redirect_stdout(io.StringIO()) as out:
            bench.main(cmd[2:])
        return types.SimpleNamespace(stdout=out.getvalue())
    monkeypatch.setattr(bench.subprocess, "run", child_here)
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)
    bench.main(["--size", "tiny", "--reps", "1", "--device", "cpu", "--compile", "--json", str(tmp_path / "b.json")])
    result = json.load(open(tmp_path / "b.json"))
    assert result["size"] == "tiny"
    for name, row in result["rows"].items():
        assert math.isfinite(row["ms"]) and row["ms"] > 0 and math.isfinite(row["peak_mib"]) and row["peak_mib"] >= 0, name
        assert (row["launches"] is None) if name.endswith("-compile") else (type(row["launches"]) is int and row["launches"] > 0), name
    for name, value in result["ratios"].items():  # a peak of 0 MiB is possible at this size: a memory ratio may be
        assert value is None or (math.isfinite(value) and (value > 0 or "memory" in name and value == 0)), name
    published = json.load(open(os.path.join(HERE, "results", "bench_cpu.json")))
    T, L = bench.SIZES["tiny"]["T"], bench.SIZES["tiny"]["L"]
    tiny = lambda name: name.replace("1000", str(T)).replace("2048", str(L))  # noqa: E731
    assert {tiny(k) for k in published["rows"]} <= set(result["rows"])
    assert {tiny(k) for k in published["ratios"]} <= set(result["ratios"])
    # issue 26's rows at tiny size (T = 10, L = 32), whether or not results/bench_cpu.json has them yet: forward(u) vs
    # forward(u, state, return_state=True) at batch 1 and 8, and a prompt through step() vs forward(return_state=True)
    models = (("hope", "HOPE"), ("s4d", "S4D"))
    assert {f"forward-32-{m}-B{b}{s}" for m, _ in models for b in (1, 8) for s in ("", "-state-in-out")} \
        | {f"{r}-10-{m}-B1{s}" for m, _ in models for r, s in (("recurrent", ""), ("forward", "-state-out"))} \
        <= set(result["rows"])
    assert {f"forward(u, state, return_state=True) / forward(u) {what}, {label}, B={b}"
            for _, label in models for what in ("launches", "time") for b in (1, 8)} \
        | {f"10 step() / forward(u[..., :10], return_state=True) {what}, {label}, B=1"
           for _, label in models for what in ("launches", "time")} <= set(result["ratios"])
    assert all(result["ratios"][k] is not None for k in result["ratios"] if "state" in k)  # times and launches: never 0


def test_peak_memory_child_runs_in_a_fresh_process():
    mib = bench.peak_mb("step-hope-fp32", torch.device("cpu"), 2, "tiny")
    assert math.isfinite(mib) and mib >= 0


def test_gpu_script_passes_only_flags_that_exist(tmp_path):
    """results/gpu/run.sh run by bash with python, timeout, rm and cp replaced by shell functions that record or skip:
    each python command line it would run is parsed by its script's own parser (an unknown flag or bad value exits)."""
    log = tmp_path / "argv"
    shims = (f'python() {{ printf "%s\\0" "$@" >> {log}; printf "\\n" >> {log}; }}; timeout() {{ shift; "$@"; }}; '
             'rm() { :; }; cp() { :; }; export -f python timeout rm cp; bash results/gpu/run.sh')
    run = subprocess.run(["bash", "-c", shims], cwd=HERE, env=dict(os.environ, OUT=str(tmp_path / "out")),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    commands = [line.split("\0")[:-1] for line in log.read_text().split("\n") if line]
    scripts = [argv[0] for argv in commands if argv[0].endswith(".py")]
    assert scripts == ["bench.py"] + ["train_scifar.py"] * 4, commands
    for argv in commands:
        if argv[0] == "bench.py":
            bench.build_parser().parse_args(argv[1:])
        elif argv[0] == "train_scifar.py":
            ts.parse_args(argv[1:])
        else:
            assert argv[0] in ("-m", "-c"), argv  # the test suite, and one-line prints
