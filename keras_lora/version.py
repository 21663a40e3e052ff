"""The keras_lora version, read by pyproject.toml without importing Keras."""

__version__ = "0.1.0"
