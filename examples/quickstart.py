"""keras_lora quickstart: pretrain, adapt with LoRA, merge, export.

1. Pretrain a small MLP classifier on task A.
2. Convert it with `apply_lora`: only the low-rank adapters train.
3. Fine-tune on task B, a shifted version of task A.
4. Print trainable vs total parameters and accuracy before and after.
5. Merge, export a TensorFlow SavedModel, reload it, print the max difference.

Runs offline on any backend (`KERAS_BACKEND=tensorflow|jax|torch`); the
SavedModel export needs `tensorflow` installed. Data is generated here.
"""

import os
import tempfile

import keras
import numpy as np

import keras_lora as kl

FEATURES, CLASSES = 32, 4


def make_task(teacher, shift, n, rng):
    """Labels from a fixed random teacher, seen through an input shift."""
    x = rng.normal(size=(n, FEATURES)).astype("float32")
    y = np.argmax(np.tanh(x @ shift @ teacher[0]) @ teacher[1], axis=1)
    return x, y


def main():
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    teacher = (rng.normal(size=(FEATURES, 64)), rng.normal(size=(64, CLASSES)))
    identity = np.eye(FEATURES)
    # Task B: the same teacher behind a low-rank change of the inputs, the
    # kind of shift a rank-4 update of the first layer can absorb.
    u, v = rng.normal(size=(FEATURES, 4)), rng.normal(size=(4, FEATURES))
    shift = identity + 0.35 * u @ v / np.sqrt(FEATURES)
    x_a, y_a = make_task(teacher, identity, 8_000, rng)
    x_b, y_b = make_task(teacher, shift, 4_000, rng)
    x_b_test, y_b_test = make_task(teacher, shift, 2_000, rng)

    inputs = keras.Input((FEATURES,), name="features")
    x = keras.layers.Dense(256, activation="relu", name="dense_1")(inputs)
    x = keras.layers.Dense(256, activation="relu", name="dense_2")(x)
    outputs = keras.layers.Dense(CLASSES, name="head")(x)
    model = keras.Model(inputs, outputs)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    print("1. Pretraining on task A")
    model.compile(keras.optimizers.Adam(1e-3), loss, metrics=["accuracy"])
    model.fit(x_a, y_a, epochs=6, batch_size=64, validation_split=0.1)

    print("\n2. Converting with apply_lora (rank 4, alpha 8)")
    print("full fine-tuning would train:", end=" ")
    kl.trainable_summary(model)
    lora_model = kl.apply_lora(model, rank=4, alpha=8)
    print("LoRA trains:", end=" ")
    kl.trainable_summary(lora_model)

    print("\n3. Fine-tuning on task B")
    lora_model.compile(keras.optimizers.Adam(3e-3), loss, metrics=["accuracy"])
    _, before = lora_model.evaluate(x_b_test, y_b_test, verbose=0)
    lora_model.fit(x_b, y_b, epochs=8, batch_size=64, validation_split=0.1)
    _, after = lora_model.evaluate(x_b_test, y_b_test, verbose=0)
    print(f"\n4. Task B test accuracy: before {before:.3f} -> after {after:.3f}")

    print("\n5. Merging and exporting a SavedModel")
    out_dir = os.path.join(tempfile.mkdtemp(), "quickstart_saved_model")
    kl.export(lora_model, out_dir)
    import tensorflow as tf

    reloaded = tf.saved_model.load(out_dir)
    served = reloaded.serve(tf.constant(x_b_test)).numpy()
    expected = lora_model.predict(x_b_test, verbose=0)
    print(f"SavedModel at {out_dir}")
    print(f"max |SavedModel - LoRA model| = {np.abs(served - expected).max():.2e}")


if __name__ == "__main__":
    main()
