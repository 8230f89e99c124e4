"""A plain eager fp32 PyTorch training loop: the yardstick the kit's step is compared with.

It trains the way Maou 0.2.0 does once its always-on anomaly switch is off: a per-row torch Dataset, a DataLoader
that collates rows into batches (shuffled), forward, loss, backward, gradient clipping, AdamW step, zero_grad, and
the loss read back (`.item()`) every step. Same network, same loss function and same rows as the kit's step, so
the comparison is at equal work. `benchmarks/step.py` runs it side by side with the kit.
"""
from __future__ import annotations

import time

import torch
from torch.utils.data import DataLoader, Dataset

from maou_nb.train import stage3_losses


class RowDataset(Dataset):
    """One training row at a time (what a plain PyTorch loader asks for), from the kit's Stage 3 dataset."""
    def __init__(self, rows):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {k: v[0] for k, v in self.rows[[i]].items() if k != "_rows"}


def reference_batches(rows, batch_size: int, seed: int = 0):
    """Endless shuffled batches from a plain DataLoader (default collate, no workers)."""
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(RowDataset(rows), batch_size=batch_size, shuffle=True, generator=g, drop_last=True)
    while True:
        yield from loader


def reference_step(model, optimizer, batch: dict, clip: float = 1.0) -> float:
    """forward -> loss -> backward -> clip -> step -> zero_grad; the loss as a float."""
    out = model(batch["board"], batch["hand"])
    loss = stage3_losses(out, batch, 0.0, 1.0, 1.0)["loss"]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def reference_optimizer(model) -> torch.optim.Optimizer:
    """AdamW with torch's defaults except the kit's learning rate and weight decay."""
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)


def timed_reference(model, optimizer, batches, steps: int) -> tuple[float, float, list[float]]:
    """(wall seconds, CPU seconds of this process, losses) of `steps` reference steps, data loading included."""
    t0, c0, losses = time.perf_counter(), time.process_time(), []
    for _ in range(steps):
        losses.append(reference_step(model, optimizer, next(batches)))
    return time.perf_counter() - t0, time.process_time() - c0, losses
