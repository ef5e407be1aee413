"""The 4-bit path end to end. NF4 is the default on CUDA; bitsandbytes runs it on the CPU here too."""
from __future__ import annotations

import pytest

from client.client import CartridgeClient

from .conftest import PROMPT, start_server


@pytest.fixture(scope="module")
def nf4_client(adapter_dirs):
    proc = start_server("--quantization", "nf4", "--dtype", "bfloat16", "--max-batch-size", "4",
                        "--max-adapters", "2", "--max-lora-rank", "16", "--max-seq-len", "256",
                        "--adapter", f"all16-rs={adapter_dirs['all16-rs']}")
    with CartridgeClient(proc.address, timeout=120) as client:
        yield client
    proc.stop()


def test_nf4_base_answers_and_adapters_apply(nf4_client):
    answer = nf4_client.generate(messages=[{"role": "user", "content": "What is the capital of France?"}],
                                 max_tokens=20)
    assert "Paris" in answer.text
    base = nf4_client.generate(PROMPT, max_tokens=12)
    adapted = nf4_client.generate(PROMPT, adapter="all16-rs", max_tokens=12)
    assert adapted.completion_tokens == 12 and adapted.text != base.text
