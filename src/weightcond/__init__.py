"""weightcond: weight conditioning for parameter-efficient fine-tuning.

A pretrained weight ``W`` (``out × in``) is adapted by a low-rank update and by conditioning
matrices placed around it:

    W' = L_post · (L_pre · W · R_pre + ΔW) · R_post

The two axes of the design space are the transform (:data:`TRANSFORMS`, one file each in
``weightcond/transforms``) and the placement (``pre``/``post`` × ``left``/``right``,
:mod:`weightcond.placement`). LoRA, DoRA, Pre-Diag and SORA are named presets
(:data:`PRESETS`).
"""

from typing import Any

from . import analysis, interop, quantized
from .batching import batch_factors
from .errors import (
    AdapterError,
    LayerTypeError,
    OptionError,
    ShapeError,
    StateError,
    UnknownNameError,
    WeightcondError,
)
from .interop import from_peft, to_peft
from .io import load_adapter, save_adapter
from .layer import (
    conditioned_layers,
    conditioners,
    delta_weight,
    dense_forward,
    explain,
    get_update,
    is_conditioned,
    merge,
    register_conditioning,
    register_update,
    remove_conditioning,
)
from .model import ConditionReport, adapter_names, condition, disabled, set_adapter
from .placement import Conditioner, Conditioning
from .presets import PRESETS, Applied, ConditionerSpec, Option, Preset, apply_preset
from .transforms import TRANSFORMS, Transform, register_transform
from .update import LowRankUpdate
from .version import __version__

__all__ = [
    "PRESETS",
    "TRANSFORMS",
    "AdapterCheckpointCallback",
    "AdapterError",
    "Applied",
    "ConditionReport",
    "Conditioner",
    "ConditionerSpec",
    "Conditioning",
    "LayerTypeError",
    "LowRankUpdate",
    "Option",
    "OptionError",
    "Preset",
    "ShapeError",
    "StateError",
    "Transform",
    "UnknownNameError",
    "WeightcondError",
    "__version__",
    "adapter_names",
    "analysis",
    "apply_preset",
    "batch_factors",
    "condition",
    "conditioned_layers",
    "conditioners",
    "delta_weight",
    "dense_forward",
    "disabled",
    "explain",
    "from_peft",
    "get_update",
    "interop",
    "is_conditioned",
    "load_adapter",
    "merge",
    "quantized",
    "register_conditioning",
    "register_transform",
    "register_update",
    "remove_conditioning",
    "save_adapter",
    "set_adapter",
    "to_peft",
]


def __getattr__(name: str) -> Any:
    if name == "AdapterCheckpointCallback":  # imports transformers: only when asked for
        return interop.AdapterCheckpointCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
