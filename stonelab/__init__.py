"""stonelab: a conformance lab for atomic, stateless operating systems."""

__version__ = "0.1.0"
