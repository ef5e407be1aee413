"""What a new user meets first, following README on a fresh clone: the example adapter, the CLI's messages,
and the checks that come before anything slow is loaded."""
from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from adapters.train.datasets import DataError, read_dataset
from client.client import CartridgeClient, CartridgeError

from .conftest import start_server
from .test_cli import NO_TORCH, cartridge

ROOT = Path(__file__).resolve().parent.parent
README_PROMPT = ("Extract this order as JSON.\n\nOrder 5521 was placed by Ada Lovelace on 3 May 2024 for 2 x teapot, "
                 "to be shipped to London.")


@pytest.fixture(scope="module")
def server():
    proc = start_server("--max-batch-size", "4", "--max-seq-len", "256", "--max-lora-rank", "8")
    yield proc
    proc.stop()


def test_readme_walkthrough_runs_with_the_shipped_adapter(server, monkeypatch):
    monkeypatch.chdir(ROOT)   # README's paths are relative to the clone
    registered = cartridge("adapters", "register", "records", "adapters/examples/records", "--server", server.address)
    assert registered.returncode == 0, registered.stderr
    # README gives the file's size (230,400 bf16 weights and a header); a CPU server holds them as float32.
    on_disk = (ROOT / "adapters" / "examples" / "records" / "adapter_model.safetensors").stat().st_size
    assert f"\t{on_disk / 1024:.0f} KiB on disk, {230_400 * 4 / 1024:.0f} KiB in memory\t" in registered.stdout
    answer = cartridge("generate", README_PROMPT, "--adapter", "records", "--server", server.address)
    assert json.loads(answer.stdout) == {"order_id": 5521, "customer": "Ada Lovelace", "date": "2024-05-03",
                                         "item": "teapot", "quantity": 2, "city": "London"}


def test_an_adapter_trained_on_another_base_is_refused(server, tmp_path):
    other = shutil.copytree(ROOT / "adapters" / "examples" / "records", tmp_path / "other-base")
    report = json.loads((other / "training_report.json").read_text())
    report["base"]["fingerprint"] = "0" * 64
    (other / "training_report.json").write_text(json.dumps(report))
    with CartridgeClient(server.address, timeout=60) as client:
        with pytest.raises(CartridgeError) as refused:
            client.register_adapter("other-base", str(other))
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "fingerprint 0000000000000000" in refused.value.message and "other weights" in refused.value.message
        assert "other-base" not in [a.name for a in client.list_adapters()]

        (other / "training_report.json").unlink()   # nothing to compare: accepted, with a warning in the log
        client.register_adapter("other-base", str(other))
    assert server.logged("'other-base'", "does not record which base")


def test_stream_json_gives_json_lines(server):
    result = cartridge("generate", "Hi", "--stream", "--json", "--max-tokens", "3", "--server", server.address)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines[-1]["finish_reason"] == "length" and lines[-1]["completion_tokens"] == 3
    assert all(set(line) == {"text"} for line in lines[:-1])


def test_ctrl_c_during_a_stream_exits_130_without_a_traceback(server):
    process = subprocess.Popen([sys.executable, "-c", NO_TORCH, "generate", "Tell me a long story", "--stream",
                                "--max-tokens", "200", "--server", server.address],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               # A test run started in the background inherits SIGINT ignored, and Python
                               # then never turns it into KeyboardInterrupt: give the user's terminal default.
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert process.stdout.read(1)          # the stream has started
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "Traceback" not in stderr


def test_bad_flags_get_the_subcommands_usage_and_a_reason():
    negative = cartridge("generate", "hi", "--max-tokens", "-1")
    assert negative.returncode == 2 and "Traceback" not in negative.stderr
    assert "usage: cartridge generate" in negative.stderr
    assert "--max-tokens: expected a whole number from 0 to 4294967295, got '-1'" in negative.stderr
    misspelled = cartridge("generate", "hi", "--temprature", "0.5")
    assert misspelled.returncode == 2 and "usage: cartridge generate" in misspelled.stderr
    assert "unrecognized arguments: --temprature 0.5; did you mean --temperature?" in misspelled.stderr


def test_eval_checks_the_adapter_path_before_loading_the_base(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"instruction": "Say hi.", "output": "hi"}\n')
    result = subprocess.run([sys.executable, "-m", "client.cli", "eval", "--adapter", str(tmp_path / "missing"),
                             "--data", str(data)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "missing' is not a directory" in result.stderr
    assert "loading the base" not in result.stdout


def test_training_checks_its_optional_packages_before_loading_anything(tmp_path):
    # A host without matplotlib: before this check, training ran to the end and crashed drawing the plot.
    blocked = "import sys; sys.modules['matplotlib'] = None; from client.cli import main; sys.exit(main(sys.argv[1:]))"
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", blocked, "train", "--data",
                             str(ROOT / "adapters" / "sample_data" / "records" / "train.jsonl"), "--output", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "cartridge train needs matplotlib (for the loss plot, loss_curves.png)" in result.stderr
    assert "pip install 'cartridge-lora[engine]'" in result.stderr
    assert result.stdout == "" and not out.exists()


def test_a_broken_json_row_is_named_in_plain_words(tokenizer, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "unterminated\n')
    with pytest.raises(DataError) as refused:
        read_dataset([str(data)], tokenizer, 64, 0.0)
    assert f"{data}, line 1: not valid JSON (column 10: Unterminated string starting at" in str(refused.value)


def test_adapter_commands_say_what_happened(server):
    registered = cartridge("adapters", "register", "records", str(ROOT / "adapters" / "examples" / "records"),
                           "--replace", "--server", server.address)
    assert registered.returncode == 0, registered.stderr
    gone = cartridge("adapters", "unregister", "records", "--server", server.address)
    assert (gone.returncode, gone.stdout, gone.stderr) == (0, "unregistered records\n", "")
    with CartridgeClient(server.address, timeout=60) as client:
        for adapter in client.list_adapters():     # what other tests of this module left
            client.unregister_adapter(adapter.name)
    listed = cartridge("adapters", "list", "--server", server.address)
    assert (listed.returncode, listed.stdout) == (0, "no adapters registered\n")
    assert json.loads(cartridge("adapters", "list", "--json", "--server", server.address).stdout) == []


def test_no_server_at_the_address_says_where_and_how_to_start_one():
    with socket.socket() as probe:      # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for command in (("adapters", "list"), ("generate", "hi")):
        result = cartridge(*command, "--server", f"127.0.0.1:{port}")
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr.startswith(f"cartridge {command[0]}: no server at 127.0.0.1:{port}: start one with "
                                        f"`cartridge serve --port {port}`"), result.stderr
        assert "UNAVAILABLE" not in result.stderr and "failed to connect" not in result.stderr


def test_a_misspelled_command_gets_the_closest_one():
    result = cartridge("generat", "hi")
    assert result.returncode == 2 and "usage: cartridge" in result.stderr
    assert "invalid choice: 'generat'" in result.stderr and "did you mean 'generate'?" in result.stderr
    verb = cartridge("adapters", "lst")
    assert verb.returncode == 2 and "usage: cartridge adapters" in verb.stderr
    assert "did you mean 'list'?" in verb.stderr
