"""Build glue. Package metadata lives in pyproject.toml; this file adds the optional CUDA extension
``daam_fast._C`` built from csrc/ (see csrc/README.md).

The extension is built when torch is importable at build time, is a CUDA build (``torch.version.cuda``) and
a CUDA toolkit is found (``CUDA_HOME``), or when ``DAAM_FAST_BUILD_CUDA=1`` forces it;
``DAAM_FAST_BUILD_CUDA=0`` turns it off. Otherwise the pure-Python package installs as usual. pip builds in an
isolated environment without torch by default, so a CUDA build needs ``pip install --no-build-isolation``.
Target architectures come from ``TORCH_CUDA_ARCH_LIST`` (torch's BuildExtension reads it), e.g. "8.0;9.0".
"""

import importlib.util
import logging
import os
from pathlib import Path

from setuptools import setup

log = logging.getLogger("daam_fast.setup")
ROOT = Path(__file__).resolve().parent


def _build_config():
    # By path: importing the daam_fast package would import torch (and need it) before we know we want it.
    spec = importlib.util.spec_from_file_location(
        "_daam_fast_cuda_build", ROOT / "daam_fast" / "kernels" / "cuda_build.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cuda_extension_kwargs() -> dict:
    """``ext_modules``/``cmdclass`` for setup() when the CUDA extension should be built, else ``{}``."""
    cfg = _build_config()
    flag = os.environ.get(cfg.BUILD_ENV, "").strip()
    if flag == "0":
        log.info("%s=0: not building %s", cfg.BUILD_ENV, cfg.EXT_MODULE)
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:
        if flag == "1":
            raise RuntimeError(
                f"{cfg.BUILD_ENV}=1 but torch is not importable at build time ({exc}); install a CUDA build of "
                "torch first and use `pip install --no-build-isolation`"
            ) from exc
        log.info("torch not importable at build time: not building %s", cfg.EXT_MODULE)
        return {}
    if flag != "1" and (torch.version.cuda is None or CUDA_HOME is None):
        log.info("not building %s: torch.version.cuda=%s, CUDA_HOME=%s", cfg.EXT_MODULE, torch.version.cuda, CUDA_HOME)
        return {}
    ext = CUDAExtension(
        name=cfg.EXT_MODULE,
        sources=list(cfg.SOURCES),
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args={"cxx": list(cfg.CXX_FLAGS), "nvcc": list(cfg.NVCC_FLAGS)},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(**cuda_extension_kwargs())
