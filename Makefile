# Two entry points (see README): `make demo` and `make test`. Both install everything first.
# Installing is idempotent: apt packages are checked before apt-get runs, and the venv is
# rebuilt only when setup.py or constraints.txt change.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := pkg-config libturbojpeg0-dev libopencv-dev
DEMO_DIR ?= demo

.PHONY: install test demo clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: setup.py constraints.txt
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing apt packages: $$missing"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -c constraints.txt numpy torch torchvision
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	$(PY) -m pip check
	@touch $@

test: install
	$(PY) -m pytest -q tests

# Each step writes its output atomically, so a finished step is skipped when `make demo` reruns.
# Then MoCo v2 (vanilla) on the DALI loader, and its linear probe + Background-Challenge report.
demo: install $(DEMO_DIR)/built/manifest.json $(DEMO_DIR)/runs/moco_vanilla/report.md
	$(VENV)/bin/objloader-build --verify $(DEMO_DIR)/built
	$(VENV)/bin/objloader-viz $(DEMO_DIR)/built --split train --out $(DEMO_DIR)/grid_train.png
	$(VENV)/bin/objloader-viz $(DEMO_DIR)/built --split multi --out $(DEMO_DIR)/grid_multi.png
	cat $(DEMO_DIR)/runs/moco_vanilla/report.md

# loss.png is written last, so an interrupted run is retrained rather than taken as finished.
$(DEMO_DIR)/runs/moco_vanilla/loss.png: $(DEMO_DIR)/built/manifest.json
	$(PY) train/moco.py --loader dali --data $(DEMO_DIR)/built/train --out $(DEMO_DIR)/runs/moco_vanilla

$(DEMO_DIR)/runs/moco_vanilla/report.md: $(DEMO_DIR)/runs/moco_vanilla/loss.png
	$(PY) train/linear.py --checkpoint $(DEMO_DIR)/runs/moco_vanilla/checkpoint.pt --data $(DEMO_DIR)/built

$(DEMO_DIR)/data/demo.json: | install
	$(VENV)/bin/objloader-demo $(DEMO_DIR)/data

$(DEMO_DIR)/built/manifest.json: $(DEMO_DIR)/data/demo.json
	$(VENV)/bin/objloader-build $(DEMO_DIR)/data $(DEMO_DIR)/built --masks gt --overwrite

clean-demo:
	rm -rf $(DEMO_DIR)
