"""Multi-device checks, run in a process of their own by test_distribution.py.

`python tests/distributed_worker.py jax|tensorflow` trains one small LoRA
model on one device and on 4 virtual CPU devices and prints one JSON line
of results. The device count must be fixed before the backend starts, which
is why this is a separate process:

- JAX: `XLA_FLAGS=--xla_force_host_platform_device_count=4` (set here,
  before JAX is imported); `keras.distribution.DataParallel` and
  `ModelParallel` with `kl.lora_layout_map` on a (2 batch, 2 model) mesh;
  and a tiny KerasHub `Llama3CausalLM` converted in place under
  `ModelParallel` with its backbone's own `get_layout_map()` plus the
  adapter keys (`run_kerashub`).
- TensorFlow: 4 logical CPU devices, `tf.distribute.MirroredStrategy`.

It can also be run by hand: `python tests/distributed_worker.py jax`.
"""

import json
import os
import sys
import tempfile

DEVICES = 4
BACKEND = sys.argv[1] if len(sys.argv) > 1 else "jax"
os.environ["KERAS_BACKEND"] = BACKEND
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if BACKEND == "jax":
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (
        f"{flags} --xla_force_host_platform_device_count={DEVICES}".strip()
    )

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_lora as kl  # noqa: E402
from keras_lora.model.surgery import lora_layers  # noqa: E402

TARGETS = ["d1", "q", "o", "d2"]
RNG = np.random.default_rng(0)
X = RNG.normal(size=(64, 6, 16)).astype("float32")
Y = RNG.normal(size=(64, 3)).astype("float32")


def build():
    """Dense (16, 32) -> EinsumDense (32, 4, 8) -> EinsumDense (4, 8, 32)
    -> pool -> Dense (32, 32) -> head Dense (32, 3).

    The first axes 16, 32 and 32 shard 2 ways; the `o` kernel's first axis
    (4) does too, and `lora_layout_map(model=...)` is tested on a 3-way
    split of an (3, ...) kernel below.
    """
    inputs = keras.Input((6, 16))
    x = keras.layers.Dense(32, activation="relu", name="d1")(inputs)
    x = keras.layers.EinsumDense("abc,cde->abde", (6, 4, 8), name="q")(x)
    x = keras.layers.EinsumDense("abde,dec->abc", (6, 32), name="o")(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    x = keras.layers.Dense(32, activation="tanh", name="d2")(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    return keras.Model(inputs, outputs, name="net")


def lora_from(base, weights):
    lora = kl.apply_lora(base, targets=TARGETS, rank=4, alpha=8)
    lora.set_weights(weights)
    return lora


def train(model):
    model.compile(keras.optimizers.Adam(0.01), "mse")
    history = model.fit(X, Y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    return history.history["loss"]


def snapshot(model):
    return [np.array(keras.ops.convert_to_numpy(w)) for w in model.weights]


def max_diff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True))


def reference():
    """The single-device run: initial weights, losses, trained weights."""
    keras.utils.set_random_seed(1)
    base = build()
    base_weights = snapshot(base)
    lora = kl.apply_lora(base, targets=TARGETS, rank=4, alpha=8)
    for _, layer in lora_layers(lora):  # non-zero B: a real update
        layer.lora_b.assign(RNG.normal(0, 0.1, layer.lora_b.shape))
    lora_weights = snapshot(lora)
    prediction = keras.ops.convert_to_numpy(lora.predict(X, verbose=0))
    losses = train(lora)
    return base, base_weights, lora_weights, prediction, losses, snapshot(lora)


def run_jax():
    import jax

    results = {"devices": len(jax.devices())}
    template, base_weights, lora_weights, prediction, losses, trained = reference()
    devices = keras.distribution.list_devices()

    # Data parallel over 4 devices: every variable replicated.
    dp = keras.distribution.DataParallel(devices=devices)
    with dp.scope():
        base = build()
        base.set_weights(base_weights)
        lora = lora_from(base, lora_weights)
        dp_prediction = keras.ops.convert_to_numpy(lora.predict(X, verbose=0))
        dp_losses = train(lora)
    results["data_parallel"] = {
        "prediction_diff": float(np.max(np.abs(dp_prediction - prediction))),
        "loss_diff": max_diff(dp_losses, losses),
        "weight_diff": max_diff(snapshot(lora), trained),
        "replicated": all(
            len(w.value.sharding.device_set) == DEVICES
            and w.value.sharding.is_fully_replicated
            for w in lora.weights
        ),
    }

    # Model parallel: (2 batch) x (2 model); base kernels sharded.
    mesh = keras.distribution.DeviceMesh((2, 2), ["batch", "model"], devices)
    layout_map = kl.lora_layout_map(mesh, model=template)
    mp = keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
    with mp.scope():
        base = build()
        base.set_weights(base_weights)
        lora = lora_from(base, lora_weights)
        mp_prediction = keras.ops.convert_to_numpy(lora.predict(X, verbose=0))
        kernels_before = {
            w.path: np.array(keras.ops.convert_to_numpy(w))
            for w in lora.weights
            if w.path.endswith("/kernel")
        }
        mp_losses = train(lora)
        layouts = {}
        for w in lora.weights:
            sharding = w.value.sharding
            layouts[w.path] = {
                "spec": [a for a in sharding.spec],
                "shape": list(w.shape),
                "shard_shape": list(w.value.addressable_shards[0].data.shape),
            }
        unchanged = all(
            np.array_equal(kernels_before[w.path], keras.ops.convert_to_numpy(w))
            for w in lora.weights
            if w.path in kernels_before
        )
        # `.keras` round trip under the distribution: still sharded.
        path = os.path.join(tempfile.mkdtemp(), "lora.keras")
        lora.save(path)
        reloaded = keras.saving.load_model(path)
        reloaded_specs = {
            w.path: [a for a in w.value.sharding.spec] for w in reloaded.weights
        }
        reloaded_prediction = keras.ops.convert_to_numpy(reloaded.predict(X, verbose=0))
        # An unbuilt Dense built inside its wrapper: path "w/w/kernel".
        inputs = keras.Input((16,))
        wrapped = kl.LoRADense(keras.layers.Dense(8, name="w"), rank=2)
        keras.Model(inputs, wrapped(inputs))
        nested = {w.path: [a for a in w.value.sharding.spec] for w in wrapped.weights}
    results["model_parallel"] = {
        "prediction_diff": float(np.max(np.abs(mp_prediction - prediction))),
        "loss_diff": max_diff(mp_losses, losses),
        "weight_diff": max_diff(snapshot(lora), trained),
        "base_unchanged": bool(unchanged),
        "layouts": layouts,
        "reloaded_specs": reloaded_specs,
        "reloaded_prediction_diff": float(
            np.max(
                np.abs(
                    reloaded_prediction
                    - keras.ops.convert_to_numpy(lora.predict(X, verbose=0))
                )
            )
        ),
        "nested_specs": nested,
    }

    # A 4-way model axis: first axes 16 and 32 divide, the `o` kernel's 4
    # does, the rest too; a (3, 8) kernel does not and must be replicated.
    mesh4 = keras.distribution.DeviceMesh((1, 4), ["batch", "model"], devices)
    odd = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(8, name="odd"), keras.layers.Dense(4)]
    )
    odd_map = kl.lora_layout_map(mesh4, model=odd)
    with keras.distribution.ModelParallel(
        layout_map=odd_map, batch_dim_name="batch"
    ).scope():
        odd2 = keras.Sequential(
            [
                keras.Input((3,)),
                keras.layers.Dense(8, name="odd"),
                keras.layers.Dense(4, name="next"),
            ]
        )
        odd_specs = {w.path: [a for a in w.value.sharding.spec] for w in odd2.weights}
    results["odd_specs"] = odd_specs
    results["kerashub"] = run_kerashub(devices)
    return results


def tiny_llama():
    """A tiny `Llama3CausalLM` (no preprocessor): vocabulary 64, 2 layers,
    hidden 16, 2 query and 2 key/value heads. The sizes make every axis that
    `Llama3Backbone.get_layout_map` shards divisible by 2."""
    import keras_hub

    backbone = keras_hub.models.Llama3Backbone(
        vocabulary_size=64,
        num_layers=2,
        hidden_dim=16,
        num_query_heads=2,
        num_key_value_heads=2,
        intermediate_dim=32,
        name="llama_backbone",
    )
    return keras_hub.models.Llama3CausalLM(backbone=backbone, preprocessor=None)


LLM_TARGETS = ["query", "value", "feedforward_output_dense"]
TOKENS = RNG.integers(1, 64, size=(8, 8)).astype("int32")
LLM_X = {"token_ids": TOKENS, "padding_mask": np.ones_like(TOKENS)}
LLM_Y = np.roll(TOKENS, -1, axis=1)


def train_llm(model):
    model.compile(optimizer=keras.optimizers.Adam(0.01), sampler="greedy")
    history = model.fit(LLM_X, LLM_Y, batch_size=4, epochs=2, shuffle=False, verbose=0)
    return history.history["loss"]


def llm_lora(base_weights, adapter_weights):
    """The tiny LLM with `base_weights`, converted in place, adapters set."""
    model = tiny_llama()
    model.backbone.set_weights(base_weights)
    kl.apply_lora(model, targets=LLM_TARGETS, rank=4, in_place=True)
    for (_, layer), values in zip(lora_layers(model), adapter_weights, strict=True):
        layer.lora_a.assign(values[0])
        layer.lora_b.assign(values[1])
    return model


def run_kerashub(devices):
    """`ModelParallel` with the backbone's own `get_layout_map()` plus the
    adapter keys of `lora_layout_map`, against a single-device run."""
    import keras_hub

    keras.utils.set_random_seed(2)
    base_weights = [np.array(w) for w in tiny_llama().backbone.get_weights()]
    single = tiny_llama()
    single.backbone.set_weights(base_weights)
    kl.apply_lora(single, targets=LLM_TARGETS, rank=4, in_place=True)
    adapters = []
    for _, layer in lora_layers(single):
        layer.lora_b.assign(RNG.normal(0, 0.1, layer.lora_b.shape))
        adapters.append(
            [keras.ops.convert_to_numpy(w) for w in (layer.lora_a, layer.lora_b)]
        )
    prediction = keras.ops.convert_to_numpy(single.predict(LLM_X, verbose=0))
    losses = train_llm(single)
    trained = snapshot(single)

    mesh = keras.distribution.DeviceMesh((2, 2), ["batch", "model"], devices)
    backbone_map = keras_hub.models.Llama3Backbone.get_layout_map(mesh)
    layout_map = kl.lora_layout_map(mesh, layout_map=backbone_map)
    mp = keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
    with mp.scope():
        model = llm_lora(base_weights, adapters)
        mp_prediction = keras.ops.convert_to_numpy(model.predict(LLM_X, verbose=0))
        frozen = {
            w.path: np.array(keras.ops.convert_to_numpy(w))
            for w in model.non_trainable_weights
        }
        mp_losses = train_llm(model)
    specs = [[w.path, [a for a in w.value.sharding.spec]] for w in model.weights]
    expected = {
        path: list(backbone_map[path].axes)
        for path, _ in specs
        if not path.split("/")[-1].startswith("lora_")
        and backbone_map[path] is not None
    }
    return {
        "class": type(model).__name__,
        "prediction_diff": float(np.max(np.abs(mp_prediction - prediction))),
        "loss_diff": max_diff(mp_losses, losses),
        "weight_diff": max_diff(snapshot(model), trained),
        "specs": specs,
        "backbone_specs": expected,
        "base_unchanged": all(
            np.array_equal(frozen[w.path], keras.ops.convert_to_numpy(w))
            for w in model.non_trainable_weights
        ),
    }


def run_tensorflow():
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * DEVICES
    )
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    results = {"devices": len(devices)}
    _, base_weights, lora_weights, prediction, losses, trained = reference()
    strategy = tf.distribute.MirroredStrategy(devices)
    with strategy.scope():
        base = build()
        base.set_weights(base_weights)
        lora = lora_from(base, lora_weights)
        ms_prediction = keras.ops.convert_to_numpy(lora.predict(X, verbose=0))
        kernels_before = [np.array(keras.ops.convert_to_numpy(w)) for w in base.weights]
        ms_losses = train(lora)
    results["mirrored"] = {
        "replicas": strategy.num_replicas_in_sync,
        "prediction_diff": float(np.max(np.abs(ms_prediction - prediction))),
        "loss_diff": max_diff(ms_losses, losses),
        "weight_diff": max_diff(snapshot(lora), trained),
        "mirrored_adapters": all(
            isinstance(w.value, tf.distribute.DistributedValues)
            and len(w.value.values) == DEVICES
            for w in lora.trainable_weights
        ),
        "base_unchanged": all(
            np.array_equal(a, keras.ops.convert_to_numpy(w))
            for a, w in zip(kernels_before, base.weights, strict=True)
        ),
    }
    return results


if __name__ == "__main__":
    result = run_jax() if BACKEND == "jax" else run_tensorflow()
    print("RESULT " + json.dumps(result))
