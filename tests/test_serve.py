"""The server end to end: start it, call it over gRPC, check what a user sees."""
from __future__ import annotations

import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from client.client import CartridgeError

from .conftest import PROMPT, make_peft_adapter


def peft_greedy_text(base_model, tokenizer, adapter_dir, prompt: str, max_tokens: int) -> str:
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model, adapter_dir).eval()
    try:
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=None)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    finally:
        model.unload()  # peft injects layers into base_model in place; take them out again


def test_generate_with_the_base_model(client):
    answer = client.generate(messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=20)
    assert "Paris" in answer.text
    assert answer.finish_reason == "end_of_sequence"
    assert answer.prompt_tokens > 10 and 0 < answer.completion_tokens <= 20
    assert answer.adapter == ""


@pytest.mark.parametrize("name", ["qv8", "all16-rs"])
def test_adapter_output_matches_peft(client, base_model, tokenizer, adapter_dirs, name):
    answer = client.generate(PROMPT, adapter=name, max_tokens=16)
    expected = peft_greedy_text(base_model, tokenizer, adapter_dirs[name], PROMPT, 16)
    base = client.generate(PROMPT, max_tokens=16)
    assert answer.text == expected
    assert answer.adapter == name and answer.finish_reason == "length" and answer.completion_tokens == 16
    assert answer.text != base.text, "the adapter should change the output, or this test proves nothing"


def test_register_while_serving_then_use_list_and_unregister(client, server, base_model, tokenizer, adapter_dirs):
    # A request is streaming while the adapter is registered: it must neither stall nor break.
    running = client.generate_stream(PROMPT, adapter="qv8", max_tokens=40)
    first = next(running)
    info = client.register_adapter("mlp4", str(adapter_dirs["mlp4"]))
    answer = client.generate(PROMPT, adapter="mlp4", max_tokens=12)
    rest = list(running)
    assert first.finish_reason is None and rest[-1].finish_reason in ("length", "end_of_sequence")
    assert (info.name, info.rank, list(info.target_modules)) == ("mlp4", 4, ["o_proj", "gate_proj", "down_proj"])
    assert info.size_bytes > 0
    assert answer.text == peft_greedy_text(base_model, tokenizer, adapter_dirs["mlp4"], PROMPT, 12)
    assert [a.name for a in client.list_adapters()] == ["all16-rs", "mlp4", "qv8"]

    client.unregister_adapter("mlp4")
    with pytest.raises(CartridgeError) as err:
        client.generate(PROMPT, adapter="mlp4", max_tokens=4)
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert "mlp4" not in [a.name for a in client.list_adapters()]


def test_output_is_the_same_alone_and_in_a_mixed_batch(client, server):
    requests = [dict(adapter=a, max_tokens=24) for a in ("qv8", "all16-rs", "", "qv8", "all16-rs", "")]
    prompts = [PROMPT, "Write a haiku about the sea.", "List three prime numbers:", "Once upon a time",
               "The best way to learn Python is", PROMPT]
    alone = [client.generate(p, **r).text for p, r in zip(prompts, requests)]
    before = decode_steps_with_company(server)
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda pr: client.generate(pr[0], **pr[1]).text, zip(prompts, requests)))
    assert together == alone
    assert decode_steps_with_company(server) > before, "the requests never shared a decode pass"


def decode_steps_with_company(server) -> float:
    """Decode passes so far that advanced more than one request, from the server's own metrics."""
    text = urllib.request.urlopen(server.metrics_url).read().decode()
    total = float(re.search(r"^cartridge_decode_batch_size_count (\S+)", text, re.M)[1])
    alone = float(re.search(r'^cartridge_decode_batch_size_bucket\{le="1.0"\} (\S+)', text, re.M)[1])
    return total - alone


def test_stream_pieces_add_up_to_the_unary_answer(client):
    pieces = list(client.generate_stream(PROMPT, adapter="all16-rs", max_tokens=20))
    whole = client.generate(PROMPT, adapter="all16-rs", max_tokens=20)
    assert len(pieces) > 3
    assert "".join(p.text for p in pieces) == whole.text
    assert all(p.finish_reason is None for p in pieces[:-1])
    last = pieces[-1]
    assert (last.finish_reason, last.completion_tokens, last.prompt_tokens, last.adapter) == \
        (whole.finish_reason, whole.completion_tokens, whole.prompt_tokens, "all16-rs")


def test_stop_strings_end_the_output_and_are_left_out(client):
    full = client.generate(PROMPT, max_tokens=30).text
    stop = full.split()[3]
    answer = client.generate(PROMPT, max_tokens=30, stop=[stop])
    assert answer.finish_reason == "stop"
    assert answer.text == full[:full.index(stop)]
    streamed = "".join(p.text for p in client.generate_stream(PROMPT, max_tokens=30, stop=[stop]))
    assert streamed == answer.text


def test_same_seed_same_sample(client):
    sample = dict(max_tokens=24, temperature=0.9, top_p=0.95, top_k=50, adapter="qv8")
    first = client.generate(PROMPT, seed=7, **sample).text
    with ThreadPoolExecutor(3) as pool:  # and in company of other sampled requests
        runs = list(pool.map(lambda s: client.generate(PROMPT, seed=s, **sample).text, [7, 8, 7]))
    assert runs[0] == runs[2] == first
    assert runs[1] != first


@pytest.mark.parametrize("request_fields, code, words", [
    (dict(adapter="no-such-adapter"), grpc.StatusCode.NOT_FOUND, "no-such-adapter"),
    (dict(adapter="bad name!"), grpc.StatusCode.INVALID_ARGUMENT, "adapter"),
    (dict(temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (dict(temperature=5.0), grpc.StatusCode.INVALID_ARGUMENT, "between 0 (greedy) and 2, got 5"),
    (dict(top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (dict(stop=[""]), grpc.StatusCode.INVALID_ARGUMENT, "stop[0]"),
    (dict(max_tokens=600), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    (dict(prompt="word " * 600), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (dict(prompt=""), grpc.StatusCode.INVALID_ARGUMENT, "prompt and messages"),
    (dict(messages=[{"role": "robot", "content": "hi"}], prompt=""), grpc.StatusCode.INVALID_ARGUMENT,
     "messages[0].role"),
])
def test_bad_requests_get_a_clear_status_and_the_server_keeps_serving(client, request_fields, code, words):
    fields = {"prompt": PROMPT, **request_fields}
    with pytest.raises(CartridgeError) as err:
        client.generate(fields.pop("prompt"), **fields)
    assert err.value.code == code
    assert words in err.value.message
    assert client.generate(PROMPT, max_tokens=2).completion_tokens == 2


def test_bad_adapters_are_refused_whole(client, base_model, tmp_path, adapter_dirs):
    pickled = make_peft_adapter(base_model, tmp_path / "pickled", 4, ["q_proj"], seed=5)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    too_big = make_peft_adapter(base_model, tmp_path / "r32", 32, ["q_proj"], seed=6)
    cases = [
        ("pickled", str(pickled), grpc.StatusCode.INVALID_ARGUMENT, "pickle"),
        ("r32", str(too_big), grpc.StatusCode.INVALID_ARGUMENT, "--max-lora-rank"),
        ("missing", str(tmp_path / "nowhere"), grpc.StatusCode.NOT_FOUND, "does not exist"),
        ("x" * 65, str(adapter_dirs["qv8"]), grpc.StatusCode.INVALID_ARGUMENT, "1 to 64"),
        ("qv8", str(adapter_dirs["mlp4"]), grpc.StatusCode.ALREADY_EXISTS, "already registered"),
    ]
    before = [(a.name, a.path) for a in client.list_adapters()]
    for name, path, code, words in cases:
        with pytest.raises(CartridgeError) as err:
            client.register_adapter(name, path)
        assert err.value.code == code, name
        assert words in err.value.message, name
    assert [(a.name, a.path) for a in client.list_adapters()] == before


PATTERNED = {
    # peft scales each module by its own alpha over its own rank; the first matching pattern wins.
    "rank-pattern": dict(r=16, targets=["q_proj", "v_proj", "o_proj", "down_proj"],
                         rank_pattern={"q_proj": 2, "layers.3.self_attn.v_proj": 4, "down_proj": 8}),
    "rank-pattern-rs": dict(r=8, targets=["q_proj", "v_proj"], use_rslora=True, rank_pattern={"v_proj": 2}),
    "alpha-pattern": dict(r=8, targets=["q_proj", "k_proj", "gate_proj"], rank_pattern={"k_proj": 4},
                          alpha_pattern={"gate_proj": 64, "layers.1.self_attn.q_proj": 2}),
}


@pytest.mark.parametrize("name", list(PATTERNED))
def test_per_module_ranks_and_alphas_are_served_as_peft_serves_them(client, base_model, tokenizer, tmp_path, name):
    from peft import PeftModel

    from adapters.formats.adapter_dir import read_adapter

    spec = dict(PATTERNED[name])
    directory = make_peft_adapter(base_model, tmp_path / name, spec.pop("r"), spec.pop("targets"), seed=11,
                                  lora_alpha=64, **spec)
    # The merge tool folds exactly the update peft applies, module by module.
    ours = read_adapter(directory)
    model = PeftModel.from_pretrained(base_model, directory).eval()
    try:
        for (layer, projection), _ in ours.a.items():
            module = model.get_submodule(f"base_model.model.model.layers.{layer}."
                                         f"{'self_attn' if projection[0] in 'qkvo' else 'mlp'}.{projection}")
            torch.testing.assert_close(ours.delta(layer, projection), module.get_delta_weight("default"),
                                       rtol=1e-6, atol=1e-7)
    finally:
        model.unload()
    client.register_adapter(name, str(directory))
    try:
        answer = client.generate(PROMPT, adapter=name, max_tokens=16)
        assert answer.text == peft_greedy_text(base_model, tokenizer, directory, PROMPT, 16)
        assert answer.text != client.generate(PROMPT, max_tokens=16).text
    finally:
        client.unregister_adapter(name)


def test_a_config_whose_rank_contradicts_its_tensors_is_refused_and_nothing_is_left(client, base_model, tmp_path):
    import json

    directory = make_peft_adapter(base_model, tmp_path / "says-r64", 4, ["q_proj", "v_proj"], seed=12)
    config_file = directory / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "r": 64, "lora_alpha": 128}))
    before = [a.name for a in client.list_adapters()]
    with pytest.raises(CartridgeError) as err:
        client.register_adapter("says-r64", str(directory))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(r"layer 0 q_proj .* rank 4 in its tensors, but adapter_config.json gives it rank 64",
                     err.value.message), err.value.message
    assert [a.name for a in client.list_adapters()] == before
    with pytest.raises(CartridgeError) as err:
        client.generate(PROMPT, adapter="says-r64", max_tokens=2)
    assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_adapter_for_another_base_is_refused(client, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "other")
    with pytest.raises(CartridgeError) as err:
        client.register_adapter("other", str(tmp_path / "other"))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "another base model" in err.value.message


def test_health_reflection_and_metrics(server, client):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    client.generate(PROMPT, adapter="qv8", max_tokens=3)
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="cartridge.v1.Inference"))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        replies = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        services = {s.name for s in next(replies).list_services_response.service}
    assert {"cartridge.v1.Inference", "cartridge.v1.Adapters", "grpc.health.v1.Health"} <= services

    text = urllib.request.urlopen(server.metrics_url).read().decode()
    for family in ("cartridge_request_latency_seconds_bucket", "cartridge_time_to_first_token_seconds_bucket",
                   "cartridge_time_per_output_token_seconds_bucket", "cartridge_requests_running",
                   "cartridge_requests_waiting", "cartridge_vram_allocated_bytes", "cartridge_vram_reserved_bytes"):
        assert re.search(rf"^{family}", text, re.M), family
    assert re.search(r'^cartridge_requests_total\{adapter="qv8",finish_reason="length"\} [1-9]', text, re.M)
    assert re.search(r'^cartridge_generated_tokens_total\{adapter="qv8"\} [1-9]', text, re.M)
    assert "resident memory (RSS)" in text   # a CPU host says what it reports instead of VRAM


def test_device_memory_is_split_into_base_weights_lora_slots_and_kv_cache(server, base_dir):
    """For the fixture's flags: the CPU's default KV cache (room for 16 requests of --max-seq-len 512 tokens),
    4 adapter slots (+ the base's) of rank 16, float32."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_dir)
    text = urllib.request.urlopen(server.metrics_url).read().decode()
    parts = {m[1]: float(m[2]) for m in re.finditer(r'^cartridge_device_memory_bytes\{part="(\w+)"\} (\S+)', text, re.M)}
    head_dim = config.hidden_size // config.num_attention_heads
    kv = config.num_hidden_layers * 2 * 16 * config.num_key_value_heads * 512 * head_dim * 4
    hidden, inner, kv_width = config.hidden_size, config.intermediate_size, config.num_key_value_heads * head_dim
    in_plus_out = 2 * (hidden + hidden) + 2 * (hidden + kv_width) + 3 * (hidden + inner)   # q o, k v, gate up down
    lora = config.num_hidden_layers * in_plus_out * 16 * 5 * 4
    assert parts["kv_cache"] == kv and parts["lora_slots"] == lora
    # 134.5M parameters in float32 plus RoPE tables; the embeddings are tied with lm_head, whose matmul reads
    # its own prepacked copy on the CPU (server.model.linear.DenseLinear): the vocabulary matrix twice.
    vocab = config.vocab_size * hidden * 4
    assert 134e6 * 4 + vocab < parts["base_weights"] < 136e6 * 4 + vocab
