"""Fine-tuning: sequences and labels, the loop, LoRA save/load, exact resume, checkpointing, bad data,
and what the command shows (progress lines, summary, loss curve).

Models are tiny random ones (small_config: 1 LLM layer of width 128, the real vocabulary).
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import shutil

import pytest
import torch
from PIL import Image

from qwenvl import QwenVLConfig, QwenVLForCausalLM, QwenVLTokenizer, cli, make_context
from qwenvl.chat_format import DEFAULT_SYSTEM
from qwenvl.finetune import (
    ConversationDataset,
    DataError,
    TrainingConfig,
    collate,
    encode_conversation,
    finetune,
    main,
    supervised_loss_sum,
)
from qwenvl.finetune.checkpointing import set_gradient_checkpointing
from qwenvl.finetune.cli import TrainingConsole
from qwenvl.finetune.data import IGNORE_INDEX, build_example, load_items
from qwenvl.finetune.loss_curve import (
    AXES,
    LINE,
    MARGINS,
    SIZE,
    draw_loss_curve,
    read_losses,
    save_loss_curve,
)
from qwenvl.finetune.train import Trainer, label_count, list_checkpoints, micro_batches, prepare_model
from qwenvl.finetune.vocabulary import CutVocabulary, data_ids

from .conftest import DATA, small_config

IMAGES = DATA / "images"
# How far a float32 cross-entropy over the whole vocabulary may be from the exact value, per label.
# Its log-normalizer sums 151,936 exponentials, and a float32 sum of n positive terms is within
# (n - 1) * 2^-24 of itself whatever the order the CPU adds them in (in turn in each vector lane:
# ~19,000 each with AVX2, ~9,500 with AVX-512); in the log that is an absolute 9.06e-3, and the
# exponentials and subtractions add some 1e-7.
FP32_CROSS_ENTROPY_ERROR = 1e-2


def conversation(sample_id: str, image: str, question: str, answer: str) -> dict:
    user = f"Picture 1: <img>{image}</img>\n{question}"
    return {
        "id": sample_id,
        "conversations": [{"from": "user", "value": user}, {"from": "assistant", "value": answer}],
    }


ITEMS = [
    conversation("gray", "gray.png", "What colour is this?", "It is a plain gray square."),
    conversation("shapes", "shapes.png", "What do you see?", "Some coloured shapes."),
    {
        "id": "two-turns",
        "conversations": [
            {"from": "user", "value": "Picture 1: <img>texture.png</img>\nDescribe it."},
            {"from": "assistant", "value": "A noisy texture."},
            {"from": "user", "value": "Is it smooth?"},
            {"from": "assistant", "value": "No."},
        ],
    },
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on shared cores their spin-waits cost
    several times the work (measured: 30 s instead of 90 s for this file on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok() -> QwenVLTokenizer:
    return QwenVLTokenizer()


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory, tok) -> str:
    """A tiny random model folder (weights and tokenizer files) that every test starts from."""
    torch.manual_seed(0)
    model = QwenVLForCausalLM(QwenVLConfig.from_dict(small_config()))
    folder = str(tmp_path_factory.mktemp("finetune") / "base")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def load(folder: str) -> QwenVLForCausalLM:
    return QwenVLForCausalLM.from_pretrained(folder, fp32=True)


def float64_copy(model: QwenVLForCausalLM) -> QwenVLForCausalLM:
    """The model in float64, for comparisons whose rounding must lie far below what they look for
    (the vision tower casts the batches' float32 pixels itself)."""
    return copy.deepcopy(model).double()


def load_float64(folder: str) -> QwenVLForCausalLM:
    return load(folder).double()


def read_log(folder) -> list[dict]:
    with open(os.path.join(folder, "log.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def dataset(tok, items=ITEMS, **options) -> ConversationDataset:
    return ConversationDataset(items, tok, IMAGES, **options)


# -- sequences and labels ----------------------------------------------------------------------------


def test_labels_cover_exactly_the_assistant_replies(tok):
    image = str(IMAGES / "gray.png")
    q1, a1 = f"Picture 1: <img>{image}</img>\nWhat is it?", "A gray square."
    q2, a2 = "And its <ref>colour</ref>?", "Gray, like <box>(0,0),(999,999)</box>."
    turns = [("user", q1), ("assistant", a1), ("user", q2), ("assistant", a2)]
    ids, labels = encode_conversation(tok, turns)

    # the prompts inference builds are prefixes of the training ids, token for token
    _, prompt1 = make_context(tok, q1, system=DEFAULT_SYSTEM)
    _, prompt2 = make_context(tok, q2, history=[(q1, a1)], system=DEFAULT_SYSTEM)
    reply1 = tok.encode_chat(a1) + [tok.im_end_id]
    reply2 = tok.encode_chat(a2) + [tok.im_end_id]
    assert ids[: len(prompt2)] == prompt2
    assert ids == prompt2 + reply2
    assert ids[len(prompt1) : len(prompt1) + len(reply1)] == reply1
    assert ids[len(prompt1) + len(reply1) : len(prompt1) + len(reply1) + 1] == tok.encode("\n")

    expected = [IGNORE_INDEX] * len(ids)
    for start, reply in ((len(prompt1), reply1), (len(prompt2), reply2)):
        expected[start : start + len(reply)] = reply
    assert labels == expected
    # the masked positions include the system, the user turns with the image span and the headers
    assert tok.img_start_id in ids and all(
        labels[i] == IGNORE_INDEX for i, t in enumerate(ids) if t >= 151857
    )
    header = [tok.im_start_id, *tok.encode("assistant"), *tok.encode("\n")]
    assert ids[len(prompt1) - len(header) : len(prompt1)] == header


def test_dataset_resolves_images_and_pads_batches(tok):
    data = dataset(tok)
    assert data.examples[0].images == [os.path.join(IMAGES, "gray.png")]
    batch = collate([data[0], data[2]])
    lengths = [len(data.examples[i].input_ids) for i in (0, 2)]
    assert batch.lengths == lengths and batch.input_ids.shape == (2, max(lengths))
    short = 0 if lengths[0] < lengths[1] else 1
    assert (batch.input_ids[short, lengths[short] :] == 151643).all()
    assert (batch.labels[short, lengths[short] :] == IGNORE_INDEX).all()
    assert batch.pixel_values.shape == (2, 3, 448, 448)
    assert batch.ids == ["gray", "two-turns"]


def test_truncation_never_cuts_an_image_span(tok):
    item = ITEMS[2]
    full = build_example(tok, item, 0, IMAGES)
    start = full.input_ids.index(tok.img_start_id)
    cut = build_example(tok, item, 0, IMAGES, max_length=start + 100)
    assert cut.input_ids == full.input_ids[:start] and cut.images == []
    kept = build_example(tok, item, 0, IMAGES, max_length=start + 258 + 5)
    assert len(kept.input_ids) == start + 258 + 5 and len(kept.images) == 1


def test_samples_without_supervised_tokens_are_skipped(tok, caplog):
    limit = len(build_example(tok, ITEMS[0], 0, IMAGES).input_ids)
    long_question = conversation("long", "gray.png", "Why? " * 30, "Because.")
    data = dataset(tok, [ITEMS[0], long_question], max_length=limit)
    assert [e.id for e in data.examples] == ["gray"]
    assert "'long' has no assistant token" in caplog.text
    with pytest.raises(DataError, match="no sample"):
        dataset(tok, [long_question], max_length=limit)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"conversations": []}, "sample #0 has no 'id'"),
        ({"id": "s1"}, "sample 's1': 'conversations'"),
        ({"id": "s2", "conversations": [{"from": "user"}]}, "sample 's2', turn 0: missing key 'value'"),
        (
            {"id": "s3", "conversations": [{"from": "user", "value": "q"}, {"from": "gpt", "value": "a"}]},
            "sample 's3', turn 1: role 'gpt'",
        ),
        (
            {
                "id": "s4",
                "conversations": [{"from": "assistant", "value": "a"}, {"from": "user", "value": "q"}],
            },
            "sample 's4', turn 0: expected 'user'",
        ),
        ({"id": "s5", "conversations": [{"from": "user", "value": "q"}]}, "sample 's5' has no assistant"),
        (conversation("s6", "missing.png", "q", "a"), "sample 's6': image file .*missing.png.* not found"),
        (conversation("s7", "x" * 300, "q", "a"), "sample 's7': .*too long"),
    ],
)
def test_bad_data_errors_name_the_sample(tok, item, message):
    with pytest.raises(DataError, match=message):
        dataset(tok, [ITEMS[0], item] if "#0" not in message else [item])


def test_an_unreadable_image_names_the_sample(tok, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    data = ConversationDataset([conversation("broken-one", "broken.png", "q", "a")], tok, tmp_path)
    with pytest.raises(DataError, match="sample 'broken-one': cannot load image .*broken.png"):
        data[0]


def test_a_bad_line_of_a_json_lines_file_is_named_by_its_number(tmp_path):
    path = tmp_path / "train.jsonl"
    # U+2028 may stand unescaped in a JSON string: it does not end a line
    sample = conversation("one", "gray.png", "A line\u2028separator?", "Yes.")
    good = json.dumps(sample, ensure_ascii=False)
    path.write_text(f"{good}\n\n{good}\n", encoding="utf-8")
    assert load_items(path) == [sample, sample]
    path.write_text(f'{good}\n\n{good}\n{{"id": "broken",\n{good}\n', encoding="utf-8")
    with pytest.raises(DataError, match="Expecting property name") as caught:
        load_items(path)
    assert f"{path}, line 4, column 17:" in str(caught.value)  # the blank line 2 counts


def test_a_bad_json_file_is_named(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[{"id": "one",]', encoding="utf-8")
    with pytest.raises(DataError, match="is not valid JSON") as caught:
        load_items(path)
    assert str(path) in str(caught.value)
    path.write_text(json.dumps(ITEMS[0]), encoding="utf-8")
    with pytest.raises(DataError, match="must hold a JSON list of samples, not a dict") as caught:
        load_items(path)
    assert str(path) in str(caught.value)


# -- the loss and the loop ---------------------------------------------------------------------------


def test_supervised_loss_equals_the_model_loss(tok, base_folder):
    model = load_float64(base_folder)
    batch = collate([dataset(tok)[i] for i in (0, 2)])
    with torch.no_grad():
        mean = supervised_loss_sum(model, batch) / label_count(batch)
        loss = model(**batch.model_inputs()).loss
    # the sum's cross-entropy is float64, the model's loss a float32 one of the same logits; the
    # labels' losses spread over ~1 nat, so a label read at a wrong place moves the mean by more
    assert mean.dtype == torch.float64
    assert mean.item() == pytest.approx(loss.item(), rel=0, abs=FP32_CROSS_ENTROPY_ERROR)


def test_full_finetuning_lowers_the_loss(tok, base_folder, tmp_path):
    model = load(base_folder)
    batch = collate([dataset(tok)[i] for i in range(2)])
    with torch.no_grad():
        before = model(**batch.model_inputs()).loss.item()
    config = TrainingConfig(max_steps=10, batch_size=2, lr=1e-2, warmup_steps=0)
    trained = finetune(model, tok, ITEMS[:2], config, tmp_path / "out", base_dir=IMAGES)
    with torch.no_grad():
        after = trained(**batch.model_inputs()).loss.item()
    log = read_log(tmp_path / "out")
    print(
        "loss before", round(before, 3), "after", round(after, 3), "log", [round(r["loss"], 3) for r in log]
    )
    assert after < 0.5 * before
    assert [r["step"] for r in log] == list(range(1, 11))
    # both float32 cross-entropies of the same logits, each within FP32_CROSS_ENTROPY_ERROR
    assert log[0]["loss"] == pytest.approx(before, rel=0, abs=2 * FP32_CROSS_ENTROPY_ERROR)
    assert {"loss", "lr", "tokens_per_s", "grad_norm"} <= set(log[0])
    # the result is a model folder with the tokenizer files: it reloads to the same logits
    reloaded = load(tmp_path / "out")
    assert QwenVLTokenizer.from_pretrained(tmp_path / "out").encode("hi") == tok.encode("hi")
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(**batch.model_inputs()).logits, trained(**batch.model_inputs()).logits
        )


def cut_vocabulary_of(tok, data: ConversationDataset, model) -> CutVocabulary:
    return CutVocabulary(data_ids(data.examples, tok.special_tokens.values()), model.config.vocab_size)


def assert_cut_loss_is_the_full_loss(model: QwenVLForCausalLM, batch, vocabulary: CutVocabulary) -> None:
    """The loss over the cut vocabulary equals the full one, compared in float64.

    In float32 they need not agree: the full loss is within FP32_CROSS_ENTROPY_ERROR per label.
    In float64 a sum of 151,936 terms is within 151,936 * 2^-53 = 1.7e-11 of itself, and the products
    of 128 terms far closer: rtol=1e-9 holds that with room. The shared column's log(n) is the one
    float32 input (CutVocabulary.bias): it moves each label's loss by at most its rounding, which
    gives atol. A real error is far larger: n off by one moves each label's loss by p_shared / n,
    some 1e-6 where the shared column has a quarter of the probability.
    """
    others = model.config.vocab_size - (vocabulary.size - 1)  # the shared id and those it stands for
    log_n_rounding = abs(vocabulary.bias[-1].item() - math.log(others))
    model = float64_copy(model)
    with torch.no_grad():
        cut = supervised_loss_sum(model, batch, vocabulary)
        full = supervised_loss_sum(model, batch)
    assert cut.dtype == full.dtype == torch.float64
    torch.testing.assert_close(cut, full, rtol=1e-9, atol=label_count(batch) * log_n_rounding)


def test_a_cut_vocabulary_gives_the_full_loss_of_the_tied_model(tok, base_folder):
    model, data = load(base_folder), dataset(tok)
    vocabulary = cut_vocabulary_of(tok, data, model)
    assert vocabulary.size < 1000
    vocabulary.tie_others(model)
    weight = model.lm_head.weight
    others = [i for i in range(weight.shape[0]) if i not in set(vocabulary.rows.tolist())]
    assert torch.equal(weight[others[0]], weight[vocabulary.shared_id])
    assert torch.equal(weight[others[-1]], weight[vocabulary.shared_id])
    assert_cut_loss_is_the_full_loss(model, collate([data[i] for i in range(3)]), vocabulary)
    with pytest.raises(ValueError, match="not in the cut vocabulary"):
        vocabulary.targets(torch.tensor([others[5]]))


def test_training_on_a_cut_vocabulary_saves_a_consistent_full_model(tok, base_folder, tmp_path):
    model = load(base_folder)
    config = TrainingConfig(max_steps=10, batch_size=3, lr=1e-2, warmup_steps=0, cut_vocabulary=True)
    trained = finetune(model, tok, ITEMS, config, tmp_path / "out", base_dir=IMAGES)
    log = read_log(tmp_path / "out")
    assert log[-1]["loss"] < 0.6 * log[0]["loss"]
    reloaded, data = load(tmp_path / "out"), dataset(tok)
    vocabulary = cut_vocabulary_of(tok, data, reloaded)
    weight = reloaded.lm_head.weight
    # every id outside the data has the shared row, so the full softmax is the trained one
    assert torch.equal(
        weight[vocabulary.others], weight[vocabulary.shared_id].expand(int(vocabulary.others.sum()), -1)
    )
    batch = collate([data[i] for i in range(3)])
    assert_cut_loss_is_the_full_loss(reloaded, batch, vocabulary)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(**batch.model_inputs()).logits, trained(**batch.model_inputs()).logits
        )
    with pytest.raises(ValueError, match="LoRA"):
        TrainingConfig(lora=True, cut_vocabulary=True)


def test_the_data_order_can_restart_at_any_micro_batch():
    config = TrainingConfig(batch_size=2)
    run = list(micro_batches(5, config, 0, 10))  # 3 micro-batches an epoch, the last one short
    assert [len(b) for b in run] == [2, 2, 1] * 3 + [2]
    assert all(sorted(sum(run[e * 3 : e * 3 + 3], [])) == list(range(5)) for e in range(3))
    assert run[:3] != run[3:6]  # reshuffled each epoch
    for start in range(10):
        assert list(micro_batches(5, config, start, 10)) == run[start:]


def test_frozen_vision_trains_only_the_resampler(base_folder):
    model = prepare_model(load(base_folder), TrainingConfig())
    visual = model.transformer.visual
    trainable = {name for name, p in visual.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("attn_pool.") for name in trainable)
    assert "attn_pool.pos_embed" not in trainable
    assert model.lm_head.weight.requires_grad and model.transformer.wte.weight.requires_grad


def test_gradient_accumulation_equals_a_bigger_batch(tok, base_folder, tmp_path):
    logs, weights = [], []
    for batch_size, grad_accum in ((2, 1), (1, 2)):
        config = TrainingConfig(
            max_steps=1,
            batch_size=batch_size,
            grad_accum=grad_accum,
            lora=True,
            lora_dropout=0.0,
            merge=False,
        )
        out = tmp_path / str(batch_size)
        trained = finetune(load_float64(base_folder), tok, ITEMS[:2], config, out, base_dir=IMAGES)
        logs.append(read_log(out)[0])
        weights.append({k: v for k, v in trained.state_dict().items() if "lora_" in k})
    # In float64 the two runs differ by adding the same terms in other groups: ~1e-16 of them
    # (turned, once in a long while, into a float32 ulp of one element by the norms, which compute
    # in float32): rel=1e-9. The loss is a mean over the labelled tokens of the whole step, not a
    # mean of micro-batch means, which would differ in the first digits.
    assert logs[0]["loss"] == pytest.approx(logs[1]["loss"], rel=1e-9)
    assert logs[0]["grad_norm"] == pytest.approx(logs[1]["grad_norm"], rel=1e-9)
    # Adam's first step is lr * g / (|g| + eps): a change in g moves it by at most lr / eps = 1e4
    # times as much, ~1e-12 here (in float32 that bound would exceed the step itself, lr = 1e-4)
    for name, value in weights[0].items():
        torch.testing.assert_close(value, weights[1][name], rtol=0, atol=1e-10)


# -- LoRA --------------------------------------------------------------------------------------------


def test_lora_merged_and_adapter_folders_give_the_trained_logits(tok, base_folder, tmp_path):
    from peft import PeftModel

    config = dict(max_steps=2, batch_size=2, lr=1e-2, lora=True, lora_r=4, lora_alpha=8)
    peft_model = finetune(
        load(base_folder),
        tok,
        ITEMS,
        TrainingConfig(**config, merge=False),
        tmp_path / "adapter",
        base_dir=IMAGES,
    )
    assert os.path.exists(tmp_path / "adapter" / "adapter_config.json")
    assert not os.path.exists(tmp_path / "adapter" / "model.safetensors")
    trained_names = {n for n, p in peft_model.named_parameters() if "lora_" in n}
    assert trained_names and all(".transformer.h." in n for n in trained_names)  # not the vision tower

    inputs = collate([dataset(tok)[0]]).model_inputs()
    with torch.no_grad():
        logits = peft_model(**inputs).logits
        base_logits = load(base_folder)(**inputs).logits
        assert (logits - base_logits).abs().max() > 1e-3  # the adapter did learn something

        round_trip = PeftModel.from_pretrained(load(base_folder), tmp_path / "adapter").eval()
        torch.testing.assert_close(round_trip(**inputs).logits, logits, rtol=0, atol=1e-5)

    finetune(load(base_folder), tok, ITEMS, TrainingConfig(**config), tmp_path / "merged", base_dir=IMAGES)
    merged = load(tmp_path / "merged")
    assert set(merged.state_dict()) == set(load(base_folder).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, logits, rtol=0, atol=1e-5)


# -- resume ------------------------------------------------------------------------------------------


def assert_same_weights(resumed: torch.nn.Module, straight: torch.nn.Module) -> None:
    """A resumed float64 run's weights are the uninterrupted run's.

    It repeats the same operations on the same values, so they are equal but where a kernel's
    rounding depends on memory layout (~1e-16 of a value). Adam's step lr * m / (sqrt(v) + eps)
    turns a change in the gradient into at most lr / eps = 1e5 times as much, ~1e-11: atol=1e-9.
    In float32 the same bound would exceed the steps themselves.
    """
    expected = straight.state_dict()
    for name, value in resumed.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-9, msg=name)


@pytest.mark.parametrize(
    "options",
    [
        dict(lora=True, lora_r=4, lora_dropout=0.3, grad_accum=2),  # dropout: the RNG state must be restored
        dict(freeze_vision=False),
    ],
    ids=["lora", "full"],
)
def test_resume_gives_the_uninterrupted_result(tok, base_folder, tmp_path, monkeypatch, options):
    config = TrainingConfig(max_steps=2, save_steps=1, lr=1e-3, warmup_steps=1, **options)
    straight = finetune(load_float64(base_folder), tok, ITEMS, config, tmp_path / "straight", base_dir=IMAGES)

    original_step = Trainer.train_step

    def crash_at_step_2(self, batches):
        if self.step == 1:
            raise RuntimeError("simulated crash")
        return original_step(self, batches)

    monkeypatch.setattr(Trainer, "train_step", crash_at_step_2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        finetune(load_float64(base_folder), tok, ITEMS, config, tmp_path / "resumed", base_dir=IMAGES)
    monkeypatch.setattr(Trainer, "train_step", original_step)
    assert [step for step, _ in list_checkpoints(tmp_path / "resumed")] == [1]

    config.resume = True
    resumed = finetune(load_float64(base_folder), tok, ITEMS, config, tmp_path / "resumed", base_dir=IMAGES)
    assert_same_weights(resumed, straight)
    straight_log, resumed_log = read_log(tmp_path / "straight"), read_log(tmp_path / "resumed")
    assert [r["step"] for r in resumed_log] == [1, 2]
    assert [r["loss"] for r in resumed_log] == pytest.approx([r["loss"] for r in straight_log], rel=1e-9)


def test_a_run_in_pieces_equals_the_run_in_one(tok, base_folder, tmp_path):
    config = TrainingConfig(max_steps=3, lr=1e-3, warmup_steps=1, freeze_vision=False)
    whole = finetune(load_float64(base_folder), tok, ITEMS, config, tmp_path / "whole", base_dir=IMAGES)
    first = TrainingConfig(**{**vars(config), "stop_at": 2})
    finetune(load_float64(base_folder), tok, ITEMS, first, tmp_path / "pieces", base_dir=IMAGES)
    assert [step for step, _ in list_checkpoints(tmp_path / "pieces")] == [2]
    rest = TrainingConfig(**{**vars(config), "resume": True})
    pieces = finetune(load_float64(base_folder), tok, ITEMS, rest, tmp_path / "pieces", base_dir=IMAGES)
    assert_same_weights(pieces, whole)
    assert [r["lr"] for r in read_log(tmp_path / "pieces")] == [r["lr"] for r in read_log(tmp_path / "whole")]


def test_resuming_with_more_steps_follows_the_new_schedule(tok, base_folder, tmp_path):
    config = TrainingConfig(max_steps=2, save_steps=1, lr=1e-3, warmup_steps=0, lr_schedule="linear")
    finetune(load(base_folder), tok, ITEMS[:1], config, tmp_path / "run", base_dir=IMAGES)
    longer = TrainingConfig(**{**vars(config), "max_steps": 4, "resume": tmp_path / "run" / "checkpoint-1"})
    finetune(load(base_folder), tok, ITEMS[:1], longer, tmp_path / "run", base_dir=IMAGES)
    # linear decay over 4 steps: 1, 3/4, 1/2, 1/4 of the peak (not the 2-step run's 1, 1/2, 0, ...)
    assert [r["lr"] for r in read_log(tmp_path / "run")] == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4])


# -- gradient checkpointing --------------------------------------------------------------------------


def test_gradient_checkpointing_gives_the_same_gradients(tok, base_folder):
    model = prepare_model(load(base_folder), TrainingConfig(freeze_vision=False))
    batch = collate([dataset(tok)[0], dataset(tok)[2]])
    calls = []  # pre-hooks on each block's first layer: recomputation may stop before a block's end
    model.transformer.h[0].ln_1.register_forward_pre_hook(lambda *_: calls.append("llm"))
    model.transformer.visual.transformer.resblocks[0].ln_1.register_forward_pre_hook(
        lambda *_: calls.append("vit")
    )

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        supervised_loss_sum(model, batch).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    assert sorted(calls) == ["llm", "vit"]
    calls.clear()
    assert set_gradient_checkpointing(model, True) == 2
    checkpointed = gradients()
    assert sorted(calls) == ["llm", "llm", "vit", "vit"]  # each block ran again in the backward pass
    assert plain.keys() == checkpointed.keys() and "transformer.visual.conv1.weight" in plain
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    set_gradient_checkpointing(model, False)
    calls.clear()
    gradients()
    assert len(calls) == 2


# -- command line ------------------------------------------------------------------------------------


def test_command_line_trains_a_lora_adapter_and_reports(base_folder, tmp_path, capsys):
    images = tmp_path / "data" / "pictures"
    images.mkdir(parents=True)
    shutil.copy(IMAGES / "gray.png", images / "gray.png")
    data = tmp_path / "data" / "train.json"
    data.write_text(json.dumps([conversation("one", "pictures/gray.png", "What is it?", "Gray.")]))
    out = tmp_path / "out"
    argv = ["--model", base_folder, "--data", str(data), "--output", str(out), "--fp32"]
    argv += ["--lora", "--lora-r", "2", "--no-merge", "--max-steps", "2", "--save-steps", "1"]
    # `qwenvl finetune`; `python -m qwenvl.finetune` (main, below) runs the same run_from_args
    assert cli.main(["finetune", *argv, "--logging-steps", "1"]) == 0
    shown = capsys.readouterr()
    files = {"adapter_config.json", "adapter_model.safetensors", "qwen.tiktoken", "checkpoint-1", "loss.png"}
    assert files <= set(os.listdir(out))
    log = read_log(out)
    assert len(log) == 2

    # captured output is no terminal: a line every --logging-steps steps and the library's messages
    step_lines = [line.split(" | ")[0] for line in shown.err.splitlines() if line.startswith("step ")]
    assert step_lines == [f"step {r['step']}/2 loss {r['loss']:.4f} lr {r['lr']:.2e}" for r in log]
    assert f"saved {out / 'checkpoint-1'}" in shown.err.splitlines()
    summary = shown.out.splitlines()
    assert summary[0].startswith("finetune: steps 1-2 of 2 in ")
    assert summary[0].endswith(f", final loss {log[-1]['loss']:.4f}")
    assert summary[1:] == [f"saved to {out}", f"log: {out / 'log.jsonl'}, loss curve: {out / 'loss.png'}"]
    with Image.open(out / "loss.png") as curve:
        assert curve.format == "PNG" and curve.size == SIZE
        assert LINE in {colour for _, colour in curve.convert("RGB").getcolors(SIZE[0] * SIZE[1])}

    data.write_text(json.dumps([conversation("bad-one", "pictures/nope.png", "q", "a")]))
    assert main(argv) == 2
    assert "sample 'bad-one'" in capsys.readouterr().err


def test_the_summary_of_a_run_stopped_early():
    stream = io.StringIO()
    console = TrainingConsole(stream, every=5, bar=False)
    console.begin(3, 5, 10)  # resumed at step 3, --stop-at 5, a schedule of 10
    for step in (4, 5):
        console.step({"step": step, "loss": 0.5, "lr": 1e-4})
    console.close()
    assert stream.getvalue().startswith("step 5/5 loss 0.5000 lr 1.00e-04 | ")  # one line: step 5
    lines = console.summary("out", "out/log.jsonl", None).splitlines()
    assert lines[0].startswith("finetune: steps 4-5 of 10 in ") and lines[0].endswith("final loss 0.5000")
    assert lines[1:] == [
        "stopped at step 5: add --resume to continue from its checkpoint",
        "saved to out",
        "log: out/log.jsonl",
    ]


def test_the_loss_curve_spans_the_steps_and_losses(tmp_path):
    log = tmp_path / "log.jsonl"
    records = [{"step": step, "loss": 6.0 / step} for step in range(1, 21)] + [{"step": 21, "loss": math.nan}]
    log.write_text("".join(json.dumps(record) + "\n" for record in records))
    assert read_losses(log) == [(r["step"], r["loss"]) for r in records[:20]]  # NaN left out
    assert save_loss_curve(log, tmp_path / "loss.png")
    left, top, right, bottom = MARGINS[0], MARGINS[1], SIZE[0] - MARGINS[2], SIZE[1] - MARGINS[3]
    with Image.open(tmp_path / "loss.png") as image:
        picture = image.convert("RGB")

    def near(x: int, y: int) -> set:
        return {picture.getpixel((x + dx, y + dy)) for dx in range(-2, 3) for dy in range(-2, 3)}

    assert LINE in near(left, top) and LINE in near(right, bottom)  # step 1 at the top, 20 lowest
    assert AXES in near(left, (top + bottom) // 2) and AXES in near((left + right) // 2, bottom)
    # a flat curve and a single step are drawn too; a log without a finite loss draws nothing
    assert draw_loss_curve([(1, 2.0), (2, 2.0)]).size == SIZE
    assert draw_loss_curve([(7, 2.0)]).size == SIZE
    log.write_text(json.dumps({"step": 1, "loss": math.inf}) + "\n")
    assert not save_loss_curve(log, tmp_path / "none.png") and not (tmp_path / "none.png").exists()
