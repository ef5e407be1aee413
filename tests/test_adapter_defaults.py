"""An adapter's cartridge.json: its defaults fill the fields a request leaves unset, on both edges, from a
directory or a store version (whose manifest covers the file); a bad file is refused when registering."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import openai
import pytest

from adapters.formats.store_layout import IntegrityError, StoreReader, VersionRef
from adapters.store.versions import AdapterStore
from cartridge.v1 import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc

from .conftest import PROMPT
from .test_store_serving import release

EXAMPLE_ADAPTER = Path(__file__).resolve().parent.parent / "adapters" / "examples" / "records"
YES_NO = {"response_format": {"type": "choice", "choice": ["yes", "no"]}, "temperature": 0}
SHORT = {"max_tokens": 3, "frequency_penalty": 0.5, "temperature": 0}


def adapter_with(directory: Path, defaults: dict | str) -> Path:
    shutil.copytree(EXAMPLE_ADAPTER, directory)
    (directory / "cartridge.json").write_text(defaults if isinstance(defaults, str) else json.dumps(defaults))
    return directory


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """flags@v1, live, with the yes/no defaults."""
    root = tmp_path_factory.mktemp("store")
    draft = AdapterStore(root).draft("flags")
    shutil.copytree(adapter_with(tmp_path_factory.mktemp("flags") / "a", YES_NO), draft.path, dirs_exist_ok=True)
    draft.commit(parent=None, record={"made_by": "tests: the records example with defaults"})
    release(root, "flags@v1")
    return root


@pytest.fixture(scope="module")
def server_flags(store, tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("defaults")
    return ["--http-port", "0", "--max-batch-size", "4", "--max-adapters", "3", "--max-lora-rank", "8",
            "--max-seq-len", "256", "--store", str(store),
            "--adapter", f"yesno={adapter_with(root / 'yesno', YES_NO)}",
            "--adapter", f"short={adapter_with(root / 'short', SHORT)}"]


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as ch:
        yield ch


def test_defaults_fill_unset_fields_and_request_fields_override_them(api):
    assert api.completions.create(model="yesno", prompt="Is water wet?").choices[0].text in ("yes", "no")
    free = api.completions.create(model="yesno", prompt=PROMPT, max_tokens=12,
                                  extra_body={"response_format": {"type": "text"}}).choices[0]
    assert free.text not in ("yes", "no") and free.finish_reason == "length"
    assert api.completions.create(model="short", prompt=PROMPT).usage.completion_tokens == 3
    assert api.completions.create(model="short", prompt=PROMPT, max_tokens=6).usage.completion_tokens == 6



def test_a_default_max_tokens_past_the_context_left_is_cut_to_fit(api, tokenizer):
    prompt = "word" + " word" * 253                  # 254 tokens of the 256-token context: 2 are left
    assert len(tokenizer.encode(prompt)) == 254
    assert api.completions.create(model="short", prompt=prompt).usage.completion_tokens == 2
    with pytest.raises(openai.BadRequestError, match="at most 2 fit"):     # one the request asks for is not
        api.completions.create(model="short", prompt=prompt, max_tokens=3)


def test_grpc_requests_get_the_same_defaults(channel, client):
    stub = inference_pb2_grpc.InferenceStub(channel)
    assert stub.Generate(inference_pb2.GenerateRequest(prompt="Is water wet?", adapter="yesno")).text in ("yes", "no")
    assert client.generate("Is water wet?", adapter="yesno").text in ("yes", "no")   # the client leaves them unset
    free = stub.Generate(inference_pb2.GenerateRequest(prompt=PROMPT, adapter="yesno", max_tokens=12,
                                                       response_format=inference_pb2.ResponseFormat(type="text")))
    assert free.text not in ("yes", "no") and free.completion_tokens == 12
    assert stub.Generate(inference_pb2.GenerateRequest(prompt=PROMPT, adapter="short")).completion_tokens == 3


def test_a_store_version_serves_its_defaults_and_its_manifest_covers_them(api, store):
    assert api.completions.create(model="flags", prompt="Is fire cold?").choices[0].text in ("yes", "no")
    reader = StoreReader(store)
    version = reader.open(VersionRef("flags", 1))
    assert "cartridge.json" in version.manifest["files"]
    (version.path / "cartridge.json").write_text(json.dumps({**YES_NO, "temperature": 1}))
    with pytest.raises(IntegrityError, match="cartridge.json"):
        reader.open(VersionRef("flags", 1))


@pytest.mark.parametrize("defaults, words", [
    ({"temperature": 5}, "temperature must be between 0 (greedy) and 2"),
    ({"colour": "red"}, "'colour' is not a default"),
    ({"max_tokens": "many"}, "'max_tokens' must be an integer"),
    ({"max_tokens": 0}, "max_tokens must be at least 1"),
    ({"top_p": 0}, "top_p must be above 0"),
    ({"repetition_penalty": -1}, "repetition_penalty must be above 0"),
    ({"response_format": {"type": "yaml"}}, "response_format.type is 'yaml'"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {
        "type": "integer", "minimum": 5, "maximum": 1}}}}, "response_format.json_schema cannot be compiled"),
    ("[1, 2]", "expected a JSON object"),
    ("{nope", "not valid JSON"),
])
def test_a_bad_cartridge_json_is_refused_at_register_naming_the_key(channel, tmp_path, defaults, words):
    path = adapter_with(tmp_path / "bad", defaults)
    with pytest.raises(grpc.RpcError) as caught:
        adapters_pb2_grpc.AdaptersStub(channel).RegisterAdapter(
            adapters_pb2.RegisterAdapterRequest(name="bad", path=str(path)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in caught.value.details() and "cartridge.json" in caught.value.details(), caught.value.details()
    names = [a.name for a in adapters_pb2_grpc.AdaptersStub(channel).ListAdapters(
        adapters_pb2.ListAdaptersRequest()).adapters]
    assert "bad" not in names
