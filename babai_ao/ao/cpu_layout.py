"""A quantized tensor's CPU kernel layout, kept on the tensor as a cache (never saved).

The fast CPU paths of ``F.linear`` (``babai_ao.kernels.cpu_int4``: int4pack;
``babai_ao.kernels.cpu_hptq``: window nibbles + sparse correction) read a layout derived from the
stored tensors. :class:`CPULayoutCache` keeps it on the weight itself, under the names in
``cpu_layout_names``: built once — on the first eager call, or when ``torch.compile`` first
flattens the real tensor (``__tensor_flatten__`` under compile), so a model compiled with no
eager call gets it too — then flattened as more inner tensors (compile's fake and
functional copies carry it, and the compiled graph calls the kernel on it directly), carried
by torchao's per-tensor ops (``detach``, ``alias``, ``clone``: ``_apply_fn_to_data``) while
the result stays on the CPU, and left out of ``torch.save`` pickles
(:func:`exclude_from_pickle`); it is not a data name, so safetensors and the integrity digest
never see it. A weight the layout does not apply to remembers that (one build attempt).

A compiled graph's runtime wrapper flattens every subclass input on every call (twice: the
guard on its metadata, then the unwrap), and torchao's generic ``__tensor_flatten__`` costs
tens of µs in Python — for a 30-block model, 420 calls per decoded token. So once a real
tensor's flatten result is final (layout built, or not applicable) it is kept on the tensor
and handed out as copies; any attribute assignment drops it, pickles leave it out.
"""

from __future__ import annotations

from typing import Any

import torch


class CPULayoutCache:
    """Mixin for a ``TorchAOBaseTensor`` subclass; the subclass names its layout tensors in
    ``cpu_layout_names`` (class attributes defaulting to ``None``) and builds them in
    ``_build_cpu_layout`` (``None``: the layout does not apply)."""

    cpu_layout_names: list[str] = []
    _cpu_layout_absent = False  # a build was tried and found the layout does not apply

    def _build_cpu_layout(self) -> tuple[torch.Tensor, ...] | None:
        raise NotImplementedError

    def cpu_layout_eligible(self) -> bool:
        """Whether a layout may exist (cheap: layout, device; the build may still decline)."""
        raise NotImplementedError

    def _first_data(self) -> torch.Tensor:
        return getattr(self, self.tensor_data_names[0])  # type: ignore[attr-defined]

    def _real_cpu(self) -> bool:
        """Plain CPU data (not fake, functional or meta): a layout can be built from it."""
        t = self._first_data()
        return type(t) is torch.Tensor and t.device.type == "cpu"

    def _has_cpu_layout(self) -> bool:
        return getattr(self, self.cpu_layout_names[0]) is not None

    def _cpu_layout_tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, n) for n in self.cpu_layout_names)

    def _set_cpu_layout(self, tensors: tuple[torch.Tensor | None, ...]) -> None:
        for name, t in zip(self.cpu_layout_names, tensors):
            setattr(self, name, t)

    def cpu_layout(self, build: bool = False) -> tuple[torch.Tensor, ...] | None:
        """The layout tensors, built and kept when ``build`` (real CPU data, eligible, not
        tried before), else ``None`` when there is none."""
        if (not self._has_cpu_layout() and build and not self._cpu_layout_absent
                and self.cpu_layout_eligible() and self._real_cpu()):
            from torch.utils._python_dispatch import _disable_current_modes

            with _disable_current_modes(), torch.no_grad():  # real tensors, even mid-trace
                built = self._build_cpu_layout()
            if built is None:
                self._cpu_layout_absent = True
            else:
                self._set_cpu_layout(built)
        return self._cpu_layout_tensors() if self._has_cpu_layout() else None

    def _carry_cpu_layout(self, out: Any) -> Any:
        """``out`` (a view or cast of ``self`` on the same stored tensors) gets the layout."""
        if self._has_cpu_layout():
            out._set_cpu_layout(self._cpu_layout_tensors())
        return out

    def __tensor_flatten__(self) -> tuple[list[str], dict[str, Any]]:
        """torchao's names and attributes, plus the layout's names when it exists. A
        compiled graph's runtime wrapper calls this twice per weight per call, so a real
        tensor keeps its result (copied out; any attribute assignment drops it) once the
        layout exists or cannot exist."""
        kept = self.__dict__.get("_flattened")
        if kept is not None:
            return list(kept[0]), dict(kept[1])
        names, attrs = super().__tensor_flatten__()  # type: ignore[misc]
        if (not self._has_cpu_layout() and torch.compiler.is_compiling()
                and not torch.compiler.is_exporting() and self._real_cpu()):
            self.cpu_layout(build=True)  # compile is about to see this weight
        if self._has_cpu_layout():
            names = [*names, *self.cpu_layout_names]
        if (type(self._first_data()) is torch.Tensor and not torch.compiler.is_compiling()
                and (self._has_cpu_layout() or not self.cpu_layout_eligible())):
            self.__dict__["_flattened"] = (tuple(names), dict(attrs))
        return names, attrs

    def __setattr__(self, name: str, value: Any) -> None:
        self.__dict__.pop("_flattened", None)  # names or attributes may change
        super().__setattr__(name, value)

    @classmethod
    def __tensor_unflatten__(cls, tensor_data_dict, tensor_attributes, outer_size,
                             outer_stride):
        data = dict(tensor_data_dict)
        layout = tuple(data.pop(n, None) for n in cls.cpu_layout_names)
        out = super().__tensor_unflatten__(  # type: ignore[misc]
            data, tensor_attributes, outer_size, outer_stride)
        out._set_cpu_layout(layout)
        return out

    def _apply_fn_to_data(self, fn):
        """torchao's per-tensor ops, the layout included while the result stays on the CPU."""
        out = super()._apply_fn_to_data(fn)  # type: ignore[misc]
        if self._has_cpu_layout() and out.device.type == "cpu":
            out._set_cpu_layout(tuple(fn(t) for t in self._cpu_layout_tensors()))
        return out


def exclude_from_pickle(cls: type) -> None:
    """``cls.__getstate__`` without the layout (rebuilt after loading) and the kept flatten
    result (which names it); call it after any other ``__getstate__`` wrapper
    (``integrity.install``)."""
    with_cache = cls.__getstate__

    def __getstate__(self) -> dict[str, Any]:
        state = with_cache(self)
        for name in (*cls.cpu_layout_names, "_cpu_layout_absent", "_flattened"):
            state.pop(name, None)
        return state

    __getstate__.__doc__ = "The pickled state without the CPU layout cache."
    cls.__getstate__ = __getstate__
