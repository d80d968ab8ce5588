"""Capture kernels: ``Σ_heads softmax(QKᵀ)[:, selected columns]`` added into a heat buffer.

Use the dispatching entry points. Kernels live in ``reference`` (PyTorch), ``triton_capture`` and
``triton_fused`` (the ``triton`` backend, registered by ``triton_backend``) and ``cuda``; ``registry`` says what a
backend declares, and :mod:`daam_fast.kernels.dispatch` makes every kernel choice (the fused attention + capture
kernel included).
"""

from .dispatch import BackendUnavailable, backends, capture_from_lse, capture_self_normalising, select_backend

__all__ = ["BackendUnavailable", "backends", "capture_from_lse", "capture_self_normalising", "select_backend"]
