"""A merged model shares no array with the LoRA model it came from.

On JAX, `Variable.assign` keeps the very array it is given and a jitted
Keras step donates its variables' buffers: had `merge_lora` assigned the
LoRA model's arrays to the merged model, the merged model's `predict`
would delete the LoRA model's weights ("Array has been deleted").
"""

import keras
import numpy as np
from tiny_kerashub import gpt2_causal_lm

import keras_lora as kl


def test_predict_on_the_merged_model_leaves_the_lora_model_intact():
    task = gpt2_causal_lm()
    kl.apply_lora(task, targets=["query"], rank=2, in_place=True)
    inputs = {"token_ids": np.ones((2, 8), "int32"), "padding_mask": np.ones((2, 8))}
    before = keras.ops.convert_to_numpy(task.backbone(inputs))
    merged = kl.merge_lora(task)
    merged.backbone.predict(inputs, verbose=0)  # jitted: donates its buffers
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(task.backbone(inputs)), before
    )
