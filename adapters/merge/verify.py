"""Checks a merged model against what it stands for: the base with its adapters applied by peft, unmerged.

Both run in float32 on the same prompts, so the merged side differs only by the fold's own
arithmetic and by its weights having been rounded to the output dtype. How much that rounding may
move logits depends on the model and the adapters, so it is measured on the spot: peft's own merge
is rounded to the same dtype, and ours may differ by at most twice what that rounding does (plus
float32 noise). A missing or mis-scaled delta moves logits by about the adapters' whole effect.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..formats.base_checkpoint import has_tokenizer
from ..lora_model import peft_wrapping

PROMPTS = ("The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,")
# float32 merges differ from peft's unmerged forward only by summation order: 2e-4 on SmolLM2-135M.
FLOAT32_TOLERANCE = 1e-3


@dataclass(frozen=True, slots=True)
class Verification:
    max_logit_diff: float          # merged vs base + adapters, over every position of every prompt
    rounding_effect: float         # what rounding peft's merge to the output dtype does to its logits
    adapter_effect: float          # the largest logit change the adapters make, for scale

    @property
    def tolerance(self) -> float:
        return 2 * self.rounding_effect + FLOAT32_TOLERANCE

    @property
    def passed(self) -> bool:
        return self.max_logit_diff <= self.tolerance

    def __str__(self) -> str:
        return (f"max |logit diff| merged vs base+adapters {self.max_logit_diff:.3g} on {len(PROMPTS)} prompts "
                f"(tolerance {self.tolerance:.3g}: rounding peft's merge to the output dtype moves them by "
                f"{self.rounding_effect:.3g}; the adapters by up to {self.adapter_effect:.3g})")


def verify_merge(base_dir: Path, adapters: Sequence[tuple[Path, float]],
                 base_weight: Callable[[str, torch.Tensor], torch.Tensor], merged_dir: Path,
                 dtype: torch.dtype) -> Verification:
    """Compares logits of `merged_dir` with base + (adapter, weight) pairs. `base_weight(name, W)` is the W
    the merge started from (dense, or NF4 round-tripped); the models are loaded one after the other."""
    from transformers import AutoModelForCausalLM

    ids, real = _prompt_batch(merged_dir)
    adapted, plain, rounded = _reference_logits(base_dir, adapters, base_weight, ids, dtype)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    merged_logits = _logits(merged, ids)
    del merged

    def max_diff(left: torch.Tensor, right: torch.Tensor) -> float:
        return (left - right).abs().amax(dim=-1)[real].max().item()

    return Verification(max_logit_diff=max_diff(merged_logits, adapted), rounding_effect=max_diff(rounded, adapted),
                        adapter_effect=max_diff(adapted, plain))


def _prompt_batch(directory: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts as one right-padded batch of token ids [B, S], and which positions are real [B, S].

    Padding only ever follows a prompt, so under causal attention no real position sees it: one
    forward pass gives every prompt's logits exactly, without an attention mask."""
    from transformers import AutoConfig, AutoTokenizer

    if has_tokenizer(directory):
        prompts = [torch.tensor(ids) for ids in AutoTokenizer.from_pretrained(directory)(list(PROMPTS)).input_ids]
    else:
        # Without a tokenizer, token ids from a fixed seed exercise the same weights.
        generator = torch.Generator().manual_seed(0)
        vocab_size = AutoConfig.from_pretrained(directory).vocab_size
        prompts = [torch.randint(vocab_size, (12,), generator=generator) for _ in PROMPTS]
    ids = torch.nn.utils.rnn.pad_sequence(prompts, batch_first=True)
    real = torch.nn.utils.rnn.pad_sequence([torch.ones(len(p), dtype=torch.bool) for p in prompts], batch_first=True)
    return ids, real


def _reference_logits(base_dir: Path, adapters: Sequence[tuple[Path, float]],
                      base_weight: Callable[[str, torch.Tensor], torch.Tensor],
                      ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Logits of the base under peft with every adapter active at its weight, of the base alone, and of
    peft's merge of the same rounded to `dtype`."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(base_weight(name, param))
    names = [f"adapter{i}" for i in range(len(adapters))]
    with peft_wrapping():
        model = PeftModel.from_pretrained(model, adapters[0][0], adapter_name=names[0])
    for name, (path, _) in zip(names[1:], adapters[1:]):
        model.load_adapter(path, adapter_name=name)
    # All active at once: every LoRA layer adds each adapter's output, scaled by its weight.
    model.base_model.set_adapter(names)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, (_, weight) in zip(names, adapters):
                module.set_scale(name, weight)
    model.eval()
    adapted = _logits(model, ids)
    with model.disable_adapter():
        plain = _logits(model, ids)
    merged = model.merge_and_unload()
    with torch.no_grad():
        for param in merged.parameters():
            param.copy_(param.to(dtype))
    rounded = _logits(merged, ids)
    return adapted, plain, rounded


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()      # [B, S, vocab]
