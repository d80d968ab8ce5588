"""Build glue. Package metadata lives in pyproject.toml; this file exists for the optional CUDA
extension in csrc/, which later builds only when CUDA is usable (see csrc/README.md)."""

from setuptools import setup

setup()
