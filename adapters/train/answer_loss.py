"""The training loss of a micro-batch: from the model's logits, or from the answer tokens' hidden states alone.

Today's path (`model_loss`) lets transformers compute logits over every position ([B, S, V], then a float32
copy for the cross-entropy): at 4 x 1024 and a 32k vocabulary that is over 1 GB of a step's peak memory,
most of it at prompt and padding positions that carry no loss. `AnswerTokenLoss` runs the decoder,
keeps the hidden states of the positions that predict an answer token, and applies the output head
and cross-entropy to those alone; on CUDA with `fused_loss`, Liger Kernel's fused linear +
cross-entropy does both in chunks, so the logits never exist at all. Both give
sum over answer tokens of -log p(token) / num_items, transformers' own reduction.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

from .datasets import IGNORE, Batch

# (output head weight [V, H], hidden states [N, H], target ids [N]) -> summed cross-entropy, a scalar.
CrossEntropy = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class StepLoss(Protocol):
    def __call__(self, model, batch: Batch, num_items: int) -> torch.Tensor: ...


def model_loss(model, batch: Batch, num_items: int) -> torch.Tensor:
    """transformers' causal-LM loss over the full logits."""
    return model(**batch.model_inputs(), labels=batch.labels, num_items_in_batch=num_items).loss


def answer_states(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states [N, H], targets [N]) of the N positions whose next token carries loss.

    hidden: [B, S, H]; labels: [B, S], IGNORE where no loss. Position t predicts token t + 1, the
    same shift transformers applies to the logits."""
    targets = labels[:, 1:]
    keep = targets != IGNORE
    return hidden[:, :-1][keep], targets[keep]


def torch_cross_entropy(weight: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The reference: logits of the N answer positions only, upcast to float32 as transformers does."""
    logits = hidden.to(weight.dtype) @ weight.T  # [N, V]
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")


def liger_cross_entropy() -> CrossEntropy:
    """Liger Kernel's fused linear + cross-entropy (Triton, CUDA only): chunks of hidden states go through
    the head and the loss, and their input gradient is computed in the forward, so no [N, V] tensor stays."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    fused = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="sum")

    def cross_entropy(weight: torch.Tensor, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # prepare_model_for_kbit_training keeps the head in float32; the kernel wants one dtype.
        return fused(weight, hidden.to(weight.dtype).contiguous(), targets)

    return cross_entropy


class AnswerTokenLoss:
    """The loss from the decoder's hidden states at answer positions; the model is a peft causal LM whose
    output head carries no LoRA (its targets are the seven projections)."""

    def __init__(self, cross_entropy: CrossEntropy):
        self.cross_entropy = cross_entropy

    def __call__(self, model, batch: Batch, num_items: int) -> torch.Tensor:
        causal_lm = model.get_base_model()
        hidden = causal_lm.get_decoder()(**batch.model_inputs()).last_hidden_state  # [B, S, H]
        states, targets = answer_states(hidden, batch.labels)
        return self.cross_entropy(causal_lm.get_output_embeddings().weight, states, targets) / num_items


def step_loss(fused_loss: bool, device: torch.device) -> StepLoss:
    """With fused_loss: the answer-token loss, through Liger on CUDA and plain torch on the CPU."""
    if not fused_loss:
        return model_loss
    return AnswerTokenLoss(liger_cross_entropy() if device.type == "cuda" else torch_cross_entropy)
