# lamina's entry points; each installs what it needs first (scripts/bootstrap.sh).
#
#   make demo    the whole life cycle of a layer on the default home, commands shown
#   make test    ruff, mypy, then the test suite (builds the corpus first if it is missing)
#   make lint    ruff and mypy
#   make lab     the engines' lab (a Debian sid userland the tests chroot into)
#   make containerd2-suite  containerd 2's snapshotter suite, built in the lab (build/)
#
# LAMINA_CORPUS (default /var/tmp/lamina-corpus) is where the corpus of real image
# layers lives; LAMINA_SHARED (default ../shared) holds the script that builds it.
# LAMINA_LAB (default /var/tmp/lamina-lab) is where the lab lives (scripts/build-lab.sh).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

LAMINA_SHARED ?= ../shared
LAMINA_CORPUS ?= /var/tmp/lamina-corpus
LAMINA_LAB ?= /var/tmp/lamina-lab
export LAMINA_SHARED LAMINA_CORPUS LAMINA_LAB

VENV := .venv
PY := $(VENV)/bin/python

.PHONY: bootstrap corpus lab containerd2-suite demo test lint

bootstrap:
	@bash scripts/bootstrap.sh

# The corpus is built once (it needs root, Docker and a Debian mirror; minutes).
corpus:
	@if [ -f "$(LAMINA_CORPUS)/MANIFEST" ]; then \
	  :; \
	elif [ ! -f "$(LAMINA_SHARED)/corpus/build-corpus.sh" ]; then \
	  echo "make: no $(LAMINA_SHARED)/corpus/build-corpus.sh; tests that need the corpus will skip"; \
	elif [ "$$(id -u)" != 0 ]; then \
	  echo "make: building the corpus needs root; tests that need it will skip"; \
	else \
	  bash "$(LAMINA_SHARED)/corpus/build-corpus.sh" "$(LAMINA_CORPUS)"; \
	fi

# The lab is built once and again only when build-lab.sh changes (it needs root and a
# Debian mirror; a minute or two), then checked in a moment.
lab:
	@if [ "$$(id -u)" != 0 ]; then \
	  echo "make: building the lab needs root; tests that need it will skip"; \
	else \
	  bash scripts/build-lab.sh "$(LAMINA_LAB)"; \
	fi

# containerd 2.1's snapshotter suite (tests/containerd/test_suite2.py) is built in the
# lab, offline, once and again only when its sources or the lab change (about 2 minutes
# from cold, 20 MB; Go's cache beside it, 370 MB), then checked in a moment.
containerd2-suite: lab
	@if [ "$$(id -u)" != 0 ]; then \
	  echo "make: building containerd 2's suite needs root (the lab); its test will skip"; \
	else \
	  bash scripts/build-containerd2-suite.sh >/dev/null; \
	fi

demo: bootstrap
	bash scripts/demo.sh

test: bootstrap corpus lab containerd2-suite
	$(VENV)/bin/ruff check
	$(VENV)/bin/mypy
	$(PY) -m pytest -q --durations=25

lint: bootstrap
	$(VENV)/bin/ruff check
	$(VENV)/bin/mypy
