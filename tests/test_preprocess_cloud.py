"""preprocess's value blend on `gs://` HCPE, against gcp-storage-emulator on 127.0.0.1 (the `servers` fixture of
cloud_servers.py): a remote shard whose rows carry no engine evaluation is refused by its URI as it arrives in the
cache, before any output shard is written; with evaluations the remote blend is the local one."""
import numpy as np
import pytest

from maou_nb import preprocess as pp
from maou_nb.cloud import upload_file
from maou_nb.selfplay import play_games
from maou_nb.storage import load_array, load_hcpe, manifest_shards

from cloud_servers import new_bucket, servers  # noqa: F401 (a fixture)


def test_remote_shard_without_eval_is_refused_by_uri_before_any_output(servers, tmp_path):
    [shard] = play_games(3, tmp_path / "selfplay", seed=2, max_moves=40, progress=False, workers=1)
    no_eval = np.asarray(load_hcpe(shard)).copy()
    no_eval["eval"] = 0
    no_eval.tofile(tmp_path / "no-eval.hcpe")
    uri = f"gs://{new_bucket('gs')}/hcpe"
    upload_file(shard, f"{uri}/a/{shard.name}")
    upload_file(tmp_path / "no-eval.hcpe", f"{uri}/b/no-eval.hcpe")
    cache = {"root": str(tmp_path / "cache"), "max_workers": 1, "max_cached_bytes": None}
    with pytest.raises(ValueError, match=rf"{uri}/b/no-eval.hcpe: eval is 0 in all {len(no_eval)} rows: these rows "
                                         "carry no engine evaluation; set value_eval_weight: 0"):
        pp.preprocess(uri, tmp_path / "pre", value_eval_weight=0.5, cache=cache, progress=False)
    assert not list((tmp_path / "pre").iterdir())          # no shard, no manifest
    pp.preprocess(f"{uri}/a", tmp_path / "remote", value_eval_weight=0.5, cache=cache, progress=False)
    pp.preprocess(shard, tmp_path / "local", value_eval_weight=0.5, progress=False)
    remote, local = ([load_array(p) for p in manifest_shards(tmp_path / d)] for d in ("remote", "local"))
    assert all(np.array_equal(a, b) for a, b in zip(remote, local)) and len(local) == 1
