# Every target bootstraps .venv itself: a fresh clone needs only Python 3.11.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run run-snowflake-demo test test-fast lint fmt proto bench load dist clean ansible-tools deploy-test deploy-test-boot

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

# Ansible controller tools (ansible-core, ansible-lint, the collections used) in a venv of
# their own: they pin packages the service does not need. Galaxy is not used.
ANSIBLE_VENV := .venv-ansible
ANSIBLE_STAMP := $(ANSIBLE_VENV)/.installed

ansible-tools: $(ANSIBLE_STAMP)

$(ANSIBLE_STAMP): ansible/requirements.txt ansible/tools/install_collections.py
	@test -x $(ANSIBLE_VENV)/bin/python || $(PYTHON) -m venv $(ANSIBLE_VENV)
	$(ANSIBLE_VENV)/bin/python -m pip install --quiet -r ansible/requirements.txt
	rm -rf $(ANSIBLE_VENV)/collections
	$(ANSIBLE_VENV)/bin/python ansible/tools/install_collections.py $(ANSIBLE_VENV)/collections
	@touch $@

run: $(STAMP)
	$(BIN)/quiver serve --demo

# fakesnow (a Snowflake emulator) seeded with sample tables, and a `quiver serve` syncing them.
run-snowflake-demo: $(STAMP)
	$(BIN)/python -m tests.snowflake_demo

test: $(STAMP) $(ANSIBLE_STAMP)
	$(BIN)/python -m pytest -q tests

# actionlint checks .github/workflows/ (expressions, action inputs, untrusted input in
# scripts); it also runs shellcheck on the run: blocks when shellcheck is on PATH.
# The inner loop: everything but the modules marked slow (subprocesses, fuzzing, deployment).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/actionlint

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The Flight SQL messages (proto_docs/flight_sql.proto) as Python: the generated module is
# committed, so only a change to the .proto needs this (grpcio-tools, a dev dependency).
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iproto_docs --python_out=flight_server/flight_sql \
		--pyi_out=flight_server/flight_sql proto_docs/flight_sql.proto

bench: $(STAMP)
	$(BIN)/python -m tests.bench

# 32 well-behaved and 4 hostile agents against a real `quiver serve` for 60 s; results in
# tests/bench/LOAD.md. Options: $(BIN)/python -m tests.load --help
load: $(STAMP)
	$(BIN)/python -m tests.load

# The wheel that ansible/ deploys. Reproducible (file times from the last commit): the
# same source gives the same wheel, so site.yml does not restart Quiver for a rebuild.
dist: $(STAMP)
	rm -rf dist build
	SOURCE_DATE_EPOCH=$$(git log -1 --format=%ct 2>/dev/null || echo 315532800) \
		$(BIN)/python -m pip wheel --quiet --no-deps --wheel-dir dist .

# Applies ansible/site.yml to a Debian bookworm root (debootstrap, cached) through the
# chroot connection, twice, and checks the result; see ansible/tests/deploy_test.sh.
deploy-test: $(STAMP) $(ANSIBLE_STAMP) dist
	bash ansible/tests/deploy_test.sh

# Then boots that root with systemd-nspawn (private network) and applies site.yml and
# restore.yml to the running system; see ansible/tests/deploy_test_boot.sh.
deploy-test-boot: deploy-test
	bash ansible/tests/deploy_test_boot.sh

clean:
	rm -rf $(VENV) $(ANSIBLE_VENV) build dist *.egg-info
