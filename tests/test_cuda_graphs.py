"""Decode through CUDA graphs gives the logits of eager decode. Needs a GPU: skipped on CPU-only
hosts (CI); run on the GPU machine with `python -m pytest tests/test_cuda_graphs.py`."""
from __future__ import annotations

import pytest
import torch

from server.lora.slots import AdapterSlots
from server.engine.cuda_graphs import DecodeGraphs
from server.model.kv_cache import PagedKVCache
from server.engine.runner import ModelRunner
from server.engine.sequence import SamplingParams
from server.model.weights import load_model
from tests.conftest import paged_sequences, run_pass, tiny_llama_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@pytest.mark.parametrize("quantize", [True, False])
@pytest.mark.parametrize("kernels", [True, False])
def test_graph_decode_matches_eager(tmp_path, quantize, kernels):
    config = tiny_llama_checkpoint(tmp_path)
    device = torch.device("cuda")
    model, stacks = load_model(tmp_path, config, torch.bfloat16, device, quantize, num_lora_slots=4, max_lora_rank=8,
                               kernels=kernels)
    for (layer, projection), stack in stacks.items():
        if projection in ("q_proj", "v_proj", "down_proj"):      # adapters of ranks 8 and 4 in slots 1 and 2
            for slot, rank in ((1, 8), (2, 4)):
                stack.load(slot, torch.randn(rank, stack.a.shape[2]) * 0.1, torch.randn(stack.b.shape[1], rank) * 0.2)
    slots = AdapterSlots(stacks, 3)
    slots.ranks.update({1: 8, 2: 4})
    slots.projections.update({1: frozenset({"q_proj", "v_proj", "down_proj"}), 2: frozenset({"q_proj", "v_proj", "down_proj"})})

    def runner(graphs: bool) -> ModelRunner:
        # Blocks of 4 tokens: the requests' blocks interleave in the pool as they grow.
        cache = PagedKVCache(3, 64, 4, 2, 64, torch.bfloat16, device)
        decode_graphs = None
        if graphs:
            decode_graphs = DecodeGraphs(model, cache, 8, 32, 8, device)
            # rows 1, 2, 4, 8 x tables of 32 blocks (128 tokens) x LoRA on none, attention or all projections
            assert decode_graphs.capture_all() == 12
        return ModelRunner(model, cache, slots, device, decode_graphs)

    eager, graphed = runner(False), runner(True)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18], [19, 20, 21]]
    runs = []
    for r in (eager, graphed):
        seqs = paged_sequences(r, prompts, [1, 0, 2, 1])
        run_pass(r, [(seq, len(seq.prompt_ids)) for seq in seqs])
        steps = []
        for step in range(6):
            active = seqs if step % 2 == 0 else seqs[:2]                 # the batch shrinks and grows again
            for seq in active:
                seq.output_ids.append(30 + step)
            steps.append(run_pass(r, [(seq, 1) for seq in active]).float())
        runs.append(steps)
    for step, (want, got) in enumerate(zip(*runs)):
        assert torch.allclose(got, want, atol=3e-2, rtol=3e-2), f"step {step}: {(got - want).abs().max():.3e}"
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.75


@pytest.mark.parametrize("penalized", [False, True])
def test_decode_launched_from_the_tokens_of_the_pass_in_flight_matches_one_at_a_time(tmp_path, penalized):
    """The engine launches pass n+1 from pass n's sampled tokens before reading them on the host:
    the same greedy tokens come out as when each pass waits for the one before; penalties too, whose
    counts of the tokens in flight are kept on the device."""
    config = tiny_llama_checkpoint(tmp_path)
    device = torch.device("cuda")
    model, stacks = load_model(tmp_path, config, torch.bfloat16, device, True, num_lora_slots=3, max_lora_rank=8,
                               kernels=True)
    for (_, projection), stack in stacks.items():
        stack.load(1, torch.randn(8, stack.a.shape[2]) * 0.1, torch.randn(stack.b.shape[1], 8) * 0.2)
    slots = AdapterSlots(stacks, 2)
    slots.ranks[1] = 8
    slots.projections[1] = frozenset(stack.projection for stack in stacks.values())

    def generate(chained: bool) -> list[list[int]]:
        cache = PagedKVCache(3, 32, 4, 2, 64, torch.bfloat16, device)
        graphs = DecodeGraphs(model, cache, 4, 32, 8, device)
        graphs.capture_all()
        runner = ModelRunner(model, cache, slots, device, graphs)
        seqs = paged_sequences(runner, [[5, 6, 7], [8, 9], [10]], [1, 0, 1], max_tokens=20)
        penalties = dict(frequency_penalty=1.5, repetition_penalty=1.3, logit_bias=((3, 2.0),)) if penalized else {}
        for row, seq in enumerate(seqs):
            seq.params, seq.penalty_row = SamplingParams(max_tokens=20, **(penalties if row != 1 else {})), row
        runner.penalties.admit(seqs, model.args.vocab_size)
        first = run_pass(runner, [(s, len(s.prompt_ids)) for s in seqs], launch=True)
        for seq, token in zip(first.seqs, runner.collect(first)[0]):
            seq.output_ids.append(token)

        def launch(fed=None):
            return run_pass(runner, [(seq, 1) for seq in seqs], fed=fed, launch=True)

        in_flight = launch()
        for _ in range(12):
            following = launch(fed=in_flight) if chained else None
            for seq, token in zip(seqs, runner.collect(in_flight)[0]):
                seq.output_ids.append(token)
            in_flight = following or launch()
        return [seq.output_ids for seq in seqs]

    assert generate(chained=True) == generate(chained=False)
