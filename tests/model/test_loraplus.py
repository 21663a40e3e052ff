"""LoRA+ (`kl.loraplus_optimizer`): the `B` factors step `ratio` times as
far as the same optimizer moves them, everything else as far; `model.fit`
and a `.keras` round trip work; LoRA+ trains faster on a small task."""

import keras
import numpy as np
import pytest
from conftest import mlp, randomize_adapters, to_numpy

import keras_lora as kl

RATIO = 4.0


def _model(variant, seed=0):
    keras.utils.set_random_seed(seed)
    kwargs = {}
    if variant == "dora_named":
        kwargs = {"use_dora": True, "adapter_name": "task"}
    model = kl.apply_lora(mlp(8, 16, 2), targets=["d1", "d2"], rank=4, **kwargs)
    return randomize_adapters(model, scale=0.3, seed=seed)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(16, 8)).astype("float32")
    y = rng.normal(size=(16, 2)).astype("float32")
    return x, y


def _step(model, optimizer):
    """The change one `train_on_batch` makes to each trainable variable."""
    model.compile(optimizer=optimizer, loss="mse")
    before = {v.path: to_numpy(v) for v in model.trainable_variables}
    model.train_on_batch(*_batch())
    assert int(to_numpy(optimizer.iterations)) == 1
    return {p: to_numpy(v) - before[p] for p, v in _paths(model).items()}


def _paths(model):
    return {v.path: v for v in model.trainable_variables}


OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.01),
    # Adam's first step is lr·g/(|g|+eps): linear in the learning rate.
    "adam": lambda: keras.optimizers.Adam(1e-3),
    # Decoupled decay: B's decay uses lr·ratio, as in a torch param group.
    "adamw": lambda: keras.optimizers.AdamW(1e-3, weight_decay=0.1),
    # A schedule: the step's learning rate is a tensor, scaled for B.
    "sgd_schedule": lambda: keras.optimizers.SGD(
        keras.optimizers.schedules.ExponentialDecay(0.01, 10, 0.5)
    ),
    # Nadam keeps one product for all variables, updated once a step.
    "nadam": lambda: keras.optimizers.Nadam(1e-3),
}


@pytest.mark.parametrize("variant", ["lora", "dora_named"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_b_steps_ratio_times_the_plain_optimizer(name, variant):
    plain_optimizer = OPTIMIZERS[name]()
    plus_optimizer = kl.loraplus_optimizer(OPTIMIZERS[name](), RATIO)
    plain = _step(_model(variant), plain_optimizer)
    plus = _step(_model(variant), plus_optimizer)
    if name == "nadam":  # advanced once in the step, not once per group
        np.testing.assert_allclose(
            to_numpy(plus_optimizer._u_product),
            to_numpy(plain_optimizer._u_product),
            rtol=1e-6,
        )
    names = {p.split("/")[-1] for p in plain}
    if variant == "lora":
        assert names == {"lora_a", "lora_b"}
        b_names = {"lora_b"}
    else:
        assert names == {"lora_a_task", "lora_b_task", "lora_magnitude_task"}
        b_names = {"lora_b_task", "lora_magnitude_task"}
    for path, delta in plain.items():
        assert np.abs(delta).max() > 1e-5, path  # every variable moved
        expected = RATIO * delta if path.split("/")[-1] in b_names else delta
        # float32: each delta is w1 - w0 with |w| <~ 1, so each carries
        # about 1e-7 of rounding; the steps are >= 1e-5.
        np.testing.assert_allclose(plus[path], expected, rtol=1e-3, atol=1e-6)


def test_passed_optimizer_is_not_modified_and_config_round_trips():
    base = keras.optimizers.Adam(2e-3, beta_1=0.8)
    config = base.get_config()
    plus = kl.loraplus_optimizer(base, ratio=8)
    assert plus is not base
    assert base.get_config() == config
    assert not hasattr(base, "ratio")
    assert isinstance(plus, keras.optimizers.Adam)
    plus_config = plus.get_config()
    assert plus_config["ratio"] == 8.0
    assert plus_config["beta_1"] == pytest.approx(0.8)
    assert plus_config["learning_rate"] == pytest.approx(2e-3)
    again = type(plus).from_config(plus_config)
    assert again.ratio == 8.0


def test_fit_and_keras_round_trip(tmp_path):
    model = _model("lora")
    optimizer = kl.loraplus_optimizer(keras.optimizers.Adam(1e-3), ratio=16)
    model.compile(optimizer=optimizer, loss="mse")
    x, y = _batch()
    history = model.fit(x, y, epochs=3, batch_size=8, verbose=0)
    assert len(history.history["loss"]) == 3
    assert np.isfinite(history.history["loss"]).all()
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded.optimizer).__name__ == "LoRAPlusAdam"
    assert loaded.optimizer.ratio == 16.0
    np.testing.assert_array_equal(
        to_numpy(loaded.predict(x, verbose=0)), to_numpy(model.predict(x, verbose=0))
    )
    loaded.fit(x, y, epochs=1, batch_size=8, verbose=0)


def _regression_loss(ratio, seed, steps=60):
    """A frozen MLP learns a teacher's output shift through LoRA (B = 0 at
    the start, as usual), full batch, Adam at lr 1e-3 for A."""
    keras.utils.set_random_seed(seed)
    base = mlp(8, 16, 2)
    teacher = kl.apply_lora(base, targets=["d1", "d2"], rank=4)
    randomize_adapters(teacher, scale=0.5, seed=seed + 100)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = to_numpy(teacher.predict(x, verbose=0))
    student = kl.apply_lora(base, targets=["d1", "d2"], rank=4)
    optimizer = keras.optimizers.Adam(1e-3)
    if ratio != 1:
        optimizer = kl.loraplus_optimizer(optimizer, ratio=ratio)
    student.compile(optimizer=optimizer, loss="mse")
    for _ in range(steps):
        loss = student.train_on_batch(x, y)
    return float(np.asarray(loss))


def test_loraplus_trains_faster_than_plain_lora():
    # Measured (seeds 0-4, 60 steps): LoRA+ at ratio 16 ends at
    # 0.19-0.36 of plain LoRA's loss on jax, 0.19-0.37 on tensorflow,
    # 0.12-0.28 on torch;
    # 0.6 leaves room for other seeds and backends' rounding.
    for seed in (0, 1):
        plain = _regression_loss(1, seed)
        plus = _regression_loss(16, seed)
        assert plus < 0.6 * plain, (seed, plus, plain)


@pytest.mark.parametrize("use_dora", [False, True])
def test_one_step_matches_real_peft_create_loraplus_optimizer(tmp_path, use_dora):
    """The same adapter, one Adam step with LoRA+ in both libraries: equal
    A, B (and DoRA magnitude) after the step."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    base = keras.Model(inputs, keras.layers.Dense(5, name="t")(inputs))
    lora = kl.apply_lora(base, targets=["t"], rank=2, alpha=3, use_dora=use_dora)
    randomize_adapters(lora, scale=0.3)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 6)).astype("float32")
    y = rng.normal(size=(16, 5)).astype("float32")

    net = torch.nn.Sequential(torch.nn.Linear(6, 5))
    kernel, bias = (to_numpy(w) for w in base.get_layer("t").weights)
    with torch.no_grad():
        net[0].weight.copy_(torch.from_numpy(kernel.T.copy()))
        net[0].bias.copy_(torch.from_numpy(bias))
    kl.save_adapter(lora, tmp_path / "p", format="peft", name_map={"t": "0"})
    peft_model = peft.PeftModel.from_pretrained(
        net, str(tmp_path / "p"), is_trainable=True
    )
    # torch's Adam puts eps outside the bias correction, Keras's inside;
    # eps = 1e-8 against steps of |g| >~ 1e-3 makes that invisible.
    optimizer = create_loraplus_optimizer(
        peft_model, torch.optim.Adam, lr=1e-3, loraplus_lr_ratio=RATIO, eps=1e-8
    )
    loss = ((peft_model(torch.from_numpy(x)) - torch.from_numpy(y)) ** 2).mean()
    loss.backward()
    optimizer.step()

    lora.compile(
        optimizer=kl.loraplus_optimizer(
            keras.optimizers.Adam(1e-3, epsilon=1e-8), ratio=RATIO
        ),
        loss="mse",
    )
    lora.train_on_batch(x, y)
    layer = lora.get_layer("t")
    peft_layer = peft_model.base_model.model[0]
    pairs = [
        (layer.lora_a, peft_layer.lora_A["default"].weight.T),
        (layer.lora_b, peft_layer.lora_B["default"].weight.T),
    ]
    if use_dora:
        pairs.append(
            (
                next(w for w in layer.weights if w.name == "lora_magnitude"),
                peft_layer.lora_magnitude_vector["default"].weight,
            )
        )
    for ours, theirs in pairs:
        # One Adam step is ~lr (ratio·lr for B) per element; 1e-6 is float32
        # rounding of weights ~1 plus the eps placement above.
        np.testing.assert_allclose(
            to_numpy(ours), theirs.detach().numpy(), atol=2e-6, err_msg=ours.path
        )
