"""Memory across restarts, node level: ~/save_memory, the memory_file loaded at start and saved on a
clean shutdown, SIGKILL around a save, a damaged file refused with the node running on empty memory."""

import signal
import subprocess

import pytest
from safetensors import safe_open

from ros_harness import Client, client, node_params, ros2, start  # noqa: F401,I100 (domain first; fixtures)


def saved_frames(path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return f.get_slice("frame_times").get_shape()[0]


def feed(client, stamps):  # noqa: F811
    before = int(client.node_status()["frames_ingested"])
    for t in stamps:
        client.image_pub.publish(client.image(t))
    client.wait_for(lambda: int(client.node_status()["frames_ingested"]) == before + len(stamps), 10,
                    f"{len(stamps)} frames")


@pytest.mark.timeout(240)
def test_memory_survives_restarts_kills_and_damage(client, start, tiny_model_path, tmp_path):  # noqa: F811
    memory = tmp_path / "memory.safetensors"
    params = node_params(tiny_model_path, memory_file=str(memory))
    first = start(params)
    client.wait_ready(first)
    feed(client, [1.0, 1.2, 1.4])
    out = ros2("service", "call", "/livevlm/save_memory", "std_srvs/srv/Trigger")
    assert "success=True" in out and "saved 3 frames" in out, out
    feed(client, [1.6, 1.8])
    # a save requested, and the node killed around it: the file on disk is a whole one, old or new
    call = subprocess.Popen(["ros2", "service", "call", "/livevlm/save_memory", "std_srvs/srv/Trigger"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client.wait_for(lambda: call.poll() is not None or memory.stat().st_mtime_ns > 0, 1, "the call to start")
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(5)
    call.kill()
    assert saved_frames(memory) in (3, 5)
    assert [p.name for p in tmp_path.glob(".memory.safetensors*")] in ([], [p.name for p in tmp_path.glob(".*tmp")])

    # a killed server can look alive to an old client for a while: each restart gets a fresh client
    client.close()
    client = Client()
    second = start(params)                                   # loads the file at start
    client.wait_ready(second)
    answer = client.query("Is the door open?")
    assert answer.success and answer.span_start.sec == 1
    feed(client, [2.0])
    loaded = saved_frames(memory)
    second.proc.send_signal(signal.SIGINT)                   # a clean shutdown saves
    second.proc.wait(10)
    assert saved_frames(memory) == loaded + 1

    memory.write_bytes(memory.read_bytes()[:100])           # damaged: refused, the node runs on empty memory
    client.close()
    client = Client()
    third = start(params)
    status = client.wait_ready(third)
    status = client.wait_for(lambda: (s := client.node_status()) and s["level"] == 1 and s, 10, "WARN status")
    assert "memory file refused" in status["message"]
    empty = client.query("Is the door open?")
    assert not empty.success and "no frame" in empty.error_message
    assert third.alive()
    client.close()


@pytest.fixture(scope="module", autouse=True)
def _rclpy_shutdown_at_end():
    yield
    import rclpy
    rclpy.try_shutdown()
