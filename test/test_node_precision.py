"""The node with the precision parameters (weights, kv_dtype, gpu_memory_budget_gb), over DDS: one
it can run starts and answers, with its sizing in diagnostics; one the device lacks is refused at
start with the reason and the node stays up saying why on every call."""

import pytest

from ros_harness import client, node_params, start  # noqa: F401,I100 (domain first; fixtures)


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_quantized_weights_int8_memory_sized_by_bytes_answer(client, start, tiny_model_path, weights):  # noqa: F811
    node = start(node_params(tiny_model_path, weights=weights, kv_dtype="int8", gpu_memory_budget_gb=0.004,
                             narration_period_s=0.0))
    status = client.wait_ready(node)
    assert status["engine"] == "ready", status
    client.feed(client.image(1.0))
    s = client.node_status()
    assert s["weights"] == weights and s["kv_dtype"] == "int8"
    assert int(s["budget_tokens_sized"]) > 0 and "GB budget" in s["memory_sizing"]
    answer = client.query("Is the door open?")
    assert answer.success, answer.error_message


@pytest.mark.parametrize("over, reason", [
    (dict(weights="int3"), "weights must be one of bf16, int8, int4"),
    (dict(kv_dtype="fp8"), "fp8 is not implemented"),
    (dict(gpu_memory_budget_gb=0.0005), "cannot hold this model and memory: .* GB budget - "),
])
def test_a_precision_the_node_cannot_run_is_refused_with_the_reason(client, start, tiny_model_path,  # noqa: F811
                                                                     over, reason):
    import re

    node = start(node_params(tiny_model_path, narration_period_s=0.0, **over))
    status = client.wait_ready(node)
    assert status["engine"] == "failed" and status["level"] == 2, status
    assert re.search(reason, status["message"]), status["message"]
    for _ in range(2):                                           # every call says why
        answer = client.query("Is the door open?")
        assert not answer.success and re.search(reason, answer.error_message), answer.error_message
    assert node.alive()
