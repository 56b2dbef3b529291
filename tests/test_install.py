"""A real install: build the wheel, install it (no dependencies) into a folder of its own and run the apps from
another working directory with only that folder on the path. Also the apps' ``--help``.

The wheel is built from a copy of the files the build reads (pyproject.toml, setup.py, README.md, proscale/, conf/),
so the test writes nothing into the repository and also checks that these files are all a build needs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # runs the apps / launchers in subprocesses

ROOT = Path(__file__).resolve().parent.parent
BUILD_INPUTS = ("pyproject.toml", "setup.py", "README.md", "proscale", "conf")
TINY = ("experiment=tiny", "steps=2", "num_threads=1")


def _clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without anything that would point the apps at the repository."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PROJECT_ROOT") and "PROSCALE" not in k}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", HYDRA_FULL_ERROR="1", PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    build = tmp_path_factory.mktemp("build")
    source = build / "source"
    for name in BUILD_INPUTS:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(src, source / name)
    pip = [sys.executable, "-m", "pip"]
    _run(
        [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(build / "dist"), str(source)],
        build,
        _clean_env(),
    )
    (found,) = (build / "dist").glob("proscale-*.whl")
    return found


def test_the_wheel_ships_every_config_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n.removeprefix("proscale/conf/") for n in names if n.startswith("proscale/conf/")}
    in_repo = {str(p.relative_to(ROOT / "conf")) for p in (ROOT / "conf").rglob("*.yaml")}
    assert shipped == in_repo
    assert "proscale/__main__.py" in names and "proscale/cli.py" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    for script in ("proscale = proscale.__main__:main", "proscale-train = ", "proscale-eval = ", "proscale-predict = "):
        assert script in scripts


def test_installed_wheel_trains_and_evaluates_from_another_directory(wheel, tmp_path):
    target, work = tmp_path / "site", tmp_path / "work"
    work.mkdir()
    _run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        tmp_path,
        _clean_env(),
    )
    before = _snapshot(target)
    # Only the install folder on the path (the dependencies come from this interpreter's site-packages).
    env = _clean_env(PYTHONPATH=str(target))
    probe = "import os, proscale, proscale.cli as c; print(proscale.__file__); print(c.CONFIG_DIR); print(os.environ['PROJECT_ROOT'])"
    module_file, config_dir, project_root = _run([sys.executable, "-c", probe], work, env).stdout.split()
    assert Path(module_file) == target / "proscale" / "__init__.py"
    assert Path(config_dir) == target / "proscale" / "conf"
    assert Path(project_root) == work

    help_text = _run([str(target / "bin" / "proscale"), "predict", "--help"], work, env).stdout
    assert "proscale predict: segment" in help_text  # the `proscale` console script and the packaged help config

    _run([sys.executable, "-m", "proscale", "train", *TINY], work, env)
    (train_results,) = (work / "logs" / "train" / "runs" / "tiny").glob("*/results.json")
    assert (work / "data" / "synthetic_tiny" / "annotations" / "panoptic_val.json").is_file()
    # The console script installed with the wheel runs the evaluation of the run's last checkpoint.
    _run([str(target / "bin" / "proscale-eval"), *TINY, "ckpt_path=last"], work, env)
    (eval_results,) = (work / "logs" / "eval" / "runs" / "tiny").glob("*/results.json")

    trained, evaluated = json.loads(train_results.read_text()), json.loads(eval_results.read_text())
    assert trained["status"] == evaluated["status"] == "ok"
    assert Path(evaluated["best_checkpoint"]).is_relative_to(work / "logs" / "train" / "runs" / "tiny")
    for key in ("PQ", "AP", "mIoU"):
        assert evaluated[key] == pytest.approx(trained[key], abs=1e-6), key
    assert _snapshot(target) == before, "the apps wrote into the install folder"
    assert sorted(p.name for p in work.iterdir()) == ["data", "logs"]


APP_HELP = {
    "train": ("proscale train: train a Mask2Former / PRO-SCALE model", "experiment=NAME", "ckpt_path=PATH|last"),
    "eval": ("proscale eval: score weights on the test split", "weights=PATH", "ckpt_path=PATH|last"),
    "predict": ("proscale predict: segment images", "weights=PATH", "input=PATH", "onnx=FILE"),
    "export": ("proscale export: weights -> an ONNX model", "output=FILE", "dynamic=true|false"),
}


@pytest.mark.parametrize("app", sorted(APP_HELP))
def test_app_help_says_what_it_does_and_lists_its_options(app, tmp_path):
    out = _run([sys.executable, "-m", "proscale", app, "--help"], tmp_path, _clean_env(PYTHONPATH=str(ROOT))).stdout
    for text in APP_HELP[app]:
        assert text in out
    assert "== Config groups (group=option) ==" in out and "PROSCALE_CONFIG_PATH" in out
    if app not in ("predict", "export"):
        experiments = next(line for line in out.splitlines() if line.startswith("experiment: "))
        assert "tiny" in experiments and "cpu_synthetic" in experiments
    assert list(tmp_path.iterdir()) == []  # --help runs nothing and writes nothing
