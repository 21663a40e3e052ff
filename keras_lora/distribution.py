"""A `keras.distribution.LayoutMap` for LoRA models (JAX backend).

Keras's `ModelParallel` places each variable by looking its path up in a
`LayoutMap`, whose keys are regexes matched in full against the path
(`re.fullmatch`). `lora_layout_map` returns one with these entries:

| key (regex)                 | layout            | what it places                  |
|-----------------------------|-------------------|---------------------------------|
| `(?:.*/)?kernel`            | `(model_axis,)`   | every base kernel, sharded on   |
|                             |                   | its first (input) axis          |
| `(?:.*/)?embeddings`        | `(model_axis,)`   | embedding tables, on the vocab  |
| `(?:.*/)?lora_a(?:_[^/]+)?` | `()`              | adapters (`lora_a`, and         |
| `(?:.*/)?lora_b(?:_[^/]+)?` | `()`              | `lora_a_<name>` of a named      |
| `(?:.*/)?lora_magnitude...` | `()`              | adapter; DoRA's magnitude):     |
|                             |                   | replicated                      |

Anything else (biases, norms, a new head's weights, optimizer state) is
replicated, as `ModelParallel` does for paths no key matches.

Why these:

- The frozen base kernels hold nearly all the memory, so they are what is
  sharded. `(model_axis,)` names the first axis only, so the same entry fits
  a `Dense` kernel `(in, out)`, an `EinsumDense` kernel such as
  `MultiHeadAttention`'s `(dim, heads, head_dim)` or `(heads, head_dim,
  dim)`, and an embedding table `(vocab, dim)`, whatever their rank: this is
  row-parallel sharding, and XLA adds the one reduction it needs.
- The adapters are `rank/(in+out)` of a kernel's size. Replicated, they
  train exactly as under data parallelism, with no communication in the
  forward pass beyond what the base layer needs.
- The keys are anchored on the variable's own name, so a base kernel's key
  matches `"d1/kernel"` (a layer wrapped after it was built, or reloaded
  from `.keras`) as well as `"d1/d1/kernel"` (an unbuilt layer built inside
  its LoRA wrapper's name scope), and can never match an adapter. Keras core
  `enable_lora` names its adapters `lora_kernel_a/b`, which loose regexes
  such as `".*query.*kernel"` also matched, sharding them on their rank
  axis: keras#19496. Ours are `lora_a`/`lora_b` and get their own keys.

A first axis that does not divide evenly by the mesh's `model_axis` size
cannot be sharded (JAX refuses). Pass `model` (the model, or the same
architecture built once without a distribution) and each such variable gets
a key `(?:.*/)?<layer>(?:/<layer>)?/<name>` that replicates it, e.g.
`(?:.*/)?head(?:/head)?/kernel` for a 3-class head on 2 devices; the two
keys above then start with a negative lookahead that excludes these, since
Keras refuses a path that several keys match. A layer of the same name in
another sub-model is replicated too. Without `model`, every matched
variable's first axis must divide.

The distribution has to be in force when the variables are created: build
or load the base model, and call `apply_lora`, inside
`distribution.scope()` (or after `keras.distribution.set_distribution`).

A model family's own layout, such as a KerasHub backbone's
`get_layout_map(mesh)`, is kept when passed as `layout_map`: its keys decide
how the base weights are sharded, and only the adapter keys are added. Its
keys are checked against the adapter variables' paths, because Keras
refuses a path that several keys match. Convert the KerasHub model with
`apply_lora(..., in_place=True)` inside `distribution.scope()`.

Only the JAX backend has Keras's distribution API in working order: the
torch backend has none, and the TensorFlow backend's is an unfinished
prototype (use `tf.distribute.MirroredStrategy` there, see docs/distributed.md).
"""

import re

import keras

MODEL_AXIS = "model"
KERNEL_KEY = r"(?:.*/)?kernel"
EMBEDDINGS_KEY = r"(?:.*/)?embeddings"
# Adapter variables: "lora_a", or "lora_a_<name>" for a named adapter.
LORA_A_KEY = r"(?:.*/)?lora_a(?:_[^/]+)?"
LORA_B_KEY = r"(?:.*/)?lora_b(?:_[^/]+)?"
LORA_MAGNITUDE_KEY = r"(?:.*/)?lora_magnitude(?:_[^/]+)?"  # DoRA
SHARDED_KEYS = (KERNEL_KEY, EMBEDDINGS_KEY)
ADAPTER_KEYS = (LORA_A_KEY, LORA_B_KEY, LORA_MAGNITUDE_KEY)


def lora_layout_map(device_mesh, model=None, model_axis=MODEL_AXIS, layout_map=None):
    """Returns a `keras.distribution.LayoutMap` for a LoRA model (JAX only).

    Base kernels and embedding tables are sharded on their first axis over
    `model_axis`; `lora_a` and `lora_b` are replicated. See the module
    docstring for the regexes and the reasons.

    Example (4 devices: 2-way data parallel, 2-way model parallel):

    >>> mesh = keras.distribution.DeviceMesh(
    ...     (2, 2), ["batch", "model"], keras.distribution.list_devices())
    >>> layout_map = kl.lora_layout_map(mesh, model=template)
    >>> distribution = keras.distribution.ModelParallel(
    ...     layout_map=layout_map, batch_dim_name="batch")
    >>> with distribution.scope():
    ...     base = build_model()            # kernels are sharded as created
    ...     lora_model = kl.apply_lora(base, rank=8)
    ...     lora_model.compile(...)
    ...     lora_model.fit(...)

    Args:
        device_mesh: a `keras.distribution.DeviceMesh` with an axis named
            `model_axis`.
        model: optional `keras.Model` with the variable paths and shapes of
            the model to distribute (the model itself, or the same
            architecture built once without a distribution). Its kernels
            and tables whose first axis the `model_axis` size does not
            divide are replicated instead of sharded.
        model_axis: the mesh axis to shard base weights over.
        layout_map: optional existing `LayoutMap` (e.g. a KerasHub
            backbone's `get_layout_map(mesh)`) on the same mesh. Its entries
            are kept and only the adapter entries are added: its own keys
            decide how base kernels are sharded.

    Returns:
        A new `keras.distribution.LayoutMap`.

    Raises:
        ValueError: not the JAX backend, or `model_axis` not in the mesh.
        TypeError: arguments of the wrong type.
    """
    backend = keras.backend.backend()
    if backend != "jax":
        raise ValueError(
            "lora_layout_map: Keras's distribution API (`ModelParallel`, "
            f"`LayoutMap`) works on the JAX backend only; this is the {backend!r} "
            "backend. Keras's torch backend has no distribution API, and its "
            "TensorFlow one is an unfinished prototype: on TensorFlow train "
            "under `tf.distribute.MirroredStrategy` instead (see docs/distributed.md)."
        )
    distribution = keras.distribution
    if not isinstance(device_mesh, distribution.DeviceMesh):
        raise TypeError(
            "lora_layout_map: `device_mesh` must be a "
            f"keras.distribution.DeviceMesh. Received: {device_mesh!r} of type "
            f"{type(device_mesh).__name__}"
        )
    if not isinstance(model_axis, str) or model_axis not in device_mesh.axis_names:
        raise ValueError(
            f"lora_layout_map: `model_axis` must name an axis of the device mesh "
            f"{list(device_mesh.axis_names)}. Received: model_axis={model_axis!r}"
        )
    if model is not None and not isinstance(model, keras.Model):
        raise TypeError(
            f"lora_layout_map: `model` must be None or a keras.Model. Received: "
            f"{model!r} of type {type(model).__name__}"
        )
    if layout_map is not None:
        if not isinstance(layout_map, distribution.LayoutMap):
            raise TypeError(
                "lora_layout_map: `layout_map` must be None or a "
                f"keras.distribution.LayoutMap. Received: {layout_map!r} of type "
                f"{type(layout_map).__name__}"
            )
        if layout_map.device_mesh is not device_mesh:
            raise ValueError(
                "lora_layout_map: `layout_map` is on another device mesh than "
                "`device_mesh`."
            )
    result = distribution.LayoutMap(device_mesh)
    if layout_map is not None:
        for key, layout in layout_map.items():
            result[key] = layout
        clashes = [
            key for key in layout_map if any(re.fullmatch(key, p) for p in _PROBES)
        ]
        if clashes:
            raise ValueError(
                f"lora_layout_map: `layout_map` keys {clashes} also match LoRA "
                "adapter variables (named 'lora_a', 'lora_b', 'lora_magnitude', "
                "with '_<adapter name>' for a named adapter); anchor them "
                "on the variable name, e.g. '.*query/kernel' (keras#19496)."
            )
    else:
        replicated = _indivisible(model, device_mesh, model_axis)
        exclude = f"(?!(?:{'|'.join(replicated)})$)" if replicated else ""
        for key in SHARDED_KEYS:
            result[exclude + key] = (model_axis,)
        for key in replicated:
            result[key] = ()
    for key in ADAPTER_KEYS:
        result[key] = ()
    return result


def _indivisible(model, device_mesh, model_axis):
    """Keys for the variables of `model` whose first axis cannot be sharded.

    A key is `(?:.*/)?<layer>(?:/<layer>)?/<variable>`: it matches the
    variable under any model name prefix and in both path forms. Layers of
    the same name elsewhere in the model are replicated too.
    """
    if model is None:
        return []
    size = device_mesh.shape[list(device_mesh.axis_names).index(model_axis)]
    keys = []
    for variable in model.weights:
        path = variable.path
        if not any(re.fullmatch(key, path) for key in SHARDED_KEYS):
            continue
        shape = tuple(variable.shape)
        if shape and shape[0] % size == 0:
            continue
        parts = path.split("/")
        leaf = re.escape(parts[-1])
        if len(parts) == 1:
            key = leaf
        else:
            owner = re.escape(parts[-2])
            key = f"(?:.*/)?{owner}(?:/{owner})?/{leaf}"
        if key not in keys:
            keys.append(key)
    return keys


# Paths an adapter variable can have, to check a user's keys against.
_PROBES = tuple(
    prefix + name
    for prefix in ("", "x/", "x/y/", "block_0/attention/query/")
    for name in ("lora_a", "lora_b", "lora_magnitude", "lora_a_task", "lora_b_task")
)
