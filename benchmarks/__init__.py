"""keras_lora benchmarks: `python -m benchmarks --backend {tensorflow,jax,torch,all}`.

Modules other than `__main__` and `report` import Keras, so import them only
after `KERAS_BACKEND` is set (`__main__` does this).
"""
