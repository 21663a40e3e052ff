"""Multi-device training: keras.distribution (JAX), tf.distribute (TensorFlow).

The device count has to be fixed before a backend starts, so the runs
happen in a subprocess (`tests/distributed_worker.py`) with 4 virtual CPU
devices; each backend's test session runs its own backend's check.
"""

import json
import os
import subprocess
import sys

import keras
import pytest

import keras_lora as kl

BACKEND = keras.backend.backend()
WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")


def run_worker(backend):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, WORKER, backend],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, (
        result.stdout[-3000:] + result.stderr[-5000:]
    )
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution runs on JAX")
def test_jax_data_and_model_parallel_match_one_device_and_shard_kernels():
    r = run_worker("jax")
    assert r["devices"] == 4
    for mode in ("data_parallel", "model_parallel"):
        # Same predictions, the same 2 epochs of Adam losses, same weights.
        assert r[mode]["prediction_diff"] < 1e-5, mode
        assert r[mode]["loss_diff"] < 1e-5, mode
        assert r[mode]["weight_diff"] < 1e-4, mode
    assert r["data_parallel"]["replicated"]

    mp = r["model_parallel"]
    assert mp["base_unchanged"]
    layouts = mp["layouts"]
    # Base kernels: first axis split over the 2-way "model" axis, as the
    # layout says; each device holds half. Adapters and biases replicated.
    for name in ("d1", "q", "o", "d2", "head"):
        entry = layouts[f"{name}/kernel"]
        assert entry["spec"] == ["model"], name
        assert entry["shard_shape"] == [entry["shape"][0] // 2] + entry["shape"][1:]
    adapters = [p for p in layouts if p.endswith(("/lora_a", "/lora_b"))]
    assert len(adapters) == 8
    for path in adapters:
        assert layouts[path]["spec"] == [], path
        assert layouts[path]["shard_shape"] == layouts[path]["shape"], path
    # A `.keras` reload under the distribution is laid out the same way.
    for path, spec in mp["reloaded_specs"].items():
        assert spec == layouts[path]["spec"], path
    assert mp["reloaded_prediction_diff"] < 1e-6
    # An unbuilt Dense built inside its wrapper: "w/w/kernel" is sharded too.
    assert mp["nested_specs"]["w/w/kernel"] == ["model"]
    assert mp["nested_specs"]["w/lora_a"] == mp["nested_specs"]["w/lora_b"] == []
    # With `model=`, a kernel whose first axis (3) does not divide by 4 is
    # replicated (under another model name prefix); the others are sharded.
    odd = {p.split("/", 1)[1]: s for p, s in r["odd_specs"].items()}
    assert odd["odd/kernel"] == []
    assert odd["next/kernel"] == ["model"]

    # A KerasHub LLM (tiny Llama3CausalLM converted in place) under
    # ModelParallel with its backbone's own get_layout_map() plus
    # lora_layout_map's adapter keys: same results as on one device.
    hub = r["kerashub"]
    assert hub["class"] == "Llama3CausalLM"
    assert hub["prediction_diff"] < 1e-5
    assert hub["loss_diff"] < 1e-5
    assert hub["weight_diff"] < 1e-4
    assert hub["base_unchanged"]
    # Every base weight the backbone's layout map names is laid out as it
    # says: the embedding and the 6 kernels of each of the 2 blocks at least.
    specs = dict((path, spec) for path, spec in hub["specs"] if "lora_" not in path)
    assert len(hub["backbone_specs"]) >= 13
    for path, spec in hub["backbone_specs"].items():
        assert specs[path] == spec, path
    assert specs["token_embedding/embeddings"] == ["model", "batch"]
    # 3 targets x 2 blocks x (A, B), all replicated.
    adapters = [spec for path, spec in hub["specs"] if "/lora_" in path]
    assert len(adapters) == 12
    assert all(all(axis is None for axis in spec) for spec in adapters)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute needs TF")
def test_tensorflow_mirrored_strategy_matches_one_device():
    r = run_worker("tensorflow")
    ms = r["mirrored"]
    assert r["devices"] == 4 and ms["replicas"] == 4
    assert ms["mirrored_adapters"]  # one copy of each adapter per device
    assert ms["prediction_diff"] < 1e-5
    assert ms["loss_diff"] < 1e-5
    assert ms["weight_diff"] < 1e-4
    assert ms["base_unchanged"]


@pytest.mark.skipif(BACKEND == "jax", reason="the JAX backend has the API")
def test_layout_map_refuses_backends_without_keras_distribution():
    with pytest.raises(ValueError, match="JAX backend only"):
        kl.lora_layout_map(None)


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution runs on JAX")
def test_layout_map_keys_match_both_path_forms_and_never_an_adapter():
    mesh = keras.distribution.DeviceMesh(
        (1,), ["model"], keras.distribution.list_devices()[:1]
    )
    layout_map = kl.lora_layout_map(mesh)
    for path in ("d1/kernel", "d1/d1/kernel", "enc/mha/query/kernel"):
        assert layout_map[path].axes == ("model",), path
    assert layout_map["tok/embeddings"].axes == ("model",)
    for path in ("d1/lora_a", "d1/lora_b", "mha/query/lora_a", "d1/lora_a_task"):
        assert layout_map[path].axes == (), path
    assert layout_map["d1/lora_magnitude"].axes == ()  # DoRA
    for path in ("d1/bias", "d1/lora_kernel_a", "d1/output", "d1/kernel_scale"):
        assert layout_map[path] is None, path

    base = keras.distribution.LayoutMap(mesh)
    base[".*query/kernel"] = (None, "model")
    merged = kl.lora_layout_map(mesh, layout_map=base)
    assert merged["block/query/kernel"].axes == (None, "model")
    assert merged["block/query/lora_a"].axes == ()
    assert merged["block/key/kernel"] is None  # only the given keys shard
    loose = keras.distribution.LayoutMap(mesh)
    loose[".*"] = ("model",)
    with pytest.raises(ValueError, match="also match LoRA adapter"):
        kl.lora_layout_map(mesh, layout_map=loose)
    with pytest.raises(ValueError, match="model_axis"):
        kl.lora_layout_map(mesh, model_axis="tensor")
    with pytest.raises(TypeError, match="device_mesh"):
        kl.lora_layout_map("mesh")
