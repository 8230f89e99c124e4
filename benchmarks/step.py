"""The kit's Stage 3 training step against a plain eager fp32 PyTorch loop (benchmarks/reference_loop.py), side by
side in one run: samples/s, the split of a step into data wait / forward / backward / optimiser, the achieved FLOP
rate (torch.utils.flop_counter) as a fraction of the machine's peak, and each speed lever on its own. Prints JSON.

Usage: python benchmarks/step.py [--sizes maou,small,default] [--batches 64,256] [--variants ...] [--rounds 3]
Variants are engine configs (TrainConfig overrides) timed in alternating rounds with the reference; medians and
bests of wall-clock samples/s, and samples per CPU-second of this process (on a shared machine the steadiest
measure of the work a step costs; run with --threads 1 so that no OpenMP thread spins) are reported.
Data: real positions (seeded random cshogi games -> HCPE -> preprocess), as benchmarks/training.py makes them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_loop import reference_batches, reference_optimizer, timed_reference  # noqa: E402
from training import temporary_data  # noqa: E402

from maou_nb.config import TrainConfig
from maou_nb.model import build_train_model, count_parameters
from maou_nb.train import TrainRun, conv_channels_last, seed_everything, stage_trainer

SIZES = {"maou": ("resnet", None, {"resnet_widths": [29, 58, 116, 174], "resnet_blocks": [2, 2, 2, 1]}),  # Maou 0.2.0: 2,566,635
         "small": ("resnet", "small", {}), "default": ("resnet", None, {})}
VARIANTS = {"kit": {"channels_last": False}, "channels_last": {"channels_last": True}, "bf16": {"amp": True, "channels_last": False},
            "channels_last+bf16": {"channels_last": True, "amp": True}}   # kit: the settings before channels_last was the default


def cpu_peak() -> dict:
    """fp32 and bf16 peak FLOP/s of this CPU: cores x FMA pipes x fp32 lanes x 2 x clock (clock from /proc/cpuinfo).
    AMD Zen 4 (AVX-512 with avx512_bf16 on EPYC): 2 FMA pipes of 256 bits = 16 fp32 FMAs a cycle a core; bf16 dot
    products (VDPBF16PS) do twice that. Other CPUs: the same formula with 2 x 512-bit pipes assumed."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    mhz = [float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")]
    clock = (mhz[0] if mhz else 2500.0) * 1e6
    amd = "AuthenticAMD" in info or "AMD" in info
    lanes = 8 if amd else 16                      # fp32 lanes of one FMA pipe
    cores = len(os.sched_getaffinity(0))
    fp32 = cores * 2 * lanes * 2 * clock
    return {"cores": cores, "clock_ghz": round(clock / 1e9, 3), "fma_pipes": 2, "fp32_lanes_per_pipe": lanes,
            "fp32_gflops": round(fp32 / 1e9, 1), "bf16_gflops": round(2 * fp32 / 1e9, 1),
            "formula": "cores x 2 FMA pipes x fp32 lanes x 2 FLOP x clock (bf16: x2)"}


def train_flops(model, batch: dict) -> int:
    """FLOPs of one forward + backward of `model` on `batch` (torch's FlopCounter)."""
    from maou_nb.train import stage3_losses
    with FlopCounterMode(display=False) as counter:
        out = model(batch["board"], batch["hand"])
        stage3_losses(out, batch, 0.0, 1.0, 1.0)["loss"].backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


class KitStep:
    """The engine's step (StageTrainer) on its own loader, timed in parts."""
    def __init__(self, data: Path, size: str, batch: int, overrides: dict, out: Path):
        arch, preset, model_config = SIZES[size]
        self.c = TrainConfig(stage="3", stage3_data=str(data), model=arch, preset=preset, model_config=model_config,
                             batch_size=batch, device="cpu", out_dir=str(out), log_every=10**9, **overrides)
        seed_everything(0)
        net = build_train_model(arch, ["3"], model_config, preset)
        if self.c.channels_last:
            conv_channels_last(net)
        self.run = TrainRun(out, self.c)
        self.tr = stage_trainer("3", self.c, net, self.run.log, "cpu", progress=False)
        self.batches = self._batches()
        self.parts = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}

    def _batches(self):
        for epoch in range(10**6):
            yield from self.tr.epoch_batches(epoch)

    def steps(self, n: int) -> tuple[float, float, list[float]]:
        """(wall seconds, CPU seconds, losses) of `n` full engine steps (tr.backward + tr.optimizer_step, as
        fit_stage calls them)."""
        t0, c0, losses = time.perf_counter(), time.process_time(), []
        for _ in range(n):
            losses.append(self.tr.backward(next(self.batches), 0)["loss"])
            self.tr.optimizer_step()
        return time.perf_counter() - t0, time.process_time() - c0, losses

    def split(self, n: int) -> dict:
        """Mean seconds of each part of a step over `n` steps (the same calls, with clocks between them)."""
        tr, spent = self.tr, dict.fromkeys(self.parts, 0.0)
        for _ in range(n):
            t0 = time.perf_counter()
            batch = next(self.batches)
            t1 = time.perf_counter()
            with tr.autocast():
                out = tr.forward(batch["board"], batch["hand"])
            loss = tr.spec.losses(out, batch)["loss"]
            t2 = time.perf_counter()
            loss.backward()
            t3 = time.perf_counter()
            tr.optimizer_step()
            t4 = time.perf_counter()
            for k, dt in zip(spent, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                spent[k] += dt / n
        return {k: round(v, 4) for k, v in spent.items()}


def compare(data: Path, size: str, batch: int, variants: list[str], rounds: int, steps: int, tmp: Path) -> dict:
    """Reference loop and engine variants at one size and batch, in alternating rounds; medians."""
    arch, preset, model_config = SIZES[size]
    seed_everything(0)
    ref_model = build_train_model(arch, ["3"], model_config, preset)
    ref_opt = reference_optimizer(ref_model)
    kits = {v: KitStep(data, size, batch, VARIANTS[v], tmp / f"{size}-{batch}-{v}") for v in variants}
    rows = kits[variants[0]].tr.train_ds
    ref_batches = reference_batches(rows, batch)
    flops = train_flops(ref_model, next(ref_batches)) / batch            # per sample, forward + backward
    timed_reference(ref_model, ref_opt, ref_batches, 2)                   # warm-up
    for k in kits.values():
        k.steps(2)
    rates = {"reference": [], **{v: [] for v in variants}}
    cpu = {name: [] for name in rates}                                      # samples per CPU-second of this process
    for _ in range(rounds):
        wall, cpu_s, _ = timed_reference(ref_model, ref_opt, ref_batches, steps)
        rates["reference"].append(steps * batch / wall)
        cpu["reference"].append(steps * batch / cpu_s)
        for v, k in kits.items():
            wall, cpu_s, _ = k.steps(steps)
            rates[v].append(steps * batch / wall)
            cpu[v].append(steps * batch / cpu_s)
    peak = cpu_peak()
    out = {"size": size, "parameters": count_parameters(ref_model)["total"], "batch": batch,
           "train_mflop_per_sample": round(flops / 1e6, 1), "results": {}}
    ref, ref_best = float(np.median(rates["reference"])), max(rates["reference"])
    ref_cpu = float(np.median(cpu["reference"]))
    for name, r in rates.items():
        rate = float(np.median(r))
        bf16 = name != "reference" and VARIANTS[name].get("amp")
        entry = {"samples_per_s": round(rate, 1), "vs_reference": round(rate / ref, 2),
                 "best_samples_per_s": round(max(r), 1), "best_vs_reference": round(max(r) / ref_best, 2),
                 "rounds": [round(x, 1) for x in r],
                 "samples_per_cpu_s": round(float(np.median(cpu[name])), 1),
                 "cpu_vs_reference": round(float(np.median(cpu[name])) / ref_cpu, 2),
                 "gflop_per_cpu_s": round(float(np.median(cpu[name])) * flops / 1e9, 1),
                 "fraction_of_core_peak": round(float(np.median(cpu[name])) * flops / 1e9 * peak["cores"]
                                                / peak["bf16_gflops" if bf16 else "fp32_gflops"], 3), "achieved_gflops": round(rate * flops / 1e9, 2),
                 "fraction_of_peak": round(rate * flops / 1e9 / peak["bf16_gflops" if bf16 else "fp32_gflops"], 3)}
        if name != "reference":
            entry["split_s"] = kits[name].split(max(2, steps // 2))
        out["results"][name] = entry
    for k in kits.values():
        k.run.log.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="maou,small")
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="steps per timed round")
    ap.add_argument("--games", type=int, default=40)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with temporary_data(args.games) as (tmp, pre):
        results = [compare(pre, size, int(b), args.variants.split(","), args.rounds, args.steps, tmp)
                   for size in args.sizes.split(",") for b in args.batches.split(",")]
    print(json.dumps({"benchmark": "step", "machine": {"cpu": platform.processor() or platform.machine(),
                      "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "load_average_at_end": os.getloadavg(), "peak": cpu_peak()}, "results": results}, indent=1))


if __name__ == "__main__":
    main()
