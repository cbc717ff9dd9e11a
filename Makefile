# Two commands on a fresh machine: `make run` and `make test`. Both create .venv when missing and
# (re)install only when pyproject.toml (or tools/install.py) changed since the last install.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kdray-installed

.PHONY: install run smoke serve kuberay test test-fast test-cluster bench-check lint format clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# tools/install.py: uv with pip's configuration (indexes, constraints), about 45 s against pip's
# 2 min on 2 cores; pip when uv fails or KDRAY_INSTALLER=pip.
$(STAMP): pyproject.toml tools/install.py | $(PY)
	$(PY) tools/install.py -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)  ## the main job on configs/default.yaml
	$(PY) tune/run.py $(ARGS)

smoke: $(STAMP)  ## the whole pipeline on configs/smoke.yaml (minutes)
	$(PY) tune/run.py --config configs/smoke.yaml --workspace workspace-smoke $(ARGS)

# The HTTP service over the registry `make run` filled: http://127.0.0.1:8000/ (kdray.serving.run).
# HAProxy on the port, in front of the Gateway replica's own HTTP server (direct ingress): no
# Python proxy hop (docs/serving.md; kdray.serving.launch.INGRESS["haproxy"], what tests use),
# its stats and metrics on loopback. `serve run --address local`: always a private Ray, never
# another one running on this machine. The API needs a bearer token (serve/config.yaml, auth:
# token): $KDRAY_SERVE_TOKEN, else a new one per start, printed in a link that hands it to the
# viewer. Ctrl-C or SIGTERM stops it and everything it started (exec: the signal reaches it).
# ARGS="--port 8100" serves on another port.
serve: $(STAMP)  ## serve the registered champions (serve/config.yaml) on 127.0.0.1:8000
	exec env KDRAY_HOME="$${KDRAY_HOME:-$(CURDIR)/workspace}" RAY_USAGE_STATS_ENABLED=0 \
	$(PY) -m kdray.serving.run serve/config.yaml $(ARGS)

# The viewer's browser test drives Debian's chromium through chromedriver: installed when missing.
CHROMEDRIVER := /usr/bin/chromedriver
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(CHROMEDRIVER):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver

# Two pytest-xdist workers: the tests that read the smoke run stay on one (tests/conftest.py), the
# rest share out; measured in docs/testing.md. TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2

test: $(STAMP) $(CHROMEDRIVER)  ## the test suite (the 2-node cluster: test-cluster; benchmarks: bench-check)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadgroup -m "not benchmark and not cluster" $(PYTEST_ARGS)

# The smoke pipeline as a Ray job on a local 2-node cluster, logging to an MLflow server through
# an outage (tests/test_cluster.py): CI runs it after `make test` (.ci/run); about 3 min alone.
test-cluster: $(STAMP)  ## the 2-node cluster test (pytest -m cluster)
	$(PY) -m pytest -m cluster tests/test_cluster.py $(PYTEST_ARGS)

# Every script under benchmarks/ with --quick (tiny sizes: does it still run and print its
# figures?). CI runs it after `make test` and `make test-cluster` (.ci/run); about 3.5 min.
bench-check: $(STAMP)  ## the benchmarks' --quick runs (tests/test_benchmarks.py -m benchmark)
	$(PY) -m pytest -n $(TEST_WORKERS) -m benchmark tests/test_benchmarks.py $(PYTEST_ARGS)

test-fast: $(STAMP)  ## unit tests only (no Ray / MLflow integration)
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m kdray.deploy.kuberay --check

# deploy/kuberay/rayservice.yaml's serveConfigV2, written from serve/config.yaml (docs/kubernetes.md)
kuberay: $(STAMP)  ## regenerate the RayService's serveConfigV2 from serve/config.yaml
	$(PY) -m kdray.deploy.kuberay

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf workspace workspace-smoke .pytest_cache
