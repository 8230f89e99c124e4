"""A quick probe of single speed levers on the bare training step (no engine, an in-memory random batch): the kit's
resnet at Maou 0.2.0's size, eager fp32 against channels-last, bf16 autocast, both, foreach / fused AdamW and
torch.compile (inductor; `warm_s` includes the compile). One JSON line per lever: median seconds a step.

Usage: python benchmarks/levers.py [BATCH] [ref,cl,bf16,cl_bf16,foreach,fused,compile,cl_bf16_compile]
"""
import copy
import json
import sys
import time

import torch

from maou_nb.model import build_train_model
from maou_nb.train import stage3_losses
torch.manual_seed(0)
B = int(sys.argv[1]) if len(sys.argv) > 1 else 64
which = sys.argv[2].split(",") if len(sys.argv) > 2 else ["ref", "cl", "bf16", "cl_bf16", "foreach", "fused"]
net0 = build_train_model("resnet", ["3"], {"resnet_widths": [29, 58, 116, 174], "resnet_blocks": [2, 2, 2, 1]})
print("params", sum(p.numel() for p in net0.parameters()))
board = torch.randint(0, 29, (B, 9, 9)); hand = torch.randint(0, 3, (B, 14))
pol = torch.rand(B, 1496); val = torch.rand(B)
batch = {"board": board, "hand": hand, "policy": pol, "value": val}
def run(name, steps=6, warm=2):
    net = copy.deepcopy(net0)
    cl = "cl" in name; bf = "bf16" in name
    if cl: net = net.to(memory_format=torch.channels_last)
    kw = {"foreach": True} if "foreach" in name else {"fused": True} if "fused" in name else {"foreach": False}
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, **kw)
    fwd = torch.compile(net) if "compile" in name else net
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf):
            out = fwd(board, hand)
        l = stage3_losses(out, batch, 0.0, 1.0, 1.0)["loss"]
        l.backward(); torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0); opt.step(); opt.zero_grad(set_to_none=True)
        return l
    t0 = time.perf_counter()
    for _ in range(warm): step()
    tw = time.perf_counter() - t0
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter(); step(); ts.append(time.perf_counter() - t0)
    ts.sort()
    return {"name": name, "B": B, "median_s": ts[len(ts)//2], "samples_per_s": B / ts[len(ts)//2], "warm_s": round(tw, 2)}
for n in which:
    print(json.dumps(run(n)), flush=True)
