"""Turning chat messages into token ids: one rendering for the server and the trainer.

An adapter trained on a conversation must see, at serving time, exactly the tokens it was
trained on up to the start of the answer; so both sides go through these two functions.
"""
from __future__ import annotations

from typing import Sequence

Message = dict[str, str]  # {"role": ..., "content": ...}, the form chat templates read


def render_prompt(tokenizer, messages: Sequence[Message], tools: list[dict] | None = None) -> list[int]:
    """Token ids of `messages` with the assistant turn opened, ready for the model to answer; `tools`
    (OpenAI's function shape) go to the template as transformers hands them."""
    if not tokenizer.chat_template:
        raise ValueError("the base model's tokenizer has no chat template; send a raw prompt instead")
    return list(tokenizer.apply_chat_template(list(messages), tools=tools, add_generation_prompt=True, tokenize=True,
                                              return_dict=False))


def render_example(tokenizer, messages: Sequence[Message]) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of a conversation whose last message is the assistant's answer.

    The answer ids are what the template adds after the opened assistant turn, end-of-turn
    token included, so the model learns to stop where the server will stop it."""
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's answer")
    prompt = render_prompt(tokenizer, messages[:-1])
    full = list(tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=False))
    if full[:len(prompt)] != prompt:
        raise ValueError("the chat template renders the conversation differently from its prompt; "
                         "cannot tell where the answer starts")
    return prompt, full[len(prompt):]
