# eva_bench: `make reproduce-language` runs the main job, `make test` the tests. Both create .venv on first use.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Fashion-MNIST (the vision CPU default's pretraining data) comes from Debian's package, installed on first use
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
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

.PHONY: install test test-slow reproduce-language reproduce-vision reproduce-rl tables bench generate clean bench-gpu

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

test-slow: $(STAMP) $(FASHION_MNIST)
	$(PY) -m pytest -q -m slow

# The language table sweep (CPU default: stories260K, ~20 min on 2 cores), then its tables. A rerun skips finished
# runs; tables are written even when a run failed (failed runs are recorded and left out of the means).
# LAUNCH=slurm: submit the sweep as a SLURM array (PARTITION=<name> or $$EVA_BENCH_SLURM_PARTITION); LAUNCH=local: the
# same submitit path on this machine; unset: the experiment's own launcher (CPU default: two joblib jobs)
LAUNCH ?=
PARTITION ?=
LAUNCHER = $(if $(LAUNCH),hydra/launcher=$(LAUNCH)) $(if $(PARTITION),hydra.launcher.partition=$(PARTITION))

reproduce-language: $(STAMP)
	$(PY) -m tasks.language.train -m experiment=$(EXPERIMENT) $(LAUNCHER) $(ARGS); status=$$?; \
	$(PY) -m eva_bench.tables --experiment $(EXPERIMENT); exit $$status

# The vision sweep (CPU default: the Fashion-MNIST-pretrained tiny ViT on five VTAB-1K-style tasks, ~20 min on 2
# cores): the backbone is built first with every core (cached), then the sweep, then its tables.
reproduce-vision: $(STAMP) $(FASHION_MNIST)
	$(PY) -m tasks.vision.prepare experiment=$(VISION_EXPERIMENT)
	$(PY) -m tasks.vision.train -m experiment=$(VISION_EXPERIMENT) $(LAUNCHER) $(ARGS); status=$$?; \
	$(PY) -m eva_bench.tables --experiment $(VISION_EXPERIMENT); exit $$status

# The RL sweep (CPU default: Meta-World expert data as Minari datasets, a decision transformer pretrained on 10 tasks,
# LoRA-fine-tuned on 3 held-out ones); data generation and pretraining happen once, cached, inside the first run.
reproduce-rl: $(STAMP)
	$(PY) -m tasks.rl.train -m experiment=$(RL_EXPERIMENT) $(LAUNCHER) $(ARGS); status=$$?; \
	$(PY) -m eva_bench.tables --experiment $(RL_EXPERIMENT); exit $$status

tables: $(STAMP)
	$(PY) -m eva_bench.tables

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
