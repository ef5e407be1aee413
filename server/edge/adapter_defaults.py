"""An adapter's cartridge.json (adapters/formats/cartridge_json.py) checked as a request is, when the adapter
is registered: a default no request could ask for is refused then, naming its key, not at each request."""
from __future__ import annotations

from ..engine.grammar import Grammars, check_format
from ..errors import InvalidArgument
from .openai_api import parse
from .sampling_fields import sampling_params

_FORMAT_FIELDS = ("response_format", "json_schema", "regex", "choice")


def request_defaults(raw: dict, where: str, grammars: Grammars | None, vocab_size: int) -> dict:
    """cartridge.json's values (OpenAI's names and shapes: they read as an HTTP body's fields) -> the
    GenerateRequest fields they set; its response format compiled once here (and cached for its requests)."""
    try:
        # Through the HTTP edge's parser: the same types, names and words as a request to /v1/completions.
        generate = parse({"model": "-", "prompt": "-", **raw}, chat=False, base_name="-").generate
        sampling_params(generate, 1, vocab_size)
        fmt = check_format(generate.response_format or "text", generate.json_schema, generate.regex, generate.choice)
        if fmt is not None:
            if grammars is None:
                raise InvalidArgument("response_format is not available on this server", field="response_format")
            grammars.compile(fmt)
    except InvalidArgument as err:
        raise InvalidArgument(f"{where}: {err}", field="cartridge.json" + (f".{err.field}" if err.field else "")) \
            from None
    fields = {key: getattr(generate, key) for key in raw if key != "response_format"}
    if "response_format" in raw:
        fields.update({key: getattr(generate, key) for key in _FORMAT_FIELDS})
    return fields
