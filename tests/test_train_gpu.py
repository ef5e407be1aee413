"""The trainer's CUDA-only pieces: Liger's fused loss and the pinned-memory offload. Skipped without CUDA.

Their CPU counterparts (the answer-token selection, the offload hooks) are tested in test_train_fast_path.py.
"""
from __future__ import annotations

import pytest
import torch

from adapters.train.answer_loss import liger_cross_entropy, torch_cross_entropy
from adapters.train.offload import HostOffload, offloaded_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Liger is Triton; pinned copies)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_liger_fused_loss_equals_the_torch_loss(dtype):
    pytest.importorskip("liger_kernel", reason="pip install 'cartridge-lora[train-gpu]'")
    torch.manual_seed(0)
    weight = torch.randn(32000, 512, device="cuda", dtype=dtype) * 0.02       # [V, H], frozen like the head
    hidden = torch.randn(700, 512, device="cuda", dtype=dtype, requires_grad=True)  # [N, H]
    targets = torch.randint(0, 32000, (700,), device="cuda")
    fused = liger_cross_entropy()(weight, hidden, targets)
    fused.backward()
    fused_grad, hidden.grad = hidden.grad.clone(), None
    reference = torch_cross_entropy(weight, hidden, targets)
    reference.backward()
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fused.float(), reference.float(), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(fused_grad.float(), hidden.grad.float(), rtol=tolerance, atol=tolerance)


def test_offloaded_checkpoint_gives_the_same_gradients_with_inputs_on_the_host():
    torch.manual_seed(0)
    layers = [torch.nn.Linear(256, 256, device="cuda") for _ in range(4)]
    x = torch.randn(8, 256, device="cuda", requires_grad=True)

    def run(checkpointed: bool) -> list[torch.Tensor]:
        for layer in layers:
            layer.zero_grad(set_to_none=True)
        h = x
        for layer in layers:
            h = offloaded_checkpoint(lambda t, layer=layer: torch.tanh(layer(t)), h) if checkpointed \
                else torch.tanh(layer(h))
        h.square().sum().backward()
        return [layer.weight.grad.clone() for layer in layers]

    reference = run(checkpointed=False)
    moved = HostOffload.offloaded_bytes
    offloaded = run(checkpointed=True)
    assert HostOffload.offloaded_bytes - moved == 4 * x.numel() * x.element_size()
    for expected, got in zip(reference, offloaded):
        torch.testing.assert_close(got, expected)
