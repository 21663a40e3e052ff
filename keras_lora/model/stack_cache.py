"""The served model's cached adapter stacks (`mixed_adapter_model(...,
cache=True)`).

`"gather"` and `"grouped"` read, per LoRA layer, every routed adapter's
`A` (scale folded in) and `B` stacked into one tensor with an all-zero
last slot (`layers.mixed_stacks.stack_factors`), and `"concat"` reads them
joined along the rank axis. Built from the adapters' own variables, that
stack is a copy of all of them on every call (4 MB per layer of 64 rank-8
adapters on a 1024-wide Dense). With the cache, the served model keeps
each layer's stacked or joined adapters in two non-trainable variables of
its own, and a call only reads them.

Freshness: the copies are rebuilt (`refresh`) when the served model is
made and whenever `ensure_fresh` finds that an adapter changed since the
last rebuild. It compares, per routed adapter, its slot, the adapter
object, its variables and their buffers: on JAX the array a variable
holds (JAX arrays are immutable, so any assignment replaces it), on torch
the tensor's in-place version counter and storage; so every write to an
adapter (`assign`, an optimizer step, `hotswap_adapter`, loading weights,
`add_adapter`/`delete_adapter`) is seen on those backends. TensorFlow has
no cheap write counter on a variable: there only structural changes (an
adapter or variable replaced) are seen, and values written in place need
`refresh` (`MixedAdapterModel.refresh_adapters`), which `fit`,
`train_on_batch` and `hotswap_adapter` on the served model call for you.
Training itself never reads the copies (gradients must reach the
adapters' own variables).
"""

import operator

import keras

from keras_lora.layers import mixed as routing_lib
from keras_lora.layers.mixed_stacks import stack_factors, stack_shapes
from keras_lora.model.walk import lora_layers

_FACTORS = operator.attrgetter("a", "b", "scale")


def _values(variables):
    """What changes when one of `variables` is written, where the backend
    shows it cheaply; `None` on TensorFlow. JAX: the arrays they hold
    (immutable: a write puts a new one; kept, so no id is reused). torch:
    their tensors and in-place version counters."""
    backend = keras.backend.backend()
    if backend == "jax":
        return [v._value for v in variables]
    if backend == "torch":
        return [(v._value, v._value._version) for v in variables]
    return None


def _same(old, new):
    """Whether the values `_values` gave as `old` and `new` are the same."""
    if old is None or new is None:
        return old is new
    if keras.backend.backend() == "jax":
        return all(map(operator.is_, old, new))
    return all(a is c and b == d for (a, b), (c, d) in zip(old, new, strict=True))


class StackCache:
    """Per routed LoRA layer, `(a_stack, b_stack)` variables of `owner` (a
    `MixedAdapters` layer) holding `stack_factors` of its adapters."""

    def __init__(self, owner):
        self.owner = owner
        self.by_layer = {}
        self.entries = []
        for _, layer in lora_layers(owner.model):
            members = routing_lib.members(layer, owner.names)
            if not members:
                continue
            layout = routing_lib.cache_layout(layer, members, owner.strategy)
            a_shape, b_shape = stack_shapes(members, layout)
            dtype = keras.backend.standardize_dtype(members[0][1].a.dtype)
            pair = tuple(
                owner.add_weight(
                    shape=shape,
                    dtype=dtype,
                    initializer="zeros",
                    trainable=False,
                    name=f"{layer.name}_{part}_stack",
                )
                for part, shape in (("a", a_shape), ("b", b_shape))
            )
            self.entries.append((layer, pair, layout))
            self.by_layer[id(layer)] = (*pair, layout)
        self.names = set(owner.names)
        self.state = None
        self.suspended = False
        self.checked = False  # set by the served model's own inference call
        self.generation = 0  # counts `refresh`es that dropped a layer's copy
        self.refresh()

    def usable(self):
        """`{id(layer): (a_stack, b_stack)}` for the routing, or `None`
        while the copies cannot be trusted (invalidated and not rebuilt
        yet, or training through `fit`): the layers then stack per call."""
        if self.suspended or self.state is None:
            return None
        return self.by_layer

    def invalidate(self):
        """Marks the copies stale: the next `ensure_fresh` rebuilds them."""
        self.state = None

    def _state(self):
        """`(structure, values)`: the routed adapters and their variables
        (by identity), and `_values` of those variables."""
        adapters, structure = [], [routing_lib.adapter_writes()]
        for layer, *_ in self.entries:
            items = tuple(layer._adapters.items())
            structure.append(items)
            adapters += [a for n, a in items if n in self.names]
        factors = list(map(_FACTORS, adapters))
        variables = [x for f in factors for x in f if isinstance(x, keras.Variable)]
        structure.append(tuple(map(id, variables)))
        structure.append(
            tuple(id(s) if isinstance(s, keras.Variable) else s for *_, s in factors)
        )
        # The adapters are kept alive with the ids (no id is reused).
        return (structure, adapters, factors), _values(variables)

    def refresh(self):
        """Rebuilds every layer's stacks from its adapters' variables.
        Returns whether a layer's stacks no longer fit its adapters (an
        adapter added, deleted or re-ranked), so that it now stacks them per
        call: compiled functions traced on the copy must then be dropped."""
        changed = False
        for layer, (a_var, b_var), layout in self.entries:
            members = routing_lib.members(layer, self.owner.names)
            if not members:
                a_var.assign(keras.ops.zeros(a_var.shape, a_var.dtype))
                b_var.assign(keras.ops.zeros(b_var.shape, b_var.dtype))
                continue
            shapes = stack_shapes(members, layout)
            if shapes != (tuple(a_var.shape), tuple(b_var.shape)):
                # The layer stacks per call instead (`cached_stacks` sees no fit).
                changed = changed or self.by_layer.pop(id(layer), None) is not None
                continue
            a, b = stack_factors(members, a_var.dtype, layout)
            a_var.assign(a)
            b_var.assign(b)
        self.state = self._state()
        if changed:
            self.generation += 1
        return changed

    def retoken(self):
        """Takes the adapters' current buffers as the cached ones, after a
        call that wrote none of them (the served model's own `predict`:
        Keras's compiled JAX steps hand every variable back in a new
        array holding the same value; torch's and TensorFlow's steps write
        nothing, so there is nothing to take)."""
        if self.state is not None and keras.backend.backend() == "jax":
            self.state = (self.state[0], self._state()[1])

    def ensure_fresh(self):
        """`refresh` if any routed adapter changed since the last one;
        returns what `refresh` returns (`False` if none ran)."""
        if self.state is None:
            return self.refresh()
        (structure, *_), values = self._state()
        (old_structure, *_), old_values = self.state
        if structure != old_structure or not _same(old_values, values):
            return self.refresh()
        return False
