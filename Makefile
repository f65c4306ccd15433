# Countersign — two commands: `make demo` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
IDP_STAMP  := tests/idp/node_modules/.installed

.PHONY: demo test lint unit install clean bench bench-tools redis-server browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip==26.3"

$(STAMP): pyproject.toml requirements.lock | $(BIN)/python
	$(BIN)/pip install --quiet -c requirements.lock -e .
	touch $@

$(TEST_STAMP): $(STAMP) pyproject.toml requirements.lock
	$(BIN)/pip install --quiet -c requirements.lock -e '.[test]'
	touch $@

$(IDP_STAMP): tests/idp/package.json tests/idp/package-lock.json
	cd tests/idp && npm ci --no-audit --no-fund --loglevel=error
	touch $@

install: $(STAMP)

# `make demo PORT=9000` serves the demo on another port (default 8080).
demo: $(STAMP)
	$(BIN)/countersign demo $(if $(PORT),--port $(PORT))

lint: $(TEST_STAMP)
	$(BIN)/ruff check proxy tests bench
	$(BIN)/ruff format --check proxy tests bench
	$(BIN)/mypy proxy

# The tests start their own redis-server on a free port; install it where it is missing.
redis-server:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (Debian package)"; \
	  apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }

# The web inbox's browser tests (tests/e2e/test_inbox_browser.py) drive headless Chromium through
# selenium; browser downloads do not work everywhere, so use the Debian packages where missing.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  echo "installing chromium and chromium-driver (Debian packages)"; \
	  apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; }

# The benchmark (bench/run_all.py, issue 7) drives load with wrk and compares with nginx: install
# them where missing, and stop the nginx service the package may start (the bench runs its own).
# `make bench PY_SPY=/path/to/py-spy` adds a profile of the proxy to the results.
bench-tools:
	@command -v wrk >/dev/null && command -v nginx >/dev/null || { \
	  echo "installing wrk and nginx (Debian packages)"; \
	  apt-get update -qq && apt-get install -y -qq wrk nginx >/dev/null; \
	  nginx -s quit 2>/dev/null || true; }

bench: $(STAMP) $(IDP_STAMP) redis-server bench-tools
	$(BIN)/python bench/run_all.py $(if $(PY_SPY),--py-spy $(PY_SPY))

unit: $(TEST_STAMP) $(IDP_STAMP) redis-server browser
	$(BIN)/pytest -q

test: lint unit

clean:
	rm -rf $(VENV) tests/idp/node_modules .mypy_cache .ruff_cache .pytest_cache
