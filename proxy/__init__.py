"""indexguard: a caching proxy for the Python package index that guards against
dependency confusion."""

__version__ = "0.1.0"
