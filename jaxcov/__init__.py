"""jaxcov: JAX-native RL for reasoning language models, with the entropy mechanism made visible."""

__version__ = "0.1.0"
