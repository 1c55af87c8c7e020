# Set-up and everyday commands. `make demo` and `make test` are the README's two commands.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A CPU build of torch; on a GPU machine install your CUDA torch first and set TORCH= (empty).
TORCH ?= torch==2.13.0
DEMO_OUT ?= runs/demo-sparsegpt-2of4

.PHONY: install demo test lint

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(if $(TORCH),$(PY) -m pip install -q $(TORCH))
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/semisparse prune smollm2-135m --method sparsegpt --pattern 2:4 \
		--nsamples 32 --seqlen 1024 -o $(DEMO_OUT) --overwrite
	$(VENV)/bin/semisparse info $(DEMO_OUT)
	$(VENV)/bin/semisparse eval smollm2-135m $(DEMO_OUT) --ppl wikitext2 --max-windows 8

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

test: lint
	$(VENV)/bin/pytest
