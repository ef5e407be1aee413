"""The trainer's fast path on the real small model: packing, the answer-token loss, offloaded checkpointing.

Each is checked against today's path: same loss and same LoRA gradients (float32 tolerance), on rows of
the shipped sample data. Liger Kernel's fused loss and pinned-memory copies need CUDA: they are
checked in test_train_gpu.py, which skips without it.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from adapters.lora_model import with_new_lora
from adapters.train.answer_loss import AnswerTokenLoss, answer_states, model_loss, torch_cross_entropy
from adapters.train.config import ConfigError, TrainConfig
from adapters.train.datasets import IGNORE, Example, collate, read_dataset
from adapters.train.loop import micro_batches, steps_per_epoch
from adapters.train.offload import HostOffload
from adapters.train.packing import collate_packed, pack

SAMPLES = Path(__file__).resolve().parent.parent / "adapters" / "sample_data"


def settings(**overrides) -> TrainConfig:
    return TrainConfig(**{"data": ("unused",), "output": "unused", "lora_dropout": 0.0, "r": 8, **overrides})


@pytest.fixture(scope="module")
def rows(tokenizer) -> list[Example]:
    """Three short instruction rows of two domains (prompt and answer) and one raw-text row (all answer):
    short, as every forward of the 135M model costs seconds on a shared CPU."""
    facts = read_dataset([str(SAMPLES / "facts" / "val.jsonl")], tokenizer, 256, 0.1).examples[:2]
    staff = read_dataset([str(SAMPLES / "directory" / "val.jsonl")], tokenizer, 256, 0.1).examples[:1]
    text = tokenizer("Packing lays short rows end to end.", add_special_tokens=False)["input_ids"]
    return [*facts, *staff, Example((), tuple(text), None, ("text", 1))]


def lora_model(base_model, **overrides):
    """A LoRA on a copy of the base with B drawn nonzero (peft starts it at zero, which hides A's gradients);
    every call gives the same LoRA weights."""
    model = with_new_lora(copy.deepcopy(base_model), settings(**overrides))
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model


@pytest.fixture(scope="module")
def model(base_model):
    return lora_model(base_model)


def loss_and_grads(model, loss_fn, batches, num_items) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    total = 0.0
    for batch in batches:
        loss = loss_fn(model, batch, num_items)
        loss.backward()
        total += loss.item()
    return total, {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_same(first, second) -> None:
    (loss_a, grads_a), (loss_b, grads_b) = first, second
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_row_restarts_positions_and_keeps_the_answer_labels(rows):
    packed = collate_packed([rows], pad_id=0)
    unpacked = collate(rows, pad_id=0)
    lengths = [example.num_tokens for example in rows]
    starts = [sum(lengths[:i]) for i in range(len(rows))]
    expected_positions = torch.cat([torch.arange(n) for n in lengths])
    assert torch.equal(packed.position_ids[0], expected_positions)
    assert packed.num_answer_tokens == unpacked.num_answer_tokens
    # The raw-text row has no prompt: its first token would be a target predicted from the row before.
    assert all(packed.labels[0, start] == IGNORE for start in starts)
    assert packed.labels[0, starts[-1] + 1] == rows[-1].answer_ids[1]


def test_packed_batch_gives_each_row_its_own_logits_loss_and_gradients(model, rows):
    packed = collate_packed([rows[:2], rows[2:]], pad_id=0)   # two packed rows, one padded
    singles = [collate([row], pad_id=0) for row in rows]
    num_items = packed.num_answer_tokens
    assert num_items == sum(single.num_answer_tokens for single in singles)

    with torch.no_grad():
        logits = model(**packed.model_inputs()).logits
        # (packed row, example, where it starts in that row)
        for i, j, start in [(0, 0, 0), (0, 1, rows[0].num_tokens), (1, 2, 0), (1, 3, rows[2].num_tokens)]:
            alone = model(**singles[j].model_inputs()).logits[0]
            torch.testing.assert_close(logits[i, start:start + rows[j].num_tokens], alone, rtol=1e-4, atol=1e-4)

    assert_same(loss_and_grads(model, model_loss, [packed], num_items),
                loss_and_grads(model, model_loss, singles, num_items))


def test_no_token_attends_across_packed_rows(model, rows):
    first, second = rows[0], rows[2]
    changed = Example(tuple(t + 7 for t in first.prompt_ids), first.answer_ids, first.answer, first.row)
    with torch.no_grad():
        before = model(**collate_packed([[first, second]], pad_id=0).model_inputs()).logits[0]
        after = model(**collate_packed([[changed, second]], pad_id=0).model_inputs()).logits[0]
    n = first.num_tokens
    assert not torch.allclose(before[:n], after[:n]), "the change reaches the row's own logits"
    torch.testing.assert_close(before[n:], after[n:], rtol=0, atol=1e-5)


def test_answer_token_loss_equals_the_full_logits_loss(model, rows):
    batch = collate_packed([rows[:3], rows[3:]], pad_id=0)   # several examples a row, and padding
    assert_same(loss_and_grads(model, AnswerTokenLoss(torch_cross_entropy), [batch], batch.num_answer_tokens),
                loss_and_grads(model, model_loss, [batch], batch.num_answer_tokens))


def test_answer_states_pick_the_positions_that_predict_answer_tokens():
    hidden = torch.arange(2 * 5, dtype=torch.float32).reshape(2, 5, 1)   # each position's value is its index
    labels = torch.tensor([[IGNORE, IGNORE, 11, 12, IGNORE], [IGNORE, 21, IGNORE, IGNORE, 24]])
    states, targets = answer_states(hidden, labels)
    assert states.flatten().tolist() == [1.0, 2.0, 5.0, 8.0]
    assert targets.tolist() == [11, 12, 21, 24]


def test_offloaded_checkpointing_keeps_the_loss_and_moves_each_layers_input(base_model, model, rows):
    batch = collate(rows, pad_id=0)
    offloaded = lora_model(base_model, gradient_checkpointing=True, offload_activations=True)
    # Checkpointing recomputes the same values, so the LoRA without it is the reference.
    reference = loss_and_grads(model, model_loss, [batch], batch.num_answer_tokens)
    moved_before = HostOffload.offloaded_bytes
    result = loss_and_grads(offloaded, model_loss, [batch], batch.num_answer_tokens)
    assert_same(result, reference)
    layer_input = batch.input_ids.numel() * base_model.config.hidden_size * 4   # float32 hidden states
    assert HostOffload.offloaded_bytes - moved_before == base_model.config.num_hidden_layers * layer_input
    with pytest.raises(ConfigError, match="offload_activations"):
        settings(offload_activations=True)


def test_packing_fills_rows_and_every_example_comes_once_an_epoch():
    # One long row to every two short ones, each row's tokens its own number.
    examples = [Example(prompt_ids=(i,) * (120 if i % 3 == 0 else 12), answer_ids=(i,) * 8, answer=None,
                        row=("mix", i)) for i in range(1, 97)]
    config = settings(packing=True, batch_size=2, max_seq_len=256)
    lengths = [example.num_tokens for example in examples]
    bins = pack(lengths, list(range(len(examples))), 256)
    assert sorted(j for row in bins for j in row) == list(range(len(examples)))
    assert max(sum(lengths[j] for j in row) for row in bins) <= 256
    room = sorted(256 - sum(lengths[j] for j in row) for row in bins)
    assert room[-2] < min(lengths), "every row but the emptiest is too full to take one more example"

    per_epoch = int(steps_per_epoch(examples, config))
    stream = micro_batches(examples, config, skip=0, pad_id=0)
    epoch = [next(stream) for _ in range(per_epoch)]
    seen = sorted(int(t) for b in epoch for t in torch.unique(b.input_ids[b.attention_mask.bool()]))
    assert seen == list(range(1, 97))
    padding = sum(int((b.attention_mask == 0).sum()) for b in epoch) / sum(b.attention_mask.numel() for b in epoch)
    assert padding < 0.1
    # A resumed run sees the batches it would have seen, across the epoch boundary too.
    following = [next(stream) for _ in range(3)]
    resumed = micro_batches(examples, config, skip=per_epoch, pad_id=0)
    assert all(torch.equal(next(resumed).input_ids, batch.input_ids) for batch in following)
