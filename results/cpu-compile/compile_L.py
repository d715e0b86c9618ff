"""What torch.compile does when L changes: time of each call, and the number of compiled graphs.

    OMP_NUM_THREADS=1 python results/cpu-compile/compile_L.py   # from the project folder

compile_L.txt: code of commit 535d854 (the layer's path as at 5955a7e), torch 2.13.0+cpu, 2-core AMD EPYC with two
training runs on the cores, one thread, nice 10; stopped after three lengths (each first call compiles for minutes).
"""
import os, sys, time
import torch, torch._dynamo
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from hope import HOPE
torch.manual_seed(0)
layer = HOPE(128, 64)
compiled = torch.compile(layer)
rows = []
for L in (512, 640, 768, 512, 1024, 896):
    u = torch.randn(8, 128, L, requires_grad=True)
    t0 = time.perf_counter(); compiled(u).square().mean().backward(); first = time.perf_counter() - t0
    ts = []
    for _ in range(3):
        t0 = time.perf_counter(); compiled(u).square().mean().backward(); ts.append(time.perf_counter() - t0)
    es = []
    for _ in range(3):
        t0 = time.perf_counter(); layer(u).square().mean().backward(); es.append(time.perf_counter() - t0)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    print(f"L={L}: first call {first:.1f} s, then {min(ts)*1e3:.0f} ms compiled vs {min(es)*1e3:.0f} ms eager; graphs so far {frames}", flush=True)
