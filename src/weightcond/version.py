"""The package's version (one place; ``pyproject.toml`` states the same, and a test checks
that they agree)."""

__version__ = "0.1.0"
