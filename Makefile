# citypulse — the two commands of the quick start are `make demo` and `make test`.
# Everything is installed from the project's own files: uv (pinned) from PyPI, the Python
# environment from uv.lock, the Kinesis emulator from infra/local/package-lock.json.

PYTHON ?= python3.11
UV_VERSION := 0.13.8
UV := .cache/uv/bin/uv
VENV := .venv
SENSORS ?= 2000
DURATION ?= 60

.PHONY: install browser demo test lint format down clean

install: $(VENV)/.installed

$(UV):
	$(PYTHON) -m venv .cache/uv
	.cache/uv/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(VENV)/.installed: pyproject.toml uv.lock infra/local/package-lock.json | $(UV)
	$(UV) sync --frozen --python $(PYTHON)
	cd infra/local && npm ci --no-audit --no-fund --loglevel=error
	touch $@

demo: install  ## the main job: the whole flow once, with a summary
	$(VENV)/bin/citypulse demo --sensors $(SENSORS) --duration $(DURATION)

# Headless Chromium for the dashboard's browser test (Debian's package; never a downloaded build).
browser:
	@test -x /usr/bin/chromium || (apt-get update && apt-get install -y --no-install-recommends chromium)

test: install browser  ## lint, then every test (unit, integration against real servers, end to end)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest

lint: install
	$(VENV)/bin/ruff check .

format: install
	$(VENV)/bin/ruff format .

down: install
	$(VENV)/bin/citypulse down

clean: down
	rm -rf .citypulse
