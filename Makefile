# make demo  — set up a local virtualenv and run the demo on the embedded default model
# make test  — set up the same virtualenv and run the whole test suite
# make fuzz  — the differential fuzzer, FUZZ_EXAMPLES cases (2,000) with a random seed it prints;
#              FUZZ_SEED=<n> replays one run; FUZZ_JOBS=<k> splits it into k parallel shards
#
# torch is pinned and installed first: a bare `torch` would pull a multi-GB CUDA build.
# On a GPU machine, set TORCH_SPEC (e.g. TORCH_SPEC='torch==2.11.0') or reuse its torch
# with VENV_FLAGS=--system-site-packages.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
VENV_FLAGS ?=
# pytest-xdist workers for `make test` (each runs torch on one thread; `auto` = one per CPU)
TEST_WORKERS ?= auto
PY := $(VENV)/bin/python
STAMP := $(VENV)/.omnicompile-$(subst =,-,$(TORCH_SPEC))
BENCH_STAMP := $(VENV)/.omnicompile-bench

FUZZ_EXAMPLES ?= 2000
FUZZ_SEED ?=
# shards run in parallel (one torch thread each), seeds FUZZ_SEED + shard; logs in fuzz-shard<i>.log
FUZZ_JOBS ?= 1

.PHONY: demo test fuzz bench setup clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $(BENCH_STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests

fuzz: $(STAMP)
	@seed=$(FUZZ_SEED); [ -n "$$seed" ] || seed=$$(od -An -N4 -tu4 /dev/urandom | tr -d ' '); \
	echo "omnicompile fuzz: $(FUZZ_EXAMPLES) cases in $(FUZZ_JOBS) shard(s), seeds $$seed + shard"; \
	pids=""; for i in $$(seq 0 $$(($(FUZZ_JOBS) - 1))); do \
		OMNICACHE_FUZZ_EXAMPLES=$$(( ($(FUZZ_EXAMPLES) + $(FUZZ_JOBS) - 1 - i) / $(FUZZ_JOBS) )) \
		OMNICACHE_FUZZ_SEED=$$((seed + i)) OMP_NUM_THREADS=1 \
		$(PY) -m pytest -q -s -p no:cacheprovider tests/test_fuzz.py -k differential \
			--hypothesis-show-statistics > fuzz-shard$$i.log 2>&1 & pids="$$pids $$!"; done; \
	rc=0; for p in $$pids; do wait $$p || rc=1; done; \
	for i in $$(seq 0 $$(($(FUZZ_JOBS) - 1))); do echo "== shard $$i (seed $$((seed + i)))"; \
		grep -E "omnicompile fuzz|passed|failed|Mismatch|Error" fuzz-shard$$i.log | tail -5; done; exit $$rc

demo: $(BENCH_STAMP)
	$(PY) bench/demo.py

bench: $(BENCH_STAMP)
	$(PY) bench/speed.py

clean:
	rm -rf $(VENV) build *.egg-info
