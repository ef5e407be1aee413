"""Training benchmark: today's step against the fast path, QLoRA on a Llama-2-7B-shape base with random weights.

    python -m tests.bench.train_bench --shape 7b                                  # on CUDA
    python -m tests.bench.train_bench --shape 7b --peer PATH/train_baseline.py    # and the peer, first
    python -m tests.bench.train_bench --shape 7b --parts rows --loss-steps 200    # the loss curve alone
    python -m tests.bench.train_bench --shape tiny --steps 2 --seq 256 --loss-steps 3 --batch 2 --warmup 1  # CPU

The recipe is the peer's (a plain transformers + peft + bitsandbytes loop): NF4 with double quantization,
bf16 compute, LoRA r=32 alpha=64 on all seven projections, gradient checkpointing, bitsandbytes paged
8-bit AdamW, micro-batch 4 x 1024. Every step is `Trainer.step` on a model from `adapters.lora_model`, so
the figures are those of `cartridge train` minus data loading and evaluation. Two parts, each run for
today's path (the settings off) and the fast path (packing, fused_loss, offload_activations on):

- speed: full rows of random tokens, loss on every token as the peer computes it; tokens/s and peak
  allocated memory, and the peer's figures for the same shape when --peer names its script.
- rows: the sample domains' rows (their prompt and answer lengths under the embedded base's tokenizer,
  random token ids, the rows repeated as often as --loss-steps needs), loss on answer tokens only. A step
  takes the rows that fill `batch` packed rows of `seq` tokens; today's path runs them as padded
  micro-batches of `batch` rows, longest first, accumulated into the same step, so both paths see the
  same rows per step and the same gradient. Prints useful (non-padding) tokens/s padded, packed (packing
  alone) and fast, and the loss of every step of today's path against the fast path.

Prints one JSON object and writes it to --out. Speed does not depend on weight values, so random weights
stand in for a real checkpoint.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from adapters.formats.base_checkpoint import resolve_base
from adapters.lora_model import load_base, with_new_lora
from adapters.train.config import TrainConfig
from adapters.train.datasets import Example, collate, read_dataset
from adapters.train.loop import Trainer
from adapters.train.packing import collate_packed, pack

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=32000),
}
RECIPE = ("NF4 + double quant, bf16 compute (fp32 on CPU), LoRA r=32 alpha=64 on all 7 projections, sdpa attention, "
          "gradient checkpointing, bnb paged 8-bit AdamW (torch AdamW on CPU); tokens/s = tokens of a step / step time")
FAST = dict(packing=True, fused_loss=True, offload_activations=True)
SAMPLES = Path(__file__).resolve().parents[2] / "adapters" / "sample_data"


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


def run_peer(script: str, shape: str, batch: int, seq: int) -> dict:
    """The peer's run of the same shape, batch and sequence with checkpointing, from its own JSON."""
    with tempfile.TemporaryDirectory() as out:
        done = subprocess.run([sys.executable, script, shape, out], capture_output=True, text=True)
        if done.returncode:
            return {"error": done.stderr.strip().splitlines()[-1:]}
        result = json.loads((Path(out) / f"train_baseline_{shape}.json").read_text())
    return next(run for run in result["runs"]
                if (run["batch"], run["seq"], run["grad_checkpointing"]) == (batch, seq, True))


def real_rows(vocab_size: int, seq: int, seed: int) -> list[Example]:
    """The sample domains' training rows as prompt and answer lengths, with random token ids."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_base(None))
    rng = random.Random(seed)
    files = sorted(str(path) for path in SAMPLES.glob("*/train.jsonl"))
    rows = read_dataset(files, tokenizer, seq, max_rejected_fraction=1.0).examples

    def tokens(n: int) -> tuple[int, ...]:
        return tuple(rng.randrange(100, vocab_size - 100) for _ in range(n))

    return [Example(tokens(len(row.prompt_ids)), tokens(len(row.answer_ids)), None, row.row) for row in rows]


def row_steps(rows: list[Example], batch: int, seq: int, steps: int, seed: int) -> list[list[list[Example]]]:
    """`steps` groups of `batch` packed rows of at most `seq` tokens each, the rows repeated as needed."""
    per_step = batch * seq / (sum(row.num_tokens for row in rows) / len(rows))
    copies = int(steps * per_step / len(rows)) + 2
    tiled = rows * copies
    order = list(range(len(tiled)))
    random.Random(seed).shuffle(order)
    bins = pack([row.num_tokens for row in tiled], order, seq)
    groups = [[[tiled[j] for j in b] for b in bins[i:i + batch]] for i in range(0, len(bins) - batch + 1, batch)]
    return groups[:steps]


class Bench:
    """Runs of the recipe on one loaded model, each from the same LoRA weights and a fresh optimizer."""

    def __init__(self, base_dir: Path, config: TrainConfig, device: torch.device):
        self.device, self.config = device, config
        self._reset_peak()
        self.model = with_new_lora(load_base(base_dir, quantized=True, device=device), config)
        # On the host, so that holding them adds nothing to the device's peak.
        self.initial = {name: p.detach().to("cpu", copy=True) for name, p in self.model.named_parameters()
                        if p.requires_grad}

    def run(self, steps: list[list], warmup: int) -> dict:
        """Times `steps` (each a list of micro-batches) after `warmup` untimed ones, from the initial weights."""
        trainer = Trainer(self.model, self.config, len(steps))
        trainer.load_lora_weights(self.initial)
        losses = []
        for i, step in enumerate(steps):
            if i == warmup:
                self._sync()
                started = time.perf_counter()
            losses.append(trainer.step(step))  # .item() inside syncs once per step
        timed = steps[warmup:]
        step_s = (time.perf_counter() - started) / len(timed)
        tokens = sum(int(b.attention_mask.sum()) for step in timed for b in step) / len(timed)
        width = sum(b.attention_mask.numel() for step in timed for b in step) / len(timed)
        result = {"step_s": round(step_s, 3), "tokens_per_s": round(tokens / step_s),
                  "padding": round(1 - tokens / width, 3), "losses": losses}
        if self.device.type == "cuda":
            result.update(peak_alloc_GB=round(torch.cuda.max_memory_allocated() / 1e9, 2),
                          peak_reserved_GB=round(torch.cuda.max_memory_reserved() / 1e9, 2))
        del trainer
        self._reset_peak()
        return result

    def close(self) -> None:
        del self.model
        gc.collect()
        self._reset_peak()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def _reset_peak(self) -> None:
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def run(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    if cuda and not importlib.util.find_spec("liger_kernel"):
        sys.exit("the fast path's fused loss needs liger-kernel on CUDA: pip install 'cartridge-lora[train-gpu]'")
    result = {"shape": args.shape, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
              "torch": torch.__version__, "recipe": RECIPE, "batch": args.batch, "seq": args.seq}
    if args.peer:
        result["peer"] = run_peer(args.peer, args.shape, args.batch, args.seq) if cuda else "needs CUDA"
    base_dir = random_base(args.shape, device)
    vocab = SHAPES[args.shape]["vocab_size"]
    # data and output are never read: the batches are made here and nothing is saved.
    config = TrainConfig(data=("random tokens",), output="(not written)", base_model=str(base_dir), method="qlora",
                         r=32, lora_alpha=64, lora_dropout=0.0, learning_rate=1e-4, lr_scheduler="constant",
                         warmup_ratio=0.0, batch_size=args.batch, max_seq_len=args.seq, gradient_checkpointing=True,
                         optimizer="paged_adamw_8bit" if cuda else "adamw")
    full = [Example((), tuple(torch.randint(100, vocab - 100, (args.seq,)).tolist()), None, ("random", i))
            for i in range(args.batch)]
    speed_steps = {"today": [[collate(full, pad_id=0)]] * (args.warmup + args.steps),
                   "fast": [[collate_packed([[row] for row in full], pad_id=0)]] * (args.warmup + args.steps)}
    groups = row_steps(real_rows(vocab, args.seq, seed=0), args.batch, args.seq, args.loss_steps, seed=0)
    padded = [[collate(chunk, pad_id=0) for chunk in _chunks(sorted((r for b in g for r in b),
                                                                  key=lambda r: -r.num_tokens), args.batch)]
              for g in groups]
    packed = [[collate_packed(g, pad_id=0)] for g in groups]
    warm = min(args.warmup, len(groups) - 1)
    speed, rows = {}, {}

    today = Bench(base_dir, config, device)
    if "speed" in args.parts:
        speed["today"] = today.run(speed_steps["today"], args.warmup)
    if "rows" in args.parts:
        rows = {"padded": today.run(padded, warm), "packed": today.run(packed, warm)}
    initial = today.initial
    today.close()
    fast = Bench(base_dir, replace(config, **FAST), device)
    fast.initial = initial   # the very LoRA weights today's path started from
    if "speed" in args.parts:
        speed["fast"] = fast.run(speed_steps["fast"], args.warmup)
    if "rows" in args.parts:
        rows["fast"] = fast.run(packed, warm)
    fast.close()

    if rows:
        today_losses, fast_losses = rows["padded"]["losses"], rows["fast"]["losses"]
        differences = [abs(fast - base) / abs(base) for base, fast in zip(today_losses, fast_losses)]
        result["loss_curve"] = {"steps": len(differences), "today": today_losses, "fast": fast_losses,
                                "relative_difference": [float(f"{d:.2e}") for d in differences],
                                "max_relative_difference": float(f"{max(differences):.2e}")}
    for part in (speed, rows):
        for figures in part.values():
            figures["loss_first"], figures["loss_last"] = figures["losses"][0], figures.pop("losses")[-1]
    if speed:
        result["speed"] = speed
    if rows:
        result["rows"] = {"steps": len(groups), "rows_per_step": sum(len(b) for b in groups[0]), **rows}
    result["summary"] = _summary(result)
    if not cuda:
        result["peak_host_rss_GB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2)
    return result


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _summary(result: dict) -> dict:
    """The issue's figures: ratios against today's path and the peer, the loss gap, packed against padded."""
    speed, rows, peer, summary = result.get("speed"), result.get("rows"), result.get("peer"), {}
    if speed:
        summary["fast_vs_today_tokens_per_s"] = round(speed["fast"]["tokens_per_s"] / speed["today"]["tokens_per_s"], 2)
        if "peak_alloc_GB" in speed["fast"]:
            summary["fast_vs_today_peak_alloc"] = round(speed["fast"]["peak_alloc_GB"]
                                                        / speed["today"]["peak_alloc_GB"], 2)
        if isinstance(peer, dict) and "tokens_per_s" in peer:
            summary["fast_vs_peer_tokens_per_s"] = round(speed["fast"]["tokens_per_s"] / peer["tokens_per_s"], 2)
            summary["fast_vs_peer_peak_alloc"] = round(speed["fast"]["peak_alloc_GB"] / peer["peak_alloc_GB"], 2)
    if rows:
        for run in ("packed", "fast"):
            summary[f"{run}_vs_padded_useful_tokens_per_s"] = round(rows[run]["tokens_per_s"]
                                                                    / rows["padded"]["tokens_per_s"], 2)
        summary["max_relative_loss_difference"] = result["loss_curve"]["max_relative_difference"]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="7b")
    parser.add_argument("--steps", type=int, default=10, help="timed steps of the speed part (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--loss-steps", type=int, default=20,
                        help="steps of the rows part, whose losses are compared (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=4, help="rows per micro-batch (default: %(default)s)")
    parser.add_argument("--seq", type=int, default=1024, help="tokens per row (default: %(default)s)")
    parser.add_argument("--parts", nargs="+", choices=("speed", "rows"), default=["speed", "rows"],
                        help="speed: full random rows; rows: the sample domains' rows and the loss comparison "
                        "(default: both)")
    parser.add_argument("--peer", metavar="PATH", help="the peer's script (train_baseline.py), run first on CUDA")
    parser.add_argument("--out", default="bench-results", help="directory for the JSON (default: %(default)s)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    result = run(args)
    print(json.dumps(result, indent=1))
    (Path(args.out) / f"train_bench_{args.shape}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
