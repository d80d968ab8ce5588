"""Write an analysis to a folder: images, per-word overlays, figures, maps (safetensors) and ``report.json``.

Shared by ``daam-fast generate`` / ``analyze`` and the web UI. The layout and the fields of ``report.json`` are
documented in ``docs/CLI.md`` and in ``daam-fast generate --help``; :data:`REPORT_FIELDS` lists the top-level
keys (the tests check them). Paths inside the report are relative to the output folder. Undefined numbers
(``nan``) are written as ``null`` so the file is strict JSON.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

from . import analysis as A
from . import figures as Fg
from .heatmap import GlobalHeatMap
from .version import __version__

__all__ = [
    "REPORT_FIELDS",
    "RUN_FIELDS",
    "FigureSet",
    "build_report",
    "json_safe",
    "safe_name",
    "sweep_and_profile",
    "write_report",
    "write_run",
]

#: Top-level keys of report.json.
REPORT_FIELDS = (
    "daam_fast_version",
    "command",
    "model",
    "prompt",
    "negative_prompt",
    "words",
    "seeds",
    "steps",
    "size",
    "guidance_scale",
    "runs",
    "seed_sweep",
    "time_profile",
    "figures",
)
#: Keys of each entry of report.json's ``runs``.
RUN_FIELDS = (
    "seed",
    "image",
    "maps",
    "negative_maps",
    "overlays",
    "influence",
    "negative_influence",
    "overlap",
    "dominance_area",
)


#: Longest side, in pixels, of the image (or its grey stand-in) drawn inside figures.
FIGURE_IMAGE_SIDE = 512


def safe_name(word: str) -> str:
    """A file-name-safe form of ``word`` (letters, digits, ``-`` and ``_`` of any script kept)."""
    return re.sub(r"[^\w-]+", "_", word).strip("_") or "word"


def json_safe(x):
    """``x`` with every nan / inf float (in nested dicts, lists, tuples) replaced by None, so ``json.dumps``
    writes strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    return x


class FigureSet:
    """Saves figures under ``out`` and remembers each one's path and pixel size for the report."""

    def __init__(self, out: Path):
        self.out = out
        self.entries: dict[str, dict] = {}

    def add(self, key: str, rel: str, fig) -> str:
        path = self.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        w, h = Fg.save(fig, path)
        self.entries[key] = {"path": rel, "width": w, "height": h}
        return rel


def _influence(gm: GlobalHeatMap, words=None) -> list[dict]:
    return [{"word": r.word, "share": r.share, "mass": r.mass} for r in A.word_influence(gm, words)]


def write_run(
    out: Path,
    figs: FigureSet,
    maps: GlobalHeatMap,
    words: Sequence[str],
    *,
    image=None,
    negative_maps: GlobalHeatMap | None = None,
    seed: int | None = None,
    model: str | None = None,
    prefix: str = "",
    save_maps: bool = True,
) -> dict:
    """Write one image's outputs under ``out / prefix`` and return its ``runs`` entry (see :data:`RUN_FIELDS`).

    ``image`` (PIL) is saved as ``image.png`` and gives the overlays (``overlays/<NN>_<word>.png``, the image's
    size); without it the overlay grid is drawn on a grey image of the latent's aspect.
    """
    from PIL import Image

    base = out / prefix if prefix else out
    base.mkdir(parents=True, exist_ok=True)

    def rel(name):
        return f"{prefix}/{name}" if prefix else name

    entry: dict = {"seed": seed, "image": None, "maps": None, "negative_maps": None, "overlays": {}}
    if image is not None:
        image.save(base / "image.png")
        entry["image"] = rel("image.png")
        (base / "overlays").mkdir(exist_ok=True)
        names, stack = A.word_maps(maps, words)
        for i, (w, m) in enumerate(zip(names, stack, strict=True)):
            name = rel(f"overlays/{i:02d}_{safe_name(w)}.png")
            Fg.overlay_image(image, m).save(out / name)
            entry["overlays"][w] = name
    if save_maps:
        maps.save(base / "maps.safetensors", seed=seed)
        entry["maps"] = rel("maps.safetensors")
        if negative_maps is not None:
            negative_maps.save(base / "negative_maps.safetensors", seed=seed)
            entry["negative_maps"] = rel("negative_maps.safetensors")
    # The figures draw the image (or a grey stand-in of the maps' aspect) at most FIGURE_IMAGE_SIDE pixels a side:
    # their size is fixed, so a larger copy shows nothing more, and a map file of extreme aspect (1000 x 1) must
    # not become a 256 x 256000 picture.
    h, w = maps.heat_maps.shape[-2:]
    if image is None:
        scale = FIGURE_IMAGE_SIDE / max(h, w)
        shown = Image.new("RGB", (max(1, round(w * scale)), max(1, round(h * scale))), (128, 128, 128))
    else:
        shown = image.copy()
        shown.thumbnail((FIGURE_IMAGE_SIDE, FIGURE_IMAGE_SIDE))
    tag = f"{prefix}/" if prefix else ""
    figs.add(f"{tag}overlay_grid", rel("overlay_grid.png"), Fg.overlay_grid(shown, maps, words, model=model))
    overlap = A.concept_overlap(maps, words)
    dominance = A.dominance_map(maps, words)
    figs.add(f"{tag}overlap", rel("overlap.png"), Fg.overlap_figure(overlap, model=model))
    picture = None if image is None else shown
    figs.add(f"{tag}dominance", rel("dominance.png"), Fg.dominance_figure(dominance, picture, model=model))
    entry["influence"] = _influence(maps)
    entry["negative_influence"] = None
    if negative_maps is not None and negative_maps.tokens.words:
        entry["negative_influence"] = _influence(negative_maps)
        figs.add(
            f"{tag}negative_overlay_grid",
            rel("negative_overlay_grid.png"),
            Fg.overlay_grid(shown, negative_maps, model=f"negative prompt, {model}" if model else "negative prompt"),
        )
    entry["overlap"] = {"words": overlap.words, "iou": overlap.iou.tolist(), "pearson": overlap.pearson.tolist()}
    entry["dominance_area"] = dominance.area()
    return entry


def build_report(command: str, **fields) -> dict:
    """The ``report.json`` dictionary of a ``command`` (``generate``, ``analyze``, ``ui``, ...): the package
    version, the command, then every other field of :data:`REPORT_FIELDS`, in that order. Raises ``ValueError``
    naming missing or unknown fields."""
    given = {"daam_fast_version": __version__, "command": command, **fields}
    missing = [k for k in REPORT_FIELDS if k not in given]
    unknown = [k for k in given if k not in REPORT_FIELDS]
    if missing or unknown:
        raise ValueError(f"report fields missing {missing}, unknown {unknown}; the fields are {list(REPORT_FIELDS)}")
    return {k: given[k] for k in REPORT_FIELDS}


def write_report(out: Path, report: dict) -> Path:
    """Write ``report`` (all :data:`REPORT_FIELDS`) to ``out/report.json`` as strict JSON; returns the path."""
    missing = [k for k in REPORT_FIELDS if k not in report]
    if missing:
        raise ValueError(f"report lacks fields {missing}")
    path = out / "report.json"
    path.write_text(json.dumps(json_safe(report), indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    return path


def sweep_and_profile(
    out: Path, figs: FigureSet, maps: Sequence[GlobalHeatMap], words, profile=None, model=None
) -> tuple[dict | None, dict | None]:
    """The ``seed_sweep`` and ``time_profile`` report entries (figures written), ``None`` where not available
    (one seed; no per-step profile)."""
    sweep = None
    if len(maps) > 1:
        sw = A.seed_sweep(maps, words)
        figs.add("seed_sweep", "seed_sweep.png", Fg.seed_sweep_figure(sw, model=model))
        sweep = {"seeds": sw.seeds, "stability": sw.stability, "figure": "seed_sweep.png"}
    tp = None
    if profile is not None:
        figs.add("time_profile", "time_profile.png", Fg.time_profile_figure(profile, model=model))
        tp = {
            "seed": maps[0].meta.get("seed"),
            "words": profile.words,
            "phases": {k: [r.start, r.stop] for k, r in profile.phases.items()},
            "share": profile.share.tolist(),
            "mass": profile.mass.tolist(),
            "figure": "time_profile.png",
        }
    return sweep, tp
