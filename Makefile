# Two entry points (see README): `make demo` and `make test`. Both install everything first: the
# core package with every optional extra (ffcv, dali, crf; setup.py) and the test tools.
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
	$(PY) -m pip install -q -c constraints.txt -e '.[all,test]'
	$(PY) -m pip check
	@touch $@

# Two pytest workers (pytest-xdist) for the two cores of the machines the suite runs on, one test
# file per worker at a time (--dist loadfile) so a module's fixtures are built once; the 15 slowest
# tests are listed at the end.
test: install
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests

# The method end to end. Each step writes its output atomically (or last), so a finished step is
# skipped when `make demo` reruns:
#   1. demo data, built with ground-truth masks (evaluation sets) -> built/
#   2. vanilla MoCo v2 on the DALI loader, its linear probe + Background-Challenge report
#   3. ContraCAM masks from the vanilla encoder (no labels), baked into built_contracam/ (train),
#      and their localisation quality against the ground truth (runs/contracam_eval)
#   4. MoCo v2 with OA-Crop + soft BG-Mixup (p = 0.4) on built_contracam/, its report, and the
#      comparison with the vanilla run (linear top-1, BG-gap)
# The small-compute recipe (benchmarks/recipe_search.py, results in benchmarks/results/
# recipe_search.md): half-width ResNet-18, 64 px, batch 256, base lr 0.06; 15 epochs keep the
# whole loop near 16 minutes on 2 CPU cores (the search's 10-minute runs use 30).
DEMO_RECIPE ?= --width 32 --image-size 64 --batch-size 256 --lr 0.06 --epochs 15
VANILLA := $(DEMO_DIR)/runs/moco_vanilla
OBJECT_AWARE := $(DEMO_DIR)/runs/moco_contracam
demo: install $(DEMO_DIR)/built/manifest.json $(VANILLA)/report.md $(DEMO_DIR)/runs/contracam_eval/contracam_eval.md \
      $(OBJECT_AWARE)/comparison.md
	$(VENV)/bin/objloader-build --verify $(DEMO_DIR)/built
	$(VENV)/bin/objloader-viz $(DEMO_DIR)/built --split train --out $(DEMO_DIR)/grid_train.png
	$(VENV)/bin/objloader-viz $(DEMO_DIR)/built --split multi --out $(DEMO_DIR)/grid_multi.png
	$(VENV)/bin/objloader-viz $(DEMO_DIR)/built_contracam --out $(DEMO_DIR)/grid_contracam.png
	cat $(DEMO_DIR)/runs/contracam_eval/contracam_eval.md | sed -n '1,/threshold sweep/p'
	cat $(OBJECT_AWARE)/comparison.md

# loss.png is written last, so an interrupted run is retrained rather than taken as finished.
$(VANILLA)/loss.png: $(DEMO_DIR)/built/manifest.json
	$(PY) train/moco.py --loader dali --data $(DEMO_DIR)/built/train --out $(VANILLA) $(DEMO_RECIPE)

$(VANILLA)/report.md: $(VANILLA)/loss.png
	$(PY) train/linear.py --checkpoint $(VANILLA)/checkpoint.pt --data $(DEMO_DIR)/built

# The training images hold one object each: single-step ContraCAM (T = 1) + CRF.
$(DEMO_DIR)/built_contracam/manifest.json: $(VANILLA)/loss.png
	$(VENV)/bin/objloader-build $(DEMO_DIR)/data/train $(DEMO_DIR)/built_contracam --masks contracam \
	  --checkpoint $(VANILLA)/checkpoint.pt --cam-iterations 1 --overwrite

$(DEMO_DIR)/runs/contracam_eval/contracam_eval.md: $(VANILLA)/loss.png
	$(VENV)/bin/objloader-cam --eval --checkpoint $(VANILLA)/checkpoint.pt --data $(DEMO_DIR)/built \
	  --limit 400 --out $(DEMO_DIR)/runs/contracam_eval

$(OBJECT_AWARE)/loss.png: $(DEMO_DIR)/built_contracam/manifest.json
	$(PY) train/moco.py --loader dali --data $(DEMO_DIR)/built_contracam --oa-crop --bg-mixup 0.4 --out $(OBJECT_AWARE) \
	  $(DEMO_RECIPE)

$(OBJECT_AWARE)/comparison.md: $(OBJECT_AWARE)/loss.png $(VANILLA)/report.md
	$(PY) train/linear.py --checkpoint $(OBJECT_AWARE)/checkpoint.pt --data $(DEMO_DIR)/built \
	  --compare $(VANILLA)/report.json

$(DEMO_DIR)/data/demo.json: | install
	$(VENV)/bin/objloader-demo $(DEMO_DIR)/data

$(DEMO_DIR)/built/manifest.json: $(DEMO_DIR)/data/demo.json
	$(VENV)/bin/objloader-build $(DEMO_DIR)/data $(DEMO_DIR)/built --masks gt --overwrite

clean-demo:
	rm -rf $(DEMO_DIR)
