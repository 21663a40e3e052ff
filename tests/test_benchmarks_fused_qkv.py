"""`benchmarks/fused_qkv.py` times one `x·[A_q | A_k | A_v]` product against
three `low_rank` calls; its figures only mean something if both rows
compute the same gradients. No timing is asserted."""

import pathlib
import sys

import numpy as np

# `benchmarks/` sits next to `tests/` and is not installed with the package.
sys.path.append(str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import fused_qkv  # noqa: E402


def test_fused_and_separate_rows_compute_the_same_gradients():
    grads = fused_qkv.gradients(tokens=16, width=32)
    names = ["dx"] + [f"d{f}_{p}" for f in "AB" for p in "qkv"]
    assert len(grads["fused"]) == len(grads["separate"]) == len(names)
    for name, fused, separate in zip(
        names, grads["fused"], grads["separate"], strict=True
    ):
        assert fused.shape == separate.shape, name
        # float32, the same products summed in another order: 1e-5 is ~100 ulps
        # of these O(1) values; a wrong slice or a missing scale is off by O(1).
        np.testing.assert_allclose(fused, separate, rtol=1e-5, atol=1e-5, err_msg=name)
        assert np.abs(separate).max() > 1e-3, name  # a gradient, not zeros
