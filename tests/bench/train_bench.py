"""Training benchmark: our trainer's step loop, QLoRA on a Llama-2-7B-shape base with random weights.

    python -m tests.bench.train_bench --shape 7b --steps 200   # on CUDA, the peer's recipe
    python -m tests.bench.train_bench --shape tiny --steps 3   # smoke test on the CPU

The recipe is /work/shared/bench/train_baseline.py's: NF4 with double quantization, bf16 compute,
LoRA r=32 alpha=64 on all seven projections, gradient checkpointing, bitsandbytes paged 8-bit AdamW,
micro-batch 4 x 1024 random tokens, loss on every token; a few warm-up steps, then the mean step time.
The base is saved to /tmp and loaded through `adapters.lora_model`, and every step is `Trainer.step`,
so the figures are those of `cartridge train` minus data loading and evaluation. Run the peer in the
same session to compare. Prints one JSON object and writes it to --out. Speed does not depend on
weight values, so random weights stand in for a real checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import torch

from adapters.train.datasets import Batch
from adapters.lora_model import load_base, with_new_lora
from adapters.train.config import TrainConfig
from adapters.train.loop import Trainer

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=32000),
}
RECIPE = ("NF4 + double quant, bf16 compute (fp32 on CPU), LoRA r=32 alpha=64 on all 7 projections, sdpa attention, "
          "gradient checkpointing, bnb paged 8-bit AdamW (torch AdamW on CPU); tokens/s = micro-batch x seq / step time")


def random_base(shape: str, device: torch.device) -> Path:
    """A random-weight Llama of `shape`, saved once under /tmp (the peer script's path, so both can share it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(tempfile.gettempdir()) / f"llama-{shape}"
    if not (path / "config.json").is_file():
        with device:
            model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape], max_position_embeddings=4096)).to(torch.bfloat16)
        model.save_pretrained(path)
        del model
    return path


def run(shape: str, steps: int, warmup: int, batch: int, seq: int, checkpointing: bool) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    base_dir = random_base(shape, device)
    # data and output are never read: the batches are made here and nothing is saved.
    config = TrainConfig(data=("random tokens",), output="(not written)", base_model=str(base_dir), method="qlora",
                         r=32, lora_alpha=64, lora_dropout=0.0, learning_rate=1e-4, lr_scheduler="constant",
                         warmup_ratio=0.0, batch_size=batch, max_seq_len=seq, gradient_checkpointing=checkpointing,
                         optimizer="paged_adamw_8bit" if cuda else "adamw", max_steps=warmup + steps)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = with_new_lora(load_base(base_dir, quantized=True, device=device), config)
    trainer = Trainer(model, config, warmup + steps)
    ids = torch.randint(100, SHAPES[shape]["vocab_size"] - 100, (batch, seq), device=device)
    micro_batch = Batch(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone())
    losses = []
    for i in range(warmup + steps):
        if i == warmup:
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
        losses.append(trainer.step([micro_batch]))  # .item() inside syncs once per step
    step_s = (time.perf_counter() - started) / steps
    result = {"shape": shape, "device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
              "recipe": RECIPE, "batch": batch, "seq": seq, "grad_checkpointing": checkpointing,
              "warmup_steps": warmup, "timed_steps": steps, "step_s": round(step_s, 3),
              "tokens_per_s": round(batch * seq / step_s), "loss_first": losses[0], "loss_last": losses[-1]}
    if cuda:
        result.update(peak_alloc_GB=round(torch.cuda.max_memory_allocated() / 1e9, 2),
                      peak_reserved_GB=round(torch.cuda.max_memory_reserved() / 1e9, 2))
    else:
        result["peak_host_rss_GB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="7b")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=4, help="micro-batch (default: %(default)s)")
    parser.add_argument("--seq", type=int, default=1024, help="tokens per row (default: %(default)s)")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", default="bench-results", help="directory for the JSON (default: %(default)s)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    result = run(args.shape, args.steps, args.warmup, args.batch, args.seq, args.gradient_checkpointing)
    print(json.dumps(result, indent=1))
    (Path(args.out) / f"train_bench_{args.shape}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
