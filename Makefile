# proscale: every target installs what it needs into .venv first (idempotent, re-run when pyproject.toml or
# constraints.txt changes). constraints.txt pins the exact versions CI tests; pyproject.toml holds the ranges.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export MPLBACKEND ?= Agg
export WANDB_MODE ?= offline
# failing runs print one message (traceback in results.json); `HYDRA_FULL_ERROR=1 make train` prints it too

.PHONY: install constraints test test-all lint train ablation ablation-quick flops-table bench notebooks clean

$(STAMP): pyproject.toml setup.py constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

## Rewrite constraints.txt from what .venv holds (after `$(PY) -m pip install -e '.[dev]'` with changed dependencies).
constraints:
	$(PY) scripts/update_constraints.py

lint: $(STAMP)
	$(PY) -m ruff check .

## The test command (README, .ci/run): lint + the default (fast) suite.
test: lint
	$(PY) -m pytest -q

## Everything, slow tests included.
test-all: lint
	$(PY) -m pytest -q -m ''

## The main job on the embedded default: synthetic data, PRO-SCALE (3,3,3) (LPE off: benchmarks/MAIN_JOB.md), CPU.
## `make train` and `make ablation` assume the machine is theirs: OpenMP's own spin-then-sleep wait, faster alone
## (benchmarks/shared_cpu.md: 0.40 vs 0.61 s/step with the apps' PASSIVE default); an exported OMP_WAIT_POLICY wins
## (`OMP_WAIT_POLICY=PASSIVE make train` on a machine shared with other jobs).
DEDICATED_WAIT := OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-default}

train: $(STAMP)
	$(DEDICATED_WAIT) $(PY) scripts/train.py experiment=cpu_synthetic $(ARGS)

## The paper's ablation on the CPU preset (conf/experiment/cpu_ablation.yaml): data + backbone pre-training once,
## the 24 jobs in LANES parallel training processes (each cores/LANES threads, OMP_WAIT_POLICY=PASSIVE; LANES=1 is
## the plain sequential multirun), round-robin inference timing, then table + plot in the sweep folder.
## Overrides: `make ablation ARGS="steps=600 model.backbone.model_name=resnet18"`.
LANES ?= 2

ablation: $(STAMP)
	$(DEDICATED_WAIT) $(PY) scripts/ablation.py --lanes $(LANES) experiment=cpu_ablation $(ARGS)

## The same pipeline as a SMOKE RUN (tiny data, 10 steps, 1 seed; minutes): checks that it works, numbers mean nothing.
ablation-quick: $(STAMP)
	$(DEDICATED_WAIT) $(PY) scripts/ablation.py --lanes $(LANES) experiment=cpu_ablation_quick $(ARGS)

## GFLOPs / params of every encoder x LPE x backbone + the paper's four numbers: CSV, markdown and PNG under
## outputs/flops/ (`make flops-table ARGS="--speed --speed-size 512 704"` adds measured ms columns).
flops-table: $(STAMP)
	$(PY) scripts/flops.py --table $(ARGS)

## Speed report: op vs HF, pixel decoders, PRO-SCALE vs M2F, GEMM fraction, training step.
## `make bench ARGS=--quick` (< 1 min idle); on a CPU shared with other jobs use ARGS="--threads 1 --clock cpu".
bench: $(STAMP)
	$(PY) scripts/benchmark.py --out benchmarks/RESULTS.md --json benchmarks/results.json $(ARGS)

## Execute notebooks/*.ipynb in place on their default settings, so they are stored with their figures (commit them).
## One notebook: `make notebooks ARGS=inspect_predictions.ipynb`.
notebooks: $(STAMP)
	$(PY) scripts/execute_notebooks.py $(ARGS)

clean:
	rm -rf outputs logs .pytest_cache .ruff_cache
