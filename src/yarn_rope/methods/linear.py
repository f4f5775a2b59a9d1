"""Linear scaling (position interpolation): every frequency divided by the factor."""

from __future__ import annotations

from .. import frequencies as F
from . import register
from . import spec as S
from .settings import Settings


def _engine_linear(s: Settings, model: S.ServeModel) -> S.EngineSettings:
    return S.EngineSettings({"rope_type": "linear", "factor": s["factor"]})


def _llamacpp_linear(s: Settings, model: S.ServeModel) -> S.EngineSettings:
    return S.EngineSettings({"scaling.type": "linear", "scaling.factor": s["factor"]})


register(
    S.MethodSpec(
        name="linear",
        summary="every frequency divided by factor (position interpolation)",
        reference="Chen et al. 2023; kaiokendev",
        table=S._static(F.linear_inv_freq, "factor"),
        required=("factor",),
        transformers=S.TransformersSpelling("linear", exact=S._ALL_RELEASES, write=S._write_factor("linear")),
        engines={
            "vllm": S.EngineSpelling(_engine_linear, S._exact),
            "sglang": S.EngineSpelling(_engine_linear, S._exact),
            "llama.cpp": S.EngineSpelling(_llamacpp_linear, S._exact),
        },
    )
)
