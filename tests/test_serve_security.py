"""Who may call and what may be read: bearer tokens, TLS, --adapter-root and --max-adapter-bytes.

One server runs with every guard on; the tests call it as an operator, a user and a stranger would.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from client.client import CartridgeClient, CartridgeError

from .conftest import PROMPT

ADMIN, USER = "admin-s3cret-token", "user-token-42"
MAX_ADAPTER_BYTES = 2_000_000   # qv8 (1.8 MB) fits, mlp4 (2.6 MB) does not


@pytest.fixture(scope="module")
def secrets(tmp_path_factory) -> dict[str, Path]:
    """Token files and a self-signed certificate for 127.0.0.1, made here with the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    where = tmp_path_factory.mktemp("secrets")
    (where / "admin").write_text(ADMIN + "\n")
    (where / "user").write_text(USER)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", where / "key.pem", "-out", where / "cert.pem", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    return {name: where / name for name in ("admin", "user", "key.pem", "cert.pem")}


@pytest.fixture(scope="module")
def adapter_root(adapter_dirs, tmp_path_factory) -> Path:
    """An adapter root holding qv8 and mlp4, a link that leads out, and an adapter whose weights link out."""
    root = tmp_path_factory.mktemp("root")
    outside = tmp_path_factory.mktemp("outside")
    for name in ("qv8", "mlp4"):
        shutil.copytree(adapter_dirs[name], root / name)
    shutil.copytree(adapter_dirs["qv8"], outside / "qv8")
    (root / "escape").symlink_to(outside / "qv8", target_is_directory=True)
    (root / "half").mkdir()
    shutil.copy(adapter_dirs["qv8"] / "adapter_config.json", root / "half")
    (root / "half" / "adapter_model.safetensors").symlink_to(outside / "qv8" / "adapter_model.safetensors")
    return root


@pytest.fixture(scope="module")
def server_flags(secrets, adapter_root) -> list[str]:
    return ["--http-port", "0", "--max-batch-size", "2", "--max-adapters", "2", "--max-lora-rank", "16",
            "--max-seq-len", "256", "--admin-token-file", str(secrets["admin"]), "--inference-token-file", str(secrets["user"]),
            "--tls-cert", str(secrets["cert.pem"]), "--tls-key", str(secrets["key.pem"]),
            "--adapter-root", str(adapter_root), "--max-adapter-bytes", str(MAX_ADAPTER_BYTES)]


def connect(server, secrets, **tokens) -> CartridgeClient:
    return CartridgeClient(server.address, timeout=60, tls_ca=str(secrets["cert.pem"]), **tokens)


@pytest.fixture
def admin(server, secrets):
    with connect(server, secrets, admin_token=ADMIN) as c:
        yield c


def refusal(call) -> CartridgeError:
    with pytest.raises(CartridgeError) as err:
        call()
    return err.value


def test_admin_calls_need_the_admin_token(server, secrets, adapter_root, monkeypatch):
    monkeypatch.delenv("CARTRIDGE_ADMIN_TOKEN", raising=False)
    path = str(adapter_root / "qv8")
    with connect(server, secrets, inference_token=USER) as user, \
            connect(server, secrets, admin_token="admin-s3cret-tokeN") as wrong:
        missing = refusal(lambda: user.register_adapter("qv8", path))
        denied = refusal(lambda: wrong.register_adapter("qv8", path))
        not_admin = refusal(lambda: connect(server, secrets, admin_token=USER).register_adapter("qv8", path))
        unregister = refusal(lambda: user.unregister_adapter("qv8"))
        assert [a.name for a in user.list_adapters()] == []
    assert missing.code == grpc.StatusCode.UNAUTHENTICATED and "admin token" in missing.message
    assert denied.code == not_admin.code == grpc.StatusCode.PERMISSION_DENIED
    assert unregister.code == grpc.StatusCode.UNAUTHENTICATED

    with connect(server, secrets, admin_token=ADMIN) as admin:
        assert admin.register_adapter("qv8", path).name == "qv8"
        admin.unregister_adapter("qv8")


def test_a_malformed_authorization_is_unauthenticated(server, secrets):
    with grpc.secure_channel(server.address, grpc.ssl_channel_credentials(secrets["cert.pem"].read_bytes())) as ch:
        from cartridge.v1 import adapters_pb2, adapters_pb2_grpc

        stub = adapters_pb2_grpc.AdaptersStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.UnregisterAdapter(adapters_pb2.UnregisterAdapterRequest(name="x"),
                                   metadata=[("authorization", f"Basic {ADMIN}")], timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "Bearer" in err.value.details()


def test_inference_needs_the_inference_or_admin_token(server, secrets, monkeypatch):
    monkeypatch.delenv("CARTRIDGE_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("CARTRIDGE_INFERENCE_TOKEN", raising=False)
    with connect(server, secrets) as anonymous, connect(server, secrets, inference_token="guess") as guesser:
        assert refusal(lambda: anonymous.generate(PROMPT, max_tokens=2)).code == grpc.StatusCode.UNAUTHENTICATED
        assert refusal(lambda: list(guesser.generate_stream(PROMPT, max_tokens=2))).code == \
            grpc.StatusCode.PERMISSION_DENIED
    for token in ({"inference_token": USER}, {"admin_token": ADMIN}):
        with connect(server, secrets, **token) as c:
            assert c.generate(PROMPT, max_tokens=2).completion_tokens == 2


def test_the_openai_http_api_takes_the_same_tokens_over_https(server, secrets):
    import json
    import ssl
    import urllib.error
    import urllib.request

    import openai

    assert server.http_url.startswith("https://")

    def api(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=server.http_url, api_key=key, max_retries=0, timeout=60,
                             http_client=openai.DefaultHttpxClient(verify=str(secrets["cert.pem"])))
    trusted = ssl.create_default_context(cafile=str(secrets["cert.pem"]))
    with pytest.raises(urllib.error.HTTPError) as anonymous:   # the openai package always sends a key
        urllib.request.urlopen(server.http_url + "/models", context=trusted)
    assert anonymous.value.code == 401 and "inference token" in json.load(anonymous.value)["error"]["message"]
    with pytest.raises(openai.PermissionDeniedError) as denied:
        api("guess").models.list()
    assert "inference" in denied.value.body["message"]
    for key in (USER, ADMIN):
        assert api(key).completions.create(model="base", prompt=PROMPT, max_tokens=2).usage.completion_tokens == 2
    with urllib.request.urlopen(server.http_url.removesuffix("/v1") + "/health", context=trusted) as health:
        assert health.status == 200                           # open, as gRPC health is


def test_health_stays_open_and_plaintext_is_refused(server, secrets):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    credentials = grpc.ssl_channel_credentials(secrets["cert.pem"].read_bytes())
    with grpc.secure_channel(server.address, credentials) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    with CartridgeClient(server.address, timeout=10, inference_token=USER) as plaintext:
        assert refusal(lambda: plaintext.generate(PROMPT, max_tokens=2)).code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("path, words", [
    ("{outside}", "outside this server's --adapter-root"),
    ("{outside}/does-not-exist", "--adapter-root"),           # outside is refused before existence is told
    ("{root}/../{outside_name}", "--adapter-root"),
    ("{root}/escape", "symlinks followed"),
    ("{root}/half", "adapter_model.safetensors in"),
])
def test_paths_outside_the_adapter_root_are_permission_denied(admin, adapter_root, adapter_dirs, path, words):
    outside = adapter_dirs["qv8"]
    path = path.format(outside=outside, root=adapter_root, outside_name=os.path.relpath(outside, adapter_root.parent))
    err = refusal(lambda: admin.register_adapter("stray", path))
    assert err.code == grpc.StatusCode.PERMISSION_DENIED, err
    assert words in err.message
    assert [a.name for a in admin.list_adapters()] == []


def test_relative_paths_are_read_under_the_root_and_big_weights_are_refused_before_reading(admin):
    assert admin.register_adapter("rel", "qv8").path == "qv8"
    big = refusal(lambda: admin.register_adapter("big", "mlp4"))
    assert big.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"--max-adapter-bytes {MAX_ADAPTER_BYTES}" in big.message and "nothing was read" in big.message
    assert [a.name for a in admin.list_adapters()] == ["rel"]
    assert admin.generate(PROMPT, adapter="rel", max_tokens=3).completion_tokens == 3
    admin.unregister_adapter("rel")


def test_the_cli_takes_tokens_from_flags_and_the_environment(server, secrets, adapter_root):
    cli = [sys.executable, "-m", "client.cli"]
    common = ["--server", server.address, "--tls-ca", str(secrets["cert.pem"])]
    env = {**os.environ, "CARTRIDGE_ADMIN_TOKEN": ADMIN}
    registered = subprocess.run([*cli, "adapters", "register", "cli", str(adapter_root / "qv8"), *common],
                                env=env, capture_output=True, text=True, timeout=60)
    listed = subprocess.run([*cli, "adapters", "list", "--json", *common, "--token-file", str(secrets["user"])],
                            env={k: v for k, v in os.environ.items() if not k.startswith("CARTRIDGE_")},
                            capture_output=True, text=True, timeout=60)
    refused = subprocess.run([*cli, "adapters", "unregister", "cli", *common, "--admin-token-file",
                              str(secrets["user"])], capture_output=True, text=True, timeout=60)
    removed = subprocess.run([*cli, "adapters", "unregister", "cli", *common, "--admin-token-file",
                              str(secrets["admin"])], capture_output=True, text=True, timeout=60)
    assert registered.returncode == 0, registered.stderr
    assert listed.returncode == 0 and '"name": "cli"' in listed.stdout, listed.stderr
    assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr
    assert removed.returncode == 0, removed.stderr


def test_listening_beyond_loopback_without_an_admin_token_warns_loudly():
    env = {k: v for k, v in os.environ.items() if k != "CARTRIDGE_ADMIN_TOKEN"}
    process = subprocess.Popen([sys.executable, "-m", "client.cli", "serve", "--host", "0.0.0.0", "--port", "0",
                                "--metrics-port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**env, "PYTHONUNBUFFERED": "1"})
    try:
        seen = []
        for line in process.stdout:     # the warning comes before the model loads
            seen.append(line)
            if "WITH NO ADMIN TOKEN" in line or "serving gRPC" in line:
                break
    finally:
        process.kill()
        process.wait()
    assert "LISTENING ON 0.0.0.0 WITH NO ADMIN TOKEN" in seen[-1], "".join(seen)
