# Two commands on a fresh machine: `make demo` and `make test`.
#   make demo  - the simulator (L40S Llama-3-8B BF16), a short Locust load, the latency table
#   make test  - builds everything the tests need from scratch, runs ruff and mypy (make lint),
#                then runs every test: the harness venv, Debian's
#                prometheus/chromium/chromium-driver/docker-compose, and real vLLM's CPU build
#                in .venv-vllm (on a fresh 2-core machine: 196 s of
#                make test's 14 min 47 s; the environments take about 4.1 GB)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
VLLM_VENV ?= .venv-vllm
SYSTEM_PACKAGES := prometheus chromium chromium-driver docker-compose

.PHONY: demo test lint venv system-deps vllm-env clean

$(BIN)/harness: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,cluster]'
	touch $(BIN)/harness

venv: $(BIN)/harness

demo: venv
	$(BIN)/harness demo

# Real tools the tests start themselves (Prometheus, a headless browser, compose's validator).
system-deps:
	@missing=""; for c in prometheus promtool chromium chromedriver docker-compose; do \
	  command -v $$c >/dev/null 2>&1 || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages for:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null; \
	fi

# Real vLLM (CPU build) and lm-eval in their own venv, apart from Locust's.
vllm-env:
	HARNESS_VLLM_VENV=$(VLLM_VENV) bash tests/vllm_env.sh $(VLLM_VENV)
	@$(VLLM_VENV)/bin/python -c "import lm_eval, accelerate" 2>/dev/null || \
	  $(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check 'lm-eval[hf]==0.4.13'

# ruff and mypy as pyproject.toml configures them ([tool.ruff], [tool.mypy]: strict on servers/
# and the harness modules without gevent or Locust).
lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint venv system-deps vllm-env
	HARNESS_VLLM_VENV=$(CURDIR)/$(VLLM_VENV) $(BIN)/python -m pytest

clean:
	rm -rf $(VENV) $(VLLM_VENV)
