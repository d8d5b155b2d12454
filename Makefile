# Set-up on a fresh machine is `make demo` or `make test`: each creates .venv and installs
# everything first. CPU torch is installed before the project so that pip keeps it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test fuzz bench bench-quick bench-detail architectures proto clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e '.[server,dev,all]'
	$(PY) scripts/install_helm.py $(VENV)/bin/helm
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/loramux demo

test: $(STAMP)
	$(PY) -m pytest -q

# The full-size fuzzing, churn, shared-store fault and LoRA-kernel shape runs (the suite runs a small version of the same tests).
fuzz: $(STAMP)
	LORAMUX_FUZZ_EXAMPLES=3000 LORAMUX_CHURN_S=60 LORAMUX_STORE_FAULTS=2000 LORAMUX_STORE_RESTARTS=3 \
		LORAMUX_KERNEL_CASES=400 $(PY) -m pytest -q tests/test_fuzz.py tests/test_hostile_adapters.py tests/test_store_faults.py \
		tests/test_lora_kernels.py::test_random_shapes_ranks_and_siblings_equal_the_float64_reference

# Tiny random models of 27 transformers architectures served at default flags (and with the
# static cache) against peft; every case equal to peft or refused cleanly (about 2 minutes).
architectures: $(STAMP)
	$(PY) scripts/architecture_sweep.py

# What users get: the server's default flags over models x adapter shapes x sampling, every
# system side by side, worst cell first, then merges, quantization and the inference options
# (about 50 minutes on 2 CPU cores in all); writes bench-results/.
bench: $(STAMP)
	$(PY) -m loramux.bench.matrix --out bench-results
	$(PY) -m loramux.bench.merge --out bench-results
	$(PY) -m loramux.bench.quantization --out bench-results
	$(PY) -m loramux.bench.inference_options --out bench-results
	$(PY) -m loramux.bench.step_floor --out bench-results
	$(PY) -m loramux.bench.front_doors --out bench-results
	$(PY) -m loramux.bench.generation_controls --out bench-results
	$(PY) -m loramux.bench.join_policy --out bench-results

bench-quick: $(STAMP)
	$(PY) -m loramux.bench.matrix --quick --out bench-results
	$(PY) -m loramux.bench.merge --quick --out bench-results
	$(PY) -m loramux.bench.quantization --quick --out bench-results
	$(PY) -m loramux.bench.inference_options --quick --out bench-results
	$(PY) -m loramux.bench.step_floor --quick --out bench-results
	$(PY) -m loramux.bench.front_doors --quick --out bench-results
	$(PY) -m loramux.bench.generation_controls --quick --out bench-results
	$(PY) -m loramux.bench.join_policy --quick --out bench-results

# One workload in depth: Poisson arrivals, continuous vs static, microbenchmarks, gRPC and tracing cost.
bench-detail: $(STAMP)
	$(PY) -m loramux.bench --out bench-results

proto: $(STAMP)
	$(PY) scripts/gen_proto.py

clean:
	rm -rf $(VENV) .demo .pytest_cache bench-results
