"""serve_bench's peer: plain transformers `generate` + peft, in-process, timed on the same batches as ours."""
from __future__ import annotations

import time
from pathlib import Path

import torch


def peer(model_dir: Path, adapter_dirs: list[Path], batches: dict[str, tuple[list[list[int]], list[str]]],
         max_tokens: int, device: str, quantize: bool) -> dict:
    """transformers generate + peft with `adapter_names` (its way of mixing adapters in one batch)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adapters.formats.nf4 import bnb_config

    kwargs = dict(quantization_config=bnb_config(), device_map=device) if quantize else dict(device_map=device)
    dtype = torch.bfloat16 if device == "cuda" or quantize else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **kwargs)
    model = PeftModel.from_pretrained(model, adapter_dirs[0], adapter_name="a0")
    for i, directory in enumerate(adapter_dirs[1:], start=1):
        model.load_adapter(directory, adapter_name=f"a{i}")
    model.eval()
    results = {}
    for case, (ids, names) in batches.items():
        batch = torch.tensor(ids, device=device)
        run = lambda n: model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=n,  # noqa: E731
                                       min_new_tokens=n, do_sample=False, adapter_names=names, pad_token_id=0)
        run(2)
        sync(device)
        start = time.perf_counter()
        run(max_tokens)
        sync(device)
        elapsed = time.perf_counter() - start
        results[case] = {"tokens_per_s": round(len(ids) * max_tokens / elapsed, 1),
                         "ms_per_decode_step": round(1000 * elapsed / max_tokens, 2)}
    return results


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
