"""settings.ini precedence: explicit > params > environment > file > default."""
import pytest

from maou_nb import settings as s


def test_precedence(tmp_path, monkeypatch):
    ini = tmp_path / "settings.ini"
    ini.write_text("[maou_nb]\ndata_root = d\ndevice = cpu\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MAOU_NB_SETTINGS", raising=False)
    monkeypatch.delenv("MAOU_NB_DATA_ROOT", raising=False)
    assert s.setting("data_root") == str(tmp_path / "d")
    monkeypatch.setenv("MAOU_NB_DATA_ROOT", "/env")
    assert s.setting("data_root") == "/env"
    assert s.setting("data_root", params={"data_root": "/p"}) == "/p"
    assert s.setting("data_root", explicit="/x", params={"data_root": "/p"}) == "/x"
    assert s.get_settings()["device"] == "cpu"


def test_settings_file_from_environment_and_errors(tmp_path, monkeypatch):
    ini = tmp_path / "other.ini"
    ini.write_text("[maou_nb]\nmodels_root = /m\n")
    monkeypatch.setenv("MAOU_NB_SETTINGS", str(ini))
    assert s.setting("models_root") == "/m"
    monkeypatch.setenv("MAOU_NB_SETTINGS", str(tmp_path / "missing.ini"))
    with pytest.raises(FileNotFoundError, match="missing.ini"):
        s.setting("models_root")
    bad = tmp_path / "bad.ini"
    bad.write_text("[maou_nb]\nmodel_root = x\n")
    with pytest.raises(ValueError, match="model_root"):
        s.read_settings_file(bad)
    with pytest.raises(KeyError, match="allowed"):
        s.setting("nope")


def test_repo_settings_file_is_valid():
    from pathlib import Path
    ini = Path(__file__).resolve().parents[1] / "settings.ini"
    values = s.read_settings_file(ini)
    assert set(values) <= set(s.DEFAULTS)
