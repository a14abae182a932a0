# Newcomer commands: `make demo` (install + train the class-conditional digits recipe + measure it), `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo

.PHONY: install demo test lint clean constraints

install: $(VENV)/.installed

# torch and torchvision are resolved together from the registry (never pin a lone torch wheel:
# a torchvision build must match it, or `import torchvision` and diffusers fail).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	$(PY) -c "import torch, torchvision, torch_fidelity, diffusers, accelerate; print('torch', torch.__version__, '| torchvision', torchvision.__version__, '| diffusers', diffusers.__version__)"
	touch $@

demo: install
	$(PY) train.py --config configs/digits_cond.yaml --output_dir $(DEMO_DIR) --resume_from_checkpoint latest
	$(PY) experiments/digits_quality.py --checkpoint $(DEMO_DIR)/pipeline --num_samples 1000 \
		--output $(DEMO_DIR)/quality.json --grid $(DEMO_DIR)/samples.png

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check cdrl tests experiments benchmarks train.py
	$(VENV)/bin/ruff format --check cdrl tests experiments benchmarks train.py

# Refresh constraints.txt (monthly, or when a dependency's release matters): resolve the newest releases
# in a scratch venv, run the suite there at one and two threads, and keep the new pins only if both pass.
constraints:
	rm -rf .venv-refresh
	$(PYTHON) -m venv .venv-refresh
	.venv-refresh/bin/python -m pip install --quiet --upgrade pip
	.venv-refresh/bin/python -m pip install --quiet -e ".[dev]"
	OMP_NUM_THREADS=1 .venv-refresh/bin/python -m pytest -q
	OMP_NUM_THREADS=2 .venv-refresh/bin/python -m pytest -q
	{ sed -n '1,3p' constraints.txt; .venv-refresh/bin/python -m pip freeze --exclude-editable | grep -v '^cdrl'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .venv-refresh

clean:
	rm -rf $(VENV) .pytest_cache
