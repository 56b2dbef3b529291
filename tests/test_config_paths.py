"""Where the apps find their configs (checkout, installed package, PROSCALE_CONFIG_DIR, user folders) and write."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import proscale.config_paths as config_paths
from proscale.__main__ import main as dispatch
from proscale.cli import APPS
from proscale.utils.hydra_utils import compose_config

ROOT = Path(__file__).resolve().parent.parent


def test_a_checkout_reads_its_conf_and_writes_into_the_repository(monkeypatch):
    monkeypatch.delenv(config_paths.CONFIG_DIR_ENV, raising=False)
    assert config_paths.is_checkout()
    assert config_paths.config_dir() == str(ROOT / "conf")
    assert config_paths.default_project_root() == ROOT


def test_an_installed_package_reads_its_own_copy_and_writes_into_the_working_directory(monkeypatch, tmp_path):
    """Installed, the folder above the package is site-packages: no conf/ + pyproject.toml there."""
    monkeypatch.delenv(config_paths.CONFIG_DIR_ENV, raising=False)
    monkeypatch.setattr(config_paths, "REPO_ROOT", tmp_path / "site-packages")
    monkeypatch.chdir(tmp_path)
    assert not config_paths.is_checkout()
    assert config_paths.config_dir() == str(config_paths.PACKAGE_DIR / "conf")
    assert config_paths.default_project_root() == tmp_path


def test_proscale_config_dir_replaces_the_tree(monkeypatch, tmp_path):
    monkeypatch.setenv(config_paths.CONFIG_DIR_ENV, str(tmp_path / "my_conf"))
    assert config_paths.config_dir() == str(tmp_path / "my_conf")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_user_config_folders_add_choices_and_replace_built_in_files(monkeypatch, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    _write(first / "experiment" / "mine.yaml", "# @package _global_\ndefaults:\n  - tiny\nexperiment_name: mine\n")
    # Same group/name as a built-in file: the user folder is searched first, so this one is used.
    _write(second / "extras" / "default.yaml", "print_config: false\nfrom_user_folder: 2\n")
    monkeypatch.setenv(config_paths.USER_CONFIG_PATH_ENV, os.pathsep.join([str(first), str(second)]))
    cfg = compose_config("train", ["experiment=mine", f"paths.data_dir={tmp_path}"], output_dir=tmp_path / "run")
    assert cfg.experiment_name == "mine"
    assert cfg.model.num_queries == 8  # from the built-in tiny preset the user's one extends
    assert dict(cfg.extras) == {"print_config": False, "from_user_folder": 2}


def test_hydra_searchpath_override_adds_a_folder(monkeypatch, tmp_path):
    monkeypatch.delenv(config_paths.USER_CONFIG_PATH_ENV, raising=False)
    _write(tmp_path / "extra" / "experiment" / "other.yaml", "# @package _global_\nexperiment_name: other\nseed: 7\n")
    cfg = compose_config("train", [f"hydra.searchpath=[file://{tmp_path / 'extra'}]", "experiment=other"])
    assert (cfg.experiment_name, cfg.seed) == ("other", 7)


def test_a_missing_user_config_folder_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv(config_paths.USER_CONFIG_PATH_ENV, str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"PROSCALE_CONFIG_PATH.*nope.*does not exist"):
        config_paths.user_config_dirs()


def test_module_help_lists_every_app(capsys):
    dispatch(["--help"])
    out = capsys.readouterr().out
    for name, (_, summary) in APPS.items():
        assert f"  {name}" in out and summary in out
    assert "PROSCALE_CONFIG_PATH" in out


def test_an_unknown_app_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        dispatch(["trian"])
    assert exit_info.value.code == 2
    assert "unknown app 'trian'" in capsys.readouterr().err
