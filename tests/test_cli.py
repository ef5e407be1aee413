"""The `cartridge` command as a user types it, against a running server."""
from __future__ import annotations

import json
import subprocess
import sys

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


def test_serve_refuses_bad_flags():
    result = subprocess.run([sys.executable, "-m", "client.cli", "serve", "--max-batch-size", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--max-batch-size must be at least 1" in result.stderr
