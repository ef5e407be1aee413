"""Where adapters live: device slot, host or disk, under a host budget; pins; bounded metric labels.

One device slot and a host budget that holds qv8 (1.8 MB) but not mlp4 (2.6 MB) beside it, so
adapters visibly move between the three places as requests come.
"""
from __future__ import annotations

import hashlib
import re
import shutil
import urllib.error
import urllib.request

import grpc
import pytest

from cartridge.v1 import adapters_pb2

from .conftest import PROMPT

DEVICE, HOST, DISK = (adapters_pb2.ADAPTER_LOCATION_DEVICE, adapters_pb2.ADAPTER_LOCATION_HOST,
                      adapters_pb2.ADAPTER_LOCATION_DISK)


@pytest.fixture(scope="module")
def server_flags() -> list[str]:
    return ["--max-batch-size", "2", "--max-adapters", "1", "--max-lora-rank", "16", "--max-seq-len", "256",
            "--max-host-adapter-bytes", "2MB"]


@pytest.fixture
def copies(adapter_dirs, tmp_path):
    """Adapters in a directory of this test's own, so it may change their files."""
    for name in ("qv8", "mlp4"):
        shutil.copytree(adapter_dirs[name], tmp_path / name)
    return tmp_path


def where(client) -> dict[str, tuple[int, int, bool]]:
    return {a.name: (a.location, a.device_slot, a.pinned) for a in client.list_adapters()}


def test_idle_adapters_leave_host_memory_and_come_back_whole(client, copies):
    info = client.register_adapter("qv8", str(copies / "qv8"))
    assert info.sha256 == hashlib.sha256((copies / "qv8" / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert where(client)["qv8"] == (HOST, 0, False)
    first = client.generate(PROMPT, adapter="qv8", max_tokens=12).text
    assert where(client)["qv8"] == (DEVICE, 1, False)

    client.register_adapter("mlp4", str(copies / "mlp4"))       # alone over the budget: dropped at once
    assert where(client) == {"qv8": (DEVICE, 1, False), "mlp4": (DISK, 0, False)}
    other = client.generate(PROMPT, adapter="mlp4", max_tokens=12).text   # read again; qv8 leaves host and slot
    assert where(client) == {"qv8": (DISK, 0, False), "mlp4": (DEVICE, 1, False)}

    again = client.generate(PROMPT, adapter="qv8", max_tokens=12).text    # read again from disk
    assert again == first != other
    assert where(client) == {"qv8": (DEVICE, 1, False), "mlp4": (DISK, 0, False)}
    client.unregister_adapter("qv8")
    client.unregister_adapter("mlp4")


def test_a_file_changed_on_disk_is_refused_and_the_adapter_marked(client, copies):
    client.register_adapter("qv8", str(copies / "qv8"))
    client.register_adapter("mlp4", str(copies / "mlp4"))
    client.generate(PROMPT, adapter="mlp4", max_tokens=2)           # qv8 leaves host memory for disk
    assert where(client)["qv8"][0] == DISK
    weights = copies / "qv8" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x40                                                  # one bit of one weight
    weights.write_bytes(bytes(data))

    for _ in range(2):   # the first request finds it, the next is refused without reading
        with pytest.raises(Exception) as err:
            client.generate(PROMPT, adapter="qv8", max_tokens=4)
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "changed on disk since it was registered" in err.value.message
    assert "changed on disk" in {a.name: a for a in client.list_adapters()}["qv8"].problem
    assert client.generate(PROMPT, adapter="mlp4", max_tokens=3).completion_tokens == 3   # others still served

    client.register_adapter("qv8", str(copies / "qv8"), replace=True)   # registering again takes the new file
    assert client.generate(PROMPT, adapter="qv8", max_tokens=3).completion_tokens == 3
    assert not {a.name: a for a in client.list_adapters()}["qv8"].problem
    client.unregister_adapter("qv8")
    client.unregister_adapter("mlp4")


def test_a_pinned_adapter_keeps_its_slot_and_pins_are_capped(client, adapter_dirs):
    pinned = client.register_adapter("pinned", str(adapter_dirs["qv8"]), pin=True)
    assert (pinned.location, pinned.device_slot, pinned.pinned) == (DEVICE, 1, True)
    with pytest.raises(Exception) as full:
        client.register_adapter("second", str(adapter_dirs["mlp4"]), pin=True)
    assert full.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "pinned" in full.value.message
    client.register_adapter("other", str(adapter_dirs["mlp4"]))
    with pytest.raises(Exception) as no_slot:        # the only slot is pinned: refused, not queued for ever
        client.generate(PROMPT, adapter="other", max_tokens=2)
    assert no_slot.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert client.generate(PROMPT, adapter="pinned", max_tokens=2).completion_tokens == 2
    assert client.generate(PROMPT, max_tokens=2).completion_tokens == 2      # the base needs no slot
    assert where(client)["pinned"] == (DEVICE, 1, True)

    client.register_adapter("pinned", str(adapter_dirs["qv8"]), replace=True)   # unpinned
    assert client.generate(PROMPT, adapter="other", max_tokens=2).completion_tokens == 2
    # other (2.6 MB) alone fills the host budget: the unpinned, idle one goes to disk.
    assert where(client) == {"pinned": (DISK, 0, False), "other": (DEVICE, 1, False)}
    client.unregister_adapter("pinned")
    client.unregister_adapter("other")


def metrics_text(server) -> str:
    return urllib.request.urlopen(server.metrics_url).read().decode()


def test_unregistering_removes_the_adapters_metric_series(client, server, adapter_dirs):
    client.register_adapter("short-lived", str(adapter_dirs["qv8"]))
    client.generate(PROMPT, adapter="short-lived", max_tokens=3)
    assert len(re.findall(r'adapter="short-lived"', metrics_text(server))) >= 6
    client.unregister_adapter("short-lived")
    assert 'adapter="short-lived"' not in metrics_text(server)


@pytest.mark.parametrize("path", ["/", "/health", "/metrics/x", "/favicon.ico"])
def test_the_metrics_port_serves_only_metrics(server, path):
    base = server.metrics_url.removesuffix("/metrics")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(base + path)
    assert err.value.code == 404
    assert urllib.request.urlopen(base + "/metrics?name[]=cartridge_requests_running").status == 200


def test_names_that_come_and_go_leave_nothing_behind(client, server, adapter_dirs):
    for cycle in range(40):
        name = f"cycle-{cycle}"
        client.register_adapter(name, str(adapter_dirs["qv8" if cycle % 2 else "mlp4"]))
        if cycle % 4 == 0:
            assert client.generate(PROMPT, adapter=name, max_tokens=1).adapter == name
        client.unregister_adapter(name)
    assert client.list_adapters() == []
    assert 'adapter="cycle-' not in metrics_text(server)
    assert float(re.search(r"^cartridge_adapters_resident (\S+)", metrics_text(server), re.M)[1]) <= 1
