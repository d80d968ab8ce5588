"""The package version (a leaf, so that any module may record it without importing the package's façade)."""

__version__ = "0.1.0"
