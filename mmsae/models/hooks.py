"""Hook points: find a module by path, capture its output, stop the forward there, replace its output.

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


class OutputReplacement:
    """Forward hook that replaces a module's output ``x`` (batch, seq, d_model) by ``fn(x)`` (same
    shape) at the positions where ``where`` (batch, seq) bool is True; elsewhere the output is kept.
    A tuple output keeps its other elements. ``where`` None replaces every position.

    Usage::

        with OutputReplacement(module, torch.zeros_like):   # zero-ablate the layer
            logits = model(**inputs).logits

    Raises:
        ValueError (at the forward): ``where`` does not have the output's (batch, seq) shape.
    """

    def __init__(self, module: nn.Module, fn, where: torch.Tensor | None = None):
        self.module, self.fn, self.where = module, fn, where
        self._handle = None

    def __call__(self, _module, _inputs, output):
        x = output[0] if isinstance(output, tuple) else output
        new = self.fn(x).to(x.dtype)
        if self.where is not None:
            if tuple(self.where.shape) != tuple(x.shape[:-1]):
                raise ValueError(f"OutputReplacement: positions of shape {tuple(self.where.shape)} "
                                 f"for an output of shape {tuple(x.shape)}")
            new = torch.where(self.where.to(x.device)[..., None], new, x)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def __enter__(self):
        self._handle = self.module.register_forward_hook(self)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        return False
