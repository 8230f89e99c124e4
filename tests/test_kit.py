"""The kit as a newcomer gets it: its own records, a wheel that carries the stage notebooks and params files,
params by name, `maou-nb init`, and a run.json that says which code ran."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from maou_nb import __version__
from maou_nb.cli import main
from maou_nb.pipeline import load_params, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
KIT = {"maou_nb/stages": (ROOT / "nbs" / "stages", "*.ipynb"), "maou_nb/params": (ROOT / "params", "*.yaml")}


def kit_files() -> dict[str, Path]:
    """{path inside the wheel: source file in the checkout} for the stage notebooks and params files."""
    return {f"{prefix}/{p.relative_to(src).as_posix()}": p
            for prefix, (src, pattern) in KIT.items() for p in sorted(src.rglob(pattern))}


def test_records_are_the_reference_copies(records_dir, shared_dir):
    """tests/data/records holds byte-for-byte copies of the reference records (and says where they come from)."""
    reference = shared_dir / "data" / "records"
    ours = {p.name: p.read_bytes() for p in records_dir.iterdir() if p.suffix in (".csa", ".kif", ".kifu")}
    assert ours and all(ours[name] == (reference / name).read_bytes() for name in ours)
    readme = (records_dir / "README.md").read_text(encoding="utf-8")
    assert all(f"`{name}`" in readme for name in ours), "every record is named in its README"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip wheel` builds from a copy of this checkout (so the build leaves nothing in the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "runs", "data",
                                                             "models", "*.egg-info", "__pycache__", ".pytest_cache"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    (path,) = (tmp / "dist").glob("maou_nb-*.whl")
    return path


def test_wheel_carries_the_stage_notebooks_and_params(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        kit = {n for n in names if n.startswith(tuple(KIT))}
        assert kit == set(kit_files())
        assert all(z.read(n) == src.read_bytes() for n, src in kit_files().items())
    assert {"maou_nb/pipeline.py", "maou_nb/train.py"} <= names
    assert not [n for n in names if n.startswith(("nbs/", "params/", "tests/"))]  # nothing outside the package


def test_installed_wheel_uses_its_own_files_and_no_foreign_git(wheel, tmp_path):
    """Installed (unpacked into a folder that sits inside some other git repository), the package finds its bundled
    stages and params, not the checkout's, and records no git revision: that repository is not the kit's."""
    git = shutil.which("git")
    site = tmp_path / "project" / ".venv" / "site-packages"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    if git:
        env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
               "GIT_COMMITTER_EMAIL": "t@t"}
        (tmp_path / "project" / "notes.txt").write_text("someone else's project\n")
        for args in (["init", "-q"], ["add", "notes.txt"], ["commit", "-q", "-m", "x"]):
            subprocess.run([git, "-C", str(tmp_path / "project"), *args], check=True, env=env, capture_output=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    probe = ("import json, maou_nb\n"
             "from maou_nb.pipeline import _git_revision, find_params, load_params, stages_dir\n"
             "print(json.dumps({'package': maou_nb.__file__, 'stages': str(stages_dir()), 'tiny': str(find_params('tiny')),"
             " 'steps': load_params('quickstart')['steps'], 'git': _git_revision()}))")
    env = {k: v for k, v in os.environ.items() if k != "MAOU_NB_STAGES"} | {"PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=empty, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert Path(got["package"]).parent == site / "maou_nb"
    assert Path(got["stages"]) == site / "maou_nb" / "stages" and Path(got["tiny"]) == site / "maou_nb/params/tiny.yaml"
    assert got["steps"] == yaml.safe_load((ROOT / "params/quickstart.yaml").read_text())["steps"]
    assert got["git"] == {}
    made = subprocess.run([sys.executable, "-m", "maou_nb.cli", "init", "work", "--notebooks"], cwd=empty, env=env,
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    copied = {f"maou_nb/{p.relative_to(empty / 'work').as_posix()}" for p in (empty / "work").rglob("*") if p.is_file()}
    assert copied == set(kit_files())


def test_params_by_name_and_a_path_wins(tmp_path, monkeypatch):
    from maou_nb.pipeline import bundled_params, find_params
    assert {"quickstart", "tiny", "maou-default", "loop/cpu-demo", "loop/gpu"} <= set(bundled_params())
    assert find_params("tiny") == find_params("tiny.yaml") == ROOT / "params" / "tiny.yaml"
    assert load_params("tiny")["train"] == load_params(ROOT / "params" / "tiny.yaml")["train"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").write_text("name: mine\nsteps: [selfplay]\nselfplay: {games: 1}\n")
    assert load_params("tiny")["name"] == "mine"  # an existing file of that name is taken, not the bundled one
    with pytest.raises(FileNotFoundError, match=r"quikstart: params file not found.*quickstart.*maou-nb init"):
        load_params("quikstart")
    with pytest.raises(FileNotFoundError, match="params file not found"):
        find_params(tmp_path / "quickstart")  # an absolute path is a path, never a name


def test_init_copies_the_examples_and_never_loses_an_edit(tmp_path, capsys):
    from maou_nb.cli import init
    from maou_nb.pipeline import bundled_params
    work = tmp_path / "work"
    assert main(["init", str(work)]) == 0
    params = {p.relative_to(work / "params").with_suffix("").as_posix() for p in (work / "params").rglob("*.yaml")}
    assert params == set(bundled_params()) and not (work / "stages").exists()
    assert (work / "params/loop/cpu-demo.yaml").read_bytes() == (ROOT / "params/loop/cpu-demo.yaml").read_bytes()
    edited = work / "params" / "quickstart.yaml"
    edited.write_text("name: my-run\n")
    capsys.readouterr()
    assert main(["init", str(work), "--notebooks"]) == 2
    err = capsys.readouterr().err
    assert "quickstart.yaml" in err and "--force" in err and "Nothing was written" in err
    assert edited.read_text() == "name: my-run\n" and not (work / "stages").exists()
    assert init(work, notebooks=True, overwrite=True)[0] == edited
    assert edited.read_bytes() == (ROOT / "params/quickstart.yaml").read_bytes()
    assert sorted(p.name for p in (work / "stages").glob("*.ipynb")) == sorted(p.name for p in KIT["maou_nb/stages"][0].glob("*.ipynb"))
    assert init(work, notebooks=True) == []  # already the kit's files: nothing to do, no error
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match="afile is a file"):
        init(tmp_path / "afile")


def _head() -> str | None:
    git = shutil.which("git")
    if not git or not (ROOT / ".git").exists():
        return None
    return subprocess.run([git, "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def test_run_json_records_version_notebook_hashes_and_keeps_them_on_resume(tmp_path):
    params = {"name": "meta", "steps": ["selfplay"], "selfplay": {"games": 2, "max_moves": 10, "workers": 1}}
    run = run_pipeline(params, run_id="meta", runs_root=str(tmp_path), echo=lambda _: None)
    meta = json.loads((run / "run.json").read_text())
    notebook = ROOT / "nbs" / "stages" / "selfplay.ipynb"
    assert meta["maou_nb"] == __version__ and meta["torch"] and meta["finished"] >= meta["started"]
    assert meta["steps"]["selfplay"]["sha256"] == hashlib.sha256(notebook.read_bytes()).hexdigest()
    assert Path(meta["steps"]["selfplay"]["notebook"]) == notebook
    head = _head()
    assert meta.get("git") == head and ("git_dirty" in meta) == (head is not None)
    run_pipeline(params, run_id="meta", runs_root=str(tmp_path), echo=lambda _: None)  # resumed: the step is skipped
    again = json.loads((run / "run.json").read_text())
    assert again["steps"] == meta["steps"]
    assert [e["started"] for e in again["earlier"]] == [meta["started"]] and "finished" in again["earlier"][0]
