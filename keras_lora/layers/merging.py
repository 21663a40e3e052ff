"""The one delta of a LoRA layer, and every merge built on it.

`Merging` is a mixin of `LoRALayer`. `delta()` is the kernel-shaped update
the active adapters (or one named adapter) amount to; the copy merge
(`merged_layer`, used by `merge_lora` and export), the in-place merge
(`merge`) and `merged_kernel` are all `W + delta`. The host merge of one
plain adapter computes the same `W + scale·A·B` in NumPy through the same
factoring description (`layers.factoring`), to keep memory low.
"""

import keras
import numpy as np
from keras import ops

from keras_lora.layers import host_merge, quantized
from keras_lora.layers.factoring import product
from keras_lora.layers.variants import dora_factor


class Merging:
    """`delta`, `merged_kernel`, `merged_layer`, `merge`/`unmerge`."""

    def delta(self, adapter=None):
        """The kernel update, shaped like the base kernel, in float32.

        Args:
            adapter: an adapter name, or `None` for the active adapters.

        Returns:
            `merged - W`: `scale·A·B` for one plain adapter; the sum over
            several; PiSSA/OLoRA add `residual - W`; DoRA's is
            `(c - 1)·W' + c·scale·A·B` with `c = m/‖W' + scale·A·B‖`
            per output unit (`W'` the frozen kernel).
        """
        kernel = ops.cast(self.base_kernel, "float32")
        return ops.subtract(self._merged_float32(adapter), kernel)

    def merged_kernel(self, adapter=None):
        """`W + delta(adapter)` in the base kernel's dtype (float32 for a
        quantized base)."""
        kernel = self.base_kernel
        return ops.cast(self._merged_float32(adapter), kernel.dtype)

    def merged_layer(self, check_finite=True, requantize=False):
        """Returns a new, built base layer holding the merged kernel.

        It has the base layer's class, config and name. Raises `ValueError`
        (and builds nothing) if the merged kernel has NaN or Inf and
        `check_finite` is true.

        A quantized base (`"int8"`, `"int4"`, `"float8"`) is dequantized
        and merged in float: the new layer has the base's float (source)
        dtype policy. With `requantize=True` it is then quantized again in
        the base's mode and int4 block size (`layers.quantized`).
        """
        base = self.layer
        mode = self.quantization_mode
        merged, finite = self._merged_array(host=mode is None, check=check_finite)
        if check_finite and not finite:
            raise ValueError(
                f"Merging LoRA layer '{self.name}' gives NaN or Inf in its "
                "kernel; nothing was merged. Check the adapters, or pass "
                "check_finite=False to merge anyway."
            )
        if mode is None:
            kernel = self.base_kernel
            return host_merge.build_with_weights(
                base,
                [
                    merged if w is kernel else np.array(ops.convert_to_numpy(w))
                    for w in base.weights
                ],
            )
        config = base.get_config()
        # Keras's quantized policies name their source; an NF4 layer keeps
        # its float policy.
        config["dtype"] = getattr(base.dtype_policy, "_source_name", None) or (
            base.dtype_policy.name
        )
        config.pop("quantization_config", None)
        float_class = getattr(base, "float_layer_class", None)
        new = (float_class() if float_class else base.__class__).from_config(config)
        new.build_from_config(base.get_build_config())
        kernel = getattr(new, self.kernel_attr)
        old = {w.name: w for w in base.weights}
        new.set_weights(
            [
                merged if w is kernel else ops.convert_to_numpy(old[w.name])
                for w in new.weights
            ]
        )
        if requantize:
            quantized.requantize(new, mode, base)
        return new

    @property
    def merged(self):
        """Whether this layer is merged in place (`merge`)."""
        return self._merged is not None

    def merge(self, kernel=None):
        """Merges in place: calls then multiply by `kernel` alone (default
        `merged_kernel()`), with no adapter math. The base kernel, shared
        with the model `apply_lora` was given, is not written; `unmerge`
        drops the merged kernel, so the layer is bitwise what it was."""
        if kernel is None:
            kernel = ops.convert_to_numpy(self.merged_kernel())
        dtype = self.compute_dtype if self.quantization_mode is None else "float32"
        value = np.asarray(kernel).astype(keras.backend.standardize_dtype(dtype))
        object.__setattr__(self, "_merged", ops.convert_to_tensor(value))
        self._changed()

    def unmerge(self):
        """Undoes `merge`, exactly (nothing is subtracted)."""
        object.__setattr__(self, "_merged", None)
        self._changed()

    # ----- helpers --------------------------------------------------------

    def _merge_adapters(self, name):
        if name is None:
            return [self._adapters[n] for n in self._active if n in self._adapters]
        return [self.get_adapter(name)]

    def _adapter_delta(self, adapter):
        """`scale·A·B` of one adapter, shaped like the kernel, float32."""
        return product(
            ops.cast(adapter.a, "float32"),
            ops.cast(adapter.b, "float32"),
            adapter.scale,
            adapter.rank,
            self.base_kernel.shape,
            self.kernel_layout(),
            ops,
        )

    def _dora_factor(self, adapter, frozen=None):
        if frozen is None:
            frozen = self._frozen_for([adapter])
        return dora_factor(frozen, adapter, self.kernel_layout(), self._norm_axes())

    def _merged_float32(self, name=None):
        adapters = self._merge_adapters(name)
        frozen = ops.cast(self._frozen_for(adapters), "float32")
        total = frozen
        for adapter in adapters:
            delta = self._adapter_delta(adapter)
            if adapter.magnitude is None:
                total = ops.add(total, delta)
                continue
            c = self._expand_to_kernel(self._dora_factor(adapter, frozen))
            scaled = ops.multiply(ops.subtract(c, 1.0), frozen)
            total = ops.add(total, ops.add(scaled, ops.multiply(c, delta)))
        return total

    def _merged_array(self, host, check=True):
        """`(merged, finite)`: the merged kernel as a NumPy array, and
        whether it is finite (`True` if not `check`ed). One plain adapter on a
        float base is merged in host memory (`host_merge`): the same
        `W + scale·A·B` as `delta()`, through the same factoring."""
        adapters = self._merge_adapters(None)
        plain = (
            len(adapters) == 1
            and adapters[0].magnitude is None
            and adapters[0].residual is None
        )
        if host and plain:
            (adapter,) = adapters
            return host_merge.merge_kernel(
                self.base_kernel,
                adapter.a,
                adapter.b,
                adapter.scale,
                adapter.rank,
                self.kernel_layout(),
            )
        merged = ops.convert_to_numpy(self.merged_kernel())
        return merged, not check or host_merge.all_finite(merged)

    def _expand_to_kernel(self, c):
        for axis in sorted(self._norm_axes()):
            c = ops.expand_dims(c, axis)
        return c
