"""The front-end session: what ``daam-fast generate``, ``analyze``, ``ui`` and ``batch`` share.

- A :class:`Request` (prompt, seeds, size, steps, guidance, words), checked by :func:`make_request` before any
  model is loaded; bad values raise :class:`UsageError` naming the option and what is valid.
- :func:`load_pipeline` (from :mod:`daam_fast.loading`): a diffusers folder, hub id, the demo model or a
  single-file checkpoint, in the model family's dtype, optionally offloaded.
- :func:`prompt_sources` / :func:`check_words`: the prompt's words as the model family's own text sources
  (tokenizers and positions) give them, so every family is handled alike (SD 1.x/2.x, SDXL, SD3, Flux).
- :func:`run_seed`: one traced generation of a request (what ``batch`` runs per item);
  :func:`generate`: the request's traced generations, one per seed, with every output file and ``report.json``;
  :func:`analyze`: the same analysis on saved maps. Both build the report in one place
  (:func:`daam_fast.report.build_report`) and return it.

Nothing here prints or changes global state (threads, logging): the front ends decide what the user sees.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import analysis as A
from . import families
from .families.base import call_default
from .generation import Generation, trace_generation, trace_time_profile
from .heatmap import HeatMapFileError, load
from .loading import UsageError, check_device, check_model, load_pipeline
from .report import FigureSet, build_report, sweep_and_profile, write_report, write_run
from .tokens import PromptTokens, WordNotFoundError, find_in_text, text_words

__all__ = [
    "Request",
    "UsageError",
    "analyze",
    "check_device",
    "check_guidance",
    "check_model",
    "check_out_dir",
    "check_words",
    "generate",
    "load_pipeline",
    "make_request",
    "parse_seeds",
    "parse_size",
    "parse_steps",
    "pipe_kwargs",
    "prompt_sources",
    "run_seed",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class Request:
    """One generation request: ``prompt`` over ``seeds`` at ``size`` (width, height) with ``steps`` denoising
    steps. ``guidance_scale`` None: the pipeline's own default; ``words`` None: every prompt word;
    ``time_profile``: trace the first seed step by step. ``option_prefix`` is how errors name the request's
    fields (``--seeds`` on the command line, ``seeds`` in the web UI)."""

    prompt: str
    seeds: tuple[int, ...]
    steps: int
    size: tuple[int, int]
    negative_prompt: str | None = None
    guidance_scale: float | None = None
    words: tuple[str, ...] | None = None
    time_profile: bool = False
    option_prefix: str = "--"

    def option(self, name: str) -> str:
        """How errors name field ``name`` (``negative_prompt`` -> ``--negative-prompt`` on the command line)."""
        return _option(self.option_prefix, name)


def _option(prefix: str, name: str) -> str:
    return prefix + (name.replace("_", "-") if prefix else name)


#: Seeds torch.Generator.manual_seed takes: 0 .. 2**64 - 1.
MAX_SEED = 2**64 - 1
#: Denoising steps a request may ask for: diffusers' schedulers are trained on 1000 timesteps and refuse more.
MAX_STEPS = 1000


def _shown(text: str, limit: int = 60) -> str:
    """``text`` for an error message: its repr, cut at ``limit`` characters."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def parse_seeds(text: str, *, what: str = "--seeds", limit: int = 1000) -> list[int]:
    """``"3"``, ``"0-7"`` or ``"1,4,9"`` as distinct seeds in order; at most ``limit`` of them, each 0..2**64-1.
    Sizes are checked before anything is built, so ``0-999999999999`` costs no memory."""
    text = str(text)
    parts = text.split(",")
    if len(parts) > limit:
        raise UsageError(f"{what} {_shown(text)}: {len(parts)} entries is more than {limit}")
    ranges = []
    for part in parts:
        m = re.fullmatch(r"\s*([0-9]{1,20})(?:-([0-9]{1,20}))?\s*", part)
        if not m and re.fullmatch(r"\s*[0-9]+(?:-[0-9]+)?\s*", part):
            raise UsageError(f"{what} {_shown(text)}: seeds must be integers 0..{MAX_SEED}")
        if not m:
            raise UsageError(f"{what} {_shown(text)}: expected e.g. 0, 0-7 or 1,4,9 (non-negative integers)")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi > MAX_SEED:
            raise UsageError(f"{what} {_shown(text)}: seeds must be integers 0..{MAX_SEED}")
        if hi < lo:
            raise UsageError(f"{what} {_shown(text)}: range {part.strip()} is empty (end before start)")
        if hi - lo + 1 > limit:
            raise UsageError(f"{what} {_shown(text)}: {hi - lo + 1} seeds is more than {limit}")
        ranges.append((lo, hi))
    seeds: dict[int, None] = {}  # at most `limit` entries of at most `limit` seeds each: bounded work and memory
    for lo, hi in ranges:
        for seed in range(lo, hi + 1):
            seeds[seed] = None
            if len(seeds) > limit:
                raise UsageError(f"{what} {_shown(text)}: more than {limit} seeds")
    return list(seeds)


def parse_size(text: str, *, what: str = "--size") -> tuple[int, int]:
    """``"WIDTHxHEIGHT"`` (multiples of 8) as ``(width, height)``."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not m or int(m.group(1)) <= 0 or int(m.group(2)) <= 0:
        raise UsageError(f"{what} {text!r}: expected WIDTHxHEIGHT, e.g. 512x512")
    width, height = int(m.group(1)), int(m.group(2))
    if width % 8 or height % 8:  # diffusers' SD / SDXL pipelines refuse other sizes
        raise UsageError(f"{what} {text!r}: width and height must be multiples of 8")
    return width, height


def parse_steps(value, *, what: str = "--steps") -> int:
    """Denoising steps: a whole number 1..:data:`MAX_STEPS` (an int, a string of digits or an integral float;
    ``2.9`` is refused, not rounded)."""
    if isinstance(value, str) and re.fullmatch(r"\s*[0-9]{1,9}\s*", value):
        steps = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        steps = value
    elif isinstance(value, float) and value.is_integer():
        steps = int(value)
    else:
        raise UsageError(f"{what} {_shown(str(value))}: expected a whole number of steps")
    if steps < 1:
        raise UsageError(f"{what} {steps}: must be at least 1")
    if steps > MAX_STEPS:
        raise UsageError(f"{what} {steps}: at most {MAX_STEPS} (diffusers' schedulers are trained on that many)")
    return steps


def check_guidance(value, *, what: str = "--guidance-scale") -> float | None:
    """A classifier-free guidance scale: a finite number >= 0, or None (the pipeline's own default)."""
    if value is None:
        return None
    try:
        scale = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{what} {_shown(str(value))}: expected a number") from None
    if isinstance(value, bool) or not math.isfinite(scale) or scale < 0:
        raise UsageError(f"{what} {scale}: must be a finite number >= 0")
    return scale


def make_request(
    prompt: str,
    *,
    seeds: str = "0",
    size: str = "512x512",
    steps=30,
    negative_prompt: str | None = None,
    guidance_scale: float | None = None,
    words: Sequence[str] | None = None,
    time_profile: bool = False,
    option_prefix: str = "--",
    max_seeds: int = 1000,
) -> Request:
    """A checked :class:`Request` from a front end's values (seeds and size as text). Raises :class:`UsageError`
    naming the bad option (``option_prefix`` + its name) and what is valid."""

    def option(name):
        return _option(option_prefix, name)

    for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if text is not None and not isinstance(text, str):
            raise UsageError(f"{option(name)} must be a string, got {type(text).__name__}")
    prompt = prompt or ""
    if not prompt.strip():
        raise UsageError(f"{option('prompt')} is empty")
    if not text_words(prompt):  # nothing to map: found now, not after loading a model and generating
        raise UsageError(f"{option('prompt')} {_shown(prompt)} has no words (letters or digits) to map")
    steps = parse_steps(steps, what=option("steps"))
    seed_list = parse_seeds(seeds, what=option("seeds"), limit=max_seeds)
    width, height = parse_size(size, what=option("size"))
    guidance = check_guidance(guidance_scale, what=option("guidance_scale"))
    for word in words or ():
        try:  # in the prompt at all; the tokenizers' truncation is checked once the model is loaded
            find_in_text(prompt, word)
        except (WordNotFoundError, ValueError, TypeError) as exc:
            raise UsageError(f"{option('words')}: {exc}") from None
    return Request(
        prompt=prompt,
        seeds=tuple(seed_list),
        steps=steps,
        size=(width, height),
        negative_prompt=(negative_prompt.strip() or None) if negative_prompt is not None else None,
        guidance_scale=guidance,
        words=None if words is None else tuple(words),
        time_profile=bool(time_profile),
        option_prefix=option_prefix,
    )


# ---------------------------------------------------------------------------------------------------- outputs
def check_out_dir(out: str | os.PathLike, *, what: str = "--out") -> Path:
    """``out`` as a :class:`Path` when it is (or can be made) a writable folder: it is no file, and its nearest
    existing ancestor is a writable folder. Raises :class:`UsageError` otherwise; nothing is created."""
    out = Path(out)
    existing = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        where = "is a file" if existing == out else f"{str(existing)!r} is a file"
        raise UsageError(f"{what} {str(out)!r}: {where}, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {str(out)!r}: {str(existing)!r} is not writable")
    return out


def prompt_sources(pipe, prompt: str) -> list[families.TextSource]:
    """The prompt's tokens as the pipeline's model family splits them (its text sources: CLIP for UNets,
    CLIP and T5 for SD3, T5 for Flux), at the pipeline's default text length. Raises :class:`UsageError` when
    the pipeline cannot be traced."""
    try:
        family = families.detect(pipe)
    except families.UnsupportedPipelineError as exc:
        raise UsageError(f"cannot trace this model: {exc}") from None
    return family.text_sources(pipe, prompt)


def check_words(pipe, prompt: str, words: Sequence[str] | None, *, what: str = "--words") -> list[str] | None:
    """``words`` when each is in the prompt through at least one of the family's text sources, else a
    :class:`UsageError` naming the word and the prompt's words; None stays None (every word)."""
    if words is None:
        return None
    return _words_in([s.tokens for s in prompt_sources(pipe, prompt)], words, what)


def _words_in(token_lists: Sequence[PromptTokens], words: Sequence[str], what: str) -> list[str]:
    """``words``, each checked to be in at least one of ``token_lists`` (else :class:`UsageError`)."""
    for word in words:
        errors = []
        for tokens in token_lists:
            try:
                tokens.positions(word)
                break
            except (WordNotFoundError, ValueError) as exc:
                errors.append(exc)
        else:
            raise UsageError(f"{what}: {errors[0]}")
    return list(words)


def pipe_kwargs(pipe, request: Request) -> dict:
    """The pipeline call's arguments for ``request``, ``guidance_scale`` always explicit (the pipeline's own
    default when the request has none), so the report records what ran."""
    kw = dict(num_inference_steps=request.steps, width=request.size[0], height=request.size[1])
    guidance = request.guidance_scale if request.guidance_scale is not None else call_default(pipe, "guidance_scale")
    if guidance is not None:
        kw["guidance_scale"] = float(guidance)
    if request.negative_prompt:
        kw["negative_prompt"] = request.negative_prompt
    return kw


# ------------------------------------------------------------------------------------------------------ running
def run_seed(pipe, request: Request, seed: int) -> Generation:
    """One traced generation of ``request`` at ``seed`` (pipeline arguments from :func:`pipe_kwargs`): the image
    and its maps (:class:`~daam_fast.generation.Generation`), nothing written."""
    return trace_generation(pipe, request.prompt, seed, **pipe_kwargs(pipe, request))


def generate(
    pipe, request: Request, out: Path, *, model: str, command: str = "generate", progress: bool = True
) -> dict:
    """Run ``request`` on ``pipe`` (one traced generation per seed; the first step by step when
    ``request.time_profile``), write images, maps, overlays and figures under ``out`` (``seed<S>/...``) and
    ``out/report.json``; return the report (fields: :data:`daam_fast.report.REPORT_FIELDS`). ``model`` names the
    model in the report and figures. The words are checked before anything is generated or written."""
    from tqdm.auto import tqdm

    words = check_words(pipe, request.prompt, request.words, what=request.option("words"))
    kw = pipe_kwargs(pipe, request)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figs = FigureSet(out)
    runs, maps, profile = [], [], None
    for i, seed in enumerate(tqdm(request.seeds, desc="seeds", unit="seed", disable=not progress)):
        if i == 0 and request.time_profile:
            gen, profile = trace_time_profile(pipe, request.prompt, seed, words, **kw)
        else:
            gen = run_seed(pipe, request, seed)
        chosen = words or A.prompt_words(gen.maps)
        run = write_run(
            out,
            figs,
            gen.maps,
            chosen,
            image=gen.image,
            negative_maps=gen.negative_maps,
            seed=seed,
            model=model,
            prefix=f"seed{seed}",
        )
        runs.append(run)
        maps.append(gen.maps)
    chosen = words or A.prompt_words(maps[0])
    sweep, tp = sweep_and_profile(out, figs, maps, chosen, profile, model=model)
    return _report(
        out,
        command,
        figs,
        runs=runs,
        seed_sweep=sweep,
        time_profile=tp,
        model=model,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        words=chosen,
        seeds=list(request.seeds),
        steps=request.steps,
        size=list(request.size),
        guidance_scale=kw.get("guidance_scale"),
    )


def analyze(
    paths: Sequence[str | Path], out: Path, *, words: Sequence[str] | None = None, image=None, what: str = "--words"
) -> dict:
    """The analysis and figures of saved maps files (several: a seed sweep) into ``out``, with ``report.json``
    (``command: analyze``); returns the report. Overlays use ``image`` (one maps file only) or the
    ``image.png`` next to each maps file. Bad files or words raise :class:`UsageError` (``what`` names the words'
    option)."""
    loaded = []
    for f in paths:
        p = Path(f)
        if not p.is_file():
            raise UsageError(f"{f}: no such file")
        try:
            loaded.append(load(p))  # the one loader: SD3 / Flux files keep every text source (T5 too)
        except HeatMapFileError as exc:
            raise UsageError(str(exc)) from None
    prompts = {g.prompt for g in loaded}
    if len(prompts) > 1:
        raise UsageError(f"the maps files have different prompts {sorted(prompts)}; analyse them one at a time")
    if words is not None:
        sources = getattr(loaded[0], "sources", None)
        words = _words_in([t for t, _ in sources.values()] if sources else [loaded[0].tokens], words, what)
    shapes = {tuple(g.heat_maps.shape[1:]) for g in loaded}
    if len(shapes) > 1:
        raise UsageError(f"the maps files have different latent sizes {sorted(shapes)}")
    if image and len(loaded) > 1:
        raise UsageError("--image works with one maps file; with several, each uses the image.png next to it")
    if image and not Path(image).is_file():
        raise UsageError(f"--image {image}: no such file")
    # Every image is read before anything is written: an unreadable one is a bad argument, not a crash midway.
    pictures = [
        _read_image(Path(image), "--image ") if image else _read_image(Path(paths[i]).parent / "image.png")
        for i in range(len(loaded))
    ]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = words if words is not None else A.prompt_words(loaded[0])
    figs = FigureSet(out)
    runs = []
    for i, gm in enumerate(loaded):
        picture = pictures[i]
        prefix = f"map{i}" if len(loaded) > 1 else ""
        name = gm.meta.get("model_name") or gm.meta.get("model")
        run = write_run(
            out, figs, gm, chosen, image=picture, seed=gm.meta.get("seed"), model=name, prefix=prefix, save_maps=False
        )
        run["maps"] = str(paths[i])
        runs.append(run)
    meta = loaded[0].meta
    sweep, tp = sweep_and_profile(out, figs, loaded, chosen, None, model=meta.get("model_name"))
    size = meta.get("image_size")
    return _report(
        out,
        "analyze",
        figs,
        runs=runs,
        seed_sweep=sweep,
        time_profile=tp,
        model=meta.get("model_name") or meta.get("model"),
        prompt=loaded[0].prompt,
        negative_prompt=None,
        words=chosen,
        seeds=[g.meta.get("seed") for g in loaded],
        steps=meta.get("steps"),
        size=None if size is None else [size[1], size[0]],
        guidance_scale=None,
    )


def _read_image(path: Path, what: str = ""):
    """The RGB image at ``path`` (None when there is no file), or :class:`UsageError` naming it when it cannot be
    read as an image."""
    from PIL import Image

    if not path.is_file():
        return None
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UsageError(f"{what}{path}: not a readable image ({type(exc).__name__})") from None


def _report(out: Path, command: str, figs: FigureSet, **fields) -> dict:
    """Build the report (with every figure written so far) and write it to ``out/report.json``."""
    report = build_report(command, **fields, figures=figs.entries)
    write_report(out, report)
    return report
