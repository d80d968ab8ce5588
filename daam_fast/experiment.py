"""daam 0.2.0's experiment folders: one generation (image, prompt, seed, heat maps) saved and loaded again, and
``set_seed``.

A folder holds what daam writes, with the same names: ``prompt.txt``, ``seed.txt``, ``<subtype>/output.png``,
per-word ``<subtype>/<word>.heat_map.png``, ground-truth masks ``<name>.gt.png`` and ``annotations.json``. The
maps go into ``<subtype>/generation.safetensors`` (a :meth:`GlobalHeatMap.save` file: safetensors + JSON with the
prompt's tokens, so loading needs no tokenizer) instead of daam's pickled ``generation.pt``, which loading would
have to unpickle, i.e. run code from the file.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .heatmap import GlobalHeatMap, load

__all__ = ["GENERATION_FILE", "GenerationExperiment", "as_pil", "set_seed"]

logger = logging.getLogger(__name__)

#: The maps of an experiment, in ``<path>/<subtype>/``; daam's ``generation.pt`` is a pickle.
GENERATION_FILE = "generation.safetensors"


def set_seed(seed: int, device: str | torch.device | None = None) -> torch.Generator:
    """Seed Python's, NumPy's and torch's global generators (all CUDA devices included) with ``seed`` and return a
    ``torch.Generator`` seeded the same, for a pipeline's ``generator=`` (daam 0.2.0's ``set_seed``).

    The generator is on ``device``; by default CUDA when available, else the CPU, as in daam (diffusers wants a
    CPU generator for a pipeline on the CPU: pass ``device="cpu"`` there on a CUDA machine).
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def as_pil(image):
    """``image`` as a PIL image: a PIL image as it is; an ``[H, W, C]`` array or a ``[C, H, W]`` tensor (what
    diffusers' ``output_type="np"`` / ``"pt"`` give per image), uint8 or float in [0, 1]."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().permute(1, 2, 0).numpy()
    arr = np.asarray(image)
    if not np.issubdtype(arr.dtype, np.integer):
        arr = (arr.astype(np.float32).clip(0, 1) * 255).round()
    arr = arr.astype(np.uint8)
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)


def _mask_png(mask: torch.Tensor):
    from PIL import Image

    # daam's mask files: the mask in all four channels; readers use the alpha channel.
    m = (mask.detach().float().cpu().clamp(0, 1) * 255).round().byte()
    return Image.fromarray(m.unsqueeze(-1).expand(-1, -1, 4).contiguous().numpy(), mode="RGBA")


def _read_mask(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        alpha = np.asarray(im.convert("RGBA"))[..., 3]
    return torch.from_numpy((alpha > 0).astype(np.float32))


@dataclass
class GenerationExperiment:
    """One generation: ``image`` (PIL), ``global_heat_map`` (fp32 ``[n_tokens, H, W]``, row ``i`` = token position
    ``i``, daam's ``GlobalHeatMap.heat_maps``), ``prompt`` and ``seed``, stored in ``path / id``.

    Fields and methods are daam 0.2.0's (``heat_map``, ``save``, ``load``, ``save_heat_map``,
    ``save_all_heat_maps``, ``read_prompt``, ``read_seed``, ...). ``tokenizer`` (a fast tokenizer) or ``source``
    (the :class:`GlobalHeatMap` the maps came from: its tokens, positions and metadata) is needed to look words up;
    :meth:`load` restores ``source`` from the file, so no tokenizer is needed after loading. daam's COCO helpers
    and prediction masks are not provided.
    """

    image: Any
    global_heat_map: torch.Tensor
    prompt: str
    seed: int | None = None
    id: str = "."
    path: Path | None = None
    _: KW_ONLY
    truth_masks: dict[str, torch.Tensor] | None = None
    annotations: dict[str, Any] | None = None
    subtype: str = "."
    tokenizer: Any = None
    source: GlobalHeatMap | None = None

    def __post_init__(self):
        # daam's rule: an experiment lives in <path>/<id> (pathlib drops the default id ".").
        self.path = None if self.path is None else Path(self.path) / self.id

    @classmethod
    def from_heat_map(
        cls, heat_map: GlobalHeatMap, image, path, seed=None, id: str = ".", subtype: str = ".", tokenizer=None
    ) -> GenerationExperiment:
        """The experiment of a traced generation: ``heat_map`` from ``compute_global_heat_map`` and its image."""
        return cls(
            image, heat_map.heat_maps, heat_map.prompt, seed=seed, id=id, path=path, subtype=subtype,
            tokenizer=tokenizer, source=heat_map,
        )

    def nsfw(self) -> bool:
        """True when the image is all black (what safety checkers return instead of a flagged image)."""
        return not np.asarray(self.image).any()

    def heat_map(self, tokenizer=None) -> GlobalHeatMap:
        """A :class:`GlobalHeatMap` of :attr:`global_heat_map` for word lookup: through ``tokenizer`` when given,
        else through :attr:`source`'s tokens, else through :attr:`tokenizer`."""
        if tokenizer is None and self.source is not None:
            src = self.source
            return type(src)(src.tokens, self.global_heat_map, positions=src.positions, meta=src.meta)
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if tokenizer is None:
            raise ValueError(
                "this experiment cannot look words up: it has neither a tokenizer nor the GlobalHeatMap its maps "
                "came from; pass tokenizer= (the pipeline's tokenizer) or build it with tokenizer= / source="
            )
        return GlobalHeatMap(tokenizer, self.prompt, self.global_heat_map)

    def _folder(self, path) -> Path:
        root = self.path if path is None else Path(path) / self.id
        if root is None:
            raise ValueError("the experiment has no folder: pass path= here or when building it")
        return root

    def clear_checkpoint(self) -> None:
        """Delete the saved maps file (daam: ``generation.pt``), keeping images and texts."""
        (self._folder(None) / self.subtype / GENERATION_FILE).unlink(missing_ok=True)

    def save(self, path=None, heat_maps: bool = True, tokenizer=None) -> Path:
        """Write the experiment into ``path / id`` (default :attr:`path`): ``prompt.txt``, ``seed.txt``,
        ``annotations.json``, ``<name>.gt.png`` for :attr:`truth_masks`, and in ``<subtype>/``: ``output.png``,
        the maps (:data:`GENERATION_FILE`) and, with ``heat_maps``, one ``<word>.heat_map.png`` per word of the
        prompt. Returns the folder."""
        root = self._folder(path)
        folder = root / self.subtype
        folder.mkdir(parents=True, exist_ok=True)
        gm = self.heat_map(tokenizer)
        gm.save(folder / GENERATION_FILE, experiment={"seed": self.seed, "id": self.id, "subtype": self.subtype})
        as_pil(self.image).save(folder / "output.png")
        (root / "prompt.txt").write_text(self.prompt, encoding="utf-8")
        (root / "seed.txt").write_text(str(self.seed), encoding="utf-8")
        for name, mask in (self.truth_masks or {}).items():
            _mask_png(mask).save(root / f"{name.lower()}.gt.png")
        if heat_maps:
            self._save_words(gm, folder)
        self.save_annotations(root)
        return root

    def save_annotations(self, path=None) -> None:
        """Write :attr:`annotations` (when set) to ``annotations.json`` in ``path`` (default :attr:`path`)."""
        if self.annotations is not None:
            folder = Path(path) if path is not None else self._folder(None)
            (folder / "annotations.json").write_text(json.dumps(self.annotations), encoding="utf-8")

    def annotate(self, key: str, value: Any) -> GenerationExperiment:
        """Set ``annotations[key] = value`` (saved by :meth:`save`); returns self."""
        self.annotations = {**(self.annotations or {}), key: value}
        return self

    def save_heat_map(
        self, word: str, tokenizer=None, crop: int | None = None, output_prefix: str = "", absolute: bool = False
    ) -> Path:
        """Draw ``word``'s map over the image (:meth:`WordHeatMap.plot_overlay`) into
        ``<path>/<subtype>/<output_prefix><word>.heat_map.png``; returns the file. ``absolute`` colours on a
        fixed 0..1 scale instead of the map's own range. ``crop`` must be None (daam 0.2.0 accepts and ignores
        it). Raises ``ValueError`` (a ``WordNotFoundError``) when ``word`` is not in the prompt."""
        if crop is not None:
            raise ValueError(f"crop={crop!r} is not supported (daam 0.2.0 ignores it too): leave it None")
        folder = self._folder(None) / self.subtype
        folder.mkdir(parents=True, exist_ok=True)
        return self._save_word(self.heat_map(tokenizer), word, folder, output_prefix, absolute)

    def save_all_heat_maps(self, tokenizer=None, crop: int | None = None) -> dict[str, Path]:
        """:meth:`save_heat_map` for each space-separated word of the prompt that has a map (others are skipped,
        as daam skips them); returns ``{word: file}``."""
        if crop is not None:
            raise ValueError(f"crop={crop!r} is not supported (daam 0.2.0 ignores it too): leave it None")
        folder = self._folder(None) / self.subtype
        folder.mkdir(parents=True, exist_ok=True)
        return self._save_words(self.heat_map(tokenizer), folder)

    def _save_words(self, gm: GlobalHeatMap, folder: Path) -> dict[str, Path]:
        written = {}
        for word in self.prompt.split(" "):
            try:
                written[word] = self._save_word(gm, word, folder, "", False)
            except (ValueError, IndexError) as exc:  # punctuation only, cut by the token window, not traced
                logger.debug("no heat map file for %r: %s", word, exc)
        return written

    def _save_word(self, gm: GlobalHeatMap, word: str, folder: Path, prefix: str, absolute: bool) -> Path:
        from matplotlib.figure import Figure

        path = folder / f"{prefix}{word.lower()}.heat_map.png"
        # A figure of its own (not pyplot's current one), so saving files never touches the user's figures.
        fig = Figure()
        gm.compute_word_heat_map(word).plot_overlay(
            self.image, out_file=path, color_normalize=not absolute, ax=fig.add_subplot()
        )
        return path

    # -- reading folders -------------------------------------------------------------------------
    @staticmethod
    def contains_truth_mask(path, prompt_id: str | None = None) -> bool:
        """Whether the experiment folder ``path`` (or ``path / prompt_id``) holds ``*.gt.png`` masks."""
        return any((Path(path) / (prompt_id or ".")).glob("*.gt.png"))

    @staticmethod
    def read_seed(path, prompt_id: str | None = None) -> int:
        """The seed in ``seed.txt`` of ``path`` (or ``path / prompt_id``)."""
        return int((Path(path) / (prompt_id or ".") / "seed.txt").read_text(encoding="utf-8"))

    @staticmethod
    def read_prompt(path, prompt_id: str | None = None) -> str:
        """The prompt in ``prompt.txt`` of ``path`` (or ``path / prompt_id``)."""
        return (Path(path) / (prompt_id or ".") / "prompt.txt").read_text(encoding="utf-8").strip()

    @staticmethod
    def has_annotations(path) -> bool:
        """Whether ``path`` holds ``annotations.json``."""
        return (Path(path) / "annotations.json").exists()

    @staticmethod
    def has_experiment(path, prompt_id: str) -> bool:
        """Whether ``path / prompt_id`` holds saved maps."""
        return (Path(path) / prompt_id / GENERATION_FILE).exists()

    @classmethod
    def load(cls, path, subtype: str = ".", all_subtypes: bool = False):
        """Read an experiment saved by :meth:`save` from its folder ``path`` (``<root>/<id>``): image, maps with
        their tokens, prompt, seed, ground-truth masks and annotations. ``all_subtypes`` reads every sub-folder
        that holds maps and returns a list.

        Raises ``FileNotFoundError`` when the files are missing and :class:`~daam_fast.HeatMapFileError` when the
        maps file is corrupt or not daam_fast's (daam's ``generation.pt`` pickles are not read).
        """
        path = Path(path)
        if all_subtypes:
            return [
                cls.load(path, subtype=d.name)
                for d in sorted(path.iterdir())
                if d.is_dir() and (d / GENERATION_FILE).exists()
            ]
        from PIL import Image

        gm = load(path / subtype / GENERATION_FILE)
        with Image.open(path / subtype / "output.png") as im:
            image = im.copy()
        info = gm.meta.get("experiment") or {}
        exp = cls(image, gm.heat_maps, gm.prompt, seed=info.get("seed"), path=path, subtype=subtype, source=gm)
        exp.id = info.get("id", ".")
        masks: dict[str, torch.Tensor] = {}
        for mask_path in sorted(path.glob("*.gt.png")):
            word = mask_path.name[: -len(".gt.png")].lower()
            mask = _read_mask(mask_path)
            masks[word] = (masks[word] + mask).clamp_(0, 1) if word in masks else mask
        exp.truth_masks = masks
        if cls.has_annotations(path):
            exp.annotations = json.loads((path / "annotations.json").read_text(encoding="utf-8"))
        return exp
