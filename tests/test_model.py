"""Tests of maou_nb.model: parameter counts, head shapes, freezing, parts, checkpoints, config errors, ONNX."""
import json

import cshogi
import numpy as np
import pytest
import torch

from maou_nb.encoding import encode_position
from maou_nb.model import (ARCHS, HEAD_NAMES, apply_freezing, build_model, checkpoint_payload, count_parameters,
                           load_model, load_part_state_dict, model_summary, part_state_dict, resolve_config)
from maou_nb.storage import save_checkpoint

# Maou's figures (stem + backbone + policy + value), from shared/reference/architectures.md
MAOU_COUNTS = {"resnet": 17_012_665, "vit": 19_766_713, "mlp-mixer": 9_171_273}
GROUPS = {"resnet": 4, "vit": 6, "mlp-mixer": 16}


def random_batch(n: int, seed: int = 0, dtype=torch.int32):
    """A batch of random piece IDs and hand counts."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 29, (n, 9, 9), generator=g).to(dtype), torch.randint(0, 5, (n, 14), generator=g).float()


def real_batch():
    """The start position and one after a few moves, encoded by maou_nb.encoding."""
    boards, hands = [], []
    board = cshogi.Board()
    for usi in [None, "7g7f", "3c3d", "8h2b+"]:
        if usi:
            board.push_usi(usi)
        b, h = encode_position(board)
        boards.append(b), hands.append(h)
    return torch.from_numpy(np.stack(boards)), torch.from_numpy(np.stack(hands).astype(np.float32))


@pytest.mark.parametrize("arch", ARCHS)
def test_default_parameter_counts_match_maou_and_forward(arch):
    model = build_model(arch).eval()
    counts = count_parameters(model)
    expected = MAOU_COUNTS[arch]
    assert abs(counts["reference"] - expected) <= 0.02 * expected, counts
    if arch != "mlp-mixer":
        assert counts["reference"] == expected
    assert counts["stem"] == 256 * 32 + 14 * 32 + 32
    assert counts["total"] == sum(counts[k] for k in ("stem", "backbone") + HEAD_NAMES)
    board, hand = real_batch()
    with torch.no_grad():
        out = model(board, hand)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"policy": (4, 1496), "value": (4, 1), "reachable": (4, 81), "legal": (4, 1496)}


@pytest.mark.parametrize("arch", ARCHS)
def test_small_head_shapes_and_input_dtypes(arch):
    model = build_model(arch, preset="small").eval()
    board, hand = real_batch()
    n = len(board)
    with torch.no_grad():
        outs = {dt: model(board.to(dt), hand) for dt in (torch.uint8, torch.int32, torch.int64)}
    shapes = {k: tuple(v.shape) for k, v in outs[torch.int64].items()}
    assert shapes == {"policy": (n, 1496), "value": (n, 1), "reachable": (n, 81), "legal": (n, 1496)}
    for out in outs.values():
        for key in HEAD_NAMES:
            assert torch.equal(out[key], outs[torch.int64][key])
            assert torch.isfinite(out[key]).all()
    assert not torch.allclose(outs[torch.int64]["policy"][0], outs[torch.int64]["policy"][1])  # positions differ


@pytest.mark.parametrize("arch", ARCHS)
def test_small_preset_is_small(arch):
    assert 100_000 <= count_parameters(build_model(arch, preset="small"))["reference"] <= 500_000


def test_heads_selection_and_legal_hidden():
    model = build_model("vit", preset="small", heads=["reachable", "legal"], legal_head_hidden=32).eval()
    out = model(*random_batch(3))
    assert sorted(out) == ["legal", "reachable"]
    assert out["legal"].shape == (3, 1496)
    assert count_parameters(model)["legal"] == 64 * 32 + 32 + 32 * 1496 + 1496
    assert count_parameters(model)["policy"] == 0


def test_hand_placement_resnet_broadcast_vit_corner():
    board, hand = random_batch(2)
    for arch, everywhere in [("resnet", True), ("vit", False), ("mlp-mixer", False)]:
        stem = build_model(arch, preset="small").stem
        x = stem(board, hand).detach()
        hand_maps = x[:, 32:]
        if everywhere:
            assert torch.equal(hand_maps, hand_maps[:, :, :1, :1].expand_as(hand_maps))
        else:
            rest = hand_maps.clone()
            rest[:, :, 0, 0] = 0
            assert torch.count_nonzero(rest) == 0 and torch.count_nonzero(hand_maps[:, :, 0, 0]) > 0


def test_config_rebuilds_identical_model_and_is_json():
    model = build_model("resnet", preset="small", resnet_blocks=(1, 2, 1, 1), heads=("policy", "value"))
    config = json.loads(json.dumps(model.config))
    assert config == model.config and config["resnet_blocks"] == [1, 2, 1, 1]
    rebuilt = build_model(model.arch, **config)
    rebuilt.load_state_dict(model.state_dict())
    board, hand = random_batch(4)
    assert torch.equal(rebuilt.eval()(board, hand)["policy"], model.eval()(board, hand)["policy"])
    assert "resnet" in model_summary(model) and f"{count_parameters(model)['total']:,}" in model_summary(model)


@pytest.mark.parametrize("kwargs, words", [
    (dict(name="transformer"), ["transformer", "resnet"]),
    (dict(name="vit", vit_embed_dim=0), ["vit_embed_dim", "0", "integer"]),
    (dict(name="vit", vit_num_heads=5), ["vit_num_heads", "5", "divisor"]),
    (dict(name="vit", vit_dropout=1.0), ["vit_dropout", "1.0"]),
    (dict(name="resnet", vit_num_layers=2), ["vit_num_layers", "'vit'", "resnet_widths"]),
    (dict(name="resnet", resnet_blocks=[2, 2]), ["resnet_blocks", "[2, 2]", "4 entries"]),
    (dict(name="mlp-mixer", mixer_dim=2.5), ["mixer_dim", "2.5"]),
    (dict(name="mlp-mixer", heads=["policy", "score"]), ["heads", "score", "reachable"]),
    (dict(name="mlp-mixer", preset="tiny"), ["preset", "tiny", "small"]),
    (dict(name="vit", legal_head_hidden=-1), ["legal_head_hidden", "-1"]),
    (dict(name="vit", colour="red"), ["colour", "allowed keys"]),
])
def test_bad_config_errors_name_key_value_and_allowed(kwargs, words):
    kwargs = dict(kwargs)
    with pytest.raises(ValueError) as err:
        build_model(kwargs.pop("name"), **kwargs)
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_bad_inputs_are_named():
    model = build_model("mlp-mixer", preset="small")
    with pytest.raises(ValueError, match="board"):
        model(torch.zeros(2, 81, dtype=torch.long), torch.zeros(2, 14))
    with pytest.raises(ValueError, match="hand"):
        model(torch.zeros(2, 9, 9, dtype=torch.long), torch.zeros(2, 7))


def expected_trainable(model, freeze_backbone, trainable_layers):
    """Names of parameters that should train, derived from the rules in architectures.md."""
    names = [n for n, _ in model.named_parameters()]
    if not freeze_backbone and trainable_layers is None:
        return set(names)
    groups = len(model.backbone.layers)
    n = trainable_layers or 0
    keep = tuple(f"backbone.layers.{i}." for i in range(groups - n, groups))
    if n > 0:
        keep += ("backbone.final_norm.",)
    return {x for x in names if x.startswith("heads.") or x.startswith(keep)}


@pytest.mark.parametrize("arch", ARCHS)
def test_freezing_groups_follow_the_rules(arch):
    model = build_model(arch, preset="small", **({"vit_num_layers": 6} if arch == "vit" else {"mixer_num_layers": 16} if arch == "mlp-mixer" else {}))
    assert len(model.backbone.layers) == GROUPS[arch]
    settings = [(False, None), (True, None)] + [(False, n) for n in range(GROUPS[arch] + 1)]
    for freeze, n in settings:
        counts = apply_freezing(model, freeze_backbone=freeze, trainable_layers=n)
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        assert trainable == expected_trainable(model, freeze, n), (freeze, n)
        assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match=f"trainable_layers={GROUPS[arch] + 1}"):
        apply_freezing(model, trainable_layers=GROUPS[arch] + 1)
    with pytest.raises(ValueError, match="freeze_backbone"):
        apply_freezing(model, freeze_backbone=True, trainable_layers=1)


@pytest.mark.parametrize("arch, settings", [("resnet", dict(trainable_layers=1)), ("vit", dict(trainable_layers=1)),
                                            ("mlp-mixer", dict(freeze_backbone=True))])
def test_frozen_parameters_stay_bit_identical_under_adamw(arch, settings):
    torch.manual_seed(0)
    model = build_model(arch, preset="small").train()
    apply_freezing(model, **settings)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    board, hand = random_batch(16)
    for _ in range(2):
        out = model(board, hand)
        loss = sum(v.float().square().mean() for v in out.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[name]), f"{name} should have moved"
        else:
            assert torch.equal(p, before[name]), f"{name} is frozen but changed"
    assert any(not p.requires_grad for p in model.parameters())


def test_parts_transfer_backbone_between_head_sets():
    stage1 = build_model("vit", preset="small", heads=["reachable"])
    stage3 = build_model("vit", preset="small", heads=["policy", "value"])
    compiled = torch.compile(stage1)  # lazy: no compilation until called; keys carry "_orig_mod."
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    backbone = part_state_dict(compiled, "backbone")
    assert backbone and not any("_orig_mod" in k for k in backbone)
    assert all(k.startswith(("stem.", "backbone.")) for k in backbone)
    load_part_state_dict(stage3, "backbone", compiled.state_dict())
    s1, s3 = stage1.eval(), stage3.eval()
    board, hand = random_batch(2)
    assert torch.equal(s1.features(board, hand), s3.features(board, hand))
    with pytest.raises(ValueError, match="no 'legal' head"):
        part_state_dict(stage3, "legal")
    with pytest.raises(ValueError, match="does not fit"):
        load_part_state_dict(build_model("vit", preset="small", vit_embed_dim=32), "backbone", backbone)
    with pytest.raises(ValueError, match="lacks"):
        load_part_state_dict(stage3, "policy", {})


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_round_trip_gives_identical_outputs(arch, tmp_path):
    model = build_model(arch, preset="small", legal_head_hidden=16)
    ema = build_model(arch, preset="small", legal_head_hidden=16)
    path = save_checkpoint(tmp_path / "model.pt", checkpoint_payload(torch.compile(model), torch.compile(ema), epoch=3))
    loaded, loaded_ema = load_model(path), load_model(path, ema=True)
    assert (loaded.arch, loaded.config) == (arch, model.config)
    assert not loaded.training
    board, hand = real_batch()
    with torch.no_grad():
        for got, want in [(loaded, model.eval()), (loaded_ema, ema.eval())]:
            a, b = got(board, hand), want(board, hand)
            assert all(torch.equal(a[k], b[k]) for k in HEAD_NAMES)


def test_load_model_errors(tmp_path):
    model = build_model("resnet", preset="small")
    path = save_checkpoint(tmp_path / "m.pt", checkpoint_payload(model))
    with pytest.raises(ValueError, match="no 'ema'"):
        load_model(path, ema=True)
    payload = checkpoint_payload(model)
    payload["model_config"]["resnet_widths"] = [16, 32, 32, 64]
    bad = save_checkpoint(tmp_path / "bad.pt", payload)
    with pytest.raises(ValueError, match="bad.pt"):
        load_model(bad)


@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_export_int32_dynamic_batch(arch, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = build_model(arch, preset="small", heads=["policy", "value"]).eval()
    board, hand = random_batch(2)
    path = tmp_path / f"{arch}.onnx"
    with pytest.warns(Warning):  # the legacy (TorchScript) exporter announces its deprecation
        torch.onnx.export(model, (board, hand), str(path), dynamo=False, opset_version=20, input_names=["board", "hand"],
                          output_names=["policy", "value"], dynamic_axes={"board": {0: "B"}, "hand": {0: "B"}})
    board, hand = real_batch()
    policy, value = ort.InferenceSession(str(path)).run(None, {"board": board.int().numpy(), "hand": hand.numpy()})
    with torch.no_grad():
        out = model.eval()(board.int(), hand)
    np.testing.assert_allclose(policy, out["policy"].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(value, out["value"].numpy(), rtol=1e-4, atol=1e-5)


def test_resolve_config_fills_preset_and_none_means_default():
    cfg = resolve_config("mlp-mixer", preset="small", mixer_dim=None, mixer_num_layers=2)
    assert cfg["mixer_dim"] == 64 and cfg["mixer_num_layers"] == 2 and cfg["heads"] == list(HEAD_NAMES)


def check_spatial_preset(preset: str, tmp_path) -> torch.nn.Module:
    """A spatial preset predicts all four heads per square with Maou's output shapes, rebuilds bit-exactly from its
    JSON config, and exports (policy + value) to ONNX that matches PyTorch; the model, for more checks."""
    from maou_nb.export import export_onnx
    model = build_model("resnet", preset=preset).eval()
    board, hand = real_batch()
    out = model(board.int(), hand)
    assert {k: tuple(v.shape) for k, v in out.items()} == {"policy": (len(board), 1496), "value": (len(board), 1),
                                                           "reachable": (len(board), 81), "legal": (len(board), 1496)}
    twin = build_model(model.arch, **json.loads(json.dumps(model.config)))
    twin.load_state_dict(model.state_dict())
    twin_out = twin.eval()(board.int(), hand)
    assert all(torch.equal(twin_out[k], out[k]) for k in out)
    figures = export_onnx(build_model("resnet", preset=preset, heads=["policy", "value"]), tmp_path / f"{preset}.onnx",
                          n_default_positions=16, fp16=False)
    assert figures["fp32"]["real"]["within_tolerance"] and figures["fp32"]["scrambled"]["within_tolerance"]
    return model


def test_spatial_presets_and_heads_export_to_onnx(tmp_path):
    """The kit's spatial preset keeps the 9x9 board (stride 1, basic blocks), predicts all four heads per square
    with the same output shapes as Maou's, rebuilds from its config, and exports to verified ONNX; Maou's default
    shapes are untouched; a spatial head on a strided ResNet is refused naming the key and the fix."""
    assert count_parameters(build_model("resnet"))["reference"] == 17_012_665
    assert resolve_config("resnet")["head_layout"] == "pooled" and resolve_config("resnet")["resnet_block"] == "bottleneck"
    model = check_spatial_preset("spatial-small", tmp_path)
    assert model.backbone(torch.zeros(1, 64, 9, 9)).shape[-2:] == (9, 9)
    board, hand = real_batch()
    vit = build_model("vit", preset="small", head_layout="spatial").eval()
    assert vit(board.int(), hand)["legal"].shape == (len(board), 1496)
    with pytest.raises(ValueError, match=r"resnet_strides=\[1, 2, 2, 2\].*all 1 with head_layout='spatial'"):
        build_model("resnet", preset="small", head_layout="spatial")


def test_ray_block_sums_match_a_walk_along_each_line():
    """RayBlock's three doublings of a fixed gather give, at every square and for each of the 8 lines (ranks,
    files, diagonals), the plain walk to the board's edge: the sum of v(t) times the gates strictly between."""
    from maou_nb.model import RAY_DIRECTIONS, RayBlock
    g_ = torch.Generator().manual_seed(0)
    v, g = torch.randn(1, 2, 8, 81, generator=g_), torch.rand(1, 2, 8, 81, generator=g_)
    got = RayBlock(4, 2).line_sums(v, g)
    want = torch.zeros_like(v)
    for d, (dr, df) in enumerate(RAY_DIRECTIONS):
        for cell in range(81):
            r, f = divmod(cell, 9)
            gate = torch.ones(1, 2)
            r, f = r + dr, f + df
            while 0 <= r < 9 and 0 <= f < 9:
                want[:, :, d, cell] += gate * v[:, :, d, r * 9 + f]
                gate = gate * g[:, :, d, r * 9 + f]
                r, f = r + dr, f + df
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match=r"resnet_strides=\[1, 2, 2, 2\].*all 1 with resnet_rays=4"):
        build_model("resnet", preset="small", resnet_rays=4)
    assert resolve_config("resnet")["resnet_rays"] == 0       # Maou's default shapes: no rays


def test_spatial_rays_preset_runs_the_heads_and_exports_to_onnx(tmp_path):
    """The `spatial-rays` preset (issue 16's trial for the quick start): stride 1, a RayBlock ending each layer, the
    checks of `check_spatial_preset` (the fixed gathers of the rays in ONNX included), under 100k parameters."""
    from maou_nb.model import RayBlock
    model = check_spatial_preset("spatial-rays", tmp_path)
    assert [type(layer[-1]) for layer in model.backbone.layers] == [RayBlock, RayBlock]
    assert count_parameters(model)["reference"] < 100_000
