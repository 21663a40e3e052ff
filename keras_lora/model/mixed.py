"""`mixed_adapter_model`: one batch, one adapter per row, one traced call.

The served model wraps the LoRA model in `MixedAdapters`, a layer whose
call opens a `layers.mixed.routing` context around the model's own call;
every LoRA layer inside (nested in attention blocks and KerasHub backbones
alike) then computes row `i` with adapter `names[adapter_index[i]]`. The
choice is data, not Python state, so one traced function serves any mix.
"""

import keras
import numpy as np
from keras import ops
from keras.src.models.functional import Functional

from keras_lora.layers import mixed as routing_lib
from keras_lora.model import stack_cache
from keras_lora.model.tracking import drop_compiled
from keras_lora.model.walk import check_is_model, require_lora_layers

INDEX_NAME = "adapter_index"


def _is_concrete(x):
    """Whether `x` holds values now (eager), not a traced placeholder."""
    if isinstance(x, keras.KerasTensor):
        return False
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.executing_eagerly()
    if backend == "jax":
        import jax

        return not isinstance(x, jax.core.Tracer)
    if backend == "torch":
        import torch

        compiling = torch.compiler.is_compiling()
        return not compiling and getattr(x, "device", None) != torch.device("meta")
    return True


def check_index(adapter_index, n):
    """Raises `ValueError` for an eager `adapter_index` outside `[-1, n)`
    or not of shape `(batch,)`; traced values pass (the layers isolate)."""
    if len(adapter_index.shape) != 1:
        raise ValueError(
            f"`{INDEX_NAME}` must have shape (batch,). Received: shape="
            f"{tuple(adapter_index.shape)}"
        )
    if not _is_concrete(adapter_index):
        return
    values = np.asarray(ops.convert_to_numpy(adapter_index))
    bad = values[(values < -1) | (values >= n)]
    if bad.size:
        raise ValueError(
            f"`{INDEX_NAME}` values must be in [-1, {n}) (-1: the base model; "
            f"0..{n - 1}: the adapters). Received: {sorted(set(bad.tolist()))[:8]}"
        )


@keras.saving.register_keras_serializable(package="keras_lora")
class MixedAdapters(keras.layers.Layer):
    """Calls `model` with each row routed to its own adapter.

    Args:
        model: a model with LoRA layers.
        names: the adapter names `adapter_index` indexes.
        strategy: `"auto"`, `"concat"`, `"gather"` or `"grouped"` (see
            `layers.mixed`).
        cache: keep each routed layer's adapters, stacked or joined as
            its strategy reads them, in variables of this layer
            (`model.stack_cache`).

    Call arguments:
        inputs: `model`'s inputs.
        adapter_index: int `(batch,)`; `-1` for the base alone.
    """

    def __init__(self, model, names, strategy="auto", cache=False, **kwargs):
        super().__init__(**kwargs)
        self.model = model
        self.names = tuple(names)
        self.strategy = strategy
        self.cache = bool(cache)
        self._stacks = stack_cache.StackCache(self) if self.cache else None

    def call(self, inputs, adapter_index, training=None):
        if not keras.backend.is_int_dtype(adapter_index.dtype):
            raise TypeError(
                f"`{INDEX_NAME}` must be an integer tensor. Received: dtype="
                f"{keras.backend.standardize_dtype(adapter_index.dtype)}"
            )
        check_index(adapter_index, len(self.names))
        index = ops.cast(adapter_index, "int32")
        stacks = None
        if self._stacks is not None:
            # Eager: never read a stale copy (checked once before the served
            # model's `predict_on_batch` and `test_on_batch`: `_checked_call`).
            if _is_concrete(index) and not self._stacks.checked:
                self._stacks.ensure_fresh()
            stacks = self._stacks.usable()
        with routing_lib.routing(index, self.names, self.strategy, stacks):
            return self.model(inputs, training=training)

    def compute_output_spec(self, inputs, adapter_index, training=None):
        return self.model.compute_output_spec(inputs)

    def save_own_variables(self, store):
        # The cache only copies the adapters, which the model saves.
        pass

    def load_own_variables(self, store):
        if self._stacks is not None:
            self._stacks.invalidate()  # rebuilt from the loaded adapters

    def get_config(self):
        config = super().get_config()
        config.update(
            model=keras.saving.serialize_keras_object(self.model),
            names=list(self.names),
            strategy=self.strategy,
            cache=self.cache,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(config["model"])
        return cls(**config)


def _guard_wide_index(index, n):
    """An index wider than int32 (int64, uint32, ...), before Keras casts it
    to the int32 input (which wraps modulo 2**32): eagerly checked like any
    index; traced, every value outside `[-1, n)` becomes `-1` (the base)."""
    if not hasattr(index, "dtype") or isinstance(index, keras.KerasTensor):
        return index
    dtype = keras.backend.standardize_dtype(index.dtype)
    if dtype in ("int32", "int16", "int8", "uint8", "uint16"):
        return index
    if not keras.backend.is_int_dtype(dtype):
        raise TypeError(
            f"`{INDEX_NAME}` must be an integer tensor. Received: dtype={dtype}"
        )
    if _is_concrete(index):
        check_index(index, n)
        return index
    valid = ops.logical_and(ops.greater_equal(index, -1), ops.less(index, n))
    return ops.where(valid, index, ops.full_like(index, -1))


@keras.saving.register_keras_serializable(package="keras_lora")
class MixedAdapterModel(Functional):
    """The served model of `mixed_adapter_model`: a functional model whose
    `adapter_index` is checked before Keras casts it to int32."""

    def _standardize_inputs(self, inputs):
        n = len(mixed_layer(self).names)
        if isinstance(inputs, dict) and INDEX_NAME in inputs:
            inputs = {**inputs, INDEX_NAME: _guard_wide_index(inputs[INDEX_NAME], n)}
        elif isinstance(inputs, (list, tuple)) and inputs:
            inputs = [*inputs[:-1], _guard_wide_index(inputs[-1], n)]
        return super()._standardize_inputs(inputs)

    def _host_check(self, x):
        # JAX (without x64) turns int64 arrays into int32 itself, wrapping,
        # before the model sees them: check NumPy indices on the host.
        index = x.get(INDEX_NAME) if isinstance(x, dict) else None
        if isinstance(x, (list, tuple)) and x:
            index = x[-1]
        if isinstance(index, np.ndarray):
            if not np.issubdtype(index.dtype, np.integer):
                raise TypeError(
                    f"`{INDEX_NAME}` must be an integer array. Received: "
                    f"dtype={index.dtype}"
                )
            check_index(index, len(mixed_layer(self).names))

    def refresh_adapters(self):
        """Rebuilds the cached adapter stacks (`cache=True`) from the
        adapters' variables now. Needed only after writing an adapter's
        values in place on TensorFlow outside this model's `fit`,
        `train_on_batch` and keras_lora's `hotswap_adapter` (JAX and torch
        see every write themselves); a no-op without the cache."""
        cache = mixed_layer(self)._stacks
        if cache is not None:
            cache.refresh()
            self._drop_if_relaid(cache)

    def _drop_if_relaid(self, cache):
        # A layer whose copy no longer fits its adapters (one added,
        # deleted or re-ranked) stacks per call from now on; functions
        # traced on its copy, by any call, are dropped.
        if self.__dict__.get("_keras_lora_cache_generation", 0) != cache.generation:
            drop_compiled(self)
            self.__dict__["_keras_lora_cache_generation"] = cache.generation

    def _serving(self, call, *args, **kwargs):
        """`call(*args, **kwargs)` (an inference method, which writes no
        adapter) with the cached stacks checked fresh first."""
        return self._checked_call(False, call, *args, **kwargs)

    def _checked_call(self, one_batch, call, *args, **kwargs):
        """`_serving`; `one_batch`: `call` runs one batch with no callbacks
        (`predict_on_batch`, `test_on_batch`), so nothing can write an
        adapter before it returns and the eager layer call need not check
        the copies again (`predict` and `evaluate` run callbacks between
        batches: the eager call checks each batch)."""
        cache = mixed_layer(self)._stacks
        if cache is None:
            return call(*args, **kwargs)
        cache.ensure_fresh()
        self._drop_if_relaid(cache)
        cache.checked = one_batch
        try:
            return call(*args, **kwargs)
        finally:
            cache.checked = False
            cache.retoken()

    def predict(self, x, *args, **kwargs):
        self._host_check(x)
        return self._serving(super().predict, x, *args, **kwargs)

    def predict_on_batch(self, x):
        self._host_check(x)
        return self._checked_call(True, super().predict_on_batch, x)

    def evaluate(self, *args, **kwargs):
        return self._serving(super().evaluate, *args, **kwargs)

    def test_on_batch(self, *args, **kwargs):
        return self._checked_call(True, super().test_on_batch, *args, **kwargs)

    def fit(self, *args, **kwargs):
        cache = mixed_layer(self)._stacks
        if cache is None:
            return super().fit(*args, **kwargs)
        # Training reads the adapters themselves; so does the validation
        # inside `fit`, since the cached copy falls behind every step.
        _drop_inference_functions(self)
        cache.suspended = True
        try:
            return super().fit(*args, **kwargs)
        finally:
            cache.suspended = False
            cache.invalidate()
            _drop_inference_functions(self)

    def train_on_batch(self, *args, **kwargs):
        try:  # training reads the adapters themselves, never the cache
            return super().train_on_batch(*args, **kwargs)
        finally:
            cache = mixed_layer(self)._stacks
            if cache is not None:
                cache.invalidate()  # rebuilt by the next call that reads it

    def generate(
        self,
        inputs,
        adapter_names,
        max_length=None,
        stop_token_ids="auto",
        strip_prompt=False,
    ):
        """Generates with each row of the batch on its own adapter.

        The served model must wrap a KerasHub `CausalLM`. Row `i` of
        `inputs` is generated as the task generates it with only adapter
        `adapter_names[i]` active (`None` or `"__base__"`: the base model
        alone), all rows in one batch and one compiled generation loop:
        KerasHub's own `generate`, with the per-row adapter index passed
        into its compiled function as data, so another mix of adapters (of
        the same batch size and `max_length`) runs the same compiled loop.
        Like PEFT's `model.generate(..., adapter_names=[...])`.

        Args:
            inputs: what the task's `generate` takes for one batch (strings,
                or a dict of `token_ids` and `padding_mask` without a
                preprocessor); not a `tf.data.Dataset`.
            adapter_names: one name per row, each one of this model's
                `names`, or `None`/`"__base__"` for the base model.
            max_length, stop_token_ids, strip_prompt: as for
                `CausalLM.generate`.

        Returns:
            What the task's `generate` returns.

        Raises:
            TypeError: the served model does not wrap a KerasHub `CausalLM`,
                or `inputs` is a dataset.
            ValueError: an unknown adapter name, a count of names that is
                not the batch size, or a sampler that changes the batch
                (beam or contrastive search).
        """
        layer = mixed_layer(self)
        task, names = layer.model, layer.names
        index = _generate_index(task, names, adapter_names, inputs)
        step, compiled = self._routed_generate(task, layer)
        rows = len(index)

        def generate_function(x, stop_token_ids=None):
            batch = int(x["token_ids"].shape[0])
            if batch != rows:
                raise ValueError(
                    f"`adapter_names` has {rows} names, but the batch has "
                    f"{batch} rows; give one name per row."
                )
            x = {**x, INDEX_NAME: ops.convert_to_tensor(index, "int32")}
            return compiled(x, stop_token_ids=stop_token_ids)

        saved = task.generate_function
        with _generate_step(task, step):
            task.generate_function = generate_function
            try:
                return task.generate(
                    inputs,
                    max_length=max_length,
                    stop_token_ids=stop_token_ids,
                    strip_prompt=strip_prompt,
                )
            finally:
                task.generate_function = saved

    def _routed_generate(self, task, layer):
        """`(step, compiled)`: a `generate_step` that opens the routing
        around the task's own, and KerasHub's compiled generation function
        built on it. Built once per model, sampler and set of variables (a
        changed sampler or adapter set gets a new one, as KerasHub drops
        its own on `compile` and keras_lora on `set_adapter`)."""
        cache = self.__dict__.setdefault("_keras_lora_generate", {})
        key = (
            id(task.sampler),
            tuple(id(v) for v in task.trainable_variables),
            tuple(id(v) for v in task.non_trainable_variables),
        )
        if key not in cache:
            own_step = task.generate_step
            names, strategy = layer.names, layer.strategy

            def step(inputs, stop_token_ids=None):
                inputs = dict(inputs)
                index = ops.cast(inputs.pop(INDEX_NAME), "int32")
                with routing_lib.routing(index, names, strategy):
                    return own_step(inputs, stop_token_ids)

            saved = task.generate_function
            task.generate_function = None
            try:
                with _generate_step(task, step):
                    compiled = task.make_generate_function()
            finally:
                task.generate_function = saved
            cache.clear()  # an older key's loop holds stale variables
            cache[key] = (step, compiled)
        return cache[key]


BASE_NAMES = (None, "__base__")


def _generate_index(task, names, adapter_names, inputs):
    """The per-row adapter index of `generate`, checked on the host."""
    if not (callable(getattr(task, "generate", None)) and hasattr(task, "sampler")):
        raise TypeError(
            "generate needs a served KerasHub `CausalLM`; this model serves "
            f"'{task.name}', a {type(task).__name__}."
        )
    sampler = type(task.sampler).__name__
    if sampler in ("BeamSampler", "ContrastiveSampler"):
        raise ValueError(
            f"generate with one adapter per row needs a sampler that keeps "
            f"the batch's rows; the task's is a {sampler}, which expands "
            "them. Compile the task with another sampler (`greedy`, `top_k`, "
            "`top_p`, `random`)."
        )
    try:
        import tensorflow as tf

        if isinstance(inputs, tf.data.Dataset):
            raise TypeError(
                "generate with `adapter_names` takes one batch, not a "
                "`tf.data.Dataset`: call it once per batch."
            )
    except ImportError:
        pass
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        raise TypeError(
            "`adapter_names` must be a list with one adapter name per row. "
            f"Received: {adapter_names!r}"
        )
    unknown = [n for n in adapter_names if n not in names and n not in BASE_NAMES]
    if unknown:
        raise ValueError(
            f"`adapter_names` holds names this model does not serve: "
            f"{unknown}. Served: {list(names)}, or None/'__base__' for the "
            "base model."
        )
    return np.array(
        [-1 if n in BASE_NAMES else names.index(n) for n in adapter_names], "int32"
    )


def _drop_inference_functions(model):
    """Drops `model`'s traced predict and test functions (not its train
    function, which never reads the cache)."""
    model.predict_function = None
    model.test_function = None


class _generate_step:
    """Within the block, `task.generate_step` is `step` (an instance
    attribute, which KerasHub's generation function looks up)."""

    def __init__(self, task, step):
        self.task, self.step = task, step

    def __enter__(self):
        object.__setattr__(self.task, "generate_step", self.step)

    def __exit__(self, *exc):
        object.__delattr__(self.task, "generate_step")


def _check_names(model, names, strategy):
    if strategy not in routing_lib.STRATEGIES:
        raise ValueError(
            f"`strategy` must be one of {routing_lib.STRATEGIES}. Received: "
            f"strategy={strategy!r}"
        )
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise TypeError(
            "`names` must be a list of adapter names. Received: "
            f"{names!r} of type {type(names).__name__}"
        )
    if not names or not all(isinstance(n, str) for n in names):
        raise ValueError(
            f"`names` must be a non-empty list of str. Received: {names!r}"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"`names` must be unique. Received: {list(names)}")
    layers = require_lora_layers(
        model, "mixed_adapter_model", ". Use `apply_lora` and `add_adapter` first."
    )
    known = []
    for _, layer in layers:
        known += [n for n in layer.adapter_names if n not in known]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"mixed_adapter_model: unknown adapter names {unknown}; the model's "
            f"adapters are {known}."
        )
    for path, layer in layers:
        routing_lib.check_layer(layer, names, path)


def _input_like(tensor, name):
    return keras.Input(batch_shape=tensor.shape, dtype=tensor.dtype, name=name)


def _served_inputs(model):
    """New inputs shaped like `model`'s, and the `adapter_index` input."""
    try:
        struct = model.input
    except (AttributeError, ValueError) as error:
        raise ValueError(
            f"mixed_adapter_model: model '{model.name}' has no defined inputs "
            "(a subclassed model never called on symbolic inputs?). Pass a "
            "functional model, e.g. `keras.Model(inputs, lora_model(inputs))`."
        ) from error
    index = keras.Input(shape=(), dtype="int32", name=INDEX_NAME)
    if isinstance(struct, dict):
        if INDEX_NAME in struct:
            raise ValueError(
                f"mixed_adapter_model: model '{model.name}' already has an "
                f"input named {INDEX_NAME!r}."
            )
        inputs = {key: _input_like(t, key) for key, t in struct.items()}
        return inputs, index, {**inputs, INDEX_NAME: index}
    if isinstance(struct, (list, tuple)):
        inputs = [_input_like(t, None) for t in struct]
        return inputs, index, [*inputs, index]
    inputs = _input_like(struct, None)
    return inputs, index, [inputs, index]


def mixed_adapter_model(model, names, strategy="auto", cache=False):
    """A Keras model computing each row of a batch with its own adapter.

    Its inputs are `model`'s own plus `adapter_index`, int32 of shape
    `(batch,)`: row `i` is computed with adapter `names[adapter_index[i]]`,
    `-1` meaning the base alone. Call it as `served([x, adapter_index])`
    (or with one more key `"adapter_index"` for dict inputs). The adapters
    may differ in rank, alpha, rsLoRA and DoRA; one traced function serves
    any mix. `model` is not changed, and its variables are shared.

    Isolation: an eager `adapter_index` outside `[-1, n)` raises
    `ValueError`; in a compiled function such a row gets the base output,
    never another adapter's.

    Training through it updates each adapter from its own rows only; make
    all of `names` trainable first with `set_adapter(model, names)`.

    Args:
        model: a functional model with LoRA layers holding `names`.
        names: list of adapter names; `adapter_index` indexes it.
        strategy: `"concat"` (one product with the concatenated `A`s, a
            per-row mask, one with the `B`s), `"gather"` (each row gathers
            its own `A`, `B`), `"grouped"` (rows grouped by adapter, one
            rank-`r` product per group: `jax.lax.ragged_dot` on JAX off
            CPU, blocks of one adapter each on JAX's CPU, padded groups
            and two `bmm`s on eager torch, a fused per-row multiply-reduce
            on TensorFlow), or `"auto"` (the default: per layer, gather
            for sequences, concat for one position up to a total rank of
            128, above it grouped, as measured); see `docs/serving.md`.
        cache: `False` (the default) or `True`: keep, per LoRA layer, all
            of its routed adapters' factors stacked (or joined, for
            `"concat"`) in non-trainable variables of the served model
            (one more copy of those adapters in memory; not saved), so
            that a call does not stack or join them again. The copy is
            rebuilt when needed before every eager call, `predict`,
            `predict_on_batch`, `evaluate` and `test_on_batch`: on JAX and
            torch any write to an adapter is seen; on TensorFlow writes
            made in place outside this model's `fit`/`train_on_batch` and
            `hotswap_adapter` are not, so call `served.refresh_adapters()`
            after them (and before exporting, or tracing a function of
            your own). Training never reads the copy. See `docs/serving.md`.

    Returns:
        A `keras.Model`.

    Raises:
        ValueError: unknown or duplicate names, no LoRA layers, a merged
            layer or a PiSSA/OLoRA adapter among `names`.
        TypeError: a LoRA layer type without per-row routing holds a name.
    """
    check_is_model(model, "mixed_adapter_model")
    _check_names(model, names, strategy)
    inputs, index, served_inputs = _served_inputs(model)
    layer = MixedAdapters(model, names, strategy, cache, name="mixed_adapters")
    outputs = layer(inputs, index)
    return MixedAdapterModel(served_inputs, outputs, name=f"{model.name}_mixed")


def mixed_layer(model):
    """The `MixedAdapters` layer of a served model, or `None`."""
    for layer in getattr(model, "layers", ()):
        if isinstance(layer, MixedAdapters):
            return layer
    return None
