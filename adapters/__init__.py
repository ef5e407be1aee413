"""Offline tooling: the adapter trainer, the merge tool, and the file formats shared with the server."""

import logging as _logging

# bitsandbytes, imported by peft on every train, eval and merge, warns on CPUs with AVX512-BF16 that an
# optional hub kernel ("pip install kernels") could not be fetched; NF4 works without it, so the
# warning only alarms. Dropped by its text, so any other bitsandbytes warning still shows.
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community"))
