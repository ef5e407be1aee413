"""Server settings: one dataclass, checked once when the server starts."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

import torch

QUANTIZATIONS = ("nf4", "none")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True, slots=True)
class ServerConfig:
    base_model: str | None = None          # transformers directory; None = embedded default
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    quantization: str | None = None        # None: nf4 on CUDA, none on CPU (faster there)
    dtype: str | None = None               # None: bfloat16 on CUDA, float32 on CPU
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9464
    http_port: int | None = None           # OpenAI-compatible HTTP; None = off
    max_batch_size: int = 256              # requests (rows) in one forward pass
    max_seq_len: int = 2048                # prompt + output tokens of one request
    max_queue: int = 256                   # requests waiting for a slot before RESOURCE_EXHAUSTED
    max_tokens_per_pass: int | None = None  # decode rows + prompt chunk tokens in one pass; None: tokens_per_pass
    kv_cache_memory: float | None = None   # bytes, or (<= 1) a share of free device memory; None: see kv_cache_bytes
    kv_block_size: int = 16                # tokens per KV-cache block
    prefix_cache: bool = True              # keep full blocks after their request and reuse them
    max_adapters: int = 16                 # adapters resident in device memory at once
    max_lora_rank: int = 64
    cuda_graphs: bool = True               # replay decode as CUDA graphs (CUDA only)
    triton_kernels: bool = True            # our NF4 matmul and multi-LoRA kernels for decode (CUDA only)
    nf4_kernel_max_rows: int = 64          # largest batch our NF4 kernel takes; above, bitsandbytes + cuBLAS
    adapters: tuple[tuple[str, str], ...] = ()   # (name, path) registered at start-up
    drain_timeout: float = 30.0            # seconds running requests get after SIGTERM/SIGINT
    admin_token: str | None = field(default=None, repr=False)      # required by Register/Unregister
    inference_token: str | None = field(default=None, repr=False)  # required by inference calls when set
    tls_cert: str | None = None            # PEM files; both or neither
    tls_key: str | None = None
    adapter_root: str | None = None        # adapters register only from under this directory
    max_adapter_bytes: int = 2 << 30       # adapter_model.safetensors size limit, checked before reading
    max_host_adapter_bytes: int | None = None   # host memory for idle adapters' weights; None: no limit
    store: str | None = None               # adapter store whose live versions are served (and followed)
    canary_check_s: float = 5.0            # how often a canary's abort limits are checked (serve --store)

    def __post_init__(self) -> None:
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"--quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        for flag, value, low in (("--port", self.port, 0), ("--metrics-port", self.metrics_port, 0),
                                 ("--max-batch-size", self.max_batch_size, 1), ("--max-seq-len", self.max_seq_len, 2),
                                 ("--max-queue", self.max_queue, 0), ("--max-adapters", self.max_adapters, 1),
                                 ("--max-lora-rank", self.max_lora_rank, 1),
                                 ("--nf4-kernel-max-rows", self.nf4_kernel_max_rows, 0),
                                 ("--max-tokens-per-pass", self.tokens_per_pass, 1),
                                 ("--kv-block-size", self.kv_block_size, 1)):
            if value < low:
                raise ValueError(f"{flag} must be at least {low}, got {value}")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ValueError(f"--http-port must be between 0 and 65535, got {self.http_port}")
        if self.port > 65535 or self.metrics_port > 65535:
            raise ValueError("ports must be at most 65535")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"--kv-cache-memory must be bytes, or a share of free memory in (0, 1], "
                             f"got {self.kv_cache_memory:g}")
        if not 0.1 <= self.canary_check_s <= 3600:
            raise ValueError(f"--canary-check-s must be between 0.1 and 3600 seconds, got {self.canary_check_s}")
        if not 0 <= self.drain_timeout <= 24 * 3600:
            raise ValueError(f"--drain-timeout must be between 0 and 86400 seconds, got {self.drain_timeout}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give both --tls-cert and --tls-key, or neither")
        if self.adapter_root is not None and not Path(self.adapter_root).is_dir():
            raise ValueError(f"--adapter-root {self.adapter_root}: not a directory")
        if self.max_adapter_bytes < 1:
            raise ValueError(f"--max-adapter-bytes must be at least 1, got {self.max_adapter_bytes}")
        if self.max_host_adapter_bytes is not None and self.max_host_adapter_bytes < 0:
            raise ValueError(f"--max-host-adapter-bytes must be at least 0, got {self.max_host_adapter_bytes}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: this host has no CUDA device")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype] if self.dtype else (torch.bfloat16 if self.on_cuda else torch.float32)

    def kv_cache_bytes(self, bytes_per_token: int) -> float:
        """--kv-cache-memory, or its default: 90 % of free device memory on CUDA, room for 16 requests of
        --max-seq-len on the CPU (where memory is shared with everything else)."""
        if self.kv_cache_memory is not None:
            return self.kv_cache_memory
        return 0.9 if self.on_cuda else 16 * self.max_seq_len * bytes_per_token

    @property
    def tokens_per_pass(self) -> int:
        """--max-tokens-per-pass, or its default. On the CPU a pass costs about its tokens, so 512 keeps a
        prompt's chunk short beside running streams. On CUDA a pass with prompt tokens runs eagerly and
        costs tens of ms whatever its size (7B shape, H100): 32 streams of 64-token prompts served 3,378
        tokens/s at 2,048 a pass against 1,689 at 512 (BENCHMARKS.md)."""
        if self.max_tokens_per_pass is not None:
            return self.max_tokens_per_pass
        return 2048 if self.on_cuda else 512

    @property
    def quantize(self) -> bool:
        return (self.quantization or ("nf4" if self.on_cuda else "none")) == "nf4"

    @property
    def kernels(self) -> bool:
        return self.on_cuda and self.triton_kernels

    @property
    def loopback_only(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:
            return False   # a host name: it may resolve to anything

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")
