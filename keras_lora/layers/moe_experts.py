"""`LoRAMoeExperts`: LoRA on the expert weights of KerasHub MoE models.

KerasHub keeps a mixture-of-experts block's feed-forward experts in one
layer holding 3-D weights `(num_experts, in, out)` (`add_weight`, no
`Dense`), and computes every expert for every token with batched einsums.
The families differ in which weights they hold and in the gated activation
between them; the rest is one computation, written once here.
"""

import contextlib

import keras
import numpy as np
from keras import ops

from keras_lora.layers import mixed
from keras_lora.layers.base import LoRALayer
from keras_lora.layers.host_merge import all_finite
from keras_lora.layers.hot_path import value


def _mixtral_hidden(layer, projected, dtype):
    # As `MixtralMoeExperts.call`: the activation in float32.
    gate = ops.cast(layer.activation(ops.cast(projected["gate"], "float32")), dtype)
    return projected["up"] * gate


def _qwen_hidden(layer, projected, dtype):
    # As `QwenMoeExperts.call` and `Qwen3MoeExperts.call`.
    gate, up = ops.split(projected["gate_up"], 2, axis=-1)
    return up * layer.activation(gate)


def _qwen3_5_hidden(layer, projected, dtype):
    # As `Qwen3_5MoeExperts.call`: SiLU in float32.
    gate, up = ops.split(projected["gate_up"], 2, axis=-1)
    return up * ops.cast(ops.silu(ops.cast(gate, "float32")), dtype)


def _gpt_oss_hidden(layer, projected, dtype):
    # As `GptOssExperts.call`: interleaved gate/up, clamped, a custom GLU.
    gate_up = projected["gate_up"]
    gate = ops.clip(gate_up[..., ::2], -1e9, layer.limit)
    up = ops.clip(gate_up[..., 1::2], -layer.limit, layer.limit)
    return (up + 1) * (gate * ops.sigmoid(gate * layer.alpha))


_MIXTRAL = {
    "gate": "_expert_feedforward_gate_dense",
    "up": "_expert_feedforward_intermediate_dense",
    "down": "_expert_feedforward_output_dense",
}
_QWEN = {
    "gate_up": "_expert_feedforward_gate_dense",
    "down": "_expert_feedforward_output_dense",
}
_GPT_OSS = {"gate_up": "gate_up_proj", "down": "down_proj"}

# KerasHub class name -> (role -> weight attribute, role -> bias attribute,
# the activation between the projections, constructor arguments beyond
# num_experts/hidden_dim/intermediate_dim/kernel_initializer). The role
# "down" maps the intermediate back to the hidden size; the others read
# the tokens.
FAMILIES = {
    "MixtralMoeExperts": (_MIXTRAL, {}, _mixtral_hidden, ("activation_fn",)),
    "QwenMoeExperts": (_QWEN, {}, _qwen_hidden, ("activation_fn",)),
    "Qwen3MoeExperts": (_QWEN, {}, _qwen_hidden, ("activation_fn",)),
    "Qwen3_5MoeExperts": (_QWEN, {}, _qwen3_5_hidden, ()),
    "GptOssExperts": (
        _GPT_OSS,
        {"gate_up": "gate_up_proj_bias", "down": "down_proj_bias"},
        _gpt_oss_hidden,
        ("alpha", "limit"),
    ),
}


def _family_name(cls):
    for klass in cls.__mro__:
        if klass.__name__ in FAMILIES and klass.__module__.startswith("keras_hub."):
            return klass.__name__
    return None


class _ExpertsType(type):
    def __instancecheck__(cls, obj):
        return _family_name(type(obj)) is not None


class MoeExperts(metaclass=_ExpertsType):
    """`isinstance(layer, MoeExperts)`: `layer` is one of KerasHub's experts
    layers (`FAMILIES`). Nothing imports `keras_hub` for this check."""


def experts_config(layer):
    """The constructor arguments of a KerasHub experts `layer`.

    KerasHub 0.32's experts layers have no `get_config` and are made with an
    initializer object, which Keras's automatic config cannot serialize.
    """
    try:
        return layer.get_config()
    except NotImplementedError:
        return _constructor_config(layer)


def _constructor_config(layer):
    extra = FAMILIES[_family_name(type(layer))][3]
    initializer = layer.kernel_initializer
    if not isinstance(initializer, str):
        initializer = keras.initializers.serialize(initializer)
    config = {
        "name": layer.name,
        "trainable": layer.trainable,
        "dtype": keras.dtype_policies.serialize(layer.dtype_policy),
        "num_experts": layer.num_experts,
        "hidden_dim": layer.hidden_dim,
        "intermediate_dim": layer.intermediate_dim,
        "kernel_initializer": initializer,
    }
    for name in extra:
        if name == "activation_fn":
            config[name] = keras.activations.serialize(layer.activation)
        else:
            config[name] = getattr(layer, name)
    return config


@contextlib.contextmanager
def _serializable(layer):
    """Lets Keras serialize `layer` with `experts_config` while in the block."""
    try:
        layer.get_config()
    except NotImplementedError:
        object.__setattr__(layer, "get_config", lambda: _constructor_config(layer))
        try:
            yield
        finally:
            object.__delattr__(layer, "get_config")
    else:
        yield


class _PackedUniform:
    """`A`'s initializer: each weight's slice of `lora_a` uniform in
    `±1/sqrt(in)` (loralib's and PEFT's), `in` that weight's input size."""

    def __init__(self, sizes):
        self.sizes = sizes

    def __call__(self, shape, dtype=None):
        parts = []
        for size in self.sizes:
            limit = 1.0 / float(np.sqrt(size))
            init = keras.initializers.RandomUniform(-limit, limit)
            parts.append(init((shape[0], size, shape[2]), dtype=dtype))
        return ops.concatenate(parts, axis=1)


@keras.saving.register_keras_serializable(package="keras_lora")
class LoRAMoeExperts(LoRALayer):
    """A frozen KerasHub experts layer plus a low-rank update per expert.

    For each expert `e` and each adapted weight `W` (`(num_experts, in,
    out)`): `x·W_e + scale·(x·A_e)·B_e`, `scale = alpha / rank`, with
    `A_e` of shape `(in, rank)` (small, random) and `B_e` of shape
    `(rank, out)` (zeros), so a fresh layer computes exactly what its base
    does. Both products run over all experts at once (one einsum each,
    `"th,ehr->etr"` then `"etr,rem->etm"`), as the base computes its
    experts; `W + scale·A·B` is never formed while training. Biases (GPT-OSS)
    stay frozen, and so does the router, which is another layer.

    The adapted weights go by role: `"gate"`, `"up"`, `"down"` (Mixtral's
    `expert_feedforward_gate_dense`, `..._intermediate_dense`,
    `..._output_dense`) or `"gate_up"`, `"down"` (Qwen-MoE, Qwen3-MoE,
    Qwen3.5-MoE, GPT-OSS, whose gate and up projections are one fused
    weight, adapted as one matrix per expert, as PEFT's `target_parameters`
    does). Their factors sit side by side in one `lora_a` of shape
    `(num_experts, sum of in, rank)` and one `lora_b` of shape
    `(rank, num_experts, sum of out)`, in the order of `expert_weights`: for
    Mixtral, `A` of the gate weight is `lora_a[:, :hidden_dim]` and its `B`
    is `lora_b[:, :, :intermediate_dim]`. Each pair multiplies only with its
    own weight's input and output, so these are independent adapters that
    save, load, hot-swap and train as one.

    Args:
        layer: the built experts layer (`MixtralMoeExperts`,
            `QwenMoeExperts`, `Qwen3MoeExperts`, `Qwen3_5MoeExperts` or
            `GptOssExperts`).
        rank: positive integer, the rank `r` of each update.
        alpha: positive number, or `None` for `alpha = rank`.
        expert_weights: the roles to adapt, or `None` for all of the
            family's weights.
        **kwargs: as for `LoRALayer`; DoRA, PiSSA/OLoRA and quantized bases
            are refused.

    Input shape:
        `(tokens, hidden_dim)`, as the base layer.

    Output shape:
        `(num_experts, tokens, hidden_dim)`, every expert's output.
    """

    base_class = MoeExperts
    # What code that asks a plain layer for "its kernel" by name reads
    # (`keras-lora inspect`): the gate (gate_up) weight of Mixtral and the
    # Qwen families. GPT-OSS names it `gate_up_proj`: ask `kernel_variable`.
    kernel_attr = "_expert_feedforward_gate_dense"

    def __init__(self, layer, rank=8, alpha=None, expert_weights=None, **kwargs):
        self._check_base_layer(layer)
        family = FAMILIES[_family_name(type(layer))]
        roles = _check_expert_weights(expert_weights, family[0])
        if not layer.built and not kwargs.get("_restoring", False):
            raise ValueError(
                f"LoRAMoeExperts needs a built experts layer: its weights "
                f"give the adapters' shapes. Layer '{layer.name}' is not built; "
                "build the model first (call it on data, or `layer.build(None)`)."
            )
        for options in [kwargs] + list(kwargs.get("adapters") or ()):
            _check_variant(layer, options)
        object.__setattr__(self, "_family", family)
        object.__setattr__(self, "_roles", roles)
        super().__init__(layer, rank=rank, alpha=alpha, **kwargs)

    @classmethod
    def _check_base_layer(cls, layer):
        if not isinstance(layer, (LoRALayer, MoeExperts)):
            raise TypeError(
                "LoRAMoeExperts wraps a KerasHub experts layer, one of "
                f"{sorted(FAMILIES)}. Received: layer={layer!r} of type "
                f"{type(layer).__name__}"
            )
        super()._check_base_layer(layer)

    def __getattr__(self, name):
        # The family's weight attributes are private in Mixtral and Qwen
        # (`_expert_feedforward_gate_dense`), which `DropIn` never forwards;
        # KerasHub's converters read them on the block's `expert_bank`.
        family = self.__dict__.get("_family")
        if family is not None and name in family[0].values():
            return getattr(self.layer, name)
        return super().__getattr__(name)

    # ----- properties -------------------------------------------------------

    @property
    def expert_weights(self):
        """The adapted weights' roles, in the order of their factors."""
        return list(self._roles)

    @property
    def base_kernels(self):
        """`{role: variable}`: the adapted 3-D weights."""
        return {
            role: getattr(self.layer, self._family[0][role]) for role in self._roles
        }

    @property
    def base_kernel(self):
        """The first adapted weight (the generic code asks for one kernel;
        `base_kernels` has them all)."""
        return self.base_kernels[self._roles[0]]

    def adapter_shapes(self):
        kernels = list(self.base_kernels.values())
        experts = kernels[0].shape[0]
        fan_in = sum(k.shape[1] for k in kernels)
        fan_out = sum(k.shape[2] for k in kernels)
        return (experts, fan_in, self.rank), (self.rank, experts, fan_out)

    def adapter_initializers(self):
        sizes = [k.shape[1] for k in self.base_kernels.values()]
        return _PackedUniform(sizes), "zeros"

    # ----- interop facts ------------------------------------------------------

    @classmethod
    def kernel_variable(cls, layer):
        """The family's first weight (gate or gate_up)."""
        weights = FAMILIES[_family_name(type(layer))][0]
        return getattr(layer, next(iter(weights.values())))

    @classmethod
    def kernel_axes(cls, layer):
        return None  # 3-D weights: a matrix per expert, no single matrix

    @classmethod
    def adapter_size(cls, layer, rank):
        """`E·r·(Σ in + Σ out)` over the adapted weights (all of them)."""
        weights = FAMILIES[_family_name(type(layer))][0]
        shapes = [tuple(getattr(layer, attr).shape) for attr in weights.values()]
        return shapes[0][0] * rank * sum(s[1] + s[2] for s in shapes)

    # ----- the forward pass -------------------------------------------------

    def call(self, inputs, training=None):
        """Every expert's output: the base's computation, each adapted
        weight's product `x·W_e` plus `scale·(x·A_e)·B_e`."""
        if mixed.current() is not None:
            raise ValueError(
                f"LoRA layer '{self.name}' (LoRAMoeExperts) does not support "
                "mixed-adapter batches; target the attention layers only."
            )
        bypass, adapters, frozen = self._call_plan()
        if bypass:
            return self.layer.call(inputs)
        weights, _, hidden, _ = self._family
        kernels = {role: getattr(self.layer, attr) for role, attr in weights.items()}
        if frozen == "merged":
            kernels.update(self._merged)
        dtype = keras.backend.standardize_dtype(inputs.dtype)
        projected = {
            role: self._project(inputs, role, kernels[role], adapters, training)
            for role in weights
            if role != "down"
        }
        h = hidden(self.layer, projected, dtype)
        return self._project(h, "down", kernels["down"], adapters, training)

    def _project(self, x, role, kernel, adapters, training):
        """`x·W_e` (+ bias) plus each adapter's update, for weight `role`;
        `x` is `(tokens, in)` (shared by the experts) or `(experts, tokens,
        in)`."""
        spec = "th" if len(x.shape) == 2 else "eth"
        y = ops.einsum(f"{spec},ehm->etm", x, value(kernel))
        if role in self._roles:
            dtype = keras.backend.standardize_dtype(y.dtype)
            for adapter in adapters:
                a, b = self._factors(adapter, role, dtype)
                xa = self._dropout(x, adapter, training)
                h = self._scaled(ops.einsum(f"{spec},ehr->etr", xa, a), adapter)
                y = y + ops.einsum("etr,rem->etm", h, b)
        bias = self._family[1].get(role)
        if bias is not None:
            y = y + ops.expand_dims(value(getattr(self.layer, bias)), 1)
        return y

    def _slices(self, role):
        """`(in, out)` slices of weight `role`'s factors in `lora_a`, `lora_b`."""
        start_in = start_out = 0
        for name, kernel in self.base_kernels.items():
            size_in, size_out = kernel.shape[1], kernel.shape[2]
            if name == role:
                return (
                    slice(start_in, start_in + size_in),
                    slice(start_out, start_out + size_out),
                )
            start_in, start_out = start_in + size_in, start_out + size_out
        raise KeyError(role)

    def _factors(self, adapter, role, dtype):
        """`(A, B)` of weight `role` in `adapter`: `(E, in, r)`, `(r, E, out)`."""
        rows, cols = self._slices(role)
        a = self._adapter(adapter.a, dtype)[:, rows, :]
        b = self._adapter(adapter.b, dtype)[:, :, cols]
        return a, b

    def compute_output_shape(self, input_shape):
        return (self.layer.num_experts, input_shape[0], self.layer.hidden_dim)

    # ----- the delta, and every merge on it ---------------------------------

    def delta(self, adapter=None):
        """`{role: scale·A·B}` per adapted weight, each `(num_experts, in,
        out)` in float32: the sum over the active adapters (or the one named
        `adapter`). Every merge route adds this to the base weights."""
        adapters = self._merge_adapters(adapter)
        deltas = {}
        for role, kernel in self.base_kernels.items():
            total = ops.zeros(tuple(kernel.shape), "float32")
            for spec in adapters:
                a, b = self._factors(spec, role, "float32")
                product = ops.einsum("eir,reo->eio", a, b)
                total = total + product * float(spec.scale_value)
            deltas[role] = total
        return deltas

    def merged_kernels(self, adapter=None):
        """`{role: W + delta}` in each weight's dtype."""
        deltas = self.delta(adapter)
        return {
            role: ops.cast(
                ops.add(ops.cast(kernel, "float32"), deltas[role]), kernel.dtype
            )
            for role, kernel in self.base_kernels.items()
        }

    def merged_kernel(self, adapter=None):
        """The merged weights flattened and concatenated in the order of
        `expert_weights`: the one array `merge` takes."""
        merged = self.merged_kernels(adapter)
        return ops.concatenate([ops.reshape(merged[r], (-1,)) for r in self._roles], 0)

    def merge(self, kernel=None):
        """Merges in place (`merge_lora(model, reversible=True)`): calls use
        the merged weights alone; the base weights are not written."""
        if kernel is None:
            kernel = self.merged_kernel()
        flat = np.asarray(ops.convert_to_numpy(kernel))
        merged, start = {}, 0
        for role, base in self.base_kernels.items():
            shape = tuple(base.shape)
            part = flat[start : start + int(np.prod(shape))].reshape(shape)
            start += part.size
            dtype = keras.backend.standardize_dtype(base.dtype)
            merged[role] = ops.convert_to_tensor(part.astype(dtype))
        object.__setattr__(self, "_merged", merged)
        self._changed()

    def merged_layer(self, check_finite=True, requantize=False):
        """A new, built experts layer of the base's class, config and name
        holding the merged weights. Raises `ValueError` (and builds nothing)
        if a merged weight has NaN or Inf and `check_finite` is true."""
        merged = {
            role: np.asarray(ops.convert_to_numpy(kernel))
            for role, kernel in self.merged_kernels().items()
        }
        if check_finite and not all(all_finite(k) for k in merged.values()):
            raise ValueError(
                f"Merging LoRA layer '{self.name}' gives NaN or Inf in its "
                "expert weights; nothing was merged. Check the adapters, or "
                "pass check_finite=False to merge anyway."
            )
        base = self.layer
        by_id = {id(self.base_kernels[role]): merged[role] for role in merged}
        values = [by_id.get(id(w), ops.convert_to_numpy(w)) for w in base.weights]
        new = type(base).from_config(experts_config(base))
        new.build_from_config(base.get_build_config() or {"input_shape": None})
        new.set_weights(values)
        return new

    # ----- saving -----------------------------------------------------------

    def get_config(self):
        with _serializable(self.layer):
            config = super().get_config()
        config["expert_weights"] = list(self._roles)
        return config

    # ----- refusals -----------------------------------------------------------

    def add_adapter(self, name, rank=8, alpha=None, **options):
        _check_variant(self.layer, options)
        return super().add_adapter(name, rank=rank, alpha=alpha, **options)


def _check_expert_weights(expert_weights, weights):
    if expert_weights is None:
        return tuple(weights)
    if isinstance(expert_weights, str):
        expert_weights = [expert_weights]
    roles = list(expert_weights)
    bad = [r for r in roles if r not in weights]
    if not roles or bad or len(set(roles)) != len(roles):
        raise ValueError(
            f"`expert_weights` must name some of this family's weights "
            f"{list(weights)}, each once. Received: expert_weights={expert_weights!r}"
        )
    return tuple(r for r in weights if r in roles)


def _check_variant(layer, options):
    if options.get("use_dora"):
        raise ValueError(
            f"Layer '{layer.name}' is a {type(layer).__name__}: DoRA "
            "(use_dora=True) is not supported on expert weights."
        )
    if options.get("init") in ("pissa", "olora"):
        raise ValueError(
            f"Layer '{layer.name}' is a {type(layer).__name__}: "
            f"init={options['init']!r} is not supported on expert weights "
            "(use 'default' or 'gaussian')."
        )
