"""Which diffusers versions the capture processors know.

Two kinds of dependence on diffusers' internals:

- **Features that need a newer diffusers**: Flux's processor classes (``transformer_flux.FluxAttnProcessor``)
  and the attention dispatcher (``diffusers.models.attention_dispatch``) arrived in diffusers 0.35.
  :func:`require_diffusers` raises :class:`DiffusersVersionError` naming the minimum when such a feature is used;
  nothing fails at import time.
- **Processor bodies reproduced step by step** (``AttnProcessor2_0``, ``FusedAttnProcessor2_0``,
  ``XFormersAttnProcessor``, ``JointAttnProcessor2_0``, Flux's native ``FluxAttnProcessor``), so the attention
  kernel's lse can be kept while the output stays bit-identical. Such a copy is right only for the diffusers
  releases it was checked on: :func:`reproduces_bodies` is True for the release series the tests run on
  (``make test``'s pinned stack and ``make test-compat``'s stacks: :data:`TESTED_DIFFUSERS`). On any other
  diffusers the capture processors call the installed processor for the output and compute the maps'
  normalisation themselves (exact by construction, slower), and say so once in the log.
"""

from __future__ import annotations

import logging
import re

__all__ = [
    "FLUX_MIN",
    "DISPATCH_MIN",
    "TESTED_DIFFUSERS",
    "DiffusersVersionError",
    "diffusers_version",
    "require_diffusers",
    "reproduces_bodies",
]

logger = logging.getLogger(__name__)

#: diffusers release series (major, minor) whose processor bodies the tests check (constraints.txt and
#: compat/*.txt; tests/test_versions.py keeps the two in step): there the copies in unet.py and joint.py give
#: bit-identical images.
TESTED_DIFFUSERS = frozenset({(0, 30), (0, 37), (0, 42)})
#: Flux's ``FluxAttnProcessor`` / ``_get_qkv_projections`` and the attention dispatcher arrived in diffusers 0.35.
FLUX_MIN = (0, 35)
DISPATCH_MIN = (0, 35)

_logged: set[str] = set()


class DiffusersVersionError(RuntimeError):
    """The installed diffusers is too old for the requested feature (the message names the minimum)."""


def diffusers_version() -> tuple[int, int, int]:
    """The installed diffusers' ``(major, minor, patch)`` (a dev/rc suffix is ignored)."""
    import diffusers

    parts = [int(p) for p in re.findall(r"\d+", diffusers.__version__)[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


def _fmt(v) -> str:
    return ".".join(str(x) for x in v)


def require_diffusers(feature: str, minimum: tuple[int, int]) -> None:
    """Raise :class:`DiffusersVersionError` when the installed diffusers is older than ``minimum`` (major, minor)."""
    import diffusers

    if diffusers_version()[:2] < tuple(minimum):
        raise DiffusersVersionError(
            f"{feature} needs diffusers >= {_fmt(minimum)}; installed is diffusers {diffusers.__version__} "
            f"(pip install -U 'diffusers>={_fmt(minimum)}')"
        )


def reproduces_bodies() -> bool:
    """Whether the installed diffusers is a release series whose processor bodies the capture processors copy
    step by step (see the module docstring). Logs once when it is not."""
    import diffusers

    if diffusers_version()[:2] in TESTED_DIFFUSERS:
        return True
    if diffusers.__version__ not in _logged:
        _logged.add(diffusers.__version__)
        logger.warning(
            "diffusers %s is not a release daam_fast's processors were checked against (%s): tracing calls the "
            "installed attention processors for the output and normalises the maps itself (exact, slower than "
            "reusing the attention kernel's log-sum-exp)",
            diffusers.__version__,
            ", ".join(_fmt(v) + ".x" for v in sorted(TESTED_DIFFUSERS)),
        )
    return False
