# The two commands of the README:
#   make demo   set up .venv if needed, then run the main job
#   make test   set up .venv if needed (with the test extra), then lint and run the suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
OUT ?= out

.PHONY: demo test lint venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) train.py --config configs/digits.py --workdir $(OUT)/digits
	$(PY) sample.py --workdir $(OUT)/digits --num 100 --method ddim --steps 50 \
		--out $(OUT)/digits/generated
	$(PY) -m diffusion_jax.evaluate digits --samples $(OUT)/digits/generated/samples.npz
	$(PY) -m diffusion_jax.plots schedules --out $(OUT)/schedules.png
	$(PY) -m diffusion_jax.plots noising --out $(OUT)/noising.png

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) $(OUT)
