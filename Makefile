# eva_bench: `make reproduce-language` runs the main job, `make test` the tests. Both create .venv on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Fashion-MNIST (the vision CPU default's pretraining data) comes from Debian's package, installed on first use
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# Chromium's driver (the report's browser test, in the slow suite) comes from Debian's packages, installed on first use
CHROMEDRIVER := /usr/bin/chromedriver
# offline by default: every accidental hub call would otherwise hang ~30 s; W&B logs offline without a key
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline
export EVA_BENCH_DATA ?= $(abspath ../shared/data)
PROTOCOL ?= fixed
# PROTOCOL=tuned: each method x rank at its own lr, chosen on a validation split (eva_bench/protocol.py)
EXPERIMENT ?= language_cpu$(if $(filter tuned,$(PROTOCOL)),_tuned)
ARGS ?=

# make reproduce-vision [PROTOCOL=tuned] [EXPERIMENT=paper_vtab_dinov2_g14]: the vision CPU default unless named
VISION_EXPERIMENT := $(if $(filter command line,$(origin EXPERIMENT)),$(EXPERIMENT),vision_cpu$(if $(filter tuned,$(PROTOCOL)),_tuned))

# make reproduce-rl [PROTOCOL=tuned] [EXPERIMENT=paper_rl_cw10]: the RL CPU default unless named
RL_EXPERIMENT := $(if $(filter command line,$(origin EXPERIMENT)),$(EXPERIMENT),rl_cpu$(if $(filter tuned,$(PROTOCOL)),_tuned))

.PHONY: install test test-slow reproduce-language reproduce-vision reproduce-rl promote tables bench generate clean bench-gpu

install: $(STAMP) $(FASHION_MNIST)
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

$(FASHION_MNIST):
	@test -e $(EVA_BENCH_DATA)/fashion-mnist/train-images-idx3-ubyte.gz && exit 0; \
	command -v apt-get >/dev/null || { echo "Fashion-MNIST: install Debian's dataset-fashion-mnist, or put its idx files under \$$EVA_BENCH_DATA/fashion-mnist"; exit 1; }; \
	(apt-get install -y -qq dataset-fashion-mnist || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)) >/dev/null

# one torch thread per test process: the tests use tiny models, where extra threads only add contention
test: $(STAMP) $(FASHION_MNIST)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

# the slow suite includes the report's browser test and a sweep on a real one-node SLURM (tests/test_slurm.py: it
# starts one with cluster/slurm-single-node.sh, installing Debian's packages as root; skipped, saying why, elsewhere)
test-slow: $(STAMP) $(FASHION_MNIST) $(CHROMEDRIVER)
	$(PY) -m pytest -q -m slow

# Reproduce: the experiment's sweep into a results root outside git ($(RUNS)), its tables there ($(RUNS)/tables/), then
# the comparison with the committed records of the same run ids (eva_bench/reproduce.py). A rerun launches only runs
# without a finished record in $(RUNS); ARGS=force=true retrains them all. DRY_RUN=1 prints the plan (runs, ETA) and
# launches nothing; STRICT=1 fails the target when a run or table cell differs from the committed one beyond 1e-5.
# LAUNCH=slurm: submit the sweep as a SLURM array (PARTITION=<name> or $$EVA_BENCH_SLURM_PARTITION); LAUNCH=slurm_cpu:
# the same on a CPU-only partition (no GPU request, 1 CPU and 4 GB per run); LAUNCH=local: the same submitit path on
# this machine; unset: the experiment's own launcher (CPU defaults: two joblib jobs).
# A named sweep, ARGS='experiment_name=<name> ...', writes its records to $(RUNS)/<name>/: its tables and comparison
# then read that folder (the last experiment_name= in ARGS wins, as on Hydra's command line); with no committed
# results/<name>/, every run is "no reference".
RUNS ?= $(or $(EVA_BENCH_RESULTS),runs)
DRY_RUN ?=
STRICT ?=
LAUNCH ?=
PARTITION ?=
LAUNCHER = $(if $(LAUNCH),hydra/launcher=$(LAUNCH)) $(if $(PARTITION),hydra.launcher.partition=$(PARTITION))

# the experiment_name given in ARGS, if any (the records' folder under $(RUNS))
NAMED = $(lastword $(patsubst ++experiment_name=%,%,$(patsubst experiment_name=%,%,$(filter experiment_name=% \
  ++experiment_name=%,$(ARGS)))))

# $(call reproduce,<recipe module>,<experiment>): sweep; then, unless a dry run, tables and comparison of the folder
# the records went to ($(NAMED) or the experiment). Tables are written even when a run failed (failed runs are
# recorded and left out of the means); the sweep's status wins.
define reproduce
	$(PY) -m $(1) -m experiment=$(2) results_dir=$(RUNS) $(LAUNCHER) $(if $(DRY_RUN),hydra.sweeper.dry_run=true) \
	  $(ARGS); status=$$?; \
	if [ -z "$(DRY_RUN)" ]; then \
	  $(PY) -m eva_bench.tables --results $(RUNS) --experiment $(or $(NAMED),$(2)) && \
	  $(PY) -m eva_bench.reproduce --experiment $(or $(NAMED),$(2)) --fresh $(RUNS) $(if $(STRICT),--strict) \
	  || status=1; \
	fi; exit $$status
endef

# The language table sweep (CPU default: stories260K, 48 runs, ~14 min on 2 idle cores, as the README measured;
# DRY_RUN=1 estimates it from the committed records' times).
reproduce-language: $(STAMP)
	$(call reproduce,tasks.language.train,$(EXPERIMENT))

# The vision sweep (CPU default: the Fashion-MNIST-pretrained tiny ViT on five VTAB-1K-style tasks, ~20 min on 2
# cores): the backbone is built first (one thread, cached), then the sweep, its tables and comparison, then the
# backbone's SHA-256 against the committed manifest (results/artifacts.json).
reproduce-vision: $(STAMP) $(FASHION_MNIST)
	$(if $(DRY_RUN),,$(PY) -m tasks.vision.prepare experiment=$(VISION_EXPERIMENT))
	$(call reproduce,tasks.vision.train,$(VISION_EXPERIMENT))
	$(if $(DRY_RUN),,$(PY) -m eva_bench.artifacts vision $(VISION_EXPERIMENT))

# The RL sweep (CPU default: Meta-World expert data as Minari datasets, a decision transformer pretrained on 10 tasks,
# LoRA-fine-tuned on 3 held-out ones); data generation and pretraining happen once, cached, inside the first run;
# last, the datasets' and checkpoint's SHA-256s against the committed manifest (results/artifacts.json).
reproduce-rl: $(STAMP)
	$(call reproduce,tasks.rl.train,$(RL_EXPERIMENT))
	$(if $(DRY_RUN),,$(PY) -m eva_bench.artifacts rl $(RL_EXPERIMENT))

# Promote the fresh records of EXPERIMENT (default language_cpu) to the committed reference, then rebuild its tables:
# review the comparison first, then commit results/ (see docs/records.md)
promote: $(STAMP)
	$(PY) -m eva_bench.reproduce --experiment $(EXPERIMENT) --fresh $(RUNS) --promote
	$(PY) -m eva_bench.tables --experiment $(EXPERIMENT)

tables: $(STAMP)
	$(PY) -m eva_bench.tables

.PHONY: figures report test-report

# SVG figures from the records (rank curves, lr selection, EVA's ranks, loss, controls, init cost): results/figures/
figures: $(STAMP)
	$(PY) -m eva_bench.figures

# the static HTML report from the records, tables and figures, readable from file://: results/report/index.html
report: $(STAMP) tables figures
	$(PY) -m eva_bench.report

# Chromium and ChromeDriver (the report's browser test) come from Debian's packages, installed on first use
$(CHROMEDRIVER):
	@command -v apt-get >/dev/null || { echo "the browser test needs Debian's chromium and chromium-driver"; exit 1; }; \
	(apt-get install -y -qq chromium chromium-driver || (apt-get update -qq && apt-get install -y -qq chromium \
	  chromium-driver)) >/dev/null

# the report in headless Chromium (tests/test_report.py; its browser tests are marked slow, out of `make test`)
test-report: $(STAMP) $(CHROMEDRIVER)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m 'slow or not slow' tests/test_report.py

bench: $(STAMP)
	$(PY) -m bench.language
	$(PY) -m bench.eva
	$(PY) -m bench.init
	$(PY) -m bench.rl
	$(PY) -m bench.vision

# on a GPU machine: LoRA training tokens/s, peak memory and EVA / LoRA-DA init cost at a 1B-class size (bench/gpu.py),
# then the language tables' expected GPU-hours at the rate it measured (bench/gpu_hours.py)
bench-gpu: $(STAMP)
	$(PY) -m bench.gpu
	$(PY) -m bench.gpu_hours --measured $$(ls -t bench/results/gpu-*.json | head -1)

generate: $(STAMP)
	$(PY) -m tasks.language.generate --prompt "Once upon a time"

clean:
	rm -rf outputs multirun .pytest_cache
