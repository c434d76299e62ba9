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

test: venv lint
	$(PY) -m pytest

# Rebuilds src/qwenvl/assets/demo-model from nothing: data, training, packing, the held-out
# evaluation (about 60 minutes on 2 CPU cores). The 5000-step schedule runs in two pieces: the
# second resumes at step 2500 on a second data set with more turns per picture (up to three
# grounding questions each).
DEMO_WORK := build/demo-model
FINETUNE := .venv/bin/qwenvl finetune --model $(DEMO_WORK)/init --output $(DEMO_WORK)/trained \
	--train-vision --fp32 --cut-vocabulary --batch-size 8 --lr 1e-3 --warmup-steps 100 \
	--max-steps 5000 --save-steps 250

demo-model: venv
	rm -rf $(DEMO_WORK)
	$(PY) -m qwenvl.demo_model init $(DEMO_WORK)/init
	.venv/bin/qwenvl synthesize --out $(DEMO_WORK)/data1 --scenes 16000 --questions-per-scene 1 \
		--multi-turn 0.85 --max-turns 5 --eval-scenes 200 --seed 11
	.venv/bin/qwenvl synthesize --out $(DEMO_WORK)/data2 --scenes 16000 --questions-per-scene 1 \
		--multi-turn 0.9 --max-turns 7 --task-repeats 3 --seed 12
	$(FINETUNE) --data $(DEMO_WORK)/data1/train.json --stop-at 2500
	$(FINETUNE) --data $(DEMO_WORK)/data2/train.json --resume
	$(PY) -m qwenvl.demo_model pack $(DEMO_WORK)/trained $(DEMO_WORK)/data2/train.json
	.venv/bin/qwenvl eval --data $(DEMO_WORK)/data1/eval.json --json $(DEMO_WORK)/eval.json
