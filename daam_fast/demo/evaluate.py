"""How well the demo model's word maps (from daam_fast's public API) land on the objects the words
name: per-word IoU after DAAM's threshold, against baselines that know no words.

Two settings:

(a) **rendered**: held-out procedural scenes (exact masks) run through the standard
    ``StableDiffusionImg2ImgPipeline`` at a few strengths, i.e. noised to a few timesteps and
    denoised with their caption; one trace per (scene, strength).
(b) **generated**: images the model generates from held-out captions; the masks come from
    nearest-colour segmentation of the generated image, and the shape word takes the mask of the
    colour it is paired with in the caption. Words whose colour the model did not paint (fewer
    than ``min_pixels`` pixels) are left out and counted.

A word map ``[16, 16]`` is binarised with daam_fast's ``WordHeatMap.expand_as(image, threshold=0.4)``
(bicubic to 32x32, min-max normalised to [0, 1], > 0.4: DAAM's recipe and tau); IoU against the
word's mask; mIoU is the mean over (image, word) pairs.
Baselines: *uniform* (a constant map; we count it as predicting the whole image), *centre blob*
(a centred Gaussian, sigma = size/4, normalised and thresholded the same way), *all foreground*
(every object pixel, for every word: knows where the objects are but not which is which).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from daam_fast.demo import shapes

__all__ = ["THRESHOLD", "word_iou", "evaluate", "format_table"]

logger = logging.getLogger(__name__)

THRESHOLD = 0.4
EVAL_SEED_RENDERED = 1  # the training data set is seed 0; these are disjoint data sets
EVAL_SEED_GENERATED = 2
_METHODS = ("daam", "uniform", "centre_blob", "all_foreground")


def word_iou(pred: np.ndarray, mask: np.ndarray) -> float:
    """IoU of two bool masks ``[H, W]`` (0 when both are empty)."""
    union = (pred | mask).sum()
    return float((pred & mask).sum() / union) if union else 0.0


def _daam_mask(word_map, size: int) -> np.ndarray:
    # The public API's daam-style binarisation of a WordHeatMap at image size.
    return word_map.expand((size, size), threshold=THRESHOLD).numpy() > 0.5


def _centre_blob(size: int) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size] + 0.5
    s = size / 4
    blob = np.exp(-((x - size / 2) ** 2 + (y - size / 2) ** 2) / (2 * s * s))
    return (blob - blob.min()) / (blob.max() - blob.min()) > THRESHOLD


class _Scores:
    def __init__(self):
        self.rows: list[tuple[str, str, float]] = []  # (method, kind, iou)

    def add(self, method: str, kind: str, iou: float) -> None:
        self.rows.append((method, kind, iou))

    def summary(self) -> dict:
        out = {}
        for method in dict.fromkeys(r[0] for r in self.rows):
            vals = {k: [r[2] for r in self.rows if r[0] == method and (k == "all" or r[1] == k)]
                    for k in ("all", "colour", "shape")}
            out[method] = {k: float(np.mean(v)) if v else float("nan") for k, v in vals.items()}
            out[method]["n_words"] = len(vals["all"])
        return out


def _score_baselines(scores: _Scores, word_masks: dict[str, np.ndarray], foreground: np.ndarray) -> None:
    size = foreground.shape[0]
    blob = _centre_blob(size)
    for word, mask in word_masks.items():
        kind = "colour" if word in shapes.COLOURS else "shape"
        scores.add("uniform", kind, word_iou(np.ones_like(mask), mask))
        scores.add("centre_blob", kind, word_iou(blob, mask))
        scores.add("all_foreground", kind, word_iou(foreground | mask, mask))


def _traced_word_maps(pipe, words, **call_kwargs):
    from daam_fast import trace

    with trace(pipe) as tc:
        out = pipe(**call_kwargs)
        gm = tc.compute_global_heat_map()
        maps = {w: gm.compute_word_heat_map(w) for w in words}
    return out, maps


@torch.no_grad()
def evaluate(
    pipe=None,
    n_scenes: int = 100,
    strengths: tuple[float, ...] = (0.3, 0.5, 0.7),
    n_generated: int = 50,
    steps: int = 20,
    guidance_scale: float = 4.0,
    seed: int = 0,
    min_pixels: int = 4,
    progress: bool = False,
) -> dict:
    """Per-word mIoU of daam_fast word maps on the demo model, beside baselines.

    ``pipe``: a ``StableDiffusionPipeline`` (default: ``load_pipeline()``). ``n_scenes`` rendered
    scenes, each denoised once per strength with ``steps`` DDIM steps (``int(steps * strength)`` of
    them run); ``n_generated`` generated images (0 skips setting b).

    Returns ``{"rendered": {...}, "generated": {...}, "settings": {...}}``; each setting holds
    ``{method: {"all", "colour", "shape": mIoU, "n_words"}}`` for ``daam`` and the baselines, and
    rendered also ``"daam_by_strength"``; generated also ``"n_words_missing"``.
    """
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image
    from tqdm.auto import tqdm

    from daam_fast.demo import load_pipeline

    pipe = pipe if pipe is not None else load_pipeline()
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    pipe.set_progress_bar_config(disable=True)
    result: dict = {"settings": dict(n_scenes=n_scenes, strengths=list(strengths), n_generated=n_generated,
                                     steps=steps, guidance_scale=guidance_scale, seed=seed, threshold=THRESHOLD)}

    # (a) rendered scenes, exact masks
    scores, by_strength = _Scores(), {s: _Scores() for s in strengths}
    for i in tqdm(range(n_scenes), desc="rendered scenes", disable=not progress):
        sc = shapes.random_scene(EVAL_SEED_RENDERED, i)
        wmasks = sc.word_masks()
        _score_baselines(scores, wmasks, sc.masks.any(0))
        for j, s in enumerate(strengths):
            g = torch.Generator().manual_seed(seed * 100_003 + i * len(strengths) + j)
            _, maps = _traced_word_maps(
                img2img, list(wmasks), prompt=sc.caption, image=Image.fromarray(sc.image), strength=s,
                num_inference_steps=steps, guidance_scale=guidance_scale, generator=g, output_type="np",
            )
            for word, mask in wmasks.items():
                iou = word_iou(_daam_mask(maps[word], mask.shape[0]), mask)
                kind = "colour" if word in shapes.COLOURS else "shape"
                scores.add("daam", kind, iou)
                by_strength[s].add("daam", kind, iou)
    result["rendered"] = scores.summary()
    result["rendered"]["daam_by_strength"] = {s: by_strength[s].summary()["daam"] for s in strengths}

    # (b) generated images, masks from colour segmentation
    scores, missing = _Scores(), 0
    for i in tqdm(range(n_generated), desc="generated images", disable=not progress):
        sc = shapes.random_scene(EVAL_SEED_GENERATED, i)
        g = torch.Generator().manual_seed(seed * 100_003 + i)
        words = [w for o in sc.objects for w in (o.colour, o.shape)]
        out, maps = _traced_word_maps(pipe, words, prompt=sc.caption, num_inference_steps=steps,
                                      guidance_scale=guidance_scale, generator=g, output_type="np")
        image = (out.images[0] * 255).round().clip(0, 255).astype(np.uint8)
        seg = shapes.segment_by_colour(image)
        foreground = np.any(list(seg.values()), axis=0)
        wmasks = {}
        for o in sc.objects:
            if seg[o.colour].sum() < min_pixels:
                missing += 2
                continue
            wmasks[o.colour] = wmasks[o.shape] = seg[o.colour]
        _score_baselines(scores, wmasks, foreground)
        for word, mask in wmasks.items():
            iou = word_iou(_daam_mask(maps[word], mask.shape[0]), mask)
            scores.add("daam", "colour" if word in shapes.COLOURS else "shape", iou)
    if n_generated:
        result["generated"] = scores.summary()
        result["generated"]["n_words_missing"] = missing
    logger.info("demo evaluation: %s", result)
    return result


def format_table(result: dict) -> str:
    """A Markdown table of :func:`evaluate`'s result: mIoU (all / colour words / shape words)."""
    lines = ["| setting | method | mIoU | colour words | shape words | words |", "|---|---|---|---|---|---|"]
    names = {"daam": "daam_fast word maps", "uniform": "uniform map", "centre_blob": "centre blob",
             "all_foreground": "all foreground"}
    for setting in ("rendered", "generated"):
        if setting not in result:
            continue
        for method in _METHODS:
            r = result[setting][method]
            lines.append(f"| {setting} | {names[method]} | {r['all']:.3f} | {r['colour']:.3f} | {r['shape']:.3f} "
                         f"| {r['n_words']} |")
        if setting == "rendered":
            for s, r in result[setting]["daam_by_strength"].items():
                lines.append(f"| rendered, strength {s} | daam_fast word maps | {r['all']:.3f} | {r['colour']:.3f} "
                             f"| {r['shape']:.3f} | {r['n_words']} |")
    if "generated" in result:
        lines.append(f"\nGenerated images: {result['generated']['n_words_missing']} words left out because the "
                     f"model did not paint their colour.")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m daam_fast.demo.evaluate: the model card's table
    import argparse

    ap = argparse.ArgumentParser(description="Evaluate the demo model's word maps (prints a Markdown table).")
    ap.add_argument("--scenes", type=int, default=100)
    ap.add_argument("--generated", type=int, default=50)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(format_table(evaluate(n_scenes=a.scenes, n_generated=a.generated, steps=a.steps, progress=True)))
