"""The named adapters of one LoRA layer: add, activate, delete, disable.

`AdapterRegistry` is a mixin of `LoRALayer`. Its state is plain Python,
kept out of Keras's tracking: `_adapters` (name -> `Adapter`), `_active`
(names), `_disabled`. Whatever changes it drops the layer's call plan
(`_plan`), which `LoRALayer.call` rebuilds once, not on every call.
"""

import keras
import numpy as np
from keras import ops

from keras_lora.config import (
    DEFAULT_NAME,
    validate_alpha,
    validate_flag,
    validate_rank,
)
from keras_lora.layers import checks, variants
from keras_lora.layers.checks import check_variant
from keras_lora.layers.variants import Adapter


def adapter_specs(layer, first, adapters, active_adapters):
    """The constructor's adapters, checked: `([Adapter], [active names])`."""
    specs = [first] + [Adapter(**dict(config)) for config in adapters or ()]
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"Adapter names must be unique. Received: {names}")
    for spec in specs:
        check_variant(layer, spec, specs)
    if active_adapters is None:
        active = [names[0]]
    elif isinstance(active_adapters, str):
        active = [active_adapters]
    else:
        active = list(active_adapters)
    unknown = [name for name in active if name not in names]
    if unknown:
        raise ValueError(
            f"`active_adapters` {unknown} are not adapters of this layer "
            f"(adapters: {names})."
        )
    return specs, active


class AdapterRegistry:
    """Named adapters on one frozen base (a mixin of `LoRALayer`)."""

    @property
    def adapter_names(self):
        """The names of this layer's adapters, in creation order."""
        return list(self._adapters)

    @property
    def active_adapters(self):
        """The names of the active adapters (their updates add up)."""
        return [name for name in self._active if name in self._adapters]

    def get_adapter(self, name):
        """The `Adapter` (options and variables) named `name`."""
        if name not in self._adapters:
            raise ValueError(
                f"LoRA layer '{self.name}' has no adapter {name!r} "
                f"(adapters: {self.adapter_names})."
            )
        return self._adapters[name]

    def add_adapter(self, name, rank=8, alpha=None, **options):
        """Adds an inactive adapter `name` (same options as the constructor:
        `use_rslora`, `dropout`, `init`, `use_dora`) on the same frozen base."""
        adapter = Adapter(name, rank, alpha, **options)
        if name in self._adapters:
            raise ValueError(f"LoRA layer '{self.name}' already has adapter {name!r}.")
        check_variant(self.layer, adapter, list(self._adapters.values()) + [adapter])
        if adapter.dropout and self.seed_generator is None:
            self._unlocked(
                lambda: setattr(self, "seed_generator", keras.random.SeedGenerator())
            )
        self._adapters[name] = adapter
        self._changed()
        if self.built or self.layer.built:
            try:
                self._build_adapters()
            except Exception:
                self._remove_variables(adapter)
                del self._adapters[name]
                self._changed()
                raise
        return adapter

    def set_active_adapters(self, names):
        """Makes `names` (a name or a list) the active, trainable adapters.
        Names this layer lacks are ignored; with none left the layer computes
        its base output."""
        names = [names] if isinstance(names, str) else list(names)
        object.__setattr__(
            self, "_active", [name for name in names if name in self._adapters]
        )
        self._changed()

    def delete_adapter(self, name):
        """Deletes adapter `name` and its variables. If it was active, the
        other active adapters stay active; if none is left, the first
        remaining adapter becomes active. The last adapter cannot go."""
        adapter = self.get_adapter(name)
        if len(self._adapters) == 1:
            raise ValueError(
                f"Adapter {name!r} is the only adapter of LoRA layer "
                f"'{self.name}'; a LoRA layer needs one. Merge "
                "(`merge_lora`) or rebuild the model instead."
            )
        self._remove_variables(adapter)
        del self._adapters[name]
        active = [n for n in self._active if n != name]
        if name in self._active and not any(n in self._adapters for n in active):
            active = [next(iter(self._adapters))]
        object.__setattr__(self, "_active", active)
        self._changed()

    @property
    def adapters_disabled(self):
        """While true, the layer computes exactly its base layer's output."""
        return self._disabled

    @adapters_disabled.setter
    def adapters_disabled(self, value):
        object.__setattr__(self, "_disabled", bool(value))
        self._changed()

    # ----- variables ---------------------------------------------------------

    def _build_adapters(self):
        tracker = getattr(self, "_tracker", None)
        locked = tracker is not None and tracker.locked
        if locked:
            tracker.unlock()
        try:
            for adapter in self._adapters.values():
                if adapter.a is None:
                    self._create_adapter(adapter, initialize=not self._restoring)
        finally:
            if locked:
                tracker.lock()
        object.__setattr__(self, "_restoring", False)
        self._changed()
        self.built = True

    def _create_adapter(self, adapter, initialize=True):
        """Creates `adapter`'s variables; with `initialize`, computes the
        data-dependent starting values (PiSSA/OLoRA factors, DoRA norms)."""
        a_shape, b_shape = self.adapter_shapes()
        a_shape = tuple(a_shape[:-1]) + (adapter.rank,)
        b_shape = (adapter.rank,) + tuple(b_shape[1:])
        if initialize:
            checks.warn_rank_above_kernel_rank(self.name, adapter, a_shape, b_shape)
        a_init, b_init = variants.initializers(adapter, self.adapter_initializers())
        dtype = checks.adapter_dtype(self.variable_dtype)
        suffix = "" if adapter.name == DEFAULT_NAME else f"_{adapter.name}"
        adapter.a = self.add_weight(
            name=f"lora_a{suffix}", shape=a_shape, initializer=a_init, dtype=dtype
        )
        adapter.b = self.add_weight(
            name=f"lora_b{suffix}", shape=b_shape, initializer=b_init, dtype=dtype
        )
        kernel = self.base_kernel
        if adapter.use_dora:
            axes = self._norm_axes()
            adapter.magnitude = self.add_weight(
                name=f"lora_magnitude{suffix}",
                shape=tuple(d for i, d in enumerate(kernel.shape) if i not in axes),
                initializer="ones",
                dtype=dtype,
            )
        if adapter.changes_base:
            adapter.residual = self.add_weight(
                name=f"lora_residual_kernel{suffix}",
                shape=tuple(kernel.shape),
                initializer="zeros",
                dtype=kernel.dtype,
                trainable=False,
            )
            value = variants.init_from_kernel(
                adapter,
                np.asarray(ops.convert_to_numpy(kernel)),
                self.kernel_layout(),
                a_shape,
                b_shape,
                initialize,
            )
            adapter.residual.assign(value.astype(adapter.residual.dtype))
        if adapter.use_dora:
            frozen = ops.cast(self._frozen_for([adapter]), "float32")
            norm = variants.column_norm(
                ops.add(frozen, self._adapter_delta(adapter)), self._norm_axes()
            )
            adapter.magnitude.assign(ops.cast(norm, adapter.magnitude.dtype))
        if adapter.hotswap:
            adapter.scale_variable = self._scale_weight(adapter)

    # ----- hot-swapping (`prepare_hotswap`, `hotswap_adapter`) -------------

    def prepare_hotswap(self, capacity):
        """Pads every adapter to rank `capacity` and gives each a scale variable.

        Zero columns of `A` and rows of `B` keep `A·B`, so the outputs stay;
        `alpha` becomes `scale·capacity` (`scale·sqrt(capacity)`, rsLoRA) so
        the scale stays. The scale becomes a non-trainable float32 variable
        (`lora_scale[_<name>]`) that calls read: a new one needs no retrace.

        Raises `ValueError` if a rank is above `capacity` (nothing changed).
        """
        capacity = validate_rank(capacity, "max_rank")
        above = self.ranks_above(capacity)
        if above:
            raise ValueError(
                f"LoRA layer '{self.name}' has adapters of rank above "
                f"max_rank={capacity}: {above}. Pass a max_rank of at least "
                f"{max(above.values())}; nothing was changed."
            )
        if not self.built or any(a.a is None for a in self._adapters.values()):
            raise ValueError(
                f"LoRA layer '{self.name}' is not built; build the model (call "
                "it on data) before `prepare_hotswap`."
            )
        self._unlocked(
            lambda: [self._pad(a, capacity) for a in self._adapters.values()]
        )
        # A `.keras` file stores variables by position: put the scale variables
        # where building from the config puts them (after each residual).
        ordered = [
            v
            for a in self._adapters.values()
            for v in (a.residual, a.scale_variable)
            if v is not None
        ]
        ids = {id(v) for v in ordered}
        store = self._non_trainable_variables
        store[:] = [v for v in store if id(v) not in ids] + ordered
        self._changed()

    def ranks_above(self, capacity):
        """`{name: rank}` of the adapters whose rank is above `capacity`:
        those a hot-swap capacity of `capacity` cannot hold."""
        return {n: a.rank for n, a in self._adapters.items() if a.rank > capacity}

    def _pad(self, adapter, capacity):
        if adapter.rank < capacity:
            scale = adapter.scale_value
            for attr, axis in (("a", -1), ("b", 0)):
                old = getattr(adapter, attr)
                value = np.asarray(ops.convert_to_numpy(old))
                widths = [(0, 0)] * value.ndim
                widths[axis] = (0, capacity - adapter.rank)
                new = self._new_weight(old.name, np.pad(value, widths), old.dtype)
                new.trainable = old.trainable
                self._replace_variable(old, new)
                setattr(adapter, attr, new)
            adapter.rank = capacity
            adapter.set_scale(scale, adapter.use_rslora, assign=False)
        if adapter.scale_variable is None:
            adapter.scale_variable = self._scale_weight(adapter)
        adapter.hotswap = True

    def _scale_weight(self, adapter):
        suffix = "" if adapter.name == DEFAULT_NAME else f"_{adapter.name}"
        value = np.float32(adapter.scale_value)
        return self._new_weight(f"lora_scale{suffix}", value, "float32", False)

    def _new_weight(self, name, value, dtype, trainable=True):
        kwargs = {"initializer": "zeros", "dtype": dtype, "trainable": trainable}
        variable = self.add_weight(name=name, shape=np.shape(value), **kwargs)
        variable.assign(value)
        return variable

    def _replace_variable(self, old, new):
        """Puts `new` where `old` is in this layer's variable lists."""
        for store in ("trainable_variables", "non_trainable_variables"):
            variables = getattr(self, f"_{store}")
            ids = self._tracker.stored_ids[store]
            if id(new) in ids:
                variables[:] = [v for v in variables if v is not new]
                ids.discard(id(new))
            for i, variable in enumerate(variables):
                if variable is old:
                    variables[i] = new
                    ids.discard(id(old))
                    ids.add(id(new))

    # ----- the first active adapter's options, as layer properties ---------

    @property
    def lora_a(self):
        """`A` of the first active adapter."""
        return self._primary_variable("a")

    @property
    def lora_b(self):
        """`B` of the first active adapter."""
        return self._primary_variable("b")

    @property
    def lora_magnitude(self):
        """DoRA's magnitude of the first active adapter, or `None`."""
        return self._primary().magnitude

    @property
    def rank(self):
        return self._primary().rank

    @property
    def alpha(self):
        return self._primary().alpha

    @alpha.setter
    def alpha(self, value):
        value = validate_alpha(value)
        self._primary().alpha = float(self._primary().rank if value is None else value)
        self._changed()

    @property
    def scale(self):
        """The factor on the (first active) update: `alpha / rank`, or
        `alpha / sqrt(rank)` with `use_rslora`."""
        return self._primary().scale

    @property
    def use_rslora(self):
        return self._primary().use_rslora

    @use_rslora.setter
    def use_rslora(self, value):
        self._primary().use_rslora = validate_flag(value, "use_rslora")
        self._changed()

    @property
    def dropout(self):
        return self._primary().dropout

    @property
    def init(self):
        return self._primary().init

    @property
    def use_dora(self):
        return self._primary().use_dora

    # ----- bookkeeping ------------------------------------------------------

    def _changed(self):
        """Drops the call plan and puts the trainable flags in line."""
        object.__setattr__(self, "_plan", None)
        self._sync_trainable()

    def _sync_trainable(self):
        """Active adapters follow `trainable`; the others are frozen."""
        adapters = self.__dict__.get("_adapters")
        if adapters is None:
            return
        active = set(self._active)
        for adapter in adapters.values():
            on = self._trainable and adapter.name in active
            for variable in adapter.variables:
                variable.trainable = on

    def _primary(self):
        for name in self._active:
            if name in self._adapters:
                return self._adapters[name]
        return next(iter(self._adapters.values()))

    def _primary_variable(self, attr):
        adapters = self.__dict__.get("_adapters")
        value = getattr(self._primary(), attr) if adapters else None
        if value is None:
            raise AttributeError(f"LoRA layer '{self.name}' has no {attr} (not built)")
        return value

    def _unlocked(self, fn):
        tracker = self._tracker
        locked = tracker.locked
        tracker.unlock()
        try:
            return fn()
        finally:
            if locked:
                tracker.lock()

    def _remove_variables(self, adapter):
        doomed = {id(v) for v in adapter.variables}
        for extra in (adapter.residual, adapter.scale_variable):
            if extra is not None:
                doomed.add(id(extra))
        for store in ("trainable_variables", "non_trainable_variables"):
            variables = getattr(self, f"_{store}")
            variables[:] = [v for v in variables if id(v) not in doomed]
            self._tracker.stored_ids[store] -= doomed
        adapter.a = adapter.b = adapter.magnitude = adapter.residual = None
        adapter.scale_variable = None
