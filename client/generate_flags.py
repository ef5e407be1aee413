"""`cartridge generate`'s sampling and output-format flags, checked as they are parsed (a bad value is a
usage error naming the flag), and the CartridgeClient.generate options they make."""
from __future__ import annotations

import argparse
import json

from .request import UINT32_MAX, UINT64_MAX, tool_message


def whole_number(largest: int):
    """An argparse type for a proto unsigned field: a clear usage error instead of protobuf's ValueError."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = -1
        if not 0 <= value <= largest:
            raise argparse.ArgumentTypeError(f"expected a whole number from 0 to {largest}, got {text!r}")
        return value
    return parse


def add_generation_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=whole_number(UINT32_MAX), default=0, help="new tokens at most (default: 256)")
    p.add_argument("--temperature", type=float,
                   help="0 = greedy (default, unless the adapter's cartridge.json gives another)")
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--top-k", type=whole_number(UINT32_MAX), default=0)
    p.add_argument("--seed", type=whole_number(UINT64_MAX))
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--n", type=whole_number(UINT32_MAX), default=0,
                   help="choices to generate from one prefill, 1 to 8 (each printed under its label)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json-schema", type=_json_file(dict, "a JSON Schema object"), metavar="FILE",
                     help="the answer is JSON valid against this JSON Schema")
    fmt.add_argument("--json-object", action="store_true", help="the answer is a JSON object")
    fmt.add_argument("--regex", help="the answer is text this regular expression matches in full")
    fmt.add_argument("--choice", nargs="+", metavar="TEXT", help="the answer is exactly one of these strings")
    p.add_argument("--logprobs", action="store_true", help="print each generated token's logprob in a table")
    p.add_argument("--top-logprobs", type=whole_number(UINT32_MAX), default=0, metavar="K",
                   help="and its K (0 to 20) likeliest alternatives (implies --logprobs)")
    p.add_argument("--prompt-logprobs", action="store_true", help="print the prompt's tokens with their logprobs")
    for penalty, what in (("presence", "-2 to 2"), ("frequency", "-2 to 2"), ("repetition", "above 0 to 10; 1 = none")):
        p.add_argument(f"--{penalty}-penalty", type=float, help=f"{what} (default: the adapter's, else none)")
    p.add_argument("--logit-bias", type=_logit_bias, action="append", default=[], metavar="TOKEN_ID=BIAS",
                   help="add BIAS (-100 to 100) to a token's logit (repeatable)")
    p.add_argument("--tools", type=_json_file(list, "a JSON list of tools", _check_tools), metavar="FILE",
                   help='functions the answer may call: [{"type": "function", "function": {"name": ..., '
                        '"parameters": {...}}}, ...] (chat only; the base\'s template must support tools)')
    p.add_argument("--tool-choice", default="", help="none, auto (default), required, or a function's name")


def generation_options(args: argparse.Namespace) -> dict:
    """The parsed flags as CartridgeClient.generate's options (prompt, messages and adapter aside)."""
    fmt = ({"type": "json_schema", "json_schema": {"schema": args.json_schema}} if args.json_schema is not None else
           {"type": "json_object"} if args.json_object else
           {"type": "regex", "regex": args.regex} if args.regex is not None else
           {"type": "choice", "choice": args.choice} if args.choice is not None else None)
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                seed=args.seed, stop=args.stop, n=args.n, response_format=fmt,
                logprobs=args.logprobs or args.top_logprobs > 0, top_logprobs=args.top_logprobs,
                prompt_logprobs=args.prompt_logprobs, presence_penalty=args.presence_penalty,
                frequency_penalty=args.frequency_penalty, repetition_penalty=args.repetition_penalty,
                logit_bias=dict(args.logit_bias), tools=args.tools or (), tool_choice=args.tool_choice)


def _logit_bias(text: str) -> tuple[int, float]:
    token, equals, bias = text.partition("=")
    try:
        return whole_number(UINT32_MAX)(token), float(bias)
    except (argparse.ArgumentTypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected TOKEN_ID=BIAS (a token id and a number), got {text!r}") from None


def _json_file(kind: type, what: str, check=lambda value: None):
    """An argparse type reading a JSON file that must hold `what` (and pass `check`, which raises ValueError)."""
    def parse(path: str):
        try:
            with open(path) as file:
                value = json.load(file)
        except OSError as err:
            raise argparse.ArgumentTypeError(f"{path}: {err.strerror}") from None
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{path}: not JSON: {err}") from None
        if not isinstance(value, kind):
            raise argparse.ArgumentTypeError(f"{path}: expected {what}, got {type(value).__name__}")
        try:
            check(value)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{path}: {err}") from None
        return value
    return parse


def _check_tools(tools: list) -> None:
    for i, tool in enumerate(tools):
        tool_message(tool, i)
