"""The training engine on real data made by real code: random cshogi games -> HCPE -> preprocess / stage data."""
import json
import math

import cshogi
import numpy as np
import pytest
import torch
import yaml

from maou_nb.preprocess import make_stage1_data, make_stage2_data, preprocess
from maou_nb.records import random_games
from maou_nb.storage import HCPE_DTYPE, load_array, load_checkpoint, save_array, save_hcpe, write_manifest, read_manifest
from maou_nb.model import ShogiNet
from maou_nb.config import SCHEDULERS, ConfigError, TrainConfig, scheduler_name
from maou_nb.train import (NonFiniteLossError, StageThresholdError, cpu_has_native_bf16, multilabel_metrics,
                            stage_gate, summarise, train)

TINY = {"device": "cpu", "model": "resnet", "preset": "small", "model_config": {"resnet_widths": [8, 8, 8, 8]},
        "batch_size": 128, "log_every": 1}
TINY_VIT = {"vit_embed_dim": 32, "vit_num_layers": 1, "vit_num_heads": 2}  # keeps dropout (0.1): RNG state matters


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Folders of real data: HCPE, preprocessed (2 shards), Stage 1 curriculum, Stage 2 labels."""
    root = tmp_path_factory.mktemp("data")
    hcpe, ids = random_games(24, seed=0, branching=None, min_plies=40, max_plies=41)  # 40 plies a game
    half = len(hcpe) // 2
    save_hcpe(root / "hcpe" / "a.npy", hcpe[:half], ids[:half])
    save_hcpe(root / "hcpe" / "b.npy", hcpe[half:], ids[half:])
    write_manifest(root / "hcpe", "hcpe", [root / "hcpe" / "a.npy", root / "hcpe" / "b.npy"], rows=len(hcpe))
    preprocess(root / "hcpe", root / "pre", rows_per_shard=(len(hcpe) // 2) + 1, progress=False)
    make_stage2_data(root / "hcpe", root / "stage2", progress=False)
    make_stage1_data(root / "stage1")
    return root


def run_config(data, tmp_path, **overrides) -> dict:
    """A tiny Stage 3 run config on the preprocessed data."""
    return {**TINY, "stage": 3, "stage3_data": str(data / "pre"), "out_dir": str(tmp_path / "run"), "epoch": 2,
            **overrides}


# ---------------------------------------------------------------- configuration

@pytest.mark.parametrize("bad, words", [
    ({"learning_rte": 0.1}, ["learning_rte", "learning_rate"]),
    ({"batch_size": 0}, ["batch_size=0", "an int >= 1"]),
    ({"batch_size": "64"}, ["batch_size='64'", "int"]),
    ({"freeze_backbone": 1}, ["freeze_backbone=1", "bool"]),
    ({"test_ratio": 1.5}, ["test_ratio=1.5", "> 0 and < 1"]),
    ({"optimizer": "adam"}, ["optimizer='adam'", "adamw", "sgd"]),
    ({"optimizer_beta1": 0.999, "optimizer_beta2": 0.9}, ["optimizer_beta1", "optimizer_beta2"]),
    ({"gce_parameter": 1.5}, ["gce_parameter=1.5"]),
    ({"value_loss_ratio": 0.0}, ["value_loss_ratio=0.0", "a number > 0"]),
    ({"momentum": 2.0}, ["momentum=2.0", ">= 0 and <= 1"]),
    ({"stage": 5}, ["stage='5'", "all"]),
    ({"early_stopping_metric": "acc"}, ["early_stopping_metric", "total", "policy", "value"]),
    ({"start_epoch": 3, "epoch": 3}, ["start_epoch=3", "epoch=3"]),
])
def test_bad_parameters_fail_naming_key_value_and_allowed(data, tmp_path, bad, words):
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict(run_config(data, tmp_path, **bad))
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_missing_or_wrong_data_and_resume_files_fail_before_compute(data, tmp_path):
    with pytest.raises(ConfigError, match="stage1_data=None"):
        TrainConfig.from_dict({**TINY, "stage": "all", "stage2_data": str(data / "stage2"), "stage3_data": str(data / "pre")})
    with pytest.raises(ConfigError, match="no such folder"):
        TrainConfig.from_dict(run_config(data, tmp_path, stage3_data=str(tmp_path / "nowhere")))
    with pytest.raises(ConfigError, match="'stage2' data but 'stage1'"):
        TrainConfig.from_dict({**TINY, "stage": 1, "stage1_data": str(data / "stage2")})
    with pytest.raises(ConfigError, match="'hcpe' data but 'preprocessed'"):
        TrainConfig.from_dict(run_config(data, tmp_path, stage3_data=str(data / "hcpe")))
    with pytest.raises(ConfigError, match="resume_backbone_from"):
        TrainConfig.from_dict(run_config(data, tmp_path, resume_backbone_from=str(tmp_path / "x.pt")))
    with pytest.raises(ConfigError, match="resume_from"):
        train(run_config(data, tmp_path, resume_from=str(tmp_path / "run")), progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_yaml_params_and_round_trip(data, tmp_path):
    params = run_config(data, tmp_path, lr_scheduler="cosine_annealing_lr", policy_target="winrate")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    config = TrainConfig.from_yaml(tmp_path / "p.yaml")
    assert config.lr_scheduler == "CosineAnnealingLR" and config.policy_target == "win_rate"
    assert TrainConfig.from_dict(config.to_dict()) == config
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**params, "epochs": 3}))
    with pytest.raises(ConfigError, match=r"bad.yaml.*'epochs'.*'epoch'"):
        TrainConfig.from_yaml(tmp_path / "bad.yaml")


def test_scheduler_names():
    for spelling in ["Warmup+CosineDecay", "warmup+cosinedecay", "warmup_cosine_decay", "WARMUP-COSINE-DECAY"]:
        assert scheduler_name(spelling) == "Warmup+CosineDecay"
    for spelling in ["CosineAnnealingLR", "cosineannealinglr", "cosine_annealing_lr"]:
        assert scheduler_name(spelling) == "CosineAnnealingLR"
    with pytest.raises(ConfigError) as e:
        TrainConfig(lr_scheduler="StepLR")
    assert all(name in str(e.value) for name in SCHEDULERS)


# ---------------------------------------------------------------- stage thresholds

def test_all_zero_predictor_fails_default_stage2_threshold(data):
    from maou_nb.datasets import open_stage_data
    ds = open_stage_data(2, data / "stage2")
    legal = ds[np.arange(len(ds))]["legal"]
    zeros = summarise(multilabel_metrics(torch.full_like(legal, -10.0), legal, torch.tensor(0.0)))
    perfect = summarise(multilabel_metrics(legal * 20 - 10, legal, torch.tensor(0.0)))
    config = TrainConfig()
    gate, _ = stage_gate("2", config.stage_metric)
    assert zeros["accuracy"] > config.stage2_threshold   # plain element-wise accuracy would pass all zeros ...
    assert gate(zeros) < config.stage2_threshold         # ... the default Stage 2 gate does not
    assert gate(perfect) == 1.0


def test_stage1_learns_the_curriculum_to_099_with_the_small_preset(data, tmp_path):
    config = {"stage": 1, "stage1_data": str(data / "stage1"), "model": "resnet", "preset": "small", "batch_size": 32,
              "learning_rate": 3e-3, "stage1_max_epochs": 40, "device": "cpu", "out_dir": str(tmp_path / "run"),
              "log_every": 1000}
    result = train(config, progress=False).stages["1"]
    assert result["stopped"] == "threshold" and result["metrics"]["accuracy"] >= 0.99, result
    assert result["metrics"]["f1"] > 0.9                                   # not the all-zero plateau (0.90)


def test_stage_missing_threshold_stops_with_achieved_required_and_hint(data, tmp_path):
    config = {**TINY, "stage": 1, "stage1_data": str(data / "stage1"), "out_dir": str(tmp_path / "run"),
              "stage1_max_epochs": 1, "stage1_threshold": 1.0, "batch_size": 256}
    with pytest.raises(StageThresholdError) as e:
        train(config, progress=False)
    msg = str(e.value)
    assert "required >= 1.0" in msg and "accuracy = 0." in msg and "stage1_max_epochs" in msg and "stage1_threshold" in msg
    assert (tmp_path / "run" / "checkpoints" / "last.pt").is_file()


# ---------------------------------------------------------------- resume, checkpoints, telemetry

def test_resume_after_kill_is_bit_exact(data, tmp_path):
    config = run_config(data, tmp_path, save_every=3, ema_decay=0.9, model="vit", model_config=TINY_VIT, epoch=2)
    straight = []
    result = train({**config, "out_dir": str(tmp_path / "a")}, progress=False,
                   callback=lambda info: straight.append((info["global_step"], info["loss"])))
    n = len(straight)
    assert n >= 6

    class Killed(Exception):
        pass

    def kill_after_half(info):
        if info["global_step"] == n // 2 + 1:
            raise Killed

    with pytest.raises(Killed):
        train({**config, "out_dir": str(tmp_path / "b")}, progress=False, callback=kill_after_half)
    saved = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")
    resumed = []
    result_b = train({**config, "out_dir": str(tmp_path / "b"), "resume_from": str(tmp_path / "b")}, progress=False,
                     callback=lambda info: resumed.append((info["global_step"], info["loss"])))
    assert resumed[0][0] == saved["global_step"] + 1 <= n // 2 + 1
    assert resumed == straight[saved["global_step"]:]              # same batches, same losses, step for step
    a = load_checkpoint(result.last_checkpoint)["model"]
    b = load_checkpoint(result_b.last_checkpoint)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert result.stages["3"]["metrics"] == result_b.stages["3"]["metrics"]


def test_checkpoint_contents_and_telemetry(data, tmp_path):
    from maou_nb.model import load_model
    result = train(run_config(data, tmp_path, epoch=1, log_every=2, tensorboard_histogram_frequency=2,
                              tensorboard_histogram_module="policy"), progress=False)
    run = tmp_path / "run"
    payload = load_checkpoint(result.last_checkpoint)
    for key in ("arch", "model_config", "model", "ema", "optimizer", "scheduler", "scaler", "epoch", "step",
                "rng", "sampler", "params", "maou_nb"):
        assert key in payload, key
    assert not any("_orig_mod." in k for k in payload["model"])
    assert TrainConfig.from_dict(payload["params"]).stage3_data == str(data / "pre")
    assert (run / "checkpoints" / "best.pt").is_file() and (run / "checkpoints" / "stage3.pt").is_file()
    model = load_model(result.last_checkpoint)
    assert all(torch.equal(v, payload["model"][k]) for k, v in model.state_dict().items())
    stats = json.loads((run / "stats.json").read_text())
    for key in ("step", "epoch", "stage", "lr", "elapsed_s", "eta_s", "timestamp"):
        assert key in stats, key
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    val = [r for r in records if r["kind"] == "val"]
    assert train_records and all(r["step"] % 2 == 0 and r["samples_per_s"] > 0 for r in train_records)
    assert len(val) == 1 and {"policy_loss", "top1", "top5", "value_loss", "value_accuracy", "brier"} <= set(val[0])
    assert list((run / "logs" / "run").glob("events.out.tfevents.*"))  # TensorBoard names the run by its folder
    assert json.loads((run / "params.json").read_text())["epoch"] == 1


def test_non_finite_loss_stops_naming_step_shard_and_checkpoint(data, tmp_path):
    bad = tmp_path / "bad"
    manifest = read_manifest(data / "pre")
    for name in manifest["shards"]:
        records = np.array(load_array(data / "pre" / name))
        moves = load_array(data / "pre" / name.replace(".npy", ".moves.npy"))
        if name == manifest["shards"][-1]:
            records["value"] = np.nan                                  # a corrupt shard
        save_array(bad / name, records)
        save_array(bad / name.replace(".npy", ".moves.npy"), np.array(moves))
    write_manifest(bad, "preprocessed", [bad / s for s in manifest["shards"]],
                   **{k: v for k, v in manifest.items() if k not in ("kind", "shards", "maou_nb")})
    with pytest.raises(NonFiniteLossError) as e:
        train(run_config(data, tmp_path, stage3_data=str(bad), save_every=1), progress=False)
    msg = str(e.value)
    assert manifest["shards"][-1] in msg and "step 1" in msg and "none written yet" in msg
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ---------------------------------------------------------------- freezing, HCPE input, stage="all"

def test_freeze_backbone_keeps_backbone_bit_identical(data, tmp_path):
    from maou_nb.model import build_model, part_state_dict
    from maou_nb.train import seed_everything
    result = train(run_config(data, tmp_path, epoch=1, freeze_backbone=True, max_steps=2), progress=False)
    assert result.stopped == "max_steps"
    trained = load_checkpoint(result.last_checkpoint)
    seed_everything(0)                                                 # the run's seed: the same initial weights
    initial = build_model(trained["arch"], **trained["model_config"])
    params = {name for name, _ in initial.named_parameters()}          # parameters, not BatchNorm statistics
    backbone = [k for k in part_state_dict(initial, "backbone") if k in params]
    heads = [k for part in ("policy", "value") for k in part_state_dict(initial, part)]
    assert backbone and heads
    assert all(torch.equal(initial.state_dict()[k], trained["model"][k]) for k in backbone)
    assert all(not torch.equal(initial.state_dict()[k], trained["model"][k]) for k in heads)


def test_trainable_layers_out_of_range_fails_early(data, tmp_path):
    with pytest.raises(ConfigError, match="trainable_layers=5.*4 layer groups"):
        TrainConfig.from_dict(run_config(data, tmp_path, trainable_layers=5))
    with pytest.raises(ConfigError, match="model_config"):
        TrainConfig.from_dict(run_config(data, tmp_path, model_config={"vit_num_layers": 2}))


def test_stage3_from_hcpe_shards(data, tmp_path):
    result = train(run_config(data, tmp_path, stage3_data=str(data / "hcpe"), input_format="hcpe", epoch=1,
                              dataloader_workers=1), progress=False)
    metrics = result.stages["3"]["metrics"]
    assert math.isfinite(metrics["policy_loss"]) and 0 <= metrics["top1"] <= metrics["top5"] <= 1


def test_stage_all_hands_one_backbone_on(data, tmp_path, monkeypatch):
    asked = []                                   # the heads each forward of the run computed
    forward = ShogiNet.forward
    def recording(self, board, hand, heads=None):
        out = forward(self, board, hand, heads)
        asked.append(tuple(out))
        return out
    monkeypatch.setattr(ShogiNet, "forward", recording)
    config = {**TINY, "stage": "all", "stage1_data": str(data / "stage1"), "stage2_data": str(data / "stage2"),
              "stage3_data": str(data / "pre"), "out_dir": str(tmp_path / "run"), "batch_size": 128,
              "stage1_threshold": 0.5, "stage2_threshold": 0.01, "stage2_batch_size": 64, "epoch": 1,
              "stage1_batch_size": 256}
    result = train(config, progress=False)
    assert list(result.stages) == ["1", "2", "3"]
    assert set(asked) == {("reachable",), ("legal",), ("policy", "value")}   # each stage runs its own heads only
    ckpt = {s: load_checkpoint(result.stages[s]["checkpoint"])["model"] for s in "123"}
    reach = [k for k in ckpt["1"] if "reachable" in k]
    backbone = [k for k in ckpt["1"] if not any(h in k for h in ("reachable", "legal", "policy", "value"))
                and ckpt["1"][k].is_floating_point()]
    assert reach and backbone
    assert all(torch.equal(ckpt["1"][k], ckpt["2"][k]) for k in reach)     # Stage 2 left Stage 1's head alone
    assert any(not torch.equal(ckpt["1"][k], ckpt["2"][k]) for k in backbone)  # ... and trained the same backbone
    assert result.stages["1"]["metrics"]["accuracy"] >= 0.5
    # a later Stage 3 can start from the stage checkpoints' parts
    later = train({**TINY, "stage": 3, "stage3_data": str(data / "pre"), "out_dir": str(tmp_path / "later"),
                   "epoch": 1, "max_steps": 1, "freeze_backbone": True,
                   "resume_backbone_from": result.stages["2"]["checkpoint"]}, progress=False)
    start = load_checkpoint(later.last_checkpoint)["model"]
    params = [k for k in backbone if "running" not in k]
    assert all(torch.equal(start[k], ckpt["2"][k]) for k in params)


# ---------------------------------------------------------------- kills at every write boundary

# Runs training jobs in forked children of one process (torch imported once) and kills a child with SIGKILL right
# after (or, with `before`, just before) its k-th rename onto a file whose name matches a pattern: every write of
# a checkpoint is one such rename, so each k is one write boundary. A job's out_dir is rerun the way the pipeline
# reruns a command: with resume_from when checkpoints/last.pt exists.
KILL_DRIVER = r'''
import fnmatch, itertools, json, os, signal, sys, traceback
from pathlib import Path
import torch
from maou_nb.train import train
torch.optim.AdamW([torch.zeros(1, requires_grad=True)])   # torch's lazy imports, once, before forking

def kill_at(pattern, k, before):
    real, seen = os.replace, [0]
    def replace(src, dst):
        hit = fnmatch.fnmatch(Path(dst).name, pattern)
        seen[0] += hit
        if hit and seen[0] == k and before:
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst)
        if hit and seen[0] == k:
            os.kill(os.getpid(), signal.SIGKILL)
    return replace

def run(config, kill):
    """Exit status of one training run in a child: -9 when the kill came, 0 when it finished, 1 on an error."""
    pid = os.fork()
    if pid == 0:
        try:
            out = Path(config["out_dir"])
            if (out / "checkpoints" / "last.pt").is_file():
                config = {**config, "resume_from": str(out)}
            if kill:
                os.replace = kill_at(*kill)
            train(config, progress=False)
            os._exit(0)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)

def job(config, pattern, before, k):
    """[k, status of the run killed at write k, status of its rerun (None if it was not killed)]."""
    job = {**config, "out_dir": f"{config['out_dir']}/k{k}"}
    killed = run(job, (pattern, k, before))
    return [k, killed, run(job, None) if killed == -signal.SIGKILL else None]

def start(*args):
    """job(*args) in a forked child, its answer coming back through a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.write(w, json.dumps(job(*args)).encode())
        os._exit(0)
    os.close(w)
    return pid, r

def answer(pid, r):
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data) if data else [None, 1, None]

# Two jobs at a time (one thread each): a 2-core machine sweeps in about half the time. The sweep ends with the
# first k past the run's last write (job k ran uninterrupted: the reference); answers after it are dropped.
config, pattern, before, only = json.loads(sys.argv[1])
ks, results = iter(sorted(only)) if only else itertools.count(1), []
while not results or results[-1][1] == -signal.SIGKILL:
    batch = list(itertools.islice(ks, 2))
    if not batch:
        break
    for k, killed, resumed in [answer(*c) for c in [start(config, pattern, before, k) for k in batch]]:
        if not results or results[-1][1] == -signal.SIGKILL:
            results.append([k, killed, resumed])
print(json.dumps(results))
'''


def kill_and_resume(config: dict, pattern: str = "*.pt", before: bool = False, only: list[int] | None = None):
    """[k, status of the run killed at write k, status of its rerun] for each k (see KILL_DRIVER)."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", KILL_DRIVER, json.dumps([config, pattern, before, only or []])],
                         capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1]), out.stderr


def same(a, b, dirs: tuple[str, str], where="") -> list[str]:
    """Where two checkpoint payloads differ: tensors bit for bit, paths relative to their run folders `dirs`;
    left out: the run token, timings, and `params` (a rerun adds `resume_from`)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        return [] if ok else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a if k not in ("run_token", "seconds", "params") for d in same(a[k], b[k], dirs, f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: lengths {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in same(x, y, dirs, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return []
    if isinstance(a, str) and isinstance(b, str):
        a, b = a.replace(dirs[0], "<run>"), b.replace(dirs[1], "<run>")
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def telemetry(run) -> list[tuple]:
    """metrics.jsonl without its timings."""
    drop = {"elapsed_s", "timestamp", "samples_per_s"}
    return [tuple(sorted((k, v) for k, v in json.loads(line).items() if k not in drop))
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(reference, run):
    """Same checkpoints (every tensor bit for bit), same telemetry, no temporaries left."""
    names = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == names, run
    for name in names:
        diff = same(load_checkpoint(reference / "checkpoints" / name), load_checkpoint(run / "checkpoints" / name),
                    (str(reference), str(run)))
        assert not diff, (run, name, diff[:5])
    assert telemetry(run) == telemetry(reference), run
    assert not [p for p in run.rglob(".*.tmp")], run


def stage_all_config(data, tmp_path, **overrides) -> dict:
    """All three stages with EMA and save_every: 18 checkpoint writes. Stage 1 meets its threshold at its last
    allowed epoch, Stage 2 before its last; Stage 3 improves at both of its epochs."""
    return {**TINY, "stage": "all", "stage1_data": str(data / "stage1"), "stage2_data": str(data / "stage2"),
            "stage3_data": str(data / "pre"), "out_dir": str(tmp_path / "runs"), "batch_size": 256,
            "stage1_batch_size": 512, "stage1_threshold": 0.5, "stage1_max_epochs": 1, "stage2_threshold": 0.01,
            "stage2_max_epochs": 3, "epoch": 2, "save_every": 3, "ema_decay": 0.9, **overrides}


def check_sweep(results, log, tmp_path, n_writes):
    """Every run killed at write k < n resumed; the run for k = n (past the last write) is the reference."""
    *killed, (last_k, finished, _) = results
    assert finished == 0 and len(killed) == n_writes, (results, log[-3000:])
    assert all(status == -9 and resumed == 0 for _, status, resumed in killed), (results, log[-3000:])
    reference = tmp_path / "runs" / f"k{last_k}"
    for k, _, _ in killed:
        assert_same_run(reference, tmp_path / "runs" / f"k{k}")
    return reference


def test_kill_at_every_checkpoint_write_resumes_to_the_same_run(data, tmp_path):
    results, log = kill_and_resume(stage_all_config(data, tmp_path))
    reference = check_sweep(results, log, tmp_path, 18)
    stages = load_checkpoint(reference / "checkpoints" / "last.pt")["stage_results"]
    assert stages["1"]["epochs"] == 1 and stages["2"]["epochs"] == 1      # met at the last / before the last epoch
    records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    val3 = [r["loss"] for r in records if r["kind"] == "val" and r["stage"] == "3"]
    assert len(val3) == 2 and load_checkpoint(reference / "checkpoints" / "best.pt")["best"] == min(val3)


def test_kill_with_a_write_half_done_leaves_no_temporary_and_resumes(data, tmp_path):
    """Killed with the temporary complete but not renamed: best.pt, stage1.pt, a mid-epoch last.pt, stage3.pt."""
    results, log = kill_and_resume(stage_all_config(data, tmp_path), before=True, only=[2, 4, 6, 17, 99])
    check_sweep(results, log, tmp_path, 4)


def test_kill_after_stage_checkpoint_when_threshold_met_at_last_epoch(data, tmp_path):
    """Found broken: every rerun crashed with KeyError: 'accuracy' (it ran zero epochs and gated on no metrics)."""
    config = stage_all_config(data, tmp_path, stage="1", stage1_max_epochs=1)
    results, log = kill_and_resume(config, pattern="stage1.pt", only=[1, 99])
    check_sweep(results, log, tmp_path, 1)


def test_kill_after_stage_checkpoint_when_threshold_met_early(data, tmp_path):
    """Found broken: the rerun trained an extra epoch and overwrote stage1.pt."""
    config = stage_all_config(data, tmp_path, stage="1", stage1_max_epochs=3)
    results, log = kill_and_resume(config, pattern="stage1.pt", only=[1, 99])
    reference = check_sweep(results, log, tmp_path, 1)
    assert load_checkpoint(reference / "checkpoints" / "stage1.pt")["epoch"] == 1


def test_kill_after_last_at_final_epoch_keeps_best_and_metrics(data, tmp_path):
    """Found broken: best.pt stayed at an older epoch (export uses it) and Stage 3's metrics came out empty."""
    config = run_config(data, tmp_path, out_dir=str(tmp_path / "runs"), epoch=2)
    results, log = kill_and_resume(config, pattern="last.pt", only=[2, 99])   # the final epoch's last.pt
    reference = check_sweep(results, log, tmp_path, 1)
    best = load_checkpoint(reference / "checkpoints" / "best.pt")
    assert best["epoch"] == 2 and best["val_metrics"]["loss"] == best["best"]
    result = train({**config, "out_dir": str(tmp_path / "runs" / "k2"), "resume_from": str(tmp_path / "runs" / "k2")},
                   progress=False)                                             # nothing left to train: same figures
    assert result.stages["3"]["metrics"] == load_checkpoint(reference / "checkpoints" / "last.pt")["val_metrics"]
    assert result.best_checkpoint == tmp_path / "runs" / "k2" / "checkpoints" / "best.pt"


def test_kill_at_stage_transitions_with_dropout_is_bit_exact(data, tmp_path):
    """ViT keeps dropout on: the RNG state handed across a stage boundary matters."""
    config = stage_all_config(data, tmp_path, model="vit", model_config=TINY_VIT, stage1_batch_size=None)
    results, log = kill_and_resume(config, pattern="stage*.pt")
    check_sweep(results, log, tmp_path, 3)


def test_a_fresh_rerun_writes_the_same_bytes_and_fresh_telemetry(data, tmp_path):
    """The loop's registry knows a model by its SHA-256: retraining the same candidate must give the same file."""
    from maou_nb.storage import sha256_file
    config = run_config(data, tmp_path, epoch=1)
    first = train(config, progress=False)
    digest, lines = sha256_file(first.best_checkpoint), (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    second = train(config, progress=False)
    assert sha256_file(second.best_checkpoint) == digest
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == len(lines)   # not appended twice


def test_full_disk_stops_training_naming_the_path_and_keeps_the_last_checkpoint(data, tmp_path):
    import subprocess
    from maou_nb.storage import StorageError
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2500k", "tmpfs", str(disk)],   # about 2 checkpoints
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up here: {mounted.stderr.strip()}")
    try:
        config = run_config(data, tmp_path, out_dir=str(disk / "run"), epoch=20, save_every=1, max_steps=200)
        with pytest.raises(StorageError) as e:
            train(config, progress=False)
        assert "no space left on device" in str(e.value) and str(disk / "run") in str(e.value), str(e.value)
        last = load_checkpoint(disk / "run" / "checkpoints" / "last.pt")      # the one before the failed write
        assert last["step"] >= 1 and not list((disk / "run").rglob(".*.tmp"))
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


# ---------------------------------------------------------------- curriculum lengths, epoch checkpoints, raw HCPE

def test_stage_fixed_epoch_count_and_minimum_before_the_gate(data, tmp_path):
    """threshold null trains exactly stage1_max_epochs (no gate); a minimum keeps an easy gate from stopping early."""
    base = {**TINY, "stage": 1, "stage1_data": str(data / "stage1"), "batch_size": 256, "log_every": 1000}
    fixed = train({**base, "out_dir": str(tmp_path / "a"), "stage1_threshold": None, "stage1_max_epochs": 2},
                  progress=False).stages["1"]
    assert fixed["epochs"] == 2 and fixed["stopped"] == "epochs" and fixed["threshold"] is None
    easy = {**base, "stage1_threshold": 0.01, "stage1_max_epochs": 3}
    assert train({**easy, "out_dir": str(tmp_path / "b")}, progress=False).stages["1"]["epochs"] == 1
    assert train({**easy, "out_dir": str(tmp_path / "c"), "stage1_min_epochs": 2}, progress=False).stages["1"]["epochs"] == 2
    with pytest.raises(ConfigError, match="stage2_min_epochs=4 exceeds stage2_max_epochs=3"):
        TrainConfig.from_dict({"stage2_min_epochs": 4, "stage2_max_epochs": 3}, check_files=False)


def test_keep_epochs_and_short_warmup(data, tmp_path):
    """keep_epochs=2 keeps the last two Stage 3 epochs beside best/last; warmup_ratio shortens Maou's one-epoch warm-up."""
    result = train(run_config(data, tmp_path, epoch=3, keep_epochs=2, warmup_ratio=0.05), progress=False)
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("epoch*.pt"))
    assert kept == ["epoch2.pt", "epoch3.pt"]
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "epoch3.pt")["epoch"] == 3
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if r["kind"] == "train"]
    steps_per_epoch = result.stages["3"]["steps"] // 3
    assert max(lrs) == pytest.approx(1e-3) and lrs.index(max(lrs)) < steps_per_epoch - 1   # peak inside epoch 1


def test_stage3_from_a_raw_hcpe_file(data, tmp_path):
    """A raw cshogi .hcpe file (no header, no manifest) is Stage 3 data and validation data as it is."""
    rows = np.concatenate([np.asarray(load_array(data / "hcpe" / n)) for n in ("a.npy", "b.npy")])
    rows[: len(rows) // 2].tofile(tmp_path / "train.hcpe")
    rows[len(rows) // 2:].tofile(tmp_path / "val.hcpe")
    result = train(run_config(data, tmp_path, stage3_data=str(tmp_path / "train.hcpe"), input_format="hcpe", epoch=1,
                              stage3_val_data=str(tmp_path / "val.hcpe")), progress=False)
    assert math.isfinite(result.stages["3"]["metrics"]["policy_loss"])
    (tmp_path / "bad.hcpe").write_bytes(b"\0" * 37)
    with pytest.raises(ConfigError, match="bad.hcpe: 37 bytes is not a whole number of 38-byte HCPE records"):
        TrainConfig.from_dict(run_config(data, tmp_path, stage3_data=str(tmp_path / "bad.hcpe"), input_format="hcpe"))


# ---------------------------------------------------------------- speed knobs

def _step_losses(data, tmp_path, name, **overrides) -> list[float]:
    losses = []
    train(run_config(data, tmp_path / name, epoch=1, **overrides), progress=False,
          callback=lambda info: losses.append(info["loss"]))
    return losses


def test_channels_last_is_the_same_maths_and_its_checkpoint_loads_anywhere(data, tmp_path):
    plain = _step_losses(data, tmp_path, "plain", channels_last=False)
    last = _step_losses(data, tmp_path, "cl")                        # the default
    assert len(plain) == len(last) >= 2 and last == pytest.approx(plain, rel=1e-4)
    ckpt = load_checkpoint(tmp_path / "cl" / "run" / "checkpoints" / "best.pt")
    conv = next(v for v in ckpt["model"].values() if v.ndim == 4 and v.shape[-1] > 1)   # a 3x3 conv: unambiguous
    assert conv.is_contiguous(memory_format=torch.channels_last)     # the layout really changed
    plain_conv = next(v for v in load_checkpoint(tmp_path / "plain" / "run" / "checkpoints" / "best.pt")["model"].values()
                      if v.ndim == 4 and v.shape[-1] > 1)
    assert plain_conv.is_contiguous() and not plain_conv.is_contiguous(memory_format=torch.channels_last)
    from maou_nb.model import build_model
    build_model(ckpt["arch"], **ckpt["model_config"]).load_state_dict(ckpt["model"])   # and loads into a plain model


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16 (AVX512-BF16 or AMX): amp trains in fp32 here")
def test_amp_on_cpu_trains_in_bf16(data, tmp_path):
    fp32 = _step_losses(data, tmp_path, "fp32")
    bf16 = _step_losses(data, tmp_path, "bf16", amp=True)
    assert len(bf16) == len(fp32) and all(math.isfinite(x) for x in bf16)
    assert bf16 != fp32                                              # autocast was on (fp32 reproduces itself exactly)
    assert bf16 == pytest.approx(fp32, rel=0.05)                     # and it is the same training within bf16 noise


def test_amp_on_a_cpu_without_native_bf16_trains_in_fp32_and_says_so(data, tmp_path, monkeypatch):
    """Emulated bf16 is slower than fp32: `amp: true` must never make a CPU run slower, so it falls back, warning."""
    fp32 = _step_losses(data, tmp_path, "fp32", max_steps=2)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):   # the CPU's answers, as an older CPU gives them
        monkeypatch.setattr(torch.cpu, probe, lambda: False)
    with pytest.warns(UserWarning, match="no native bf16.*training runs in fp32; set amp: false"):
        fallback = _step_losses(data, tmp_path, "amp", amp=True, max_steps=2)
    assert fallback == fp32                                          # the fp32 step, bit for bit


def test_the_command_makes_waiting_openmp_threads_sleep_unless_told_otherwise():
    """Spinning OpenMP threads collapse a step on busy cores (benchmarks/RESULTS.md): maou-nb sets PASSIVE first."""
    import subprocess
    import sys
    probe = "import os, sys, maou_nb.cli; print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["PASSIVE", "False"]                     # set before torch (and its OpenMP) loaded
    out = subprocess.run([sys.executable, "-c", probe], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == "ACTIVE"


def test_pinned_memory_is_for_cuda_only_and_the_cpu_step_is_unchanged(data, tmp_path):
    """`pin_memory: true` on CPU: no page-locked batches (a CPU-only torch warns on them and gains nothing)."""
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pinned = _step_losses(data, tmp_path, "pinned", pin_memory=True, max_steps=2)
    assert not [w for w in caught if "pin_memory" in str(w.message)], [str(w.message) for w in caught]
    assert len(pinned) == 2 and pinned == _step_losses(data, tmp_path, "default", max_steps=2)   # the same CPU step, bit for bit


def test_lr_scaling_scales_the_rate_with_the_batch_of_a_step(data, tmp_path):
    lrs = {}
    for scaling in ("none", "linear", "sqrt"):
        seen = []
        train(run_config(data, tmp_path / scaling, max_steps=1, lr_scaling=scaling, lr_reference_batch=32,
                         gradient_accumulation_steps=2), progress=False, callback=lambda info: seen.append(info["lr"]))
        lrs[scaling] = seen[0]
    batch_per_step = TINY["batch_size"] * 2                           # 256 rows an optimiser step, 8x the reference
    assert lrs["linear"] == pytest.approx(lrs["none"] * batch_per_step / 32)
    assert lrs["sqrt"] == pytest.approx(lrs["none"] * math.sqrt(batch_per_step / 32))
    line = json.loads((tmp_path / "linear" / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert line["lr"] == pytest.approx(lrs["linear"])                  # the logged rate is the scaled one
