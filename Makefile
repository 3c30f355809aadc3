# twinfed: the two commands of the quick start.
#   make demo   set up .venv if needed, then run the main job on the embedded default
#   make test   set up .venv if needed, then run the whole test suite
# The virtual environment is rebuilt only when pyproject.toml changes.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.twinfed-installed
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo-output

export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: demo test lint bench clean help

help:
	@echo "make demo   - 3 synthetic hospitals -> OMOP -> data quality -> federated DP studies over TLS -> a patient twin -> a hospital twin -> report"
	@echo "make test   - run the whole test suite (creates .venv on first use)"
	@echo "make lint   - ruff"
	@echo "make bench  - run every benchmark (hours; BENCH_ARGS='--only NAME') and update docs/benchmarks.md"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 11) else "twinfed needs Python 3.11 or newer; set PYTHON=/path/to/python3.11")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@# torch first: the CPU build; the package's own torch>=2.6 is then already met.
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/twinfed synth --sites 3 --patients 2000 --seed 7 --out $(DEMO_DIR)/consortium --force
	$(BIN)/twinfed inspect $(DEMO_DIR)/consortium
	@mkdir -p $(DEMO_DIR)/omop
	@# Each hospital loads its own export into its own OMOP database (SQLite, the embedded default),
	@# then checks its data quality. dq exits 1 when a check fails: that is a finding, not an error.
	@for site in $$(ls $(DEMO_DIR)/consortium | grep -v -e ground-truth -e report -e consortium.json); do \
		echo "== $$site: FHIR -> OMOP =="; \
		$(BIN)/twinfed etl --input $(DEMO_DIR)/consortium/$$site/fhir --db sqlite:///$(DEMO_DIR)/omop/$$site.sqlite \
			--secret-file $(DEMO_DIR)/omop/$$site.secret --report $(DEMO_DIR)/omop/$$site-etl.json || exit $$?; \
		echo "== $$site: data quality =="; \
		$(BIN)/twinfed dq --db sqlite:///$(DEMO_DIR)/omop/$$site.sqlite --report $(DEMO_DIR)/omop/$$site-dq.json \
			--html $(DEMO_DIR)/omop/$$site-dq.html; status=$$?; [ $$status -le 1 ] || exit $$status; \
	done
	@# The consortium: keys, a coordinator and one site node per hospital as real processes talking TLS on
	@# loopback; each hospital approves the study; the study runs to its model card; audits are verified.
	@# Then the consortium trains the patient twin, and one hospital shows one of its patients' twins;
	@# last, that hospital's bed manager runs its hospital twin for the next 30 days with two what-ifs.
	$(BIN)/twinfed demo --omop $(DEMO_DIR)/omop --out $(DEMO_DIR)/federation --study configs/study-inpatient-mortality.yaml \
		--twin-study configs/study-patient-twin-example.yaml --scenarios configs/scenario-example.yaml \
		--hospital configs/hospital-example.yaml --hospital-scenarios configs/hospital-scenario-example.yaml \
		--exports $(DEMO_DIR)/consortium

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all $(BENCH_ARGS)

clean:
	rm -rf $(DEMO_DIR) benchmarks/output .pytest_cache .ruff_cache
