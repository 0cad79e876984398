# stonelab: `make run` and `make test` each do every missing set-up step themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP_SYS := $(VENV)/.system-packages
STAMP_PY  := $(VENV)/.installed

.PHONY: run test test-crash setup bench fuzz clean

setup: $(STAMP_SYS) $(STAMP_PY)

$(STAMP_SYS): tools/debian-packages.txt tools/ensure-system-packages
	tools/ensure-system-packages
	@mkdir -p $(VENV) && touch $@

$(STAMP_PY): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip >/dev/null 2>&1 || true
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The default suite against the reference implementation on the default kernel (in QEMU guests: KVM where it
# really works, else TCG), with a report in reports/.
run: setup
	$(VENV)/bin/stonelab run --target vm --tag default --report-dir reports

# Two workers (pytest-xdist): the guest tests are CPU-bound TCG, and CI has two cores.
test: setup
	$(PY) -m pytest -q -p no:cacheprovider -n 2 -m "not long" tests

# Only the crash engine's guest acceptance tests (part of `make test` too).
test-crash: setup
	$(PY) -m pytest -q -p no:cacheprovider -m "crash_vm or long" tests

# The boot benchmark's baseline tool (virtme-ng, from PyPI) in a venv of its own: not a project dependency.
BENCH_VENV := .bench-venv
$(BENCH_VENV)/bin/vng:
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q virtme-ng

bench: setup $(BENCH_VENV)/bin/vng
	$(PY) bench/stone.py
	$(PY) bench/blit.py
	$(PY) bench/boot.py --vng $(BENCH_VENV)/bin/vng

# The long randomized campaign over the parsers of untrusted input (make test runs a short derandomized one).
# FUZZ_ARGS=--inputs N --jobs N --seed N --target T ...
fuzz: setup
	$(PY) tools/fuzz.py $(FUZZ_ARGS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) build *.egg-info .hypothesis
