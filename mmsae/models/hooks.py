"""Hook points: find a module by path, capture its output, stop the forward there.

A *hook point* is a module path as ``model.named_modules()`` prints it, e.g.
``model.language_model.layers.15`` for LLaVA-NeXT in transformers 5. The residual stream is the
output of that decoder layer, shape ``(batch, seq, d_model)``.
"""

from __future__ import annotations

import torch
from torch import nn


def resolve_hook_point(model: nn.Module, hook_point: str) -> nn.Module:
    """Return the module at ``hook_point`` (a path from ``model.named_modules()``).

    Raises:
        ValueError: no such module; the message lists nearby decoder-layer paths.
    """
    try:
        return model.get_submodule(hook_point)
    except AttributeError:
        layers = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1].isdigit() and "layers" in n]
        hint = f" (e.g. {layers[0]} ... {layers[-1]})" if layers else ""
        raise ValueError(f"model.hook_point: no module {hook_point!r} in {type(model).__name__}{hint}") from None


def layer_index(hook_point: str) -> int | None:
    """The trailing integer of a hook point (``...layers.15`` -> 15), or None."""
    tail = hook_point.rsplit(".", 1)[-1]
    return int(tail) if tail.isdigit() else None


class StopForward(Exception):
    """Raised by a capture hook to end the forward pass once the hooked layer has run."""


class ActivationCapture:
    """Forward hook that stores a module's output and optionally stops the forward there.

    Usage::

        with ActivationCapture(module, stop=True) as cap:
            cap.run(model, **inputs)
        acts = cap.output  # (batch, seq, d_model)
    """

    def __init__(self, module: nn.Module, stop: bool = True):
        self.module, self.stop = module, stop
        self.output: torch.Tensor | None = None
        self._handle = None

    def _hook(self, _module, _inputs, output):
        self.output = (output[0] if isinstance(output, tuple) else output).detach()
        if self.stop:
            raise StopForward

    def __enter__(self):
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        return False

    def run(self, model: nn.Module, **inputs) -> torch.Tensor:
        """Run ``model(**inputs)`` and return the captured output."""
        self.output = None
        try:
            model(**inputs, use_cache=False)
        except StopForward:
            pass
        if self.output is None:
            raise RuntimeError("the hooked module did not run during the forward pass")
        return self.output
