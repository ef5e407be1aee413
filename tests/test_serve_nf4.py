"""The 4-bit path end to end. NF4 is the default on CUDA; bitsandbytes runs it on the CPU here too."""
from __future__ import annotations

import pytest

from .conftest import PROMPT


@pytest.fixture(scope="module")
def server_flags(adapter_dirs) -> list[str]:
    return ["--quantization", "nf4", "--dtype", "bfloat16", "--max-batch-size", "4", "--max-adapters", "2",
            "--max-lora-rank", "16", "--max-seq-len", "256", "--adapter", f"all16-rs={adapter_dirs['all16-rs']}"]


def test_nf4_base_answers_and_adapters_apply(client):
    answer = client.generate(messages=[{"role": "user", "content": "What is the capital of France?"}],
                             max_tokens=20)
    assert "Paris" in answer.text
    base = client.generate(PROMPT, max_tokens=12)
    adapted = client.generate(PROMPT, adapter="all16-rs", max_tokens=12)
    assert adapted.completion_tokens == 12 and adapted.text != base.text
