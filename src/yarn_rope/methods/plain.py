"""Plain RoPE (method ``none``): the table every other method changes."""

from __future__ import annotations

from typing import Any

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
)


def _write_plain(s: Settings) -> dict[str, Any]:
    return {"rope_type": "default"}


def _engine_plain(s: Settings, model: ServeModel) -> EngineSettings:
    return EngineSettings({"rope_type": "default"})


def _llamacpp_plain(s: Settings, model: ServeModel) -> EngineSettings:
    return EngineSettings({"scaling.type": "none"})


register(
    MethodSpec(
        name="none",
        summary="plain RoPE",
        reference="Su et al., RoFormer (2021)",
        table=_static(F.default_inv_freq),
        aliases=("default",),
        states_target=False,
        transformers=TransformersSpelling("default", exact=_ALL_RELEASES, write=_write_plain),
        engines={
            "vllm": EngineSpelling(_engine_plain, _exact),
            "sglang": EngineSpelling(_engine_plain, _exact),
            "llama.cpp": EngineSpelling(_llamacpp_plain, _exact),
        },
    )
)
