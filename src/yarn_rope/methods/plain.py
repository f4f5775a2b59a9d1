"""Plain RoPE (method ``none``): the table every other method changes."""

from __future__ import annotations

from typing import Any

from .. import frequencies as F
from . import register
from . import spec as S
from .settings import Settings


def _write_plain(s: Settings) -> dict[str, Any]:
    return {"rope_type": "default"}


def _engine_plain(s: Settings, model: S.ServeModel) -> S.EngineSettings:
    return S.EngineSettings({"rope_type": "default"})


def _llamacpp_plain(s: Settings, model: S.ServeModel) -> S.EngineSettings:
    return S.EngineSettings({"scaling.type": "none"})


register(
    S.MethodSpec(
        name="none",
        summary="plain RoPE",
        reference="Su et al., RoFormer (2021)",
        table=S._static(F.default_inv_freq),
        aliases=("default",),
        states_target=False,
        transformers=S.TransformersSpelling("default", exact=S._ALL_RELEASES, write=_write_plain),
        engines={
            "vllm": S.EngineSpelling(_engine_plain, S._exact),
            "sglang": S.EngineSpelling(_engine_plain, S._exact),
            "llama.cpp": S.EngineSpelling(_llamacpp_plain, S._exact),
        },
    )
)
