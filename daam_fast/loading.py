"""Loading the pipeline a front end runs: the session's one way in (:func:`daam_fast.session.load_pipeline`).

Where users' models are:
- a diffusers pipeline folder or a hub id (``from_pretrained``);
- ``"demo"``: the demo model shipped in the package (:mod:`daam_fast.demo`);
- a single-file checkpoint as WebUIs use them (``.safetensors`` / ``.ckpt``, SD 1.x/2.x or SDXL), through diffusers'
  ``from_single_file``; its configs come from the hub unless ``config`` names a diffusers folder of the same kind
  of model (configs and tokenizers; weights not needed), which loads it offline.

The dtype follows the model family on CUDA (fp16 for SD 1.x/2.x and SDXL, bf16 for SD3 and Flux, whose
activations overflow fp16) and is fp32 on the CPU unless asked otherwise. ``offload`` keeps the weights on the
CPU and moves them to the device when used (diffusers' model or sequential CPU offload, through accelerate);
``vae_tiling`` decodes large images tile by tile.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

__all__ = [
    "DEMO",
    "DTYPES",
    "OFFLOAD_MODES",
    "UsageError",
    "check_device",
    "check_model",
    "default_dtype",
    "load_pipeline",
    "single_file_pipeline_class",
]

logger = logging.getLogger(__name__)

#: ``--model demo``: the demo model shipped in the package.
DEMO = "demo"
#: ``--dtype`` values (``auto``: per model family on CUDA, fp32 on the CPU).
DTYPES = ("auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16")
OFFLOAD_MODES = ("model", "sequential")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
# Pipelines whose CUDA default is bf16 (their activations overflow fp16), by class-name prefix.
_BF16_FAMILIES = ("StableDiffusion3", "Flux")


class UsageError(ValueError):
    """A bad argument or request: front ends answer it with its one-line message (exit code 2, HTTP 400)."""


def default_dtype(class_name: str | None, device: str):
    """The dtype a pipeline of class ``class_name`` runs in on ``device`` by default: fp32 on the CPU; on CUDA
    bf16 for SD3 and Flux, fp16 for the others (SD 1.x/2.x, SDXL)."""
    import torch

    if not device.startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if (class_name or "").startswith(_BF16_FAMILIES) else torch.float16


def _dtype(name: str, class_name: str | None, device: str, what: str):
    import torch

    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    names.update(fp32=torch.float32, fp16=torch.float16, bf16=torch.bfloat16)
    if name == "auto":
        return default_dtype(class_name, device)
    if name not in names:
        raise UsageError(f"{what} {name!r}: valid are {', '.join(DTYPES)}")
    return names[name]


def _dtype_kwarg() -> str:
    import diffusers

    # diffusers renamed torch_dtype to dtype in 0.42 (it warns about the old name; older ones lack the new).
    return "dtype" if tuple(int(x) for x in diffusers.__version__.split(".")[:2]) >= (0, 42) else "torch_dtype"


def _looks_local(model: str) -> bool:
    # A hub id is "name" or "org/name"; anything path-like that does not exist is a missing folder or file.
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model


def _checkpoint_keys(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    import torch

    # weights_only: a .ckpt is a pickle; only tensors and plain containers are read (as diffusers reads it).
    data = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    while isinstance(data, dict) and "state_dict" in data:
        data = data["state_dict"]
    return list(data)


def single_file_pipeline_class(path, config=None, what: str = "--model"):
    """The diffusers pipeline class that loads the single-file checkpoint ``path``: the class of ``config`` (a
    diffusers folder) when given, else ``StableDiffusionXLPipeline`` or ``StableDiffusionPipeline`` as the weights'
    names say (SDXL's second text encoder, or an SD UNet). Raises :class:`UsageError` for other checkpoints."""
    import diffusers

    path, config = Path(path), None if config is None else Path(config)
    if config is not None:
        name = json.loads((config / "model_index.json").read_text()).get("_class_name", "")
    else:
        keys = _checkpoint_keys(path)
        if any(k.startswith("conditioner.embedders.1.") for k in keys):
            name = "StableDiffusionXLPipeline"
        elif any(k.startswith("model.diffusion_model.") for k in keys):
            name = "StableDiffusionPipeline"
        else:
            raise UsageError(
                f"{what} {str(path)!r}: not an SD 1.x/2.x or SDXL checkpoint (no model.diffusion_model.* or "
                "conditioner.* weights); for other models pass a diffusers folder, or --config with one"
            )
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_single_file"):
        raise UsageError(f"--config: {name or 'its model_index.json'} cannot load single-file checkpoints")
    return cls


def _source(model: str, config, what: str) -> tuple[str, Path | None, Path | None]:
    """``(kind, path, config)`` of ``model``: kind ``folder``, ``file`` (single-file checkpoint) or ``hub``."""
    path = Path(model).expanduser()
    if model == DEMO and not path.exists():
        from .demo import MODEL_DIR

        path = MODEL_DIR
    if config is not None:
        config = Path(config).expanduser()
        if not (config / "model_index.json").is_file():
            raise UsageError(f"--config {str(config)!r}: not a diffusers pipeline folder (no model_index.json)")
    if path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise UsageError(f"{what} {model!r}: a single-file checkpoint ends in {' or '.join(SINGLE_FILE_SUFFIXES)}")
        return "file", path, config
    if config is not None:
        raise UsageError("--config applies to single-file checkpoints (.safetensors / .ckpt) only")
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise UsageError(f"{what} {model!r}: the folder has no model_index.json (not a diffusers pipeline folder)")
        return "folder", path, None
    if _looks_local(model) or path.suffix in SINGLE_FILE_SUFFIXES:
        raise UsageError(f"{what} {model!r}: no such folder or file")
    return "hub", None, None


def check_model(model: str, config: str | None = None, *, what: str = "--model") -> str:
    """``model`` when it can name a pipeline: ``demo``, an existing diffusers folder, a single-file checkpoint
    (``.safetensors`` / ``.ckpt``, with ``config`` an optional diffusers folder), or a hub id. Raises
    :class:`UsageError` for an empty name, a missing folder or file, or one that is no pipeline; nothing is loaded."""
    if not isinstance(model, str) or not model.strip():
        raise UsageError(f"{what} is empty: give a diffusers pipeline folder, a checkpoint file, a hub id or demo")
    _source(model, config, what)
    return model


def check_device(device: str, *, what: str = "--device") -> str:
    """``device`` when this machine has it: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or another torch device type.
    Raises :class:`UsageError` for a malformed name or a CUDA device that is not there."""
    import torch

    if device == "auto":
        return device
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"{what} {device!r}: expected auto, cpu, cuda, cuda:N (or another torch device)") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"{what} {device!r}: CUDA is not available on this machine (use cpu or auto)")
        if parsed.index is not None and parsed.index >= count:
            raise UsageError(f"{what} {device!r}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return device



def load_pipeline(
    model: str,
    device: str = "auto",
    *,
    dtype: str = "auto",
    config: str | None = None,
    offload: str | None = None,
    vae_tiling: bool = False,
    quiet: bool = False,
    what: str = "--model",
):
    """A diffusers pipeline from ``model`` (a folder, a hub id, ``"demo"``, or a single-file ``.safetensors`` /
    ``.ckpt`` checkpoint with ``config`` an optional diffusers folder for its configs) on ``device`` (``auto``:
    CUDA when available, else the CPU) in ``dtype`` (``auto``: see :func:`default_dtype`).

    ``offload="model"`` / ``"sequential"``: diffusers' model / sequential CPU offload onto ``device`` (needs
    accelerate; sequential needs a CUDA device); ``vae_tiling``: decode in tiles. Raises :class:`UsageError` for
    bad arguments and ``RuntimeError`` when loading fails.
    """
    import torch

    check_model(model, config, what=what)
    kind, path, config = _source(model, config, what)
    if offload is not None and offload not in OFFLOAD_MODES:
        raise UsageError(f"--offload {offload!r}: valid are {', '.join(OFFLOAD_MODES)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if offload == "sequential" and not device.startswith("cuda"):
        raise UsageError(f"--offload sequential streams weights to a CUDA device; the device is {device}")
    if offload is not None and importlib.util.find_spec("accelerate") is None:
        raise UsageError(f"--offload {offload} needs the accelerate package: pip install accelerate")
    try:
        if kind == "file":
            cls = single_file_pipeline_class(path, config, what)
            kw = {_dtype_kwarg(): _dtype(dtype, cls.__name__, device, "--dtype")}
            if config is not None:
                kw.update(config=str(config), local_files_only=True)
            pipe = cls.from_single_file(str(path), **kw)
        else:
            from diffusers import DiffusionPipeline

            class_name = _class_name(path) if kind == "folder" else _hub_class_name(model)
            kw = {_dtype_kwarg(): _dtype(dtype, class_name, device, "--dtype")}
            pipe = DiffusionPipeline.from_pretrained(str(path) if path is not None else model, **kw)
    except UsageError:
        raise
    except Exception as exc:
        logger.debug("loading %s failed", model, exc_info=True)
        raise RuntimeError(f"could not load model {model!r}: {type(exc).__name__}: {exc}{_hint(kind, config)}") from exc
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe = pipe.to(device)
    if vae_tiling:
        pipe.vae.enable_tiling()
    pipe.set_progress_bar_config(desc="steps", leave=False, disable=quiet)
    return pipe


def _class_name(folder: Path) -> str | None:
    return json.loads((folder / "model_index.json").read_text()).get("_class_name")


def _hub_class_name(model: str) -> str | None:
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(model).get("_class_name")
    except Exception:  # offline or unknown: from_pretrained reports it
        logger.debug("no model_index.json for %s", model, exc_info=True)
        return None


def _hint(kind: str, config) -> str:
    if kind == "hub":
        return " (a hub id needs network access or a local cache; or pass a local folder)"
    if kind == "file" and config is None:
        return (
            " (a single-file checkpoint takes its configs from the hub: offline, pass --config DIR, a diffusers "
            "folder of the same kind of model with its configs and tokenizers)"
        )
    return ""
