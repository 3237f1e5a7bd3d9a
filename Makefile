# Two commands on a fresh machine:  `make train` (the main job: CIFAR-10) and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install train tune test test-fast ui

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $@

train: install  ## the tutorial's CIFAR-10 experiment, tracked in ./mlflow.db (ARGS="-P arch=cnn_modern ...")
	mlflow run . -e cifar10 --env-manager local --experiment-name cifar10 $(ARGS)

tune: install  ## a Keras Tuner search on CIFAR-10 (ARGS="-P tuner=bayesian -P max_trials=20 ...")
	mlflow run . -e tune_cifar10 --env-manager local --experiment-name cifar10 $(ARGS)

test: install  ## every tier
	python -m pytest -q -n 2 --dist worksteal --durations=40 tests

test-fast: install  ## the fast tier, about 2 minutes
	python -m pytest -q -n 2 --dist worksteal -m "not slow" tests

ui: install  ## the MLflow UI on http://127.0.0.1:5000
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port 5000
