"""`combine_adapters`' methods against real PEFT's `add_weighted_adapter`.

The same three adapters sit on a Keras model (keras_lora) and on the same
model in torch (PEFT, loaded from keras_lora's PEFT-format files): an MLP
(Dense/Linear), an Embedding and a Conv2D. Both libraries combine them with
every method, and each layer's update `scale·A·B` must agree.
"""

import keras
import numpy as np
import pytest

import keras_lora as kl
from keras_lora.model import combine
from keras_lora.model.surgery import lora_layers

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
merge_utils = pytest.importorskip("peft.utils.merge_utils")

# name: (rank, alpha, use_rslora). "one" and "two" share a rank, as PEFT's
# factor methods need; "three" has another, for "cat" and the SVD methods.
ADAPTERS = {"one": (4, 6, False), "two": (4, 8, True), "three": (2, 3, False)}
# Float32 factors of size ~0.5 give updates of size ~1. Both libraries
# compute in float32 but in different orders (sums, the weights' square
# roots, torch's and LAPACK's SVD), so updates agree to some float32 ulps of
# their size; 3e-5 is ~4x the largest difference measured (7.6e-6, the
# Embedding's DARE-ties SVD case).
ATOL = 3e-5


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def _t(m):
    return m.T


def _same(m):
    return m


# How a layer type's tensors sit in PEFT, from ours as `combine` holds them:
# A `(fan_in, rank)`, B `(rank, fan_out)`, an update `(fan_in, fan_out)`.
LINEAR = {"a": _t, "b": _t, "delta": _t}  # PEFT: (rank, in), (out, rank), (out, in)
EMBEDDING = {"a": _t, "b": _t, "delta": _same}  # the update is (num, dim) in both
CONV2D = {  # Keras (kh, kw, in, out) against torch (out, in, kh, kw)
    "a": lambda m: m.reshape(3, 3, 3, -1).transpose(3, 2, 0, 1),
    "b": lambda m: m.T[:, :, None, None],
    "delta": lambda m: m.reshape(3, 3, 3, 4).transpose(3, 2, 0, 1),
}


class Embedder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(20, 8)

    def forward(self, ids):
        return self.emb(ids)


def mlp_pair():
    inputs = keras.Input((6,))
    x = keras.layers.Dense(8, activation="relu", name="fc1")(inputs)
    x = keras.layers.Dense(10, activation="relu", name="fc2")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(x))
    net = torch.nn.Sequential(
        torch.nn.Linear(6, 8),
        torch.nn.ReLU(),
        torch.nn.Linear(8, 10),
        torch.nn.ReLU(),
        torch.nn.Linear(10, 3),
    )
    return model, net, {"fc1": ("0", LINEAR), "fc2": ("2", LINEAR)}


def embedding_pair():
    inputs = keras.Input((5,), dtype="int32")
    model = keras.Model(inputs, keras.layers.Embedding(20, 8, name="emb")(inputs))
    return model, Embedder(), {"emb": ("emb", EMBEDDING)}


def conv2d_pair():
    inputs = keras.Input((6, 6, 3))
    model = keras.Model(inputs, keras.layers.Conv2D(4, 3, name="conv")(inputs))
    net = torch.nn.Sequential()
    net.add_module("conv", torch.nn.Conv2d(3, 4, 3))
    return model, net, {"conv": ("conv", CONV2D)}


def keras_mlp():
    return mlp_pair()[0]


@pytest.fixture(
    params=[mlp_pair, embedding_pair, conv2d_pair], ids=lambda f: f.__name__
)
def models(request, tmp_path):
    """`(lora, peft_model, layers)`: the same three adapters in both
    libraries; `layers` maps each targeted Keras layer to its torch module
    and layout. The base weights play no part: only updates are compared."""
    model, net, layers = request.param()
    lora = kl.apply_lora(
        model, targets=list(layers), rank=4, alpha=6, adapter_name="one"
    )
    for name, (rank, alpha, rslora) in ADAPTERS.items():
        if name != "one":
            kl.add_adapter(lora, name, rank=rank, alpha=alpha, use_rslora=rslora)
    rng = np.random.default_rng(0)
    for _, layer in lora_layers(lora):
        for name in ADAPTERS:
            adapter = layer.get_adapter(name)
            for v in (adapter.a, adapter.b):
                v.assign(rng.normal(0, 0.5, v.shape).astype("float32"))
    peft_model = None
    name_map = {path: module for path, (module, _) in layers.items()}
    for name in ADAPTERS:
        directory = tmp_path / name
        kl.save_adapter(lora, directory, format="peft", adapter=name, name_map=name_map)
        if peft_model is None:
            peft_model = peft.PeftModel.from_pretrained(
                net, str(directory), adapter_name=name
            )
        else:
            peft_model.load_adapter(str(directory), adapter_name=name)
    # The transfer itself is exact: each adapter's update is the same.
    for name in ADAPTERS:
        for ours, theirs in zip(
            keras_deltas(lora, name, layers),
            peft_deltas(peft_model, name, layers),
            strict=True,
        ):
            np.testing.assert_allclose(ours, theirs, atol=1e-6)
    return lora, peft_model, layers


def keras_deltas(lora, name, layers=None):
    """Each targeted layer's `scale·A·B` of adapter `name`, in float64, in
    PEFT's layout (`layers`; `None`: ours, `(fan_in, fan_out)`)."""
    deltas = []
    for path, layer in sorted(lora_layers(lora), key=lambda p: p[0]):
        adapter = layer.get_adapter(name)
        a, b = (_np(v).astype(np.float64) for v in (adapter.a, adapter.b))
        delta = (
            adapter.scale_value
            * a.reshape(-1, adapter.rank)
            @ b.reshape(adapter.rank, -1)
        )
        deltas.append(delta if layers is None else layers[path][1]["delta"](delta))
    return deltas


def peft_deltas(peft_model, name, layers):
    """PEFT's `get_delta_weight(name)` of each targeted layer."""
    net = peft_model.base_model.model
    with torch.no_grad():
        return [
            net.get_submodule(layers[path][0]).get_delta_weight(name).numpy()
            for path in sorted(layers)
        ]


class SharedMasks:
    """DARE draws random masks: ours from NumPy (`seed`), PEFT's from
    `torch.bernoulli`. To compare the arithmetic around the draw, the test
    records the masks ours draws and feeds PEFT those masks, put in its
    layouts, through a `random_pruning` with PEFT's own body
    (`tensor * mask`, then `/ density`). Both draw one mask per tensor in
    the same order (layer by layer: the A factors, then the B factors; or
    the updates, for the SVD methods), which the shape check and the
    emptied queue confirm."""

    def __init__(self, monkeypatch, layers, count, svd):
        self.masks = []
        # The layout of each mask, in the order both libraries draw them.
        self.layouts = []
        for path in sorted(layers):
            kind = layers[path][1]
            parts = ["delta"] if svd else ["a", "b"]
            self.layouts += [kind[part] for part in parts for _ in range(count)]
        original = combine.bernoulli_mask

        def record(rng, shape, density):
            mask = original(rng, shape, density)
            self.masks.append(mask)
            return mask

        def replay(tensor, density, rescale):
            layout = self.layouts.pop(0)
            mask = torch.from_numpy(np.ascontiguousarray(layout(self.masks.pop(0))))
            assert tuple(mask.shape) == tuple(tensor.shape)
            pruned = tensor * mask
            return pruned / density if rescale else pruned

        monkeypatch.setattr(combine, "bernoulli_mask", record)
        monkeypatch.setattr(merge_utils, "random_pruning", replay)


def same_svd_signs(monkeypatch):
    """An SVD's signs are arbitrary, and torch's differ from NumPy's;
    `svd_clamp`'s quantile sees them. Ours fixes them (`svd_flip`: each
    `u_i`'s largest entry positive); PEFT's SVD gets the same rule here, so
    that the clamp's arithmetic is what is compared."""
    svd = torch.linalg.svd

    def flipped(matrix, *args, **kwargs):
        u, s, vh = svd(matrix, *args, **kwargs)
        k = s.shape[-1]
        signs = torch.sign(u[u[:, :k].abs().argmax(dim=0), torch.arange(k)])
        signs[signs == 0] = 1
        u, vh = u.clone(), vh.clone()
        u[:, :k] *= signs
        vh[:k] *= signs[:, None]
        return u, s, vh

    monkeypatch.setattr(torch.linalg, "svd", flipped)


TWO = {"one": 0.7, "two": -0.4}
THREE = {"one": 0.7, "two": -0.4, "three": 1.3}
CASES = [
    ("cat", THREE, {}),
    ("linear", TWO, {}),
    # One adapter: PEFT's linear rule, whatever the method (rank 2, no pruning).
    ("linear", {"three": -0.6}, {}),
    ("svd", {"three": -0.6}, {"svd_rank": 1}),
    ("ties", {"one": 0.8}, {"density": 0.5}),
    ("svd", THREE, {}),
    ("svd", THREE, {"svd_rank": 3, "svd_clamp": 0.9}),
    ("ties", TWO, {"density": 0.5}),
    ("ties", TWO, {"density": 0.3, "majority_sign_method": "frequency"}),
    ("ties_svd", THREE, {"density": 0.6}),
    ("dare_linear", TWO, {"density": 0.5, "seed": 1}),
    ("dare_linear_svd", THREE, {"density": 0.7, "seed": 2}),
    ("dare_ties", TWO, {"density": 0.6, "seed": 3}),
    ("dare_ties_svd", THREE, {"density": 0.4, "seed": 4, "svd_rank": 2}),
    ("magnitude_prune", TWO, {"density": 0.4}),
    ("magnitude_prune", TWO, {"density": 1.0}),  # prunes nothing: linear
    ("magnitude_prune_svd", THREE, {"density": 0.5}),
]


@pytest.mark.parametrize(
    "method, weights, options",
    CASES,
    ids=[
        f"{m}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'plain'}-{len(w)}"
        for m, w, o in CASES
    ],
)
def test_matches_peft_add_weighted_adapter(
    models, monkeypatch, method, weights, options
):
    lora, peft_model, layers = models
    if "dare" in method:
        masks = SharedMasks(monkeypatch, layers, len(weights), method.endswith("svd"))
    if "svd_clamp" in options:
        same_svd_signs(monkeypatch)
    kl.combine_adapters(lora, weights, name="mix", method=method, **options)
    peft_options = {k: v for k, v in options.items() if k != "seed"}
    peft_model.add_weighted_adapter(
        list(weights),
        list(weights.values()),
        "mix",
        combination_type=method,
        **peft_options,
    )
    if "dare" in method:
        assert masks.masks == [] and masks.layouts == []  # PEFT used them all
    ours = keras_deltas(lora, "mix", layers)
    theirs = peft_deltas(peft_model, "mix", layers)
    worst = max(np.abs(o - t).max() for o, t in zip(ours, theirs, strict=True))
    print(f"{method} {options}: max |ours - peft| = {worst:.2e}")
    for o, t in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(o, t, atol=ATOL)
    # The combination is not trivially zero or one adapter's update.
    assert all(np.abs(o).max() > 0.1 for o in ours)
    if len(weights) > 1:
        for name in weights:
            assert np.abs(ours[0] - keras_deltas(lora, name, layers)[0]).max() > 1e-3
    density = options.get("density", 1.0)
    if density < 1 and len(weights) > 1:  # the pruning did something
        plain = "svd" if method.endswith("_svd") else "linear"
        kl.combine_adapters(lora, weights, name="unpruned", method=plain)
        pairs = zip(ours, keras_deltas(lora, "unpruned", layers), strict=True)
        assert max(np.abs(o - u).max() for o, u in pairs) > 1e-2
    if "svd_clamp" in options:  # the clamp did something
        kl.combine_adapters(
            lora, weights, name="unclamped", method=method, svd_rank=options["svd_rank"]
        )
        pairs = zip(ours, keras_deltas(lora, "unclamped", layers), strict=True)
        assert max(np.abs(o - u).max() for o, u in pairs) > 1e-2
    # Same rank, scale 1 (PEFT: r = lora_alpha).
    net = peft_model.base_model.model
    for path, layer in lora_layers(lora):
        adapter = layer.get_adapter("mix")
        module = net.get_submodule(layers[path][0])
        assert adapter.rank == module.r["mix"] and adapter.scale_value == 1.0
        assert module.scaling["mix"] == 1.0
        assert "mix" not in layer.active_adapters


@pytest.mark.parametrize("method", ["cat", "linear", "svd"])
def test_combination_after_an_rslora_first_adapter_against_peft(models, method):
    """Ours keeps the combined adapter's scale 1 after an rsLoRA adapter
    ("two"): its update is the combination itself. PEFT up to 0.21 copied
    the first adapter's `use_rslora` with `lora_alpha = r`, so its scale was
    `r/sqrt(r) = sqrt(r)` and its update `sqrt(r)` times the combination;
    PEFT 0.22 turns rsLoRA off for the new adapter (scale 1), as ours."""
    import peft

    old_peft = tuple(int(p) for p in peft.__version__.split(".")[:2]) < (0, 22)
    lora, peft_model, layers = models
    weights = {"two": 0.8, "one": -0.5}
    kl.combine_adapters(lora, weights, name="mix", method=method)
    peft_model.add_weighted_adapter(
        list(weights), list(weights.values()), "mix", combination_type=method
    )
    rank = next(layer for _, layer in lora_layers(lora)).get_adapter("mix").rank
    for ours, theirs in zip(
        keras_deltas(lora, "mix", layers),
        peft_deltas(peft_model, "mix", layers),
        strict=True,
    ):
        factor = np.sqrt(rank) if old_peft else 1.0
        np.testing.assert_allclose(theirs, factor * ours, atol=ATOL)


def keras_model():
    """The Keras side alone: adapters "one", "two" (rank 4) and "three"
    (rank 2) on fc1 and fc2, random and non-zero."""
    lora = kl.apply_lora(
        keras_mlp(), targets=["fc1", "fc2"], rank=4, adapter_name="one"
    )
    kl.add_adapter(lora, "two", rank=4, alpha=8)
    kl.add_adapter(lora, "three", rank=2)
    rng = np.random.default_rng(1)
    for _, layer in lora_layers(lora):
        for name in ADAPTERS:
            adapter = layer.get_adapter(name)
            for v in (adapter.a, adapter.b):
                v.assign(rng.normal(0, 0.5, v.shape).astype("float32"))
    return lora


def test_dare_seed_is_reproducible():
    lora = keras_model()
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        kl.combine_adapters(
            lora, TWO, name=name, method="dare_ties", density=0.5, seed=seed
        )
    a, b, c = (keras_deltas(lora, n) for n in "abc")
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert max(np.abs(x - z).max() for x, z in zip(a, c, strict=True)) > 1e-3


def test_svd_rank_defaults_to_the_largest_and_pads_past_the_kernel():
    lora = keras_model()
    kl.combine_adapters(lora, THREE, name="svd", method="svd")
    kl.combine_adapters(lora, THREE, name="wide", method="svd", svd_rank=9)
    for path, layer in lora_layers(lora):
        assert layer.get_adapter("svd").rank == 4
        wide = layer.get_adapter("wide")
        # fc1's kernel is 6x8: rank 9 keeps all 6 directions, zero-padded.
        assert wide.rank == 9
        if path == "fc1":
            np.testing.assert_array_equal(_np(wide.a)[:, 6:], 0)
    exact = [
        sum(w * d for w, d in zip(ws, ds, strict=True))
        for ws, ds in [
            (list(THREE.values()), [keras_deltas(lora, n)[i] for n in THREE])
            for i in range(2)
        ]
    ]
    for got, want in zip(keras_deltas(lora, "wide"), exact, strict=True):
        np.testing.assert_allclose(got, want, atol=ATOL)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "mean"}, r"`method` must be one of .*method='mean'"),
        ({"method": "ties"}, r"needs `density`.*density=None"),
        ({"method": "dare_linear", "density": 0.0}, r"in \(0, 1\].*density=0.0"),
        ({"method": "ties", "density": 1.5}, r"density=1.5"),
        ({"method": "ties", "density": True}, r"density=True"),
        ({"method": "linear", "density": 0.5}, r"does not prune.*density=0.5"),
        ({"method": "dare_ties", "density": 0.5, "seed": 1.5}, r"`seed`.*seed=1.5"),
        ({"method": "dare_ties", "density": 0.5, "seed": -1}, r"`seed`.*seed=-1"),
        ({"method": "linear", "svd_rank": 2}, r"`svd_rank` and `svd_clamp` are for"),
        ({"method": "svd", "svd_rank": 0}, r"`svd_rank` must be.*svd_rank=0"),
        ({"method": "svd", "svd_clamp": 2}, r"`svd_clamp` must be.*svd_clamp=2"),
        (
            {"method": "ties", "density": 0.5, "majority_sign_method": "sum"},
            r"`majority_sign_method` must be one of",
        ),
        (
            {"method": "linear", "majority_sign_method": "frequency"},
            r"`majority_sign_method` is for the ties methods",
        ),
    ],
)
def test_bad_options_are_refused_naming_the_argument(kwargs, message):
    lora = keras_model()
    before = kl.list_adapters(lora)
    with pytest.raises(ValueError, match=message):
        kl.combine_adapters(lora, TWO, name="mix", **kwargs)
    assert kl.list_adapters(lora) == before


@pytest.mark.parametrize("method", ["linear", "ties", "dare_linear"])
def test_factor_methods_need_one_rank_as_peft(method):
    lora = keras_model()
    before = kl.list_adapters(lora)
    density = None if method == "linear" else 0.5
    with pytest.raises(ValueError, match=r"needs adapters of one rank.*'three': 2"):
        kl.combine_adapters(lora, THREE, method=method, density=density)
    assert kl.list_adapters(lora) == before
    # The SVD methods and "cat" take any ranks.
    kl.combine_adapters(lora, THREE, name="ok", method="svd")


def test_dora_and_pissa_are_refused_and_nothing_is_added():
    lora = keras_model()
    kl.add_adapter(lora, "dora", rank=4, targets=["fc2"], use_dora=True)
    before = kl.list_adapters(lora)
    with pytest.raises(ValueError, match=r"'dora' of layer 'fc2' uses DoRA"):
        kl.combine_adapters(lora, {"one": 0.5, "dora": 0.5}, method="svd")
    assert kl.list_adapters(lora) == before
    pissa = kl.apply_lora(keras_mlp(), targets=["fc1"], rank=2, init="pissa")
    kl.add_adapter(pissa, "plain", rank=2)
    with pytest.raises(ValueError, match=r"init='pissa'"):
        kl.combine_adapters(
            pissa, {"default": 1.0, "plain": 1.0}, method="ties", density=0.5
        )
