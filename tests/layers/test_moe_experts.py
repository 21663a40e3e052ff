"""`LoRAMoeExperts`: Keras's layer harness, exact outputs at init, the
per-expert math against a NumPy loop over the experts, the exact merge, the
reversible merge, the choice of weights, and the refusals.

Tolerances: the unmerged path (`x·W_e + s·(x·A_e)·B_e`) and the merged
weights (`x·(W_e + s·A_e·B_e)`) sum the same float32 products in different
orders; 1e-5 on outputs of order 1 is float32 rounding, while the adapters
below move the outputs by more than 0.05.
"""

import keras
import numpy as np
import pytest
from absl.testing import parameterized
from conftest import to_numpy
from keras.src import testing
from keras_hub.src.models.gpt_oss.gpt_oss_decoder import GptOssExperts
from keras_hub.src.models.mixtral.mixtral_decoder import MixtralMoeExperts
from keras_hub.src.models.qwen3_5_moe.qwen3_5_moe_decoder import Qwen3_5MoeExperts
from keras_hub.src.models.qwen3_moe.qwen3_moe_decoder import Qwen3MoeExperts
from keras_hub.src.models.qwen_moe.qwen_moe_decoder import QwenMoeExperts

import keras_lora as kl
from keras_lora.layers import LoRAMoeExperts, lora_class_for

EXPERTS, HIDDEN, INTER, TOKENS = 3, 8, 6, 5

# family -> (KerasHub experts class, its weights' roles, 3-D weights held)
FAMILIES = {
    "mixtral": (MixtralMoeExperts, ["gate", "up", "down"], 3),
    "qwen_moe": (QwenMoeExperts, ["gate_up", "down"], 2),
    "qwen3_moe": (Qwen3MoeExperts, ["gate_up", "down"], 2),
    "qwen3_5_moe": (Qwen3_5MoeExperts, ["gate_up", "down"], 2),
    "gpt_oss": (GptOssExperts, ["gate_up", "down"], 2),
}


def experts(family, build=True):
    cls = FAMILIES[family][0]
    layer = cls(
        num_experts=EXPERTS,
        hidden_dim=HIDDEN,
        intermediate_dim=INTER,
        kernel_initializer=keras.initializers.GlorotUniform(),
        name="experts",
    )
    if build:
        layer.build((None, HIDDEN))
        if family == "gpt_oss":  # non-zero biases, so that they are tested
            rng = np.random.default_rng(3)
            for bias in (layer.gate_up_proj_bias, layer.down_proj_bias):
                bias.assign(rng.normal(0, 0.1, bias.shape).astype("float32"))
    return layer


def tokens(seed=0):
    return np.random.default_rng(seed).normal(size=(TOKENS, HIDDEN)).astype("float32")


def randomize(lora, seed=1):
    rng = np.random.default_rng(seed)
    for w in (lora.lora_a, lora.lora_b):
        w.assign(rng.normal(0, 0.3, w.shape).astype("float32"))


class LoRAMoeExpertsTest(testing.TestCase):
    @parameterized.named_parameters(
        ("plain", {}),
        ("rslora", {"use_rslora": True, "alpha": 4}),
        ("gaussian_dropout", {"init": "gaussian", "dropout": 0.1}),
    )
    def test_harness(self, options):
        self.run_layer_test(
            LoRAMoeExperts,
            init_kwargs={"layer": experts("mixtral"), "rank": 2, **options},
            input_shape=(TOKENS, HIDDEN),
            expected_output_shape=(EXPERTS, TOKENS, HIDDEN),
            expected_num_trainable_weights=2,
            expected_num_non_trainable_weights=3,
            expected_num_seed_generators=1 if options.get("dropout") else 0,
        )


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_selected_and_exact_at_init(family):
    base = experts(family)
    assert lora_class_for(base) is LoRAMoeExperts
    lora = LoRAMoeExperts(base, rank=2)
    assert lora.expert_weights == FAMILIES[family][1]
    x = tokens()
    np.testing.assert_array_equal(to_numpy(lora(x)), to_numpy(base(x)))
    # Only A and B train; the 3-D weights (and GPT-OSS's biases) are frozen.
    assert [w.name for w in lora.trainable_weights] == ["lora_a", "lora_b"]
    assert not base.trainable_weights


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_per_expert_update_and_exact_merge(family):
    base = experts(family)
    lora = LoRAMoeExperts(base, rank=2, alpha=4)  # scale 2
    randomize(lora)
    x = tokens()
    got = to_numpy(lora(x))

    merged = lora.merged_layer()
    assert type(merged) is type(base) and merged.name == "experts"
    expected = to_numpy(merged(x))
    assert np.abs(expected - to_numpy(base(x))).max() > 0.05
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

    # Each weight's update, expert by expert: W_e + 2·A_e·B_e, its factors
    # side by side in lora_a (input axis) and lora_b (output axis).
    a, b = to_numpy(lora.lora_a), to_numpy(lora.lora_b)
    start_in = start_out = 0
    for role, kernel in lora.base_kernels.items():
        kernel = to_numpy(kernel)
        size_in, size_out = kernel.shape[1:]
        roles = zip(lora.expert_weights, merged_kernels(merged), strict=True)
        new = to_numpy(dict(roles)[role])
        for e in range(EXPERTS):
            a_e = a[e, start_in : start_in + size_in, :]
            b_e = b[:, e, start_out : start_out + size_out]
            np.testing.assert_allclose(
                new[e], kernel[e] + 2.0 * a_e @ b_e, rtol=1e-6, atol=1e-6
            )
        start_in, start_out = start_in + size_in, start_out + size_out
    assert start_in == a.shape[1] and start_out == b.shape[2]
    # The biases are the base's.
    for w, v in zip(base.weights, merged.weights, strict=True):
        if len(w.shape) == 2:
            np.testing.assert_array_equal(to_numpy(w), to_numpy(v))


def merged_kernels(layer):
    """The 3-D weights of a plain experts layer, in role order."""
    return [w for w in layer.weights if len(w.shape) == 3]


def test_reversible_merge_and_unmerge_are_exact():
    base = experts("mixtral")
    lora = LoRAMoeExperts(base, rank=2)
    randomize(lora)
    x = tokens()
    before = to_numpy(lora(x))
    kernels = [to_numpy(w).copy() for w in base.weights]
    lora.merge()
    assert lora.merged
    np.testing.assert_allclose(to_numpy(lora(x)), before, rtol=1e-5, atol=1e-5)
    lora.unmerge()
    np.testing.assert_array_equal(to_numpy(lora(x)), before)
    for w, k in zip(base.weights, kernels, strict=True):
        np.testing.assert_array_equal(to_numpy(w), k)


def test_delta_is_per_weight_and_per_adapter():
    lora = LoRAMoeExperts(experts("qwen3_moe"), rank=2)
    randomize(lora)
    lora.add_adapter("other", rank=3)
    deltas = lora.delta()
    assert sorted(deltas) == ["down", "gate_up"]
    assert tuple(deltas["gate_up"].shape) == (EXPERTS, HIDDEN, 2 * INTER)
    assert tuple(deltas["down"].shape) == (EXPERTS, INTER, HIDDEN)
    # The new adapter has B = 0: its delta is zero, the default one's is not.
    assert np.abs(to_numpy(lora.delta("other")["down"])).max() == 0.0
    assert np.abs(to_numpy(deltas["down"])).max() > 0.01
    lora.set_active_adapters(["default", "other"])
    np.testing.assert_array_equal(
        to_numpy(lora.delta()["down"]), to_numpy(deltas["down"])
    )


def test_expert_weights_subset():
    base = experts("mixtral")
    lora = LoRAMoeExperts(base, rank=2, expert_weights=["down"])
    assert lora.expert_weights == ["down"]
    assert tuple(lora.lora_a.shape) == (EXPERTS, INTER, 2)
    assert tuple(lora.lora_b.shape) == (2, EXPERTS, HIDDEN)
    randomize(lora)
    merged = lora.merged_layer()
    gate, up, down = merged_kernels(merged)
    np.testing.assert_array_equal(to_numpy(gate), to_numpy(base.weights[0]))
    np.testing.assert_array_equal(to_numpy(up), to_numpy(base.weights[1]))
    assert np.abs(to_numpy(down) - to_numpy(base.weights[2])).max() > 0.01
    x = tokens()
    np.testing.assert_allclose(
        to_numpy(lora(x)), to_numpy(merged(x)), rtol=1e-5, atol=1e-5
    )
    config = lora.get_config()
    assert config["expert_weights"] == ["down"]
    assert LoRAMoeExperts.from_config(config).expert_weights == ["down"]


def test_gradient_reaches_the_adapters_only():
    base = experts("mixtral")
    lora = LoRAMoeExperts(base, rank=2)
    inputs = keras.Input((HIDDEN,), batch_size=TOKENS)
    # The tokens are the batch: (experts, tokens, hidden) -> tokens first.
    model = keras.Model(inputs, keras.ops.moveaxis(lora(inputs), 0, 1))
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    kernels = [to_numpy(w).copy() for w in base.weights]
    target = np.ones((TOKENS, EXPERTS, HIDDEN), "float32")
    model.fit(tokens(), target, epochs=1, batch_size=TOKENS, verbose=0)
    assert np.abs(to_numpy(lora.lora_b)).max() > 0
    for w, k in zip(base.weights, kernels, strict=True):
        np.testing.assert_array_equal(to_numpy(w), k)


def test_bad_input():
    with pytest.raises(ValueError, match="rank"):
        LoRAMoeExperts(experts("mixtral"), rank=0)
    with pytest.raises(ValueError, match="not built"):
        LoRAMoeExperts(experts("mixtral", build=False), rank=2)
    with pytest.raises(TypeError, match="LoRAMoeExperts wraps a KerasHub experts"):
        LoRAMoeExperts(keras.layers.Dense(4), rank=2)
    with pytest.raises(ValueError, match="expert_weights"):
        LoRAMoeExperts(experts("qwen3_moe"), rank=2, expert_weights=["gate"])
    with pytest.raises(ValueError, match="expert_weights"):
        LoRAMoeExperts(experts("mixtral"), rank=2, expert_weights=[])
    with pytest.raises(ValueError, match="DoRA"):
        LoRAMoeExperts(experts("mixtral"), rank=2, use_dora=True)
    with pytest.raises(ValueError, match="pissa"):
        LoRAMoeExperts(experts("mixtral"), rank=2, init="pissa")
    lora = LoRAMoeExperts(experts("mixtral"), rank=2)
    with pytest.raises(ValueError, match="DoRA"):
        lora.add_adapter("d", use_dora=True)
    assert lora.adapter_names == ["default"]
    with pytest.raises(TypeError, match="already a LoRA layer"):
        LoRAMoeExperts(lora, rank=2)


def test_merge_refuses_non_finite():
    lora = LoRAMoeExperts(experts("mixtral"), rank=2)
    lora.lora_b.assign(np.full(lora.lora_b.shape, np.inf, "float32"))
    with pytest.raises(ValueError, match="NaN or Inf"):
        lora.merged_layer()
    assert type(lora.merged_layer(check_finite=False)) is MixtralMoeExperts


def test_exported_from_the_package():
    assert kl.LoRAMoeExperts is LoRAMoeExperts
