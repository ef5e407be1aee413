"""Structured output: a response format compiled by xgrammar into a grammar, matched token by token.

Grammars compile at the edge, on the calling thread, before the request reaches the engine; compiled
grammars are cached by the format's canonical JSON. The engine only advances each row's matcher and
asks it for the next token bitmask, which the sampler applies to that row's logits alone.
"""
from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..errors import InvalidArgument, Unavailable

log = logging.getLogger(__name__)

FORMAT_TYPES = ("text", "json_object", "json_schema", "regex", "choice")
MAX_FORMAT_CHARS = 65_536        # a schema, regex or all choices together
MAX_CHOICES = 256
CACHE_SIZE = 128


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """A checked format: `type` one of FORMAT_TYPES but "text" (which is no format: None);
    `value` the schema as JSON text, the regex, or the choices; "" for json_object."""
    type: str
    value: str | tuple[str, ...] = ""

    def canonical(self) -> str:
        """The cache key: the same format, however its JSON was spaced, gives the same key. Key order is kept:
        a schema's property order is the order of the answer's keys."""
        value = json.loads(self.value) if self.type == "json_schema" else self.value
        return json.dumps({"type": self.type, "value": value}, separators=(",", ":"))


def check_format(type_: str, json_schema: str = "", regex: str = "", choice: tuple[str, ...] = (),
                 field: str = "response_format") -> ResponseFormat | None:
    """What an edge received, unchecked -> a ResponseFormat (None for plain text)."""
    if type_ not in FORMAT_TYPES:
        raise InvalidArgument(f"{field}.type is {type_!r}; expected one of {FORMAT_TYPES}", field=f"{field}.type")
    given = {"json_schema": bool(json_schema), "regex": bool(regex), "choice": bool(choice)}
    extra = [name for name, present in given.items() if present and name != type_]
    if extra:
        raise InvalidArgument(f"{field}.{extra[0]} is only allowed with {field}.type {extra[0]!r}",
                              field=f"{field}.{extra[0]}")
    if type_ == "text":
        return None
    if type_ == "json_object":
        return ResponseFormat("json_object")
    if type_ == "json_schema":
        if not json_schema:
            raise InvalidArgument(f"{field}.json_schema is required with type 'json_schema'",
                                  field=f"{field}.json_schema")
        if len(json_schema) > MAX_FORMAT_CHARS:
            raise InvalidArgument(f"{field}.json_schema is over {MAX_FORMAT_CHARS} characters",
                                  field=f"{field}.json_schema")
        try:
            schema = json.loads(json_schema)
        except ValueError as err:
            raise InvalidArgument(f"{field}.json_schema is not valid JSON: {err}", field=f"{field}.json_schema") from None
        if not isinstance(schema, (dict, bool)):
            raise InvalidArgument(f"{field}.json_schema must be a JSON object", field=f"{field}.json_schema")
        return ResponseFormat("json_schema", json.dumps(schema, separators=(",", ":")))
    if type_ == "regex":
        if not regex or len(regex) > MAX_FORMAT_CHARS:
            raise InvalidArgument(f"{field}.regex must be 1 to {MAX_FORMAT_CHARS} characters", field=f"{field}.regex")
        return ResponseFormat("regex", regex)
    if not choice or len(choice) > MAX_CHOICES:
        raise InvalidArgument(f"{field}.choice must hold 1 to {MAX_CHOICES} strings", field=f"{field}.choice")
    if not all(isinstance(c, str) and c for c in choice):
        raise InvalidArgument(f"{field}.choice must hold non-empty strings", field=f"{field}.choice")
    if sum(len(c) for c in choice) > MAX_FORMAT_CHARS:
        raise InvalidArgument(f"{field}.choice is over {MAX_FORMAT_CHARS} characters", field=f"{field}.choice")
    return ResponseFormat("choice", tuple(choice))


def _ebnf_literal(text: str) -> str:
    """`text` as an EBNF string literal: every character outside printable ASCII as a \\u escape."""
    out = []
    for ch in text:
        if ch in '"\\' or not (0x20 <= ord(ch) < 0x7f):
            out.append("\\u%04x" % ord(ch) if ord(ch) < 0x10000 else "\\U%08x" % ord(ch))
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


class Grammars:
    """xgrammar over the server's tokenizer; compiled grammars cached by the format's canonical JSON."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: frozenset[int], cache_size: int = CACHE_SIZE):
        self.vocab_size = vocab_size
        self._cache: OrderedDict[str, object] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._load_error: str | None = None
        # Reading the vocabulary takes seconds: done on a thread of its own from start-up; compile() waits for it.
        self._ready = threading.Thread(target=self._load, args=(tokenizer, stop_ids), name="grammars", daemon=True)
        self._ready.start()

    def _load(self, tokenizer, stop_ids: frozenset[int]) -> None:
        try:
            self._read_vocabulary(tokenizer, stop_ids)
        except Exception as err:  # noqa: BLE001 - kept for every request that asks for a format
            self._load_error = f"{type(err).__name__}: {err}"
            log.error("structured output is unavailable: %s", self._load_error)

    def _read_vocabulary(self, tokenizer, stop_ids: frozenset[int]) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size,
                                                       stop_token_ids=sorted(stop_ids) or None)
        # xgrammar's own cache is off: ours is bounded and keyed by the canonical format.
        self._compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        stop_only = torch.zeros(self.vocab_size // 32 + 1, dtype=torch.int64)   # the mask allowing only stop tokens
        for token in self.info.stop_token_ids:
            stop_only[token // 32] |= 1 << (token % 32)
        self.stop_only = stop_only.to(torch.int32)[:xgr.allocate_token_bitmask(1, self.vocab_size).shape[-1]]

    def wait_ready(self) -> None:
        """Returns once the tokenizer's vocabulary is read (compile() waits for it too)."""
        self._ready.join()

    def compile(self, fmt: ResponseFormat):
        """The compiled grammar of `fmt`, from the cache or compiled now (INVALID_ARGUMENT if it cannot be)."""
        key = fmt.canonical()
        self.wait_ready()
        if self._load_error is not None:
            raise Unavailable(f"structured output is unavailable on this server: {self._load_error}")
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                return compiled
        compiled = self._compile(fmt)
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, fmt: ResponseFormat):
        field = "response_format." + fmt.type
        try:
            if fmt.type == "json_object":
                return self._compiler.compile_builtin_json_grammar()
            if fmt.type == "json_schema":
                return self._compiler.compile_json_schema(fmt.value, any_whitespace=False)
            if fmt.type == "regex":
                return self._compiler.compile_regex(fmt.value)
            alternatives = " | ".join(_ebnf_literal(c) for c in fmt.value)
            return self._compiler.compile_grammar(f"root ::= {alternatives}")
        except Exception as err:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError with its reason
            reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            reason = re.sub(r"^\[[\d:]+\] \S+:\d+: ", "", reason)     # xgrammar's time and source line
            raise InvalidArgument(f"{field} cannot be compiled: {reason[:500]}", field=field) from None

    def matcher(self, compiled) -> "GrammarState":
        return GrammarState(self, self._xgr.GrammarMatcher(compiled))


class GrammarState:
    """One row's matcher and the bitmask of its next token, filled after each accepted token
    (on the engine thread, between passes)."""

    def __init__(self, grammars: Grammars, matcher):
        self.grammars, self.matcher = grammars, matcher
        self.bitmask = grammars._xgr.allocate_token_bitmask(1, grammars.vocab_size)
        self.matcher.fill_next_token_bitmask(self.bitmask)

    def accept(self, token: int) -> bool:
        """Advances by `token`; True when the grammar is complete: nothing but a stop token may follow."""
        if not self.matcher.accept_token(token):
            raise RuntimeError(f"token {token} broke its row's grammar")
        if self.matcher.is_terminated():
            return True
        self.matcher.fill_next_token_bitmask(self.bitmask)
        return torch.equal(self.bitmask[0], self.grammars.stop_only)


def apply_masks(logits: torch.Tensor, seqs) -> torch.Tensor:
    """logits [B, vocab] -> the same, with each constrained row's disallowed tokens at -inf. Rows without a
    grammar are not touched (a copy is made only when some row has one, so the graph's output stays as is)."""
    rows = [i for i, s in enumerate(seqs) if s.grammar is not None]
    if not rows:
        return logits
    import xgrammar as xgr

    masks = torch.cat([seqs[i].grammar.bitmask for i in rows]).to(logits.device, non_blocking=True)
    logits = logits.clone()
    picked = logits[rows]
    vocab = seqs[rows[0]].grammar.grammars.vocab_size
    xgr.apply_token_bitmask_inplace(picked, masks, vocab_size=min(vocab, picked.shape[-1]))
    logits[rows] = picked
    return logits
