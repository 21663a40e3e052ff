"""Copying a model layer by layer, layers nested inside other layers too.

`keras.models.clone_model` copies a Functional or Sequential graph, but a
layer *inside* another layer is out of its reach: `MultiHeadAttention`
creates its `query`/`key`/`value` projections in `build`, a user's custom
block creates its `Dense` layers in `__init__`, and a subclassed model does
the same. `rebuild_container` makes a new container of the same class from
config, builds it, and points its sublayer attributes at the original
(shared) sublayers or at replacements; the original is left as it was.
`copy_model` is the one structural copy built on both: `apply_lora`'s copy
(targets shared, then swapped) and `merge_lora`'s plain model (LoRA layers
merged). Where the adapters sit, for a `.keras` file, is recorded by
`keras_lora.model.in_place` (`layout`, `LoRAContainer`).
"""

import keras

from keras_lora.model.in_place import LoRAContainer  # noqa: F401 (its old home)
from keras_lora.model.tracking import (
    assign_copy,
    attributes,
    forget_torch_params,
    own_variables,
    set_attribute,
)
from keras_lora.model.walk import graph_model

Layer = keras.layers.Layer
Variable = keras.Variable


def rebuild_container(old, child_fn, share_variables):
    """Returns a new, built `old.__class__` whose sublayers are
    `child_fn(child)` for each direct sublayer `child` of `old`.

    The new container comes from `old`'s config and build config. Its own
    variables (those not in a sublayer) are `old`'s very variables if
    `share_variables`, else copies of their values. Sublayers are found
    through `old`'s attributes (a layer, or a list, tuple or dict of
    layers); anything else raises `ValueError`.
    """
    cls = type(old)
    try:
        new = cls.from_config(old.get_config())
    except Exception as e:
        raise ValueError(
            f"Cannot reach the layers inside '{old.name}' ({cls.__name__}): "
            f"recreating it from its config failed ({type(e).__name__}: {e}). "
            "Give the class a `get_config` that returns its constructor "
            "arguments."
        ) from e
    build_config = old.get_build_config()
    if old.built:
        if not _needs_build(old, new):
            # Every sublayer attribute already exists (made in __init__) and
            # there are no own weights: building would only make weights to
            # throw away. Its sublayers are swapped in below.
            set_attribute(
                new, "_build_shapes_dict", getattr(old, "_build_shapes_dict", None)
            )
            new.built = True
        elif build_config:
            new.build_from_config(build_config)
        if not new.built:
            raise ValueError(
                f"Cannot reach the layers inside '{old.name}' ({cls.__name__}): "
                "it has no build config to rebuild it from. Build it by "
                "calling it on data (or on a `keras.Input`) first."
            )
    mapping = {id(child): child_fn(child) for child in old._layers}
    placed = set()

    def swap(value):
        if isinstance(value, Layer) and id(value) in mapping:
            placed.add(id(value))
            return mapping[id(value)], True
        if isinstance(value, (list, tuple)) and any(
            isinstance(v, Layer) and id(v) in mapping for v in value
        ):
            items = [swap(v)[0] for v in value]
            return (tuple(items) if isinstance(value, tuple) else items), True
        if isinstance(value, dict) and any(
            isinstance(v, Layer) and id(v) in mapping for v in value.values()
        ):
            return {k: swap(v)[0] for k, v in value.items()}, True
        return value, False

    for attr, value in attributes(old).items():
        if attr.startswith("_tracker") or attr in ("_layers", "_modules"):
            continue
        replacement, changed = swap(value)
        if changed:
            set_attribute(new, attr, replacement)
    missing = [c.name for c in old._layers if id(c) not in placed]
    if missing:
        raise ValueError(
            f"Cannot reach sublayers {missing} of '{old.name}' "
            f"({cls.__name__}): they are not held in an attribute (or a "
            "list, tuple or dict attribute) of the layer."
        )
    new._layers[:] = [mapping[id(c)] for c in old._layers]
    _share_own_variables(old, new, share_variables)
    forget_torch_params([new])
    return new


def _holds_sublayer(value, ids):
    if isinstance(value, Layer):
        return id(value) in ids
    if isinstance(value, (list, tuple)):
        return any(isinstance(v, Layer) and id(v) in ids for v in value)
    if isinstance(value, dict):
        return any(isinstance(v, Layer) and id(v) in ids for v in value.values())
    return False


def _needs_build(old, new):
    """Whether `new` (fresh from config) must be built to match `old`."""
    if keras.src.utils.python_utils.is_default(new.build):
        return False  # nothing to build: Keras would only warn
    if own_variables(old):
        return True
    ids = {id(child) for child in old._layers}
    new_attrs = attributes(new)
    return any(
        attr not in new_attrs
        for attr, value in attributes(old).items()
        if not attr.startswith(("_tracker", "_self_"))
        and attr not in ("_layers", "_modules")
        and _holds_sublayer(value, ids)
    )


def _share_own_variables(old, new, share):
    old_vars, new_vars = own_variables(old), own_variables(new)
    if len(old_vars) != len(new_vars) or any(
        tuple(o.shape) != tuple(n.shape)
        for o, n in zip(old_vars, new_vars, strict=True)
    ):
        raise ValueError(
            f"Cannot rebuild '{old.name}' ({type(old).__name__}): rebuilt from "
            "its config it has different weights of its own."
        )
    if not share:
        for o, n in zip(old_vars, new_vars, strict=True):
            assign_copy(n, o)
        return
    by_id = {id(n): o for o, n in zip(old_vars, new_vars, strict=True)}
    for attr, value in attributes(new).items():
        if isinstance(value, Variable) and id(value) in by_id:
            set_attribute(new, attr, by_id[id(value)])
    new._trainable_variables[:] = list(old._trainable_variables)
    new._non_trainable_variables[:] = list(old._non_trainable_variables)
    for variable in old_vars:
        variable.trainable = False


def copy_layer(layer, deferred, trainable=None):
    """A copy of `layer` from its config. Its weights are set now, or, if
    `deferred` is a list, once the model around it is built. A bare
    operation of a graph (`ops.not_equal` from a mask, say) has no state
    and is shared."""
    if not isinstance(layer, keras.layers.Layer):
        return layer
    new = layer.__class__.from_config(layer.get_config())
    if deferred is not None:
        deferred.append((layer, new))
        return new
    build_config = layer.get_build_config()
    if layer.built and build_config:
        new.build_from_config(build_config)
    if layer.weights:
        copy_weights(layer, new)
    if trainable is not None:
        new.trainable = trainable
    return new


def copy_weights(old, new):
    """Sets `new`'s weights (a copy of `old` from its config) to `old`'s,
    matched by variable name, in order among equal names. A float8 layer
    built from its config lists its scales first, one quantized after it
    was built lists its kernel first, so positions alone can disagree."""
    names = [v.name for v in new.weights]
    pools = {}
    for variable in old.weights:
        pools.setdefault(variable.name, []).append(variable)
    if sorted(names) != sorted(v.name for v in old.weights):
        new.set_weights(old.get_weights())
        return
    new.set_weights([keras.ops.convert_to_numpy(pools[n].pop(0)) for n in names])


def copy_model(model, leaf, share_variables):
    """A copy of `model` (a graph or any other layer), layer by layer.

    `leaf(layer, deferred)` gives each layer's replacement (the layer
    itself to share it, a copy, a merged layer), or `None` to open it: a
    graph is cloned with `keras.models.clone_model` and any other layer
    rebuilt from its config (`rebuild_container`, its own variables shared
    if `share_variables`, else copied), its sublayers replaced the same way.
    `model` itself is always opened, and a `LoRAContainer` is opened as the
    layer it holds. `deferred` is a list for a layer of a graph, to hand to
    `copy_layer` (its weights are set once the graph is built), else `None`.
    Returns the copy and the deferred `(old, new)` pairs, weights set.
    `apply_lora`'s copy and `merge_lora`'s plain model are both made here.
    """
    deferred = []

    def clone(layer, in_graph=True):
        if getattr(type(layer), "holds_layer_transparently", False):
            layer = layer.layer  # a LoRAContainer: opened as what it holds
        new = leaf(layer, deferred if in_graph else None)
        if new is not None:
            return new
        return open_layer(layer)

    def nested_clone(layer):
        return clone(layer, in_graph=False)

    def open_layer(layer):
        if graph_model(layer):
            return keras.models.clone_model(layer, clone_function=clone, recursive=True)
        return rebuild_container(layer, nested_clone, share_variables)

    copy = open_layer(model)
    for old, new in deferred:
        copy_weights(old, new)
    return copy, deferred
