# citypulse — the two commands of the quick start are `make demo` and `make test`.
# Everything is installed from the project's own files: uv (pinned) from PyPI, the Python
# environment from uv.lock, the Kinesis emulator from infra/local/package-lock.json.

PYTHON ?= python3.11
UV_VERSION := 0.13.8
UV := .cache/uv/bin/uv
VENV := .venv
# checkov conflicts with Airflow 3 (termcolor, packaging, cachetools, boto3): its own environment,
# installed from hash-pinned requirements (infra/tools/requirements.in says how to re-pin).
CHECKOV_VENV := .cache/checkov-venv
SENSORS ?= 2000
DURATION ?= 60

.PHONY: install tools browser demo test lint format down clean

install: $(VENV)/.installed

$(UV):
	$(PYTHON) -m venv .cache/uv
	.cache/uv/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(VENV)/.installed: pyproject.toml uv.lock infra/local/package-lock.json | $(UV)
	$(UV) sync --frozen --python $(PYTHON)
	cd infra/local && npm ci --no-audit --no-fund --loglevel=error
	touch $@

tools: $(CHECKOV_VENV)/.installed  ## the IaC scanners' own environment (checkov)

$(CHECKOV_VENV)/.installed: infra/tools/requirements.txt | $(UV)
	rm -rf $(CHECKOV_VENV)
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(UV) pip install --quiet --python $(CHECKOV_VENV)/bin/python --require-hashes -r infra/tools/requirements.txt
	touch $@

demo: install  ## the main job: the whole flow once, with a summary
	$(VENV)/bin/citypulse demo --sensors $(SENSORS) --duration $(DURATION)

# Headless Chromium for the dashboard's browser test (Debian's package; never a downloaded build).
browser:
	@test -x /usr/bin/chromium || (apt-get update && apt-get install -y --no-install-recommends chromium)

test: install tools browser  ## lint, then every test (unit, integration against real servers, end to end, IaC scans)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest

lint: install
	$(VENV)/bin/ruff check .

format: install
	$(VENV)/bin/ruff format .

mwaa-bundle: install  ## dist/mwaa-bundle.zip: dags/ + streaming, expectations, dbt_project + requirements, startup.sh
	$(VENV)/bin/python -m infra.mwaa.bundle dist/mwaa-bundle.zip

down: install
	$(VENV)/bin/citypulse down

clean: down
	rm -rf .citypulse
