"""Distributed training (DDP, gloo on CPU, loopback only) on real data made by real code.

In pytest, `torch.multiprocessing.spawn` with a file:// rendezvous needs no TCP store; the torchrun tests run inside
a private network namespace (`unshare -n`), because torchrun's rendezvous store listens on every interface."""
import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from maou_nb.preprocess import preprocess
from maou_nb.records import random_games
from maou_nb.storage import load_checkpoint, save_hcpe, write_manifest
from maou_nb.config import ConfigError, TrainConfig
from maou_nb.model import build_train_model
from maou_nb.distributed import Dist, check_world, start_distributed
from maou_nb.telemetry import RunLog
from maou_nb.train import conv_channels_last, stage_trainer, train

# no BatchNorm (its statistics are per rank under DDP) and no dropout: the 2-process run must be the 1-process run
VIT = {"device": "cpu", "model": "vit", "preset": "small", "log_every": 1, "epoch": 2, "stage": "3",
       "model_config": {"vit_embed_dim": 32, "vit_num_layers": 1, "vit_num_heads": 2, "vit_dropout": 0.0}}
TORCHRUN = shutil.which("torchrun")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "MAOU_NB_PROGRESS": "text"}


@pytest.fixture(scope="module")
def pre(tmp_path_factory):
    """A preprocessed folder of real positions (seeded random cshogi games)."""
    root = tmp_path_factory.mktemp("ddp-data")
    hcpe, ids = random_games(6, seed=3, branching=None, min_plies=30, max_plies=31)
    save_hcpe(root / "hcpe" / "a.npy", hcpe, ids)
    write_manifest(root / "hcpe", "hcpe", [root / "hcpe" / "a.npy"], rows=len(hcpe))
    preprocess(root / "hcpe", root / "pre", progress=False)
    return root / "pre"


def _worker(rank: int, world: int, init_file: str, runs: list[dict], rows_file: str | None) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for params in runs:     # one process group for several runs: each process starts once (the costly part)
            train(params, progress=False)
        if rows_file:
            params = runs[0]       # the rows this rank's trainer feeds it in an epoch
            d, _ = start_distributed("cpu")
            c = TrainConfig.from_dict(params)
            tr = stage_trainer("3", c, build_train_model(c.model, ["3"], c.model_config, c.preset),
                               RunLog(Path(rows_file).parent, c, write=False), "cpu", False, d)
            rows = [batch["_rows"].tolist() + [tr.share[0]] for batch in tr.epoch_batches(0)]
            Path(f"{rows_file}.{rank}").write_text(json.dumps(rows))
            # and a ResNet (BatchNorm, channels-last conv weights by default) steps under DDP too
            c = TrainConfig.from_dict({**params, "model": "resnet", "model_config": {}})
            net = conv_channels_last(build_train_model(c.model, ["3"], c.model_config, c.preset))
            tr = stage_trainer("3", c, net, RunLog(Path(rows_file).parent, c, write=False), "cpu", False, d)
            tr.backward(next(tr.epoch_batches(0)), 0)
            tr.optimizer_step()
    finally:
        dist.destroy_process_group()


def spawn_train(runs: list[dict], world: int, tmp_path: Path, rows_file: Path | None = None) -> None:
    """`train(params)` for each of `runs` in turn on `world` processes joined by a file:// rendezvous (no sockets
    listen); forked, so they start with this process's imports instead of loading torch again."""
    init_file = tmp_path / f"rendezvous-{time.monotonic_ns()}"
    mp.start_processes(_worker, args=(world, str(init_file), runs, rows_file and str(rows_file)), nprocs=world,
                       join=True, start_method="fork")


def weights(run: Path, name: str = "last.pt") -> dict:
    return load_checkpoint(run / "checkpoints" / name)["model"]


def assert_same_weights(a: dict, b: dict, atol: float = 2e-4) -> None:
    """Equal within float noise (AdamW magnifies the rounding of near-zero gradients to ~lr/10 per weight)."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=1e-4), (k, (a[k] - b[k]).abs().max())


def train_lines(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_two_processes_of_batch_b_match_one_process_of_2b_and_resume_on_another_world_size(pre, tmp_path):
    params = {**VIT, "stage3_data": str(pre), "batch_size": 32}
    one = train({**params, "out_dir": str(tmp_path / "one")}, progress=False)
    steps = one.stages["3"]["steps"]
    assert steps >= 10
    mixed = {**params, "out_dir": str(tmp_path / "mixed")}     # 1 -> 2 -> 1 processes, stopped mid-epoch each time
    train({**mixed, "max_steps": 3}, progress=False)
    spawn_train([{**params, "out_dir": str(tmp_path / "two")}, {**mixed, "max_steps": 4, "resume_from": mixed["out_dir"]}],
                2, tmp_path, rows_file=tmp_path / "rows")
    ranks = [json.loads(Path(f"{tmp_path / 'rows'}.{r}").read_text()) for r in range(2)]
    c = TrainConfig.from_dict(params)
    alone = stage_trainer("3", c, build_train_model(c.model, ["3"], c.model_config, c.preset),
                          RunLog(tmp_path / "rows-one", c, write=False), "cpu", False)
    for whole, a, b in zip((batch["_rows"].tolist() for batch in alone.epoch_batches(0)), *ranks, strict=True):
        assert a[-1] and b[-1] and not set(a[:-1]) & set(b[:-1])        # each rank its own half, weighted
        assert sorted(a[:-1] + b[:-1]) == sorted(whole)                 # together: the one-process batch
    assert_same_weights(weights(tmp_path / "two"), weights(tmp_path / "one"))
    a, b = train_lines(tmp_path / "one"), train_lines(tmp_path / "two")
    assert len(a) == len(b) == steps                                 # rank 0 alone wrote the telemetry
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-4)   # losses reduced over ranks
    assert (b[0]["world_size"], b[0]["batch_per_rank"], b[0]["batch_global"]) == (2, 16, 32)
    assert b[-1]["lr"] == a[-1]["lr"]                                # the same schedule at any world size
    val = lambda run: [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "val"]
    assert val(tmp_path / "two")[-1]["top1"] == pytest.approx(val(tmp_path / "one")[-1]["top1"])  # validation reduced
    # the 1 -> 2 -> 1 run resumed on the other world size each time, and lands on the same weights
    assert load_checkpoint(tmp_path / "mixed/checkpoints/last.pt")["global_step"] == 7
    train({**mixed, "resume_from": str(tmp_path / "mixed")}, progress=False)
    assert_same_weights(weights(tmp_path / "mixed"), weights(tmp_path / "one"))
    assert len(train_lines(tmp_path / "mixed")) == steps


def test_a_batch_that_does_not_split_over_the_processes_is_refused(pre, tmp_path):
    c = TrainConfig.from_dict({**VIT, "stage": "all", "stage1_data": str(pre), "stage2_data": str(pre), "stage3_data": str(pre),
                               "batch_size": 32, "stage2_batch_size": 33}, check_files=False)
    check_world(c, Dist(world_size=1))
    with pytest.raises(ConfigError, match=r"stage2_batch_size=33 is the global batch of stage 2 .* multiple of 2"):
        check_world(c, Dist(world_size=2))


# ---------------------------------------------------------------- torchrun, on loopback only

def _loopback_ok() -> str | None:
    """Why torchrun cannot be tested here, or None."""
    if TORCHRUN is None or shutil.which("unshare") is None or shutil.which("ip") is None:
        return "torchrun, unshare or ip is not installed"
    probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, text=True)
    if probe.returncode:
        return f"a private network namespace is not permitted here (unshare -n: {probe.stderr.strip()})"
    return None


LOOPBACK = _loopback_ok()
needs_loopback = pytest.mark.skipif(LOOPBACK is not None, reason=f"torchrun stays on loopback only: {LOOPBACK}")


def in_private_net(script: str, cwd: Path) -> subprocess.Popen:
    """`script` (sh) inside a private network namespace whose only interface is loopback."""
    return subprocess.Popen(["unshare", "-n", "sh", "-c", "ip link set lo up && " + script], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.fixture(scope="module")
def launch(pre, tmp_path_factory):
    """(params file, runs root, weights of the same run trained by one process) for the torchrun tests."""
    root = tmp_path_factory.mktemp("torchrun")
    params = root / "params.yaml"
    section = {**VIT, "stage3_data": str(pre), "batch_size": 16, "epoch": 1, "save_every": 1}
    params.write_text(yaml.safe_dump({"steps": ["train"], "train": section}))
    train({**section, "out_dir": str(root / "runs" / "one")}, progress=False)
    return params, root / "runs", weights(root / "runs" / "one")


def torchrun(launch, run_id: str, *options: str) -> str:
    params, runs, _ = launch
    return (f"exec {TORCHRUN} {' '.join(options)} -m maou_nb.cli train {params} --run-id {run_id} --runs-root {runs}")


@needs_loopback
def test_torchrun_two_nodes_match_one_process(launch, tmp_path):
    """Two "nodes" on one machine: two launchers meeting at a c10d rendezvous on 127.0.0.1."""
    params, runs, one = launch
    node = torchrun(launch, "nodes", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
                    "--rdzv-endpoint=127.0.0.1:29531", "--rdzv-id=maou").removeprefix("exec ")
    p = in_private_net(f"{node} > node0.log 2>&1 & {node} > node1.log 2>&1; s=$?; wait $! && exit $s", tmp_path)
    out, _ = p.communicate(timeout=240)
    logs = (tmp_path / "node0.log").read_text() + (tmp_path / "node1.log").read_text()
    assert p.returncode == 0, out + logs
    assert logs.count('"out_dir"') == 1                               # rank 0 alone printed the result
    assert_same_weights(weights(runs / "nodes"), one)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, nearest first."""
    out, todo = [], [pid]
    while todo:
        kids = [int(k) for p in todo for k in Path(f"/proc/{p}/task/{p}/children").read_text().split()
                if Path(f"/proc/{p}/task/{p}/children").exists()]
        out, todo = out + kids, kids
    return out


def _rank_processes(pid: int) -> dict[int, int]:
    """rank -> pid of the `maou-nb train` ranks below `pid` (not their torchrun launcher)."""
    ranks = {}
    for child in _descendants(pid):
        try:
            cmd = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            env = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{child}/environ").read_bytes().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if b"maou_nb.cli" in cmd and b"torch.distributed.run" not in cmd and b"RANK" in env:
            ranks[int(env[b"RANK"])] = child
    return ranks


@needs_loopback
def test_the_train_stage_hands_off_to_torchrun_and_a_killed_rank_restarts(launch, tmp_path):
    """`maou-nb run` of a params file whose train section says nproc_per_node: 2: the stage notebook's `train` runs
    `torchrun ... maou-nb train` as a child; rank 1 is killed once training has checkpointed, torchrun restarts the
    group, which resumes; the notebook goes on with rank 0's result as after a single process."""
    params, runs, one = launch
    spec = yaml.safe_load(params.read_text())
    spec["train"].update(nproc_per_node=2, max_restarts=1, stage3_val_data=None)   # val: a slice, as in `one`
    hand = tmp_path / "hand.yaml"
    hand.write_text(yaml.safe_dump(spec))
    p = in_private_net(f"exec {sys.executable} -m maou_nb.cli run {hand} --run-id hand --runs-root {runs}", tmp_path)
    deadline = time.time() + 180
    while not (runs / "hand" / "checkpoints" / "last.pt").is_file():   # training has written a checkpoint
        assert p.poll() is None and time.time() < deadline, p.communicate()[0]
        time.sleep(0.05)
    ranks = _rank_processes(p.pid)
    assert sorted(ranks) == [0, 1], ranks
    os.kill(ranks[1], signal.SIGKILL)                                # rank 1 dies mid-run
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 0, out
    assert "exitcode: -9" in out, out                                # torchrun saw the kill and restarted
    done = json.loads((runs / "hand" / "train.done.json").read_text())
    assert done["best_checkpoint"] == str(runs / "hand" / "checkpoints" / "best.pt")   # rank 0's result, in the notebook
    assert_same_weights(weights(runs / "hand"), one)
    lines = train_lines(runs / "hand")
    assert [r["global_step"] for r in lines] == list(range(1, len(lines) + 1))   # the telemetry rewound, no duplicates
    assert lines[-1]["world_size"] == 2


@needs_loopback
def test_a_failed_hand_off_names_the_failing_rank_log(launch, tmp_path):
    """`maou-nb train` (not under torchrun) with nproc_per_node: 2 hands off too; the ranks fail on a corrupt
    `last.pt` to resume from, and the error names the failing rank's log and quotes the cause."""
    params, runs, _ = launch
    spec = yaml.safe_load(params.read_text())
    spec["train"]["nproc_per_node"] = 2
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(spec))
    (runs / "broken" / "checkpoints").mkdir(parents=True)
    (runs / "broken" / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    p = in_private_net(f"exec {sys.executable} -m maou_nb.cli train {broken} --run-id broken --runs-root {runs}", tmp_path)
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 2, out
    error = out[out.index("maou-nb train: error: torchrun (2 processes) failed"):]
    log = Path(re.search(r"the failing rank's log: (\S+)", error).group(1))
    assert log.is_file() and log.is_relative_to(runs / "broken" / "torchrun" / "logs"), error
    assert "last.pt" in log.read_text() and "last.pt" in error, error    # the cause, in the log and quoted
