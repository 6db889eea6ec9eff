"""The package version, a leaf every layer may read (/info, the CLI, the container labels)."""

__version__ = "0.1.0"
