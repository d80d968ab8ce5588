"""Capture kernels: ``Σ_heads softmax(QKᵀ)[:, selected columns]`` added into a heat buffer.

Use the dispatching entry points; backends live in ``reference`` (PyTorch), ``triton_capture`` and
``triton_fused`` (registered by ``triton_backend``) and ``cuda``, and are chosen by :mod:`daam_fast.kernels.dispatch`.
"""

from .dispatch import BackendUnavailable, backends, capture_from_lse, capture_self_normalising, select_backend

__all__ = ["BackendUnavailable", "backends", "capture_from_lse", "capture_self_normalising", "select_backend"]
