# The two commands of the README:
#   make demo   set up .venv if needed, then run the main job
#   make test   set up .venv if needed (with the test extra), then lint and run the suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HASH := $(shell cat pyproject.toml | cksum | cut -d' ' -f1)
# The demo needs the library; the tests also need the test tools and the `compare` extra
# (torch + pytorch-fid for the Inception cross-check).
BASE_STAMP := $(VENV)/.installed-base-$(HASH)
TEST_STAMP := $(VENV)/.installed-test-$(HASH)
OUT ?= out

.PHONY: demo test lint venv clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip

$(BASE_STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e .
	rm -f $(VENV)/.installed-base-*
	touch $@

$(TEST_STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet -e '.[test,compare]'
	rm -f $(VENV)/.installed-*
	touch $(BASE_STAMP) $@

venv: $(TEST_STAMP)

# train.py, sample.py and the plots keep what XLA compiles in ~/.cache/diffusion_jax/jax, so a
# second `make demo` skips most compilation (DIFFUSION_JAX_COMPILATION_CACHE=off|DIR to change).
demo: $(BASE_STAMP)
	$(PY) train.py --config configs/digits.py --workdir $(OUT)/digits
	$(PY) sample.py --workdir $(OUT)/digits --num 100 --method ddim --steps 50 \
		--out $(OUT)/digits/generated
	$(PY) -m diffusion_jax.evaluation digits --samples $(OUT)/digits/generated/samples.npz
	$(PY) -m diffusion_jax.plots loss --workdir $(OUT)/digits --out $(OUT)/digits/loss.png
	$(PY) -m diffusion_jax.plots trajectory --workdir $(OUT)/digits --out $(OUT)/digits/trajectory.png
	$(PY) -m diffusion_jax.plots schedules --out $(OUT)/schedules.png
	$(PY) -m diffusion_jax.plots noising --out $(OUT)/noising.png

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) $(OUT)
