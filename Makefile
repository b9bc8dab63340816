# Two commands for a newcomer: `make demo` and `make test`.
# Both create (or reuse) the virtual environment .venv inside the repo.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmcl-installed
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
DATA := data/digits
DEMO_RUN := runs/clip_digits

.PHONY: install demo test gpu-smoke lint mutation clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mmcl-prep digits --out $(DATA)
	$(VENV)/bin/accelerate launch --config_file accelerate_config.yaml -m mmcl train \
		--config configs/clip_digits.yaml --set run.output_dir=$(DEMO_RUN) --set train.progress=false
	$(VENV)/bin/mmcl eval zeroshot --model $(DEMO_RUN)/final \
		--shards "$(DATA)/test-{000000..000001}.tar" --templates digits

test: $(STAMP)
	$(PY) -m pytest tests

# Every GPU benchmark of benchmarks/run_gpu.sh at a tiny size on the CPU: a GPU session's 15 minutes are not
# spent finding a broken script (about 4 minutes on 2 cores; CI runs it after the tests).
gpu-smoke: $(STAMP)
	rm -rf runs/gpu-smoke
	SMOKE=1 BUDGET=1800 PYTHON=$(PY) bash benchmarks/run_gpu.sh runs/gpu-smoke

# Mutation score of mmcl/objectives against the tests that cover each function (see docs/testing.md).
mutation: $(STAMP)
	rm -rf mutants
	$(VENV)/bin/mutmut run --max-children 2 || true
	$(VENV)/bin/mutmut results --all true > mutation-results.txt || true
	$(PY) -m benchmarks.mutation_score mutation-results.txt

lint: $(STAMP)
	$(VENV)/bin/ruff check mmcl data_prep tests benchmarks

clean:
	rm -rf $(VENV) data runs mutants mutation-results.txt
