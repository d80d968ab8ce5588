"""What people do with heat maps: word influence, concept overlap, seed sweeps, time profiles.

Every function here works on :class:`~daam_fast.heatmap.GlobalHeatMap` objects (fp32 ``[n_positions, H, W]``
per-token maps) or on plain fp32 ``[N, H, W]`` stacks of word maps, so the same analysis applies to the prompt's
maps, to the negative prompt's (``tc.compute_global_heat_map(negative=True)``) and to maps loaded from disk.
All of them are pure: running a pipeline under :func:`daam_fast.trace` is :mod:`daam_fast.generation`'s.

Conventions: "normalised" means min-max scaled to [0, 1] per map; a constant map normalises to all zeros.
Undefined statistics (the correlation of a constant map, the stability of a single seed) are ``nan``, never
a made-up number.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .heatmap import GlobalHeatMap

__all__ = [
    "Dominance",
    "Overlap",
    "SeedSweep",
    "TimeProfile",
    "WordInfluence",
    "concept_overlap",
    "dominance_map",
    "normalize01",
    "pearson",
    "prompt_words",
    "seed_sweep",
    "soft_iou",
    "time_profile",
    "word_influence",
    "word_maps",
]

logger = logging.getLogger(__name__)
_EPS = 1e-12


# ------------------------------------------------------------------------------------------------ words
def _sources(gm: GlobalHeatMap) -> list[tuple]:
    """``[(PromptTokens, offset)]`` of the texts the map's words come from: the prompt for UNet models; for
    joint-attention maps (SD3, Flux: :class:`~daam_fast.heatmap.JointGlobalHeatMap`) the default source's
    tokenizers (SD3 with T5: CLIP at 0 and T5 at 77), as ``compute_word_heat_map`` looks words up."""
    sources = getattr(gm, "sources", None)
    if not sources:
        return [(gm.tokens, 0)]
    default = getattr(gm, "default_source", "both")
    return [sources[n] for n in (list(sources) if default == "both" else [default])]


def _content_positions(gm: GlobalHeatMap) -> list[int]:
    """Traced positions of prompt tokens: tokens with a character span (no start / end / padding tokens)."""
    traced = set(gm.positions)
    return [
        off + i
        for tokens, off in _sources(gm)
        for i, (a, b) in enumerate(tokens.offsets)
        if b > a and off + i in traced
    ]


def _word_positions(gm: GlobalHeatMap, word: str) -> list[int]:
    """All positions of ``word`` over the map's sources (a word may be cut from one window but not another)."""
    from .tokens import WordNotFoundError

    found, errors = [], []
    for tokens, off in _sources(gm):
        try:
            found += [off + p for p in tokens.positions(word)]
        except WordNotFoundError as exc:
            errors.append(exc)
    if not found:
        raise errors[0]
    return found


def prompt_words(gm: GlobalHeatMap) -> list[str]:
    """The prompt's distinct words in prompt order (case-insensitive; the first spelling is kept)."""
    seen: dict[str, str] = {}
    for tokens, _ in _sources(gm):
        for w in tokens.words:
            seen.setdefault(w.text.casefold(), w.text)
    return list(seen.values())


def _words(gm: GlobalHeatMap, words: Sequence[str] | None) -> list[str]:
    chosen = prompt_words(gm) if words is None else list(words)
    if not chosen:
        raise ValueError(f"no words to analyse: the prompt {gm.prompt!r} has no words")
    return chosen


def word_maps(gm: GlobalHeatMap, words: Sequence[str] | None = None) -> tuple[list[str], torch.Tensor]:
    """Word heat maps stacked: ``(words, maps)`` with maps fp32 ``[n_words, H, W]`` on the CPU (each the mean of
    the word's token maps, as :meth:`GlobalHeatMap.compute_word_heat_map`). ``words=None``: all
    :func:`prompt_words`."""
    chosen = _words(gm, words)
    # On the CPU whatever device traced them: the results feed numpy, matplotlib and JSON.
    return chosen, torch.stack([gm.compute_word_heat_map(w).heatmap.float().cpu() for w in chosen])


# ------------------------------------------------------------------------------------------- influence
@dataclass(frozen=True)
class WordInfluence:
    """One word's part of the total attribution.

    ``mass`` is the sum over pixels of its tokens' maps (all occurrences; a word of several tokens sums them),
    ``share`` is ``mass`` over the total of all prompt tokens (start, end and padding excluded).
    """

    word: str
    positions: tuple[int, ...]
    mass: float
    share: float


def word_influence(gm: GlobalHeatMap, words: Sequence[str] | None = None) -> list[WordInfluence]:
    """Each word's share of the total attribution, ranked, largest first.

    Args:
        gm: per-token maps, fp32 ``[n_positions, H, W]``.
        words: words to rank (default all :func:`prompt_words`).
    Returns:
        :class:`WordInfluence` per word, sorted by ``share`` descending. The total counts every traced prompt
        token (no start, end or padding tokens), punctuation included, so shares of the words sum to at most 1;
        the remainder belongs to tokens that are no word (``,``, ``(``). For SD3 with T5 both encoders' tokens
        count (a word's mass sums its CLIP and T5 tokens).
    """
    inner = _content_positions(gm)
    if not inner:
        raise ValueError("no prompt tokens were traced (only start / end tokens)")
    mass = {p: float(gm.token_heat_map(p).double().sum()) for p in inner}
    total = sum(mass.values())
    out = []
    for word in _words(gm, words):
        positions = tuple(p for p in _word_positions(gm, word) if p in mass)
        m = sum(mass[p] for p in positions)
        out.append(WordInfluence(word, positions, m, m / total if total > 0 else float("nan")))
    return sorted(out, key=lambda r: -r.share if r.share == r.share else 0.0)


# --------------------------------------------------------------------------------------------- overlap
def normalize01(maps: torch.Tensor) -> torch.Tensor:
    """Min-max scale each map of ``maps`` (``[..., H, W]``) to [0, 1]; constant maps become 0. Returns fp32."""
    m = maps.float()
    lo = m.amin(dim=(-2, -1), keepdim=True)
    hi = m.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (m - lo) / span.clamp_min(_EPS), torch.zeros_like(m))


def soft_iou(a: torch.Tensor, b: torch.Tensor, normalize: bool = True) -> float:
    """Soft intersection over union ``sum(min(a, b)) / sum(max(a, b))`` of two ``[H, W]`` maps.

    With ``normalize`` (default) both are first min-max scaled to [0, 1], so identical maps give 1 and maps with
    disjoint support give 0. ``nan`` when both are all zero.
    """
    if normalize:
        a, b = normalize01(a), normalize01(b)
    a, b = a.double(), b.double()
    union = torch.maximum(a, b).sum()
    return float(torch.minimum(a, b).sum() / union) if union > 0 else float("nan")


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two maps (any equal shape) over pixels; ``nan`` when either is constant."""
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    den = a.norm() * b.norm()
    return float((a * b).sum() / den) if den > 0 else float("nan")


@dataclass
class Overlap:
    """Pairwise overlap of word maps: ``iou`` and ``pearson`` are fp64 ``[n_words, n_words]``, symmetric, with
    ``words`` naming rows and columns (diagonal 1, or nan for an all-zero / constant map)."""

    words: list[str]
    iou: torch.Tensor
    pearson: torch.Tensor


def _stack(source, words) -> tuple[list[str], torch.Tensor]:
    if isinstance(source, GlobalHeatMap):
        return word_maps(source, words)
    maps = torch.as_tensor(source).float().cpu()
    if maps.dim() != 3:
        raise ValueError(f"expected word maps [n_words, H, W], got shape {tuple(maps.shape)}")
    names = [str(i) for i in range(maps.shape[0])] if words is None else list(words)
    if len(names) != maps.shape[0]:
        raise ValueError(f"{len(names)} word names for {maps.shape[0]} maps")
    return names, maps


def concept_overlap(source: GlobalHeatMap | torch.Tensor, words: Sequence[str] | None = None) -> Overlap:
    """Pairwise soft IoU (of [0, 1]-normalised maps) and Pearson correlation of word maps.

    Args:
        source: a :class:`GlobalHeatMap` (``words`` are looked up in it, default all prompt words) or word maps
            fp32 ``[n_words, H, W]`` (``words`` then only names them).
    """
    names, maps = _stack(source, words)
    n = maps.shape[0]
    iou = torch.empty(n, n, dtype=torch.float64)
    corr = torch.empty(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            iou[i, j] = iou[j, i] = soft_iou(maps[i], maps[j])
            corr[i, j] = corr[j, i] = pearson(maps[i], maps[j])
    return Overlap(names, iou, corr)


@dataclass
class Dominance:
    """Per pixel, the word that attends most.

    ``index``: int64 ``[H, W]``, index into ``words`` of the strongest word; ``margin``: fp32 ``[H, W]``, its
    value minus the second strongest (0 where tied, or the strongest value itself with a single word);
    ``maps``: the fp32 ``[n_words, H, W]`` maps compared; ``normalized``: whether they were min-max scaled.
    """

    words: list[str]
    index: torch.Tensor
    margin: torch.Tensor
    maps: torch.Tensor
    normalized: bool

    def area(self) -> dict[str, float]:
        """Fraction of pixels each word owns."""
        total = self.index.numel()
        return {w: float((self.index == i).sum()) / total for i, w in enumerate(self.words)}


def dominance_map(
    source: GlobalHeatMap | torch.Tensor, words: Sequence[str] | None = None, normalize: bool = False
) -> Dominance:
    """Which word owns each pixel, with its margin over the runner-up.

    By default raw maps are compared: they are attention probabilities, summed the same way for every token, so
    they share one unit and a word that attends more where another is expected shows up. ``normalize=True``
    compares [0, 1]-scaled maps instead (each word's own peak counts as 1). Ties go to the first word.

    Args:
        source: :class:`GlobalHeatMap` or word maps fp32 ``[n_words, H, W]`` (see :func:`concept_overlap`).
    """
    names, maps = _stack(source, words)
    if normalize:
        maps = normalize01(maps)
    if maps.shape[0] == 1:
        return Dominance(names, torch.zeros(maps.shape[1:], dtype=torch.long), maps[0].clone(), maps, normalize)
    top = maps.topk(2, dim=0)
    # topk breaks ties arbitrarily; argmax of the first maximum keeps "ties go to the first word" exact.
    index = (maps == top.values[0:1]).float().argmax(dim=0)
    return Dominance(names, index, top.values[0] - top.values[1], maps, normalize)


# --------------------------------------------------------------------------------------------- seeds
@dataclass
class SeedSweep:
    """One prompt over several seeds. Per word (keys of the dicts): ``per_seed`` fp32 ``[n_seeds, H, W]`` (raw
    maps), ``mean`` and ``std`` fp32 ``[H, W]`` (population std, 0 for one seed) and ``stability``: the mean
    pairwise Pearson correlation of its per-seed maps (1 = same shape every seed; nan for a single seed)."""

    words: list[str]
    seeds: list[int | None]
    per_seed: dict[str, torch.Tensor]
    mean: dict[str, torch.Tensor]
    std: dict[str, torch.Tensor]
    stability: dict[str, float]


def seed_sweep(maps: Sequence[GlobalHeatMap], words: Sequence[str] | None = None) -> SeedSweep:
    """Mean, std and stability of word maps across seeds.

    Args:
        maps: one :class:`GlobalHeatMap` per seed, same prompt and latent size (``meta["seed"]`` names it).
        words: default all prompt words of the first map.
    """
    if not maps:
        raise ValueError("seed_sweep needs at least one GlobalHeatMap")
    shapes = {tuple(m.heat_maps.shape[1:]) for m in maps}
    if len(shapes) > 1:
        raise ValueError(f"maps of different latent sizes cannot be compared across seeds: {sorted(shapes)}")
    chosen = _words(maps[0], words)
    per_seed, mean, std, stability = {}, {}, {}, {}
    for w in chosen:
        stack = torch.stack([m.compute_word_heat_map(w).heatmap.float().cpu() for m in maps])
        per_seed[w] = stack
        mean[w] = stack.mean(0)
        std[w] = stack.std(0, correction=0)
        pairs = [pearson(stack[i], stack[j]) for i in range(len(maps)) for j in range(i + 1, len(maps))]
        valid = [c for c in pairs if c == c]
        stability[w] = sum(valid) / len(valid) if valid else float("nan")
    return SeedSweep(chosen, [m.meta.get("seed") for m in maps], per_seed, mean, std, stability)


# ---------------------------------------------------------------------------------------------- time
@dataclass
class TimeProfile:
    """Word attribution over denoising steps.

    ``step_maps``: fp32 ``[n_steps, n_words, H, W]``, each step's own word maps (they sum over steps to the
    whole-run maps); ``mass``: fp64 ``[n_steps, n_words]``, pixel sums of the word's token maps per step;
    ``share``: ``mass`` over the step's total over all prompt tokens; ``phases``: name -> step range;
    ``phase_maps``: name -> fp32 ``[n_words, H, W]``, the word maps of those steps only.
    """

    words: list[str]
    step_maps: torch.Tensor
    mass: torch.Tensor
    share: torch.Tensor
    phases: dict[str, range]
    phase_maps: dict[str, torch.Tensor] = field(default_factory=dict)


_PHASE_NAMES = {1: ["all"], 2: ["early", "late"], 3: ["early", "middle", "late"]}


def _phases(n_steps: int, n_phases: int) -> dict[str, range]:
    n_phases = max(1, min(n_phases, n_steps))
    names = _PHASE_NAMES.get(n_phases, [f"phase{i}" for i in range(n_phases)])
    bounds = [round(i * n_steps / n_phases) for i in range(n_phases + 1)]
    return {names[i]: range(bounds[i], bounds[i + 1]) for i in range(n_phases)}


def time_profile(
    step_maps: Sequence[GlobalHeatMap], words: Sequence[str] | None = None, phases: int = 3
) -> TimeProfile:
    """Per-step word maps and masses from per-step :class:`GlobalHeatMap` objects (one per denoising step, each
    holding only that step's attention, e.g. from :func:`trace_time_profile`), and phase maps over ``phases``
    contiguous, near-equal step ranges (3: early / middle / late)."""
    if not step_maps:
        raise ValueError("time_profile needs one GlobalHeatMap per step, got none")
    first = step_maps[0]
    chosen = _words(first, words)
    inner = _content_positions(first)
    positions = {w: _word_positions(first, w) for w in chosen}
    maps = torch.stack([word_maps(g, chosen)[1] for g in step_maps])  # [S, N, H, W]
    mass = torch.tensor(
        [[float(sum(g.token_heat_map(p).double().sum() for p in positions[w])) for w in chosen] for g in step_maps],
        dtype=torch.float64,
    )
    totals = torch.tensor([float(sum(g.token_heat_map(p).double().sum() for p in inner)) for g in step_maps])
    share = mass / totals.clamp_min(_EPS).double()[:, None]
    ranges = _phases(len(step_maps), phases)
    return TimeProfile(chosen, maps, mass, share, ranges, {k: maps[list(r)].sum(0) for k, r in ranges.items()})
