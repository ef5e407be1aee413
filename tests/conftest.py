"""Shared fixtures: the embedded base, peft adapters made on it, and real servers on loopback ports."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from adapters.formats.base_checkpoint import resolve_base

PROMPT = "The three most important things about gardening are"


@pytest.fixture(scope="session")
def base_dir() -> Path:
    return resolve_base(None)


@pytest.fixture(scope="session")
def base_model(base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tokenizer(base_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir)


def make_peft_adapter(base_model, out: Path, r: int, targets: list[str], seed: int, use_rslora: bool = False,
                      lora_alpha: int | None = None, b_std: float = 0.05, **lora_config) -> Path:
    """A peft adapter with nonzero A and B (peft starts B at zero, which would hide every bug). B's
    spread `b_std` sets how far it moves the base, from unnoticeable (1e-4) to ruinous (1);
    `lora_config` passes further peft LoraConfig fields (rank_pattern, alpha_pattern, ...)."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=lora_alpha or 2 * r, target_modules=targets, use_rslora=use_rslora,
                        lora_dropout=0.0, task_type="CAUSAL_LM", **lora_config)
    model = get_peft_model(copy.deepcopy(base_model), config)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=b_std)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def adapter_dirs(base_model, tmp_path_factory) -> dict[str, Path]:
    """Three adapters of different ranks and targets, one with rsLoRA scaling."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        "qv8": make_peft_adapter(base_model, root / "qv8", 8, ["q_proj", "v_proj"], seed=1),
        "all16-rs": make_peft_adapter(base_model, root / "all16-rs", 16,
                                      ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                      seed=2, use_rslora=True),
        "mlp4": make_peft_adapter(base_model, root / "mlp4", 4, ["gate_proj", "down_proj", "o_proj"], seed=3),
    }


@dataclass
class ServerProcess:
    address: str
    metrics_url: str
    process: subprocess.Popen
    log: list[str]               # everything the server printed, kept for failure reports
    http_url: str | None = None  # the OpenAI API's base URL (.../v1), with --http-port

    def stop(self) -> None:
        stop_process(self.process)

    def logged(self, *parts: str, seconds: float = 10) -> bool:
        """Whether a line holding every one of `parts` shows up in the log within `seconds`: a thread reads
        the server's output, so a line it just printed can land a moment after the call that caused it."""
        deadline = time.monotonic() + seconds
        while True:
            if any(all(part in line for part in parts) for line in list(self.log)):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)


def tiny_llama_checkpoint(directory: Path):
    """A 3-layer random Llama (grouped-query heads) saved in bf16 at `directory`; returns its config."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000, max_position_embeddings=256)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    return config


def paged_sequences(runner, prompts: list[list[int]], lora_slots: list[int] | None = None,
                    max_tokens: int = 8) -> list:
    """Sequences for driving a ModelRunner directly, each with its own block table on a fresh pool over the
    runner's cache (what the scheduler would hand out)."""
    from server.engine.block_pool import BlockPool, BlockTable
    from server.engine.sequence import SamplingParams, Sequence
    from server.engine.text_stream import TextStream

    pool = BlockPool(runner.cache.num_blocks, runner.cache.block_size)
    seqs = [Sequence(p, SamplingParams(max_tokens=max_tokens), None, TextStream(None)) for p in prompts]
    for seq, lora in zip(seqs, lora_slots or [0] * len(seqs)):
        seq.blocks, seq.lora_slot = BlockTable(pool, b"base"), lora
    return seqs


def run_pass(runner, shares: list, fed=None, launch: bool = False):
    """One pass of `n` more tokens of each (sequence, n), single tokens first as the scheduler orders them
    -> the logits of the sequences that sample, in the order of `shares` (or, with `launch`, the launched
    DecodePass, in the pass's order)."""
    from server.engine.sequence import Work

    work = sorted((Work(seq, seq.computed, seq.computed + n) for seq, n in shares), key=lambda w: w.length > 1)
    for w in work:
        assert w.seq.blocks.grow(w.end)
    out = runner.launch(work, fed) if launch else runner.forward(work)
    samplers = [w.seq for w in work if w.samples]
    for w in work:
        w.seq.computed = w.end
    if launch:
        return out
    return out[[samplers.index(seq) for seq, _ in shares if seq in samplers]]


def launch(command: list[str], ready: str, seconds: float,
           env: dict[str, str] | None = None) -> tuple[subprocess.Popen, list[str], re.Match]:
    """Starts a `cartridge` command and waits for the line that matches `ready`; its output is kept."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    lines = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        found = re.search(ready, line)
        if found:
            # Keep reading its log so the process never blocks on a full pipe.
            threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
            return process, lines, found
    process.kill()
    raise RuntimeError(f"{' '.join(command[3:5])} did not start:\n" + "".join(lines))


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM, as an orchestrator stops a server (it drains), then SIGKILL after a minute."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


def start_server(*flags: str) -> ServerProcess:
    """`cartridge serve` on free loopback ports, as a user would start it; waits for its ready line."""
    command = [sys.executable, "-m", "client.cli", "serve", "--port", "0", "--metrics-port", "0", *flags]
    process, lines, ready = launch(command, r"serving gRPC on (\S+), metrics on ([^\s,]+)(?:, OpenAI HTTP on (\S+))?",
                                   300)   # a 7B base quantizes on load
    return ServerProcess(ready[1], ready[2], process, lines, ready[3])


@pytest.fixture(scope="module")
def server_flags(adapter_dirs) -> list[str]:
    """A CPU server with two adapters given at start-up; a test module overrides this for its own set-up."""
    return ["--max-batch-size", "8", "--max-adapters", "4", "--max-lora-rank", "16", "--max-seq-len", "512",
            "--adapter", f"qv8={adapter_dirs['qv8']}", "--adapter", f"all16-rs={adapter_dirs['all16-rs']}"]


@pytest.fixture(scope="module")
def server(server_flags):
    proc = start_server(*server_flags)
    yield proc
    proc.stop()


@pytest.fixture
def client(server):
    from client.client import CartridgeClient

    with CartridgeClient(server.address, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def api(server):
    """The real `openai` package's client on the module's server (which needs --http-port)."""
    import openai

    with openai.OpenAI(base_url=server.http_url, api_key="unused", max_retries=0, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def stub(server):
    """A raw gRPC Inference stub on the module's server, for fields our client does not expose."""
    import grpc
    from cartridge.v1 import inference_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        yield inference_pb2_grpc.InferenceStub(channel)
