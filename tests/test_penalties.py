"""Logit bias and presence / frequency / repetition penalties (server/engine/penalties.py) against a plain
per-row loop over the same logits, on the CPU path the engine runs here."""
from __future__ import annotations

import random

import torch

from server.engine.penalties import Penalties
from server.engine.sampler import sample_on_device
from server.engine.sequence import SamplingParams, Sequence

VOCAB = 97


def reference(logits: list[float], params: SamplingParams, prompt: list[int], generated: list[int]) -> list[float]:
    """One row, token by token, in float64: OpenAI's bias and penalties, transformers' repetition penalty."""
    out = list(logits)
    for token, bias in params.logit_bias:
        out[token] += bias
    for token in range(len(out)):
        count = generated.count(token)
        if count or token in prompt:
            out[token] = out[token] / params.repetition_penalty if out[token] > 0 else \
                out[token] * params.repetition_penalty
        out[token] -= count * params.frequency_penalty + (count > 0) * params.presence_penalty
    return out


def make_rows(rng: random.Random) -> list[Sequence]:
    rows = []
    for row in range(6):
        penalized = row % 3 != 0           # rows 0 and 3 ask for nothing: they must stay untouched
        params = SamplingParams(
            max_tokens=8,
            presence_penalty=rng.uniform(-2, 2) if penalized else 0.0,
            frequency_penalty=rng.uniform(-2, 2) if penalized else 0.0,
            repetition_penalty=rng.uniform(0.5, 2.0) if penalized else 1.0,
            logit_bias=tuple((t, rng.uniform(-100, 100)) for t in rng.sample(range(VOCAB), 5)) if penalized else ())
        seq = Sequence([rng.randrange(VOCAB) for _ in range(rng.randrange(1, 12))], params, None, None)
        seq.penalty_row = 5 - row          # table rows in another order than batch rows
        rows.append(seq)
    return rows


def test_bias_and_penalties_match_the_reference_row_by_row_and_leave_other_rows_alone():
    rng = random.Random(7)
    torch.manual_seed(7)
    seqs = make_rows(rng)
    penalties = Penalties(num_rows=6, device=torch.device("cpu"))
    penalties.admit(seqs, VOCAB)
    generated = [[] for _ in seqs]
    for _ in range(5):       # a few steps of sampled tokens, some repeated, counted as the sampler counts them
        tokens = torch.tensor([rng.randrange(VOCAB // 4) for _ in seqs])
        penalties.record(seqs, tokens)
        for row, token in enumerate(tokens.tolist()):
            generated[row].append(token)
    logits = torch.randn(len(seqs), VOCAB) * 5
    before = logits.clone()
    applied = penalties.apply(logits, seqs)
    assert torch.equal(logits, before), "the input (a graph's output) must not change"
    for row, seq in enumerate(seqs):
        want = reference(logits[row].double().tolist(), seq.params, seq.prompt_ids, generated[row])
        if seq.params.penalized:
            torch.testing.assert_close(applied[row].double(), torch.tensor(want, dtype=torch.float64),
                                       rtol=1e-5, atol=1e-4)
        else:
            assert torch.equal(applied[row], logits[row])


def test_a_row_reused_by_a_new_request_starts_with_no_counts_and_its_own_prompt():
    rng = random.Random(3)
    seqs = make_rows(rng)
    penalties = Penalties(num_rows=6, device=torch.device("cpu"))
    penalties.admit(seqs, VOCAB)
    penalties.record(seqs, torch.arange(len(seqs)))
    fresh = Sequence([1, 2], SamplingParams(max_tokens=4, frequency_penalty=1.0, repetition_penalty=2.0), None, None)
    fresh.penalty_row = seqs[1].penalty_row
    penalties.admit([fresh], VOCAB)
    logits = torch.full((1, VOCAB), 3.0)
    want = reference([3.0] * VOCAB, fresh.params, fresh.prompt_ids, [])
    torch.testing.assert_close(penalties.apply(logits, [fresh])[0].double(), torch.tensor(want, dtype=torch.float64))


def test_a_preempted_request_admitted_again_in_another_row_counts_what_it_generated():
    seq = Sequence([4, 5], SamplingParams(max_tokens=8, presence_penalty=0.5, frequency_penalty=1.0,
                                          repetition_penalty=1.5), None, None)
    seq.output_ids = [7, 7, 9]          # generated before its preemption
    seq.penalty_row = 2
    penalties = Penalties(num_rows=3, device=torch.device("cpu"))
    penalties.admit([seq], VOCAB)
    logits = torch.randn(1, VOCAB) * 5
    want = reference(logits[0].double().tolist(), seq.params, seq.prompt_ids, seq.output_ids)
    torch.testing.assert_close(penalties.apply(logits, [seq])[0].double(), torch.tensor(want, dtype=torch.float64),
                               rtol=1e-5, atol=1e-4)


def test_the_sampler_counts_its_own_tokens_so_greedy_with_a_frequency_penalty_does_not_repeat():
    seq = Sequence([0], SamplingParams(max_tokens=8, frequency_penalty=2.0), None, None)
    seq.penalty_row = 0
    penalties = Penalties(num_rows=1, device=torch.device("cpu"))
    penalties.admit([seq], VOCAB)
    logits = torch.zeros(1, VOCAB)
    logits[0, :4] = torch.tensor([1.0, 0.5, 0.2, 0.1])    # without the penalty, greedy picks 0 every time
    picked = [sample_on_device(logits, [seq], penalties)[0].item() for _ in range(4)]
    assert picked == [0, 1, 2, 3]
