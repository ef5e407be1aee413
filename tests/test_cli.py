"""The `cartridge` command as a user types it, and the Python client's generation options, against a
running server."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import jsonschema
import pytest

from client.cli import main

from .conftest import PROMPT

# Poisoning torch proves the client half never imports it (client/ needs only grpc and the protos).
NO_TORCH = "import sys; sys.modules['torch'] = None; from client.cli import main; sys.exit(main(sys.argv[1:]))"


def cartridge(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True, timeout=120)


def test_generate_from_the_command_line(server):
    result = cartridge("generate", "What is the capital of France?", "--max-tokens", "20", "--server", server.address)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout

    raw = cartridge("generate", PROMPT, "--raw", "--adapter", "qv8", "--max-tokens", "5", "--json",
                    "--server", server.address)
    answer = json.loads(raw.stdout)
    assert answer["adapter"] == "qv8" and answer["completion_tokens"] == 5 and answer["finish_reason"] == "length"

    streamed = cartridge("generate", PROMPT, "--raw", "--adapter", "qv8", "--max-tokens", "5", "--stream",
                         "--server", server.address)
    assert streamed.stdout.rstrip("\n") == answer["text"]


def generate_in_process(capsys, *args: str) -> tuple[int, str, str]:
    """`cartridge generate ARGS` in this process (no interpreter start): exit status, stdout, stderr."""
    try:
        status = main(["generate", *args])
    except SystemExit as exit:       # argparse's usage errors
        status = exit.code
    out, err = capsys.readouterr()
    return status, out, err


def test_adapters_register_list_unregister(server, adapter_dirs):
    registered = cartridge("adapters", "register", "cli-mlp4", str(adapter_dirs["mlp4"]), "--server", server.address)
    assert registered.returncode == 0, registered.stderr
    assert registered.stdout.startswith("cli-mlp4\trank 4")
    listed = json.loads(cartridge("adapters", "list", "--json", "--server", server.address).stdout)
    assert {"name": "cli-mlp4", "rank": 4, "target_modules": ["o_proj", "gate_proj", "down_proj"]}.items() <= \
        next(a for a in listed if a["name"] == "cli-mlp4").items()
    assert cartridge("adapters", "unregister", "cli-mlp4", "--server", server.address).returncode == 0
    again = cartridge("adapters", "unregister", "cli-mlp4", "--server", server.address)
    assert again.returncode == 1
    assert "NOT_FOUND" in again.stderr and "cli-mlp4" in again.stderr


def test_unknown_adapter_is_reported_not_traced(server):
    result = cartridge("generate", "hi", "--adapter", "ghost", "--server", server.address)
    assert result.returncode == 1
    assert result.stderr.strip() == "cartridge generate: NOT_FOUND: adapter 'ghost' is not registered"


ANSWER = {"type": "object",
          "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}, "sure": {"type": "boolean"}},
          "required": ["answer", "sure"], "additionalProperties": False}


def test_client_n_choices_with_a_seed_are_reproducible_streamed_or_not(client):
    fields = dict(n=3, seed=7, temperature=1.0, max_tokens=4)
    answer = client.generate(PROMPT, **fields)
    assert [c.index for c in answer.choices] == [0, 1, 2] and answer.text == answer.choices[0].text
    assert answer.completion_tokens == sum(c.completion_tokens for c in answer.choices) == 12
    assert len({c.text for c in answer.choices}) == 3
    # The same seed and request again, streamed this time: the same three choices.
    streamed = ["", "", ""]
    for piece in client.generate_stream(PROMPT, **fields):
        streamed[piece.choice_index] += piece.text
    assert streamed == [c.text for c in answer.choices]


def test_client_regex_and_choice_constraints_hold(client):
    codes = client.generate("Give me a code.", response_format={"type": "regex", "regex": "[A-Z]{2}-[0-9]{3}"},
                            n=2, seed=1, temperature=1.0, max_tokens=10)
    assert all(re.fullmatch("[A-Z]{2}-[0-9]{3}", c.text) for c in codes.choices), codes.choices
    picked = client.generate(messages=[{"role": "user", "content": "Is the sky blue?"}],
                             response_format={"type": "choice", "choice": ["yes", "no"]}, n=2, seed=2,
                             temperature=1.0)
    assert {c.text for c in picked.choices} <= {"yes", "no"} and picked.finish_reason == "stop"
    with pytest.raises(ValueError, match="choice must be a list of strings"):
        client.generate("hi", response_format={"type": "choice", "choice": "yes"})


def test_client_logprobs_are_sorted_with_the_chosen_token_on_top(client):
    answer = client.generate(PROMPT, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3,
                             prompt_logprobs=True)
    assert len(answer.logprobs) == answer.completion_tokens == 5
    for entry in answer.logprobs:
        top = [t.logprob for t in entry.top_logprobs]
        assert len(top) == 3 and top == sorted(top, reverse=True)
        # Greedy: the chosen token is the likeliest one.
        assert (entry.top_logprobs[0].token_id, entry.top_logprobs[0].logprob) == (entry.token_id, entry.logprob)
    assert "".join(entry.token for entry in answer.logprobs) == answer.text
    assert len(answer.prompt_logprobs) == answer.prompt_tokens and answer.prompt_logprobs[0].logprob is None
    assert all(entry.logprob <= 0 for entry in answer.prompt_logprobs[1:])


def test_generate_prints_each_choice_a_schema_answer_and_a_logprob_table(server, tmp_path, capsys):
    flags = [PROMPT, "--raw", "--n", "2", "--seed", "3", "--temperature", "1", "--max-tokens", "3",
             "--server", server.address]
    choices = json.loads(generate_in_process(capsys, *flags, "--json")[1])["choices"]
    assert generate_in_process(capsys, *flags)[1] == "".join(
        f"--- choice {c['index']} ({c['finish_reason']}, {c['completion_tokens']} tokens) ---\n{c['text']}\n"
        for c in choices)

    schema = tmp_path / "answer.json"
    schema.write_text(json.dumps(ANSWER))
    status, out, err = generate_in_process(capsys, "Is the sky blue?", "--json-schema", str(schema),
                                           "--max-tokens", "30", "--server", server.address)
    assert status == 0, err
    jsonschema.validate(json.loads(out), ANSWER)

    table = generate_in_process(capsys, PROMPT, "--raw", "--max-tokens", "3", "--top-logprobs", "2",
                                "--server", server.address)[1].splitlines()
    assert table[-5] == "logprobs:" and table[-4].split() == ["token", "logprob", "top", "2"]
    for row in table[-3:]:
        token, logprob, first, first_logprob = re.fullmatch(r'  (".*?") +(\S+)  (".*?") (\S+), .*', row).groups()
        assert (token, logprob) == (first, first_logprob)       # greedy: the chosen token is the likeliest


@pytest.mark.parametrize("flags, message", [
    (["--logit-bias", "abc"], "argument --logit-bias: expected TOKEN_ID=BIAS (a token id and a number), got 'abc'"),
    (["--logit-bias", "5=x"], "argument --logit-bias: expected TOKEN_ID=BIAS (a token id and a number), got '5=x'"),
    (["--choice"], "argument --choice: expected at least one argument"),
    (["--choice", "a", "--regex", "b"], "argument --regex: not allowed with argument --choice"),
    (["--json-schema", "/nonexistent.json"], "argument --json-schema: /nonexistent.json: No such file or directory"),
    (["--n", "2", "--stream"], "--stream with --n above 1 needs --json (each line names its choice)"),
])
def test_generate_refuses_bad_option_values_in_one_line(capsys, flags, message):
    status, _, err = generate_in_process(capsys, "hi", *flags, "--server", "127.0.0.1:1")
    assert status == 2 and err.splitlines()[-1] == f"cartridge generate: error: {message}"


def test_a_value_the_server_refuses_is_reported_not_traced(server, capsys):
    status, _, err = generate_in_process(capsys, "hi", "--logit-bias", "5=300", "--server", server.address)
    assert status == 1
    assert err.strip() == "cartridge generate: INVALID_ARGUMENT: logit_bias[5] must be between -100 and 100, got 300"


def test_serve_refuses_bad_flags():
    result = subprocess.run([sys.executable, "-m", "client.cli", "serve", "--max-batch-size", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--max-batch-size must be at least 1" in result.stderr
