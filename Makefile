PY := .venv/bin/python
# The CPU build of torch: an unpinned torch pulls a multi-GB CUDA build.
TORCH_CPU := torch==2.13.0

.PHONY: venv run test lint format demo-model

venv: .venv/.done

.venv/.done: pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_CPU)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

run: venv
	$(PY) -m qwenvl.demo

lint: venv
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/ruff format --check src tests benchmarks

format: venv
	.venv/bin/ruff format src tests benchmarks
	.venv/bin/ruff check --fix src tests benchmarks

# one test process per core (pytest-xdist); each runs PyTorch on one thread (tests/conftest.py)
test: venv lint
	$(PY) -m pytest -n auto

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
