"""Batched LoRA against a slow float64 loop, over the ways requests spread across adapters (as punica tests)."""
from __future__ import annotations

import random

import pytest
import torch

from server.lora.batch import LoraBatch, LoraStack

SLOTS, MAX_RANK, IN, OUT = 6, 16, 32, 24
RANKS = {0: 0, 1: 4, 2: 16, 3: 8, 4: 1, 5: 12}   # slot 0 is the base model: no delta


def spread(kind: str, rows: int) -> list[int]:
    rng = random.Random(kind)
    if kind == "same":
        return [3] * rows
    if kind == "distinct":
        return [1 + i % (SLOTS - 1) for i in range(rows)]
    if kind == "with_base":
        return [rng.choice([0, 0, 2, 5]) for _ in range(rows)]
    weights = [1 / (k + 1) ** 1.5 for k in range(SLOTS)]                      # Zipf
    return rng.choices(range(SLOTS), weights=weights, k=rows)


def make_stack(projection: str = "q_proj") -> tuple[LoraStack, dict]:
    stack = LoraStack(projection, SLOTS, MAX_RANK, IN, OUT, torch.float32, torch.device("cpu"))
    weights = {}
    for slot, rank in RANKS.items():
        if rank:
            a, b, scaling = torch.randn(rank, IN), torch.randn(OUT, rank), random.random() + 0.5
            stack.load(slot, a, b * scaling)
            weights[slot] = (a.double(), b.double(), scaling)
    return stack, weights


def reference(x: torch.Tensor, row_slots: list[int], weights: dict) -> torch.Tensor:
    y = torch.zeros(*x.shape[:-1], OUT, dtype=torch.float64)
    for i, slot in enumerate(row_slots):
        if slot in weights:
            a, b, scaling = weights[slot]
            y[i] = (x[i].double() @ a.T) @ b.T * scaling
    return y


@pytest.mark.parametrize("kind", ["same", "distinct", "with_base", "zipf"])
@pytest.mark.parametrize("prefill, segments", [(True, True), (False, True), (False, False)])
def test_batched_delta_matches_a_loop_over_rows(kind, prefill, segments):
    """Per-row gathers (BGMV) take one token a row; segments (SGMV) any rows, prompt runs and decode tokens mixed."""
    stack, weights = make_stack()
    rows = 9
    row_slots = spread(kind, rows)
    x = torch.randn(rows, 5 if prefill else 1, IN)
    batch = LoraBatch.build(row_slots, RANKS, {s: frozenset({"q_proj"}) for s in RANKS}, x.shape[1],
                            torch.device("cpu"), segments=segments)
    base = torch.randn(rows, x.shape[1], OUT)
    out = stack.add_delta(base.clone(), x, batch)
    want = base.double() + reference(x, row_slots, weights)
    assert torch.allclose(out.double(), want, rtol=1e-4, atol=1e-4)


def test_untargeted_projection_and_base_rows_are_untouched():
    stack, _ = make_stack("v_proj")
    x, base = torch.randn(4, 1, IN), torch.randn(4, 1, OUT)
    targets_q_only = {s: frozenset({"q_proj"}) for s in RANKS}
    batch = LoraBatch.build([1, 2, 3, 0], RANKS, targets_q_only, 1, torch.device("cpu"))
    assert torch.equal(stack.add_delta(base.clone(), x, batch), base)
    assert LoraBatch.build([0, 0], RANKS, targets_q_only, 5, torch.device("cpu")).slots is None


def test_reloading_a_slot_replaces_every_weight():
    stack, _ = make_stack()
    a, b = torch.randn(2, IN), torch.randn(OUT, 2)
    stack.load(2, a, b)                         # slot 2 held a rank-16 adapter before
    x = torch.randn(1, 1, IN)
    batch = LoraBatch.build([2], {2: 2}, {2: frozenset({"q_proj"})}, 1, torch.device("cpu"))
    out = stack.add_delta(torch.zeros(1, 1, OUT), x, LoraBatch(batch.slots, MAX_RANK, batch.projections, None))
    assert torch.allclose(out[0, 0], (x[0, 0] @ a.T) @ b.T, atol=1e-5)
