"""k15: the reinforcement-learning system of the Kimi k1.5 report in JAX."""

__version__ = "0.1.0"
