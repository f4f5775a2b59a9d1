"""Linear scaling (position interpolation): every frequency divided by the factor."""

from __future__ import annotations

from .. import frequencies as F
from . import register
from .settings import Settings
from .spec import (
    _ALL_RELEASES,
    EngineSettings,
    EngineSpelling,
    MethodSpec,
    ServeModel,
    TransformersSpelling,
    _exact,
    _static,
    _write_factor,
)


def _engine_linear(s: Settings, model: ServeModel) -> EngineSettings:
    return EngineSettings({"rope_type": "linear", "factor": s["factor"]})


def _llamacpp_linear(s: Settings, model: ServeModel) -> EngineSettings:
    return EngineSettings({"scaling.type": "linear", "scaling.factor": s["factor"]})


register(
    MethodSpec(
        name="linear",
        summary="every frequency divided by factor (position interpolation)",
        reference="Chen et al. 2023; kaiokendev",
        table=_static(F.linear_inv_freq, "factor"),
        required=("factor",),
        transformers=TransformersSpelling("linear", exact=_ALL_RELEASES, write=_write_factor("linear")),
        engines={
            "vllm": EngineSpelling(_engine_linear, _exact),
            "sglang": EngineSpelling(_engine_linear, _exact),
            "llama.cpp": EngineSpelling(_llamacpp_linear, _exact),
        },
    )
)
