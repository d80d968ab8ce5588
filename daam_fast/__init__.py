"""daam_fast: exact DAAM per-word attribution heat maps for diffusers pipelines, at almost no cost.

>>> from daam_fast import trace
>>> with trace(pipe) as tc:
...     image = pipe(prompt).images[0]
...     heat_map = tc.compute_global_heat_map()
...     hat = heat_map.compute_word_heat_map("hat")      # hat.heatmap: fp32 [H_latent, W_latent]
"""

import logging

from .experiment import GenerationExperiment, set_seed
from .heatmap import GlobalHeatMap, HeatMapFileError, HeatMapSelectionError, WordHeatMap, load
from .trace import Record, SnapshotBudgetError, Trace, UnsupportedPipelineError, trace
from .version import __version__ as __version__

__all__ = [
    "GenerationExperiment",
    "GlobalHeatMap",
    "HeatMapFileError",
    "HeatMapSelectionError",
    "Record",
    "SnapshotBudgetError",
    "Trace",
    "UnsupportedPipelineError",
    "WordHeatMap",
    "load",
    "set_seed",
    "trace",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
