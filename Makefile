# Two entry points (see README): `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Portable llama.cpp build (AVX2/FMA, no -march=native); pip's wheel cache reuses it.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: install demo test lint clean

$(BIN)/.installed: pyproject.toml setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip setuptools wheel
	# torch first, pinned to the CPU wheel, so no resolver can pull a CUDA build.
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[all]"
	touch $@

# transformers.js for tests/test_transformers_js.py (Node; onnxruntime-node's CPU binding ships
# in the package, so no install scripts run).
JS := tests/js
$(JS)/node_modules/.installed: $(JS)/package.json
	cd $(JS) && npm install --ignore-scripts --no-audit --no-fund @huggingface/transformers@4
	touch $@

install: $(BIN)/.installed $(JS)/node_modules/.installed

# The whole chain offline on trained:smolvlm (a SmolVLM-architecture model trained on
# edgevlm's task set, shipped with the package): export it as it is and pruned by 25%, to
# GGUF and ONNX (each verified against PyTorch), ask each export about a picture, time them.
DEMO_ASK = --image examples/red-circle.png --prompt "What colour is the shape?" --max-tokens 8
DEMO_PRUNE = --method bi --ratio 0.25 --calib tasks:64
demo: install
	$(BIN)/edgevlm inspect trained:smolvlm
	$(BIN)/edgevlm -q export --model trained:smolvlm --target gguf -o out/demo-base-gguf --force
	$(BIN)/edgevlm -q export --model trained:smolvlm --target onnx -o out/demo-base-onnx --force
	$(BIN)/edgevlm -q export --model trained:smolvlm $(DEMO_PRUNE) --target gguf -o out/demo-gguf --force
	$(BIN)/edgevlm -q export --model trained:smolvlm $(DEMO_PRUNE) --target onnx --quant q4 -o out/demo-onnx --force
	@for export in base-gguf base-onnx gguf onnx; do \
		printf "%-10s answers: " $$export; $(BIN)/edgevlm -q run out/demo-$$export $(DEMO_ASK); done
	$(BIN)/edgevlm -q bench out/demo-gguf out/demo-onnx --runs 3 --gen-tokens 32 -o out/bench.json

lint: install
	$(BIN)/ruff check .

test: lint
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) out build dist *.egg-info $(JS)/node_modules
