"""A LoRA layer is a drop-in for the layer it wraps.

KerasHub blocks and converters read `kernel`, `bias`, `embeddings`,
`units`, `equation`, ... of their sublayers, also after those were swapped
for LoRA layers in place. `DropIn` (a mixin of `LoRALayer`) answers the
public attributes a LoRA layer lacks from the wrapped layer. Private names
never fall through (Keras probes its own private state with `hasattr`),
and writes never do: they land on the LoRA layer, as for any attribute.
"""


class DropIn:
    """Reads of missing public attributes fall through to `self.layer`."""

    def __getattr__(self, name):
        # Only reached when normal lookup fails. Public attributes this layer
        # lacks are read from the wrapped layer (a drop-in). Private names
        # never fall through (Keras probes its private state with
        # `hasattr`), and writes never do.
        parent = _parent_getattr(type(self))
        if parent is not None:  # torch.nn.Module's: parameters, submodules
            try:
                return parent(self, name)
            except AttributeError:
                pass
        state = self.__dict__
        layer = state.get("layer", state.get("_modules", {}).get("layer"))
        if name.startswith("_") or name == "layer" or layer is None:
            raise AttributeError(
                f"'{type(self).__name__}' object has no attribute '{name}'"
            )
        try:
            return getattr(layer, name)
        except AttributeError as error:
            raise AttributeError(
                f"'{type(self).__name__}' object has no attribute '{name}', "
                f"nor has the {type(layer).__name__} it wraps ({error})"
            ) from None

    def enable_lora(self, *args, **kwargs):
        """Refused: this layer already is a LoRA layer (Keras core's
        `enable_lora` would put a second update on the frozen base)."""
        raise ValueError(
            f"Layer '{self.name}' is a keras_lora {type(self).__name__}; Keras "
            "core's `enable_lora` cannot be used on it (add another adapter "
            "with `add_adapter` instead)."
        )


# class -> the `__getattr__` after `DropIn` in its MRO, or None.
_PARENTS = {}


def _parent_getattr(cls):
    """The `__getattr__` `DropIn`'s would reach by `super()` (on torch,
    `torch.nn.Module`'s, which holds `self.layer` among its submodules).
    Found once per class, without `super()`: `torch.compile` cannot trace
    `super()` here, and `self.layer` is read this way on every call."""
    if cls not in _PARENTS:
        mro = cls.__mro__
        after = mro[mro.index(DropIn) + 1 :]
        found = (vars(klass).get("__getattr__") for klass in after)
        _PARENTS[cls] = next((f for f in found if f is not None), None)
    return _PARENTS[cls]
