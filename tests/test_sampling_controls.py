"""Penalties, logit_bias, n and echo with prompt logprobs, against a real server over HTTP (openai) and gRPC,
checked against transformers on the same base (fp32, CPU)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import openai
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from cartridge.v1 import inference_pb2

from .conftest import PROMPT


@pytest.fixture(scope="module")
def server_flags(adapter_dirs) -> list[str]:
    return ["--http-port", "0", "--max-batch-size", "8", "--max-adapters", "2", "--max-lora-rank", "8",
            "--max-seq-len", "256", "--adapter", f"qv8={adapter_dirs['qv8']}"]


class OpenAIPenalties(LogitsProcessor):
    """The reference: OpenAI's presence and frequency penalties over the generated tokens, one row."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        counts = torch.bincount(input_ids[0, self.prompt_len:], minlength=scores.shape[-1])[None].float()
        return scores - counts * self.frequency - (counts > 0) * self.presence


def transformers_greedy(base_model, tokenizer, max_tokens: int, **generate) -> list[int]:
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        out = base_model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id,
                                  **generate)
    return out[0, ids.shape[1]:].tolist()


def generated_ids(stub, **fields) -> list[int]:
    answer = stub.Generate(inference_pb2.GenerateRequest(prompt=PROMPT, temperature=0, logprobs=True, **fields))
    return [t.token_id for t in answer.logprobs]


def test_repetition_penalty_gives_transformers_greedy_tokens(stub, base_model, tokenizer):
    want = transformers_greedy(base_model, tokenizer, 24, repetition_penalty=1.4)
    assert generated_ids(stub, max_tokens=24, repetition_penalty=1.4) == want
    assert want != transformers_greedy(base_model, tokenizer, 24), "the penalty should change this output"


def test_presence_and_frequency_penalties_give_the_reference_greedy_tokens(stub, base_model, tokenizer):
    prompt_len = len(tokenizer.encode(PROMPT))
    want = transformers_greedy(base_model, tokenizer, 24, logits_processor=LogitsProcessorList(
        [OpenAIPenalties(prompt_len, 0.8, 0.6)]))
    assert generated_ids(stub, max_tokens=24, presence_penalty=0.8, frequency_penalty=0.6) == want
    assert want != transformers_greedy(base_model, tokenizer, 24), "the penalties should change this output"


def test_logit_bias_forces_or_forbids_tokens(api, tokenizer):
    token = tokenizer.encode(" banana")[0]
    forced = api.completions.create(model="base", prompt=PROMPT, max_tokens=4, temperature=0,
                                    logit_bias={str(token): 100}, logprobs=0)
    assert forced.choices[0].logprobs.tokens == [tokenizer.decode([token])] * 4
    plain = api.completions.create(model="base", prompt=PROMPT, max_tokens=1, temperature=0, logprobs=0)
    first = tokenizer.encode(plain.choices[0].text)[0]
    banned = api.completions.create(model="base", prompt=PROMPT, max_tokens=1, temperature=0,
                                    logit_bias={str(first): -100})
    assert banned.choices[0].text != plain.choices[0].text


def test_a_penalised_row_leaves_the_rows_beside_it_untouched(api):
    free = [dict(model=m, prompt=p, max_tokens=16, temperature=0) for m, p in
            (("base", PROMPT), ("qv8", PROMPT), ("base", "Once upon a time"))]
    penalised = [dict(model="base", prompt=PROMPT, max_tokens=16, temperature=0, frequency_penalty=2,
                      logit_bias={"11": -50}), dict(model="qv8", prompt=PROMPT, max_tokens=16, temperature=0,
                                                      extra_body={"repetition_penalty": 1.8})]

    def run(rows):
        with ThreadPoolExecutor(len(rows)) as pool:
            return [a.choices[0].text for a in pool.map(lambda r: api.completions.create(**r), rows)]

    assert run(free + penalised)[:len(free)] == run(free)


def test_n_choices_with_a_seed_are_reproducible_distinct_and_begin_like_n_1(api):
    fields = dict(model="base", prompt=PROMPT, max_tokens=12, temperature=1.0, seed=11)
    first = [c.text for c in api.completions.create(n=4, **fields).choices]
    with ThreadPoolExecutor(3) as pool:     # the same request again, with others running beside it
        beside = [pool.submit(api.completions.create, model="qv8", prompt="Once upon a time", max_tokens=12,
                              temperature=1.0) for _ in range(2)]
        again = [c.text for c in api.completions.create(n=4, **fields).choices]
        [b.result() for b in beside]
    assert again == first
    assert len(set(first)) == 4, first
    assert api.completions.create(**fields).choices[0].text == first[0]


def test_greedy_choices_share_one_prefill_and_equal_the_single_answer(api, server):
    single = api.chat.completions.create(model="qv8", messages=[{"role": "user", "content": "Name a fruit."}],
                                         max_tokens=10, temperature=0)
    answer = api.chat.completions.create(model="qv8", messages=[{"role": "user", "content": "Name a fruit."}],
                                         max_tokens=10, temperature=0, n=3)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert {c.message.content for c in answer.choices} == {single.choices[0].message.content}
    assert answer.usage.completion_tokens == 3 * single.usage.completion_tokens
    assert answer.usage.prompt_tokens == single.usage.prompt_tokens


def test_streamed_choices_carry_their_index_and_add_up_to_the_whole(api):
    fields = dict(model="base", messages=[{"role": "user", "content": "Say a word."}], max_tokens=8,
                  temperature=1.0, seed=4, n=3)
    whole = api.chat.completions.create(**fields)
    texts, finished = {}, {}
    for chunk in api.chat.completions.create(stream=True, stream_options={"include_usage": True}, **fields):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
        if chunk.usage:
            assert chunk.usage.completion_tokens == whole.usage.completion_tokens
    assert texts == {c.index: c.message.content for c in whole.choices}
    assert finished == {c.index: c.finish_reason for c in whole.choices}


def test_grpc_n_gives_every_choice_unary_and_streamed(stub):
    request = inference_pb2.GenerateRequest(prompt=PROMPT, max_tokens=8, temperature=1.0, seed=9, n=3)
    answer = stub.Generate(request)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert answer.text == answer.choices[0].text
    assert answer.completion_tokens == sum(c.completion_tokens for c in answer.choices)
    streamed, last = {}, {}
    for message in stub.GenerateStream(request):
        streamed[message.choice_index] = streamed.get(message.choice_index, "") + message.text
        if message.finish_reason:
            last[message.choice_index] = message.completion_tokens
    assert streamed == {c.index: c.text for c in answer.choices}
    assert last == {c.index: c.completion_tokens for c in answer.choices}


def test_echo_with_logprobs_gives_prompt_logprobs_of_a_transformers_forward(api, stub, base_model, tokenizer):
    answer = api.completions.create(model="base", prompt=PROMPT, max_tokens=1, temperature=0, logprobs=3, echo=True)
    ids = tokenizer.encode(PROMPT)
    lp = answer.choices[0].logprobs
    assert answer.choices[0].text.startswith(PROMPT)
    assert len(lp.tokens) == len(ids) + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None      # nothing predicts the first token
    with torch.no_grad():
        expected = torch.log_softmax(base_model(torch.tensor([ids])).logits[0].float(), dim=-1)
    for position in range(1, len(ids)):
        assert abs(lp.token_logprobs[position] - expected[position - 1, ids[position]].item()) < 1e-4, position
        assert len(lp.top_logprobs[position]) == 3
    assert lp.text_offset[:2] == [0, len(lp.tokens[0])]
    grpc_answer = stub.Generate(inference_pb2.GenerateRequest(prompt=PROMPT, max_tokens=1, prompt_logprobs=True))
    assert [t.token_id for t in grpc_answer.prompt_logprobs] == ids
    assert not grpc_answer.prompt_logprobs[0].HasField("logprob")
    assert [t.logprob for t in grpc_answer.prompt_logprobs[1:]] == \
        pytest.approx(lp.token_logprobs[1:len(ids)], abs=1e-6)


def test_an_adapters_prompt_logprobs_match_peft_in_every_choice(api, base_model, adapter_dirs, tokenizer):
    import copy

    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base_model), adapter_dirs["qv8"]).eval()
    ids = tokenizer.encode(PROMPT)
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    want = [expected[position - 1, ids[position]].item() for position in range(1, len(ids))]
    answer = api.completions.create(model="qv8", prompt=PROMPT, max_tokens=2, temperature=1.0, seed=3, n=2,
                                    logprobs=0, echo=True)
    for choice in answer.choices:
        assert choice.logprobs.token_logprobs[1:len(ids)] == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("fields, param, words", [
    (dict(n=9), "n", "between 1 and 8"),
    (dict(n=0), "n", "at least 1"),
    (dict(presence_penalty=2.5), "presence_penalty", "between -2 and 2"),
    (dict(frequency_penalty="high"), "frequency_penalty", "a number"),
    (dict(extra_body={"repetition_penalty": 0}), "repetition_penalty", "above 0"),
    (dict(extra_body={"repetition_penalty": 11}), "repetition_penalty", "at most 10"),
    (dict(logit_bias={"abc": 1}), "logit_bias", "token ids"),
    (dict(logit_bias={"-5": 1}), "logit_bias", "token ids"),
    (dict(logit_bias={"9" * 5000: 1}), "logit_bias", "token ids"),
    (dict(logit_bias={"5": 101}), "logit_bias", "between -100 and 100"),
    (dict(logit_bias={"5": "x"}), "logit_bias.5", "a number"),
    (dict(logit_bias={"999999": 1}), "logit_bias", "token ids are 0 to"),
    (dict(logit_bias={str(i): 1 for i in range(301)}), "logit_bias", "at most 300"),
    (dict(logit_bias=[1]), "logit_bias", "an object"),
    (dict(echo="yes"), "echo", "true or false"),
])
def test_bad_sampling_controls_are_400s_naming_the_field(api, fields, param, words):
    with pytest.raises(openai.BadRequestError) as caught:
        api.completions.create(model="base", prompt=PROMPT, max_tokens=2, **fields)
    assert caught.value.body["param"] == param and words in caught.value.body["message"], caught.value.body
    assert api.completions.create(model="base", prompt=PROMPT, max_tokens=1).choices[0].finish_reason


@pytest.mark.parametrize("fields, words", [
    (dict(n=9), "between 1 and 8"),
    (dict(presence_penalty=-3), "presence_penalty"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty"),
    (dict(repetition_penalty=-1), "repetition_penalty"),
    (dict(logit_bias={10**6: 1.0}), "logit_bias"),
    (dict(logit_bias={5: float("inf")}), "logit_bias"),
])
def test_bad_sampling_controls_are_invalid_argument_on_grpc(stub, fields, words):
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(inference_pb2.GenerateRequest(prompt=PROMPT, max_tokens=2, **fields))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in caught.value.details()
