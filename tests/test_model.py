"""Our model runner against transformers' LlamaForCausalLM on the embedded default model."""
from __future__ import annotations

import torch
from transformers import AutoConfig

from server.lora.slots import AdapterSlots
from server.model.kv_cache import KVCache
from server.engine.runner import ModelRunner
from server.engine.sequence import SamplingParams, Sequence
from server.engine.text_stream import TextStream
from server.model.weights import load_model

from .conftest import PROMPT


def build_runner(base_dir, quantize: bool, dtype: torch.dtype) -> ModelRunner:
    config = AutoConfig.from_pretrained(base_dir)
    model, stacks = load_model(base_dir, config, dtype, torch.device("cpu"), quantize, num_lora_slots=2,
                               max_lora_rank=8)
    cache = KVCache(model.args.n_layers, 4, 128, model.args.n_kv_heads, model.args.head_dim, dtype, torch.device("cpu"))
    return ModelRunner(model, cache, AdapterSlots(stacks, 1), torch.device("cpu"))


def run_steps(runner: ModelRunner, prompts: list[list[int]], continuations: list[list[int]]) -> list[torch.Tensor]:
    """Prefill the prompts together, then feed the given continuation tokens one step at a time;
    returns each step's logits [n, vocab]."""
    seqs = [Sequence(p, SamplingParams(max_tokens=8), None, TextStream(None)) for p in prompts]
    for slot, seq in enumerate(seqs):
        seq.kv_slot = slot
    steps = [runner.prefill(seqs)]
    for i in range(len(continuations[0])):
        for seq, cont in zip(seqs, continuations):
            seq.output_ids.append(cont[i])
        steps.append(runner.decode(seqs))
    return steps


def reference_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()   # [T, vocab]


def test_logits_match_transformers_in_float32(base_dir, base_model, tokenizer):
    runner = build_runner(base_dir, quantize=False, dtype=torch.float32)
    # Two prompts of different lengths in one padded prefill, then decode steps for both.
    prompts = [tokenizer.encode(PROMPT), tokenizer.encode("Paris is the capital of")]
    continuations = [[11, 260, 1345], [2136, 30, 198]]
    steps = run_steps(runner, prompts, continuations)
    for row, (prompt, cont) in enumerate(zip(prompts, continuations)):
        expected = reference_logits(base_model, prompt + cont)
        for step, logits in enumerate(steps):
            want = expected[len(prompt) - 1 + step]
            assert torch.allclose(logits[row], want, atol=2e-3, rtol=1e-4), \
                f"row {row} step {step}: max diff {(logits[row] - want).abs().max():.2e}"


def test_nf4_logits_match_transformers_bitsandbytes(base_dir, tokenizer):
    """The NF4 path runs on the CPU here (bitsandbytes 0.50 has CPU kernels); on a GPU it is the default."""
    from transformers import AutoModelForCausalLM

    from adapters.formats.nf4 import bnb_config

    reference = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=bnb_config(torch.bfloat16),
                                                     dtype=torch.bfloat16, device_map="cpu")
    runner = build_runner(base_dir, quantize=True, dtype=torch.bfloat16)
    prompt = tokenizer.encode(PROMPT)
    ours = run_steps(runner, [prompt], [[]])[0][0]
    want = reference_logits(reference, prompt)[-1]
    # bf16 activations: compare the distributions, not bits.
    assert ours.argmax() == want.argmax()
    assert torch.nn.functional.cosine_similarity(ours, want, dim=0) > 0.999
