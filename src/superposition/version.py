"""The package version, importable without loading anything else (folders record it; ``--version`` prints it)."""

__version__ = "0.1.0"
