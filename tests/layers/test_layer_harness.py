"""Every LoRA layer type passes Keras's own layer harness, as Keras's layers
do: `keras.src.testing.TestCase.run_layer_test` checks serialization
(`get_config`/`from_config`), symbolic and eager calls, output shapes and
dtypes, weight counts, a compiled training step and mixed precision
(`mixed_float16`; Keras skips that check on torch CPU).

Each case wraps a fresh base layer; the harness instantiates the LoRA layer
several times over that one base, which a LoRA layer allows (the base is
frozen and never written).
"""

import keras
import keras_hub
from absl.testing import parameterized
from keras.src import testing

import keras_lora as kl

# name, LoRA-layer options, trainable weights at rank 2 (A, B, DoRA's m)
VARIANTS = (
    ("plain", {}, 2),
    ("rslora", {"use_rslora": True, "alpha": 4}, 2),
    ("dora", {"use_dora": True}, 3),
    ("pissa", {"init": "pissa"}, 2),
    ("gaussian_dropout", {"init": "gaussian", "dropout": 0.1}, 2),
)


def _non_trainable(base_weights, options):
    # PiSSA/OLoRA keep a residual kernel of their own (non-trainable).
    return base_weights + (1 if options.get("init") in ("pissa", "olora") else 0)


class LoRADenseTest(testing.TestCase):
    @parameterized.named_parameters(*VARIANTS)
    def test_harness(self, options, trainable):
        self.run_layer_test(
            kl.LoRADense,
            init_kwargs={"layer": keras.layers.Dense(5), "rank": 2, **options},
            input_shape=(2, 3, 4),
            expected_output_shape=(2, 3, 5),
            expected_num_trainable_weights=trainable,
            expected_num_non_trainable_weights=_non_trainable(2, options),
            expected_num_seed_generators=1 if options.get("dropout") else 0,
            supports_masking=True,
        )


class LoRAEinsumDenseTest(testing.TestCase):
    @parameterized.named_parameters(
        *[
            (f"{name}_{f}", options, n, f)
            for name, options, n in VARIANTS
            for f in ("standard", "keras")
        ]
    )
    def test_harness(self, options, trainable, factoring):
        base = keras.layers.EinsumDense("abc,cde->abde", (3, 2, 4), bias_axes="de")
        self.run_layer_test(
            kl.LoRAEinsumDense,
            init_kwargs={"layer": base, "rank": 2, "factoring": factoring, **options},
            input_shape=(2, 3, 5),
            expected_output_shape=(2, 3, 2, 4),
            expected_num_trainable_weights=trainable,
            expected_num_non_trainable_weights=_non_trainable(2, options),
            supports_masking=True,
        )


class LoRAEmbeddingTest(testing.TestCase):
    @parameterized.named_parameters(*VARIANTS)
    def test_harness(self, options, trainable):
        self.run_layer_test(
            kl.LoRAEmbedding,
            init_kwargs={"layer": keras.layers.Embedding(10, 6), "rank": 2, **options},
            input_dtype="int32",
            input_shape=(2, 3),
            expected_output_shape=(2, 3, 6),
            expected_num_trainable_weights=trainable,
            expected_num_non_trainable_weights=_non_trainable(1, options),
        )

    def test_harness_reversible_embedding_reverse(self):
        table = keras_hub.layers.ReversibleEmbedding(10, 6, tie_weights=True)
        table.build((None,))
        self.run_layer_test(
            kl.LoRAEmbedding,
            init_kwargs={"layer": table, "rank": 2},
            input_shape=(2, 3, 6),
            call_kwargs={"reverse": True},
            expected_output_shape=(2, 3, 10),
            expected_num_trainable_weights=2,
            expected_num_non_trainable_weights=1,
        )


class LoRAConvTest(testing.TestCase):
    @parameterized.named_parameters(*VARIANTS)
    def test_harness(self, options, trainable):
        self.run_layer_test(
            kl.LoRAConv,
            init_kwargs={
                "layer": keras.layers.Conv2D(4, 3, padding="same"),
                "rank": 2,
                **options,
            },
            input_shape=(2, 5, 5, 3),
            expected_output_shape=(2, 5, 5, 4),
            expected_num_trainable_weights=trainable,
            expected_num_non_trainable_weights=_non_trainable(2, options),
        )
