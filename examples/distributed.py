"""keras_lora on several devices, with Keras's and TensorFlow's own engines.

JAX backend (the default here):
  1. `keras.distribution.DataParallel`: every variable replicated, the batch
     split over the devices.
  2. `keras.distribution.ModelParallel` with `kl.lora_layout_map`: the frozen
     base kernels sharded over a "model" mesh axis, the adapters replicated.
TensorFlow backend: `tf.distribute.MirroredStrategy`.
Torch backend: Keras has no distribution API there; this script says so.

With no accelerators it makes 4 virtual CPU devices, which must happen
before the backend starts:

    KERAS_BACKEND=jax python examples/distributed.py
    KERAS_BACKEND=tensorflow python examples/distributed.py

On real accelerators leave the device setup out and use every device.
"""

import os

DEVICES = 4
BACKEND = os.environ.setdefault("KERAS_BACKEND", "jax")
if BACKEND == "jax":
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={DEVICES}"
    ).strip()

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_lora as kl  # noqa: E402

rng = np.random.default_rng(0)
x = rng.normal(size=(512, 64)).astype("float32")
y = (x @ rng.normal(size=(64, 8)) > 0).astype("float32")


def build_base():
    """A small pretrained-looking MLP; the 256-wide kernels get sharded."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,))
    h = keras.layers.Dense(256, activation="gelu", name="up")(inputs)
    h = keras.layers.Dense(256, activation="gelu", name="mid")(h)
    outputs = keras.layers.Dense(8, name="head")(h)
    return keras.Model(inputs, outputs, name="base")


def fine_tune(base):
    lora = kl.apply_lora(base, rank=8, trainable=["head"])
    kl.trainable_summary(lora)
    lora.compile(
        keras.optimizers.Adam(1e-2),
        keras.losses.BinaryCrossentropy(from_logits=True),
    )
    history = lora.fit(x, y, batch_size=64, epochs=3, verbose=2)
    return lora, history.history["loss"]


def show_layouts(model):
    for w in model.weights:
        sharding = w.value.sharding
        local = w.value.addressable_shards[0].data.shape
        print(
            f"  {w.path:14s} {str(tuple(w.shape)):11s} spec={sharding.spec} "
            f"per-device {tuple(local)}"
        )


def jax_main():
    devices = keras.distribution.list_devices()
    print(f"{len(devices)} devices: {devices}")

    print("\n== DataParallel ==")
    with keras.distribution.DataParallel(devices=devices).scope():
        _, losses = fine_tune(build_base())
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")

    print("\n== ModelParallel: 2-way data x 2-way model ==")
    mesh = keras.distribution.DeviceMesh((2, 2), ["batch", "model"], devices)
    # The model tells the helper which first axes do not divide by 2; here
    # all do. Print the regexes it uses:
    layout_map = kl.lora_layout_map(mesh, model=build_base())
    for key, layout in layout_map.items():
        print(f"  {key!r:28s} -> {layout.axes}")
    distribution = keras.distribution.ModelParallel(
        layout_map=layout_map, batch_dim_name="batch"
    )
    with distribution.scope():  # variables are placed as they are created
        lora, losses = fine_tune(build_base())
        show_layouts(lora)
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")


def tensorflow_main():
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * DEVICES
    )
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    strategy = tf.distribute.MirroredStrategy(devices)
    print(f"\n== MirroredStrategy over {strategy.num_replicas_in_sync} replicas ==")
    with strategy.scope():  # build, convert and compile inside the scope
        lora, losses = fine_tune(build_base())
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")


if __name__ == "__main__":
    if BACKEND == "jax":
        jax_main()
    elif BACKEND == "tensorflow":
        tensorflow_main()
    else:
        print(
            f"The {BACKEND} backend has no Keras distribution API; run this "
            "example with KERAS_BACKEND=jax or tensorflow."
        )
