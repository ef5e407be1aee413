"""The 4-bit path end to end. NF4 is the default on CUDA; bitsandbytes runs it on the CPU here too."""
from __future__ import annotations

import re
import urllib.request

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


def test_nf4_base_weights_take_about_an_eighth_of_float32(server):
    text = urllib.request.urlopen(server.metrics_url).read().decode()
    base = float(re.search(r'^cartridge_device_memory_bytes\{part="base_weights"\} (\S+)', text, re.M)[1])
    # 106M projection weights at 4 bits with their scales, 28M embedding weights in bfloat16: ~0.11 GB,
    # against 0.54 GB in float32.
    assert 100e6 < base < 125e6
