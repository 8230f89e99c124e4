"""ONNX export: round trips of all three backbones against PyTorch on real game positions, fp16, sidecars,
atomic writes, and `load_onnx` on cshogi boards."""
import json
from pathlib import Path

import cshogi
import cshogi.CSA
import numpy as np
import onnx
import pytest
import torch

from maou_nb.encoding import MOVE_LABELS_NUM, legal_moves_label, move_label
from maou_nb.export import (FP16_TOLERANCE, FP32_TOLERANCE, export_onnx, fp16_path, is_float16_model, load_onnx,
                            load_policy, position_arrays, sidecar_path, torch_outputs)
from maou_nb.model import build_model
from maou_nb.storage import save_checkpoint, sha256_file


def game_boards(path: Path, every: int = 3) -> list[cshogi.Board]:
    """Every `every`-th position of each game in a CSA file (moves checked legal by cshogi)."""
    out = []
    for game in cshogi.CSA.Parser.parse_file(str(path)):
        board = cshogi.Board(game.sfen)
        for i, move in enumerate(game.moves):
            if i % every == 0:
                out.append(cshogi.Board(board.sfen()))
            assert board.is_legal(move)
            board.push(move)
    return out


@pytest.fixture(scope="module")
def real_boards(records_dir) -> list[cshogi.Board]:
    boards = [b for p in sorted(records_dir.glob("floodgate2025_*.csa")) for b in game_boards(p)]
    assert {b.turn for b in boards} == {cshogi.BLACK, cshogi.WHITE} and any(any(b.pieces_in_hand[0]) for b in boards)
    return boards


@pytest.fixture(scope="module")
def exported(tmp_path_factory, real_boards):
    """Each backbone's small preset, checkpointed with EMA weights and exported."""
    out = {}
    for arch in ("resnet", "vit", "mlp-mixer"):
        folder = tmp_path_factory.mktemp(arch.replace("-", ""))
        torch.manual_seed(0)
        model = build_model(arch, preset="small").eval()
        ema = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
        ckpt = save_checkpoint(folder / "model.pt", {"arch": model.arch, "model_config": model.config,
                                                      "model": model.state_dict(), "ema": ema})
        result = export_onnx(ckpt, folder / "model.onnx", positions=real_boards)
        out[arch] = (ckpt, result)
    return out


@pytest.mark.parametrize("arch", ["resnet", "vit", "mlp-mixer"])
def test_round_trip_matches_torch_on_real_positions(exported, real_boards, arch):
    ckpt, result = exported[arch]
    assert result["opset"] == 20 and result["positions"]["real"] == len(real_boards)
    ema_model = load_policy(ckpt).model          # EMA weights, as exported
    board, hand = position_arrays(real_boards)
    want_policy, want_value = torch_outputs(ema_model, board, hand)
    for path, tol in ((result["path"], FP32_TOLERANCE), (result["fp16_path"], FP16_TOLERANCE)):
        policy, value = load_onnx(path).predict(real_boards)
        for got, want in ((policy, want_policy), (value, want_value.reshape(-1))):
            assert np.all(np.abs(got - want) <= tol["atol"] + tol["rtol"] * np.abs(want)), (arch, path)
    fp32, fp16 = result["fp32"], result["fp16"]
    assert fp32["max_abs_diff"] <= 1e-4 < fp16["tolerance"]["atol"]
    assert 0 < fp16["max_abs_diff"] <= FP16_TOLERANCE["atol"] + FP16_TOLERANCE["rtol"] * np.abs(want_policy).max()
    assert fp16["real"]["policy_top1_agreement"] >= 0.9
    assert is_float16_model(result["fp16_path"]) and not is_float16_model(result["path"])
    # the EMA weights, not the raw ones, went into the file
    raw = torch_outputs(load_policy(ckpt, ema=False).model, board, hand)[0]
    assert np.abs(load_onnx(result["path"]).predict(real_boards)[0] - raw).max() > 1e-3


def test_interface_and_dynamic_batch(exported, real_boards):
    path = exported["vit"][1]["path"]
    graph = onnx.load(path).graph
    assert [(i.name, i.type.tensor_type.elem_type) for i in graph.input] == [("board", onnx.TensorProto.INT32),
                                                                              ("hand", onnx.TensorProto.FLOAT)]
    assert [o.name for o in graph.output] == ["policy", "value"]
    session = load_onnx(path)
    for n in (1, 7):
        policy, value = session.predict(real_boards[:n])
        assert policy.shape == (n, MOVE_LABELS_NUM) and value.shape == (n,)


def test_sidecar_contents(exported):
    ckpt, result = exported["mlp-mixer"]
    for path, variant in ((result["path"], "fp32"), (result["fp16_path"], "fp16")):
        meta = json.loads(sidecar_path(path).read_text())
        assert meta["variant"] == variant and meta["arch"] == "mlp-mixer" and meta["weights"] == "ema"
        assert meta["config"] == build_model("mlp-mixer", preset="small").config
        assert meta["checkpoint_sha256"] == sha256_file(ckpt) and meta["sha256"] == sha256_file(path)
        assert meta["opset"] == 20 and meta["versions"]["maou_nb"]
        assert meta["verification"]["real"]["within_tolerance"]
        assert meta["verification"]["max_abs_diff"] == result[variant]["max_abs_diff"]
        assert list(meta["inputs"]) == ["board", "hand"] and list(meta["outputs"]) == ["policy", "value"]
    assert Path(result["fp16_path"]) == fp16_path(result["path"])


def test_load_onnx_evaluates_cshogi_boards_with_legal_moves_only(exported, real_boards):
    session = load_onnx(exported["resnet"][1]["path"])
    assert session.meta["arch"] == "resnet"
    for board in real_boards[::5]:
        probs, value = session.evaluate(board)
        assert set(probs) == set(board.legal_moves)
        assert abs(sum(probs.values()) - 1) < 1e-6 and 0 < value < 1
        best = max(probs, key=probs.get)
        logits = session.predict(board)[0][0]
        legal = legal_moves_label(board)
        assert move_label(board, best) == int(np.argmax(np.where(legal, logits, -np.inf)))
    hcps = np.zeros(4, cshogi.HuffmanCodedPos)
    for i, b in enumerate(real_boards[:4]):
        b.to_hcp(hcps[i:i + 1])
    np.testing.assert_array_equal(session.predict(hcps)[0], session.predict(real_boards[:4])[0])


def test_float16_input_files_load_and_play(exported, real_boards, tmp_path):
    """A float16 file whose `hand` input is float16 too (converted with its inputs) loads and agrees."""
    from maou_nb.players import NetworkPlayer
    half = onnx.load(exported["resnet"][1]["fp16_path"])
    cast = next(n for n in half.graph.node if n.op_type == "Cast" and list(n.input) == ["hand"])
    half.graph.node.remove(cast)
    for node in half.graph.node:
        node.input[:] = ["hand" if name == cast.output[0] else name for name in node.input]
    next(i for i in half.graph.input if i.name == "hand").type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    onnx.save(half, str(tmp_path / "half_io.onnx"))
    policy = load_onnx(tmp_path / "half_io.onnx")
    assert policy.hand_dtype == np.float16
    got, want = policy.predict(real_boards[:64]), load_onnx(exported["resnet"][1]["path"]).predict(real_boards[:64])
    np.testing.assert_allclose(got[0], want[0], atol=0.05, rtol=0.05)
    boards = [b for b in real_boards[:64] if not b.is_game_over()]
    moves = NetworkPlayer(tmp_path / "half_io.onnx").choose_many(boards)
    assert all(m in set(b.legal_moves) for b, m in zip(boards, moves))


def test_failed_export_keeps_the_old_file(exported, real_boards, tmp_path, monkeypatch):
    import maou_nb.export as export
    model = build_model("mlp-mixer", preset="small")
    export_onnx(model, tmp_path / "model.onnx", positions=real_boards[:8], fp16=False)
    before = sha256_file(tmp_path / "model.onnx")

    def crash(model, path, opset=20):
        Path(path).write_bytes(b"half a file")
        raise RuntimeError("exporter died")
    monkeypatch.setattr(export, "write_graph", crash)
    with pytest.raises(RuntimeError, match="exporter died"):
        export_onnx(model, tmp_path / "model.onnx", positions=real_boards[:8])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.json"]
    assert sha256_file(tmp_path / "model.onnx") == before


