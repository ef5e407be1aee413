"""How `cartridge generate` prints an answer: for a person (text, each choice under its label, logprob tables,
tool calls as JSON) or, with --json, as one JSON object per answer or stream piece."""
from __future__ import annotations

import json
from dataclasses import asdict
from typing import Sequence

from .completion import Completion, TokenLogprob, ToolCall


def print_answer(answer: Completion) -> None:
    many = len(answer.choices) > 1
    for choice in answer.choices:
        if many:
            print(f"--- choice {choice.index} ({choice.finish_reason}, {choice.completion_tokens} tokens) ---")
        print(choice.text)
        print_details(choice.logprobs, choice.tool_calls)
    print_details(prompt_logprobs=answer.prompt_logprobs)


def print_details(logprobs: Sequence[TokenLogprob] = (), tool_calls: Sequence[ToolCall] = (),
                  prompt_logprobs: Sequence[TokenLogprob] = ()) -> None:
    """What follows an answer's text: its tool calls, one JSON object a line, and its logprob tables."""
    for call in tool_calls:
        print("tool call: " + json.dumps({"id": call.id, "name": call.name, "arguments": json.loads(call.arguments)},
                                         ensure_ascii=False))
    for title, entries in (("logprobs", logprobs), ("prompt logprobs", prompt_logprobs)):
        if entries:
            _print_table(title, entries)


def _print_table(title: str, entries: Sequence[TokenLogprob]) -> None:
    """One row a token: the token (as a JSON string, so spaces and newlines show), its logprob, and the
    likeliest alternatives with theirs, most likely first."""
    tokens = [json.dumps(entry.token, ensure_ascii=False) for entry in entries]
    width = max(len("token"), *map(len, tokens))
    alternatives = max(len(entry.top_logprobs) for entry in entries)
    print(f"{title}:")
    print(f"  {'token':<{width}}  {'logprob':>9}" + (f"  top {alternatives}" if alternatives else ""))
    for entry, token in zip(entries, tokens):
        top = ", ".join(f"{json.dumps(t.token, ensure_ascii=False)} {t.logprob:.4f}" for t in entry.top_logprobs)
        logprob = "-" if entry.logprob is None else f"{entry.logprob:.4f}"
        print(f"  {token:<{width}}  {logprob:>9}  {top}".rstrip())


def answer_json(answer: Completion, piece: bool = False, many: bool = False) -> dict:
    """--json's object for a whole answer or, with `piece`, a stream piece (its text alone until its choice's
    last piece); `many`: n > 1, so a piece names its choice. Logprobs, tool calls and choices appear when
    the answer has them."""
    out: dict = {"text": answer.text, **({"choice_index": answer.choice_index} if piece and many else {})}
    if not piece or answer.finish_reason is not None:
        out |= {"finish_reason": answer.finish_reason, "prompt_tokens": answer.prompt_tokens,
                "completion_tokens": answer.completion_tokens, "adapter": answer.adapter,
                # From a stored version (serve --store): which one, and the id `cartridge feedback` rates.
                **({"adapter_version": answer.adapter_version, "request_id": answer.request_id}
                   if answer.adapter_version else {})}
    extras = {"logprobs": [asdict(entry) for entry in answer.logprobs],
              "prompt_logprobs": [asdict(entry) for entry in answer.prompt_logprobs],
              "tool_calls": [asdict(call) for call in answer.tool_calls],
              "choices": [asdict(choice) for choice in answer.choices] if len(answer.choices) > 1 else []}
    return out | {key: value for key, value in extras.items() if value}
