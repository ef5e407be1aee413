"""`cartridge merge`: flags -> MergeConfig -> a merged model directory."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path


def register(commands) -> None:
    parser = commands.add_parser("merge", help="fold LoRA adapters into the base and export a plain model",
                                 description="Fold W + scaling * B @ A into dense weights and write a transformers "
                                 "directory that loads without peft (config, tokenizer, generation config, "
                                 "sharded safetensors and their index).")
    parser.add_argument("--adapter", action="append", required=True, metavar="DIR",
                        help="peft adapter directory (repeatable: the deltas are summed)")
    parser.add_argument("--weight", action="append", type=float, default=[], metavar="W",
                        help="one per --adapter, in order: merge W + sum of weight * delta (default: 1 each)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where to write the merged model")
    parser.add_argument("--base", metavar="DIR", help="transformers-format base the adapters were made for "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="bf16",
                        help="of the merged weights: bf16, fp16 or fp32 (default: %(default)s)")
    parser.add_argument("--weights-source", default="dense", metavar="dense|nf4",
                        help="W to fold into: the base's dense weights, or the NF4-dequantized ones the server "
                        "serves, for adapters trained with QLoRA (default: %(default)s)")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                        help="compare logits of the merged model with base + adapters under peft and fail above "
                        "tolerance (default: on for models under 1B parameters)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    parser.add_argument("--max-shard-size", default="2GB", metavar="SIZE",
                        help="largest safetensors file; peak memory is about one shard (default: %(default)s)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    started = time.perf_counter()
    from .merge import MergeConfig, VerificationError, merge

    try:
        config = MergeConfig(adapters=tuple(Path(a) for a in args.adapter), out=Path(args.out),
                             weights=tuple(args.weight), base=args.base, dtype=args.dtype,
                             weights_source=args.weights_source, verify=args.verify, overwrite=args.overwrite,
                             max_shard_size=args.max_shard_size)
        result = merge(config)
    except VerificationError as err:
        print(f"cartridge merge: {err}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as err:
        print(f"cartridge merge: {err}", file=sys.stderr)
        return 2
    if result.verification is not None:
        print(f"verified: {result.verification}")
    print(f"merged {len(config.adapters)} adapter(s) into {result.out}: {result.num_shards} shard(s), "
          f"{result.num_bytes / 1e9:.2f} GB {config.dtype}, W from {config.weights_source}, "
          f"{time.perf_counter() - started:.1f} s")
    return 0
