# citylake: the two commands are `make demo` and `make test` (both set everything up).
PYTHON ?= python3.11
VENV   := .venv
# Airflow 3 has a venv of its own: it pins pandas 3, which PySpark 4.2 does not support.
VENV_AIRFLOW := .venv-airflow
AIRFLOW_PACKAGES := apache-airflow==3.3.2 apache-airflow-providers-apache-spark==6.3.4
PY     := $(VENV)/bin/python
JARS   := .jars
DELTA_VERSION := 4.4.0
DELTA_ARTIFACTS := io.delta:delta-spark_4.2_2.13:$(DELTA_VERSION) io.delta:delta-storage:$(DELTA_VERSION)
export PYSPARK_PYTHON := $(abspath $(PY))
export PYSPARK_DRIVER_PYTHON := $(abspath $(PY))

.PHONY: help setup venv jars airflow dist demo test test-fast bench beijing-accuracy mlflow-ui clean-lake clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

venv: $(VENV)/.installed  ## create the virtual environment and install citylake

$(JARS)/.fetched:
	mkdir -p $(JARS)
	for a in $(DELTA_ARTIFACTS); do \
	  mvn -q -B dependency:copy -Dartifact=$$a -DoutputDirectory=$(JARS) || exit 1; done
	touch $@

jars: $(JARS)/.fetched  ## fetch the Delta jars with Maven into .jars/

$(VENV_AIRFLOW)/.installed: constraints-airflow.txt
	test -x $(VENV_AIRFLOW)/bin/python || $(PYTHON) -m venv $(VENV_AIRFLOW)
	$(VENV_AIRFLOW)/bin/pip install --quiet --upgrade pip
	$(VENV_AIRFLOW)/bin/pip install --quiet -c constraints-airflow.txt $(AIRFLOW_PACKAGES)
	touch $@

airflow: $(VENV_AIRFLOW)/.installed  ## Airflow 3 + Spark provider in .venv-airflow (own venv: pandas 3)

dist: venv  ## wheel + zip for --py-files + jobs/ + conf/ in dist/ (for spark-submit on a cluster)
	$(PY) scripts/dist.py

setup: venv jars airflow  ## everything the pipeline and the tests need

demo: setup  ## generate a sample city and run every stage on local[2]
	$(VENV)/bin/citylake demo

test: setup  ## run the whole test suite
	$(VENV)/bin/pytest

test-fast: setup  ## unit tests only (no integration)
	$(VENV)/bin/pytest -m "not integration"

bench: setup  ## ingest benchmark (figures go to bench/RESULTS.md by hand)
	$(PY) bench/ingest_bench.py

beijing-accuracy: setup  ## PM2.5 forecast accuracy on the real Beijing data -> bench/RESULTS_BEIJING.md
	$(PY) bench/beijing_accuracy.py

mlflow-ui: setup  ## open the MLflow UI on http://127.0.0.1:5000 (runs, charts, registered champions)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlruns.db --default-artifact-root ./mlartifacts --host 127.0.0.1 --port 5000

clean-lake:  ## delete the local lake and MLflow store
	rm -rf lake mlruns.db mlartifacts

clean: clean-lake  ## also delete the venv and jars
	rm -rf $(VENV) $(VENV_AIRFLOW) $(JARS) dist
