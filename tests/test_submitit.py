"""Sweeps through submitit: `hydra/launcher=submitit_local` runs a multirun the way `hydra/launcher=slurm` does
(each job pickled and run in its own subprocess by submitit), here without a cluster; a missing plugin is one
clear message."""

from __future__ import annotations

import json
import sys

import hydra
import pytest
from helpers.launch import TINY, TRAIN, python, run

import proscale.cli
from proscale.utils.hydra_utils import compose_config
from proscale.utils.launch import MissingLauncherPluginError, check_launcher_plugin

pytestmark = pytest.mark.e2e  # runs the apps / launchers in subprocesses


@pytest.mark.slow  # two training subprocesses started by submitit: ~1 min on an idle 2-core machine
def test_submitit_local_multirun_writes_two_results_and_the_table(tmp_path):
    sweep = tmp_path / "sweep"
    common = [*TINY, f"paths.log_dir={tmp_path / 'logs'}", f"paths.data_dir={tmp_path / 'data'}"]
    common += ["data.num_train=2", "data.num_val=2", "steps=1"]
    sweep_args = ["hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}", "model/encoder=m2f,proscale"]
    command = python(TRAIN, "-m", *common, *sweep_args)
    # both jobs would generate the same synthetic data folder at once: prepare it first, as a cluster user would
    data_cfg = compose_config("train", common, output_dir=tmp_path / "compose")
    hydra.utils.instantiate(data_cfg.data).prepare_data()
    code, output = run(command, timeout=900)
    assert code == 0, output[-5000:]

    assert list((sweep / ".submitit").iterdir())  # submitit's job folders: the jobs really went through submitit
    results = [json.loads((sweep / str(num) / "results.json").read_text()) for num in (0, 1)]
    assert [r["status"] for r in results] == ["ok", "ok"]
    assert [r["tags"]["encoder"] for r in results] == ["m2f", "proscale"]
    assert all(0.0 <= r["PQ"] <= 100.0 and r["total_gflops"] > 0 for r in results)

    code, output = run(python("scripts/make_tables.py", str(sweep)))
    assert code == 0, output[-3000:]
    table = (sweep / "ablation.md").read_text()
    assert "M2F" in table and "PRO-SCALE (3,3,3)" in table
    assert (sweep / "ablation.csv").read_text().count("\n") >= 3  # header + one row per encoder


def test_submitit_launcher_configs_compose(tmp_path):
    for launcher, target in [("submitit_local", "LocalLauncher"), ("slurm", "SlurmLauncher")]:
        cfg = compose_config("train", ["experiment=tiny", f"hydra/launcher={launcher}"], output_dir=tmp_path)
        assert cfg.hydra.launcher._target_.endswith(target)
    cfg = compose_config("train", ["experiment=tiny", "hydra/launcher=slurm"], output_dir=tmp_path)
    assert cfg.hydra.launcher.max_num_timeout == 3 and cfg.hydra.launcher.timeout_min == 4320


def test_missing_submitit_plugin_is_one_clear_message(monkeypatch, capsys):
    # simulate the plugin not being installed: importing it fails
    monkeypatch.setitem(sys.modules, "hydra_plugins.hydra_submitit_launcher.submitit_launcher", None)
    with pytest.raises(MissingLauncherPluginError, match=r"hydra/launcher=slurm .* pip install 'proscale\[slurm\]'"):
        check_launcher_plugin(["-m", "experiment=tiny", "hydra/launcher=slurm"])
    check_launcher_plugin(["-m", "hydra/launcher=local", "experiment=tiny"])  # other launchers need nothing

    monkeypatch.setattr(sys, "argv", ["train.py", "-m", "hydra/launcher=submitit_local", "experiment=tiny"])
    with pytest.raises(SystemExit) as stopped:
        proscale.cli.train_main()
    assert stopped.value.code == 2
    assert "hydra/launcher=submitit_local runs the sweep through submitit" in capsys.readouterr().err
