"""Forwarding a call to the processor a capture processor wraps, with exactly the arguments that processor takes.

diffusers' attention modules call the installed processor as ``processor(attn, hidden_states,
encoder_hidden_states=..., attention_mask=..., **kwargs)`` and drop every keyword argument (``temb``,
``cross_attention_kwargs`` / ``joint_attention_kwargs`` entries such as IP-Adapter's ``ip_adapter_masks`` or a
custom processor's own options) that the processor's ``__call__`` does not name. A wrapper must therefore show the
wrapped processor's signature (:func:`mirror_signature`) and pass on only what it accepts (:class:`Forward`): stock
processors differ (``SlicedAttnProcessor``, installed by ``pipe.enable_attention_slicing()``, takes no ``temb``),
and custom ones may take as little as ``(attn, hidden_states, encoder_hidden_states=None, attention_mask=None)``.
"""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["Forward", "mirror_signature"]


#: Subclasses made by :func:`mirror_signature`, one per (wrapper class, wrapped signature).
_MIRRORS: dict[tuple[type, str], type] = {}


def mirror_signature(processor, original) -> None:
    """Give ``processor.__call__`` the signature of ``original.__call__``, so the attention module keeps (and drops)
    the keyword arguments it would for ``original``.

    ``processor`` becomes an instance of a subclass of its class (same name, made once per signature) whose
    ``__call__`` carries that signature and calls the class's own: a class attribute, not an instance one, so
    ``torch.compile`` traces the call as any method call.
    """
    try:
        signature = inspect.signature(original.__call__)
    except (TypeError, ValueError):  # no introspectable signature: keep the wrapper's own
        return
    base = type(processor)
    key = (base, str(signature))
    if key not in _MIRRORS:
        base_call = base.__call__

        def __call__(self, *args, **kwargs):
            return base_call(self, *args, **kwargs)

        me = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
        __call__.__signature__ = signature.replace(parameters=[me, *signature.parameters.values()])
        attrs = {"__call__": __call__, "__doc__": base.__doc__, "__module__": base.__module__}
        _MIRRORS[key] = type(base.__name__, (base,), {**attrs, "__qualname__": base.__qualname__})
    processor.__class__ = _MIRRORS[key]


class Forward:
    """Calls ``original`` with the keyword arguments its ``__call__`` names (all of them when it takes
    ``**kwargs`` or has no introspectable signature); its signature is read once, here.

    ``Forward(original)(attn, hidden_states, encoder_hidden_states=..., attention_mask=..., temb=..., **extra)``:
    keyword arguments ``original`` does not take are left out, positional ones are passed as given.
    """

    def __init__(self, original: Any):
        self.original = original
        try:
            params = inspect.signature(original.__call__).parameters.values()
        except (TypeError, ValueError):
            params = None
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        if params is None or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            self.accepted: frozenset[str] | None = None
        else:
            self.accepted = frozenset(p.name for p in params if p.kind in named)

    def __call__(self, attn, *args, **kwargs):
        if self.accepted is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in self.accepted}
        return self.original(attn, *args, **kwargs)
