"""The model side of the plugin: vLLM's ``get_rope`` learns the ``yarn_rope.*`` dynamic types.

Imported only inside vLLM processes (it imports vLLM). :func:`install` wraps
``vllm.model_executor.layers.rotary_embedding.get_rope`` once; a ``rope_type`` of a dynamic
yarn_rope method then builds a :class:`PerRequestRotary`, and every other type goes to vLLM's own
function untouched. The module's rows are chosen per token as data: ``positions + row_offsets``,
where ``row_offsets`` is a persistent buffer that the runner hook (:mod:`._runner`) fills before
each forward, so compiled graphs and CUDA graphs replay with no data-dependent branch.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from .plan import ServePlan, plan_from

__all__ = ["install", "plan_of_config", "rotaries_of"]

_PREFIX = "yarn_rope."
_CLASS: list[type] = []


def rotaries_of(model: Any) -> list[Any]:
    """The per-request rotary modules of a built model (each shared module once)."""
    if not _CLASS:
        return []
    found: dict[int, Any] = {}
    for module in model.modules():
        if isinstance(module, _CLASS[0]):
            found.setdefault(id(module), module)
    return list(found.values())


def is_ours(rope_parameters: Any) -> bool:
    """Whether a rope dict names a yarn_rope type (``"yarn_rope.<method>"``)."""
    return isinstance(rope_parameters, dict) and str(rope_parameters.get("rope_type", "")).startswith(_PREFIX)


def plan_of_config(vllm_config: Any) -> ServePlan | None:
    """The plan of the model ``vllm_config`` serves, ``None`` when it declares no yarn_rope type.

    Read from the text config's ``rope_parameters`` (after ``hf_overrides``), vLLM's final
    ``max_model_len`` and ``additional_config["yarn_rope"]``; the scheduler and the model both
    call this, so they agree on every bucket.
    """
    model_config = getattr(vllm_config, "model_config", None)
    if model_config is None:
        return None
    text = model_config.hf_text_config
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None)
    if isinstance(rope, dict) and "rope_type" not in rope and "full_attention" in rope:
        rope = rope["full_attention"]  # one dict per layer type
    if not isinstance(rope, dict) or not is_ours(rope):
        return None
    additional = getattr(vllm_config, "additional_config", None) or {}
    options = additional.get("yarn_rope") if isinstance(additional, dict) else None
    return plan_from(
        _with_family(dict(rope), model_config.hf_config), int(model_config.max_model_len), options
    )


def _with_family(rope: dict[str, Any], hf_config: Any) -> dict[str, Any]:
    """The rope dict with the YaRN authors' family defaults (betas, mscale coefficient) where the
    config's ``auto_map`` names one of their modeling files and the dict states none."""
    from ..loading.plan import code_family

    auto_map = getattr(hf_config, "auto_map", None) or {}
    _, family = code_family(auto_map.get("AutoModelForCausalLM") if isinstance(auto_map, dict) else None)
    if family is None:
        return rope
    for key in ("beta_fast", "beta_slow", "mscale_coefficient"):
        rope.setdefault(key, getattr(family, key))
    return rope


def _refuse_unsupported(vllm_config: Any) -> None:
    """Engine features the plugin cannot serve exactly: one clear error at start-up."""
    speculative = getattr(vllm_config, "speculative_config", None)
    parallel = vllm_config.parallel_config
    problems = []
    if speculative is not None:
        problems.append(
            "speculative decoding (its draft tokens would need their own table choice and a crossing "
            "mid-draft a recompute): serve without --speculative-config"
        )
    if parallel.pipeline_parallel_size > 1:
        problems.append("pipeline parallelism: serve with --pipeline-parallel-size 1")
    if parallel.data_parallel_size > 1:
        problems.append("data parallelism: run one vLLM per replica instead of --data-parallel-size")
    if problems:
        raise ValueError("yarn_rope's dynamic YaRN plugin does not support " + "; ".join(problems))


def _rotary_class() -> type:
    """:class:`PerRequestRotary`, defined on first use (it subclasses vLLM's RotaryEmbedding)."""
    if _CLASS:
        return _CLASS[0]
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    class PerRequestRotary(RotaryEmbedding):  # type: ignore[misc]
        """vLLM's rotary embedding over every bucket's table; rows chosen per token.

        ``cos_sin_cache`` is ``[total_rows, rotary_dim]`` (:meth:`ServePlan.cos_sin_cache`);
        ``row_offsets`` ``[max_num_batched_tokens]`` int64 holds each token's bucket start.
        """

        def __init__(
            self,
            head_size: int,
            rotary_dim: int,
            base: float,
            is_neox_style: bool,
            dtype: torch.dtype,
            plan: ServePlan,
            max_tokens: int,
        ) -> None:
            self.plan = plan
            super().__init__(head_size, rotary_dim, plan.max_model_len, base, is_neox_style, dtype)
            self.last_row = plan.total_rows - 1
            self.row_offsets: torch.Tensor
            self.register_buffer("row_offsets", torch.zeros(max_tokens, dtype=torch.int64), persistent=False)

        def _compute_cos_sin_cache(self) -> torch.Tensor:
            return self.plan.cos_sin_cache(self.rotary_dim, self.base)

        def rows(self, positions: torch.Tensor) -> torch.Tensor:
            """Each token's row: its position in its bucket's table (padding stays in range)."""
            flat = positions.flatten()
            rows = flat + self.row_offsets[: flat.shape[0]]
            return rows.clamp_(max=self.last_row).view(positions.shape)

        def forward_native(self, positions: torch.Tensor, query: torch.Tensor, key: Any = None) -> Any:
            return super().forward_native(self.rows(positions), query, key)

        def forward_cuda(self, positions: torch.Tensor, query: torch.Tensor, key: Any = None) -> Any:
            return super().forward_cuda(self.rows(positions), query, key)

        def forward_cpu(self, positions: torch.Tensor, query: torch.Tensor, key: Any = None) -> Any:
            return super().forward_cpu(self.rows(positions), query, key)

        def forward_hip(self, positions: torch.Tensor, query: torch.Tensor, key: Any = None) -> Any:
            return super().forward_hip(self.rows(positions), query, key)

        def forward_xpu(self, positions: torch.Tensor, query: torch.Tensor, key: Any = None) -> Any:
            return super().forward_xpu(self.rows(positions), query, key)

        def extra_repr(self) -> str:
            plan = self.plan
            return (
                f"{super().extra_repr()}, method={plan.scaling.method!r}, buckets={plan.num_buckets}, "
                f"growth={plan.growth:g}, angles={plan.angles!r}"
            )

    _CLASS.append(PerRequestRotary)
    return PerRequestRotary


_CALL = ("head_size", "max_position", "is_neox_style", "rope_parameters", "dtype")
_BUILT: dict[str, Any] = {}


def _get_rope(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``get_rope(...)`` for a yarn_rope type: a :class:`PerRequestRotary`, one per distinct call."""
    from vllm.config import get_current_vllm_config

    call = dict(zip(_CALL, args, strict=False), **kwargs)
    rope = dict(call["rope_parameters"])
    if call.get("dual_chunk_attention_config") is not None or "mrope_section" in rope:
        raise ValueError(
            f"yarn_rope's vLLM plugin serves {rope['rope_type']} on plain rotary layers only, not with "
            "dual-chunk attention or multimodal RoPE (mrope_section)"
        )
    from ._engine import install_runner

    vllm_config = get_current_vllm_config()
    _refuse_unsupported(vllm_config)
    install_runner()  # the runner that builds this model is imported by now
    plan = plan_of_config(vllm_config)
    if plan is None:  # per-layer dicts: this layer's is ours though the full-attention one is not
        raise ValueError(
            f"yarn_rope's vLLM plugin serves {rope['rope_type']} when the config declares it for the model "
            "(or its full-attention layers); here only another layer type's rope dict names it: declare "
            "it in the full-attention dict"
        )
    head_size = int(call["head_size"])
    rotary_dim = int(rope.get("rope_dim") or head_size * rope.get("partial_rotary_factor", 1.0))
    base = float(rope.get("rope_theta", 10000))
    neox = bool(call.get("is_neox_style", True))
    dtype = call.get("dtype") or torch.get_default_dtype()
    tokens = int(vllm_config.scheduler_config.max_num_batched_tokens)
    # Every layer shares one module, as with vLLM's own cache; a new engine with other settings
    # (plan, batch size) gets its own.
    key = repr((head_size, rotary_dim, base, neox, dtype, plan, tokens))
    if key not in _BUILT:
        _BUILT[key] = _rotary_class()(head_size, rotary_dim, base, neox, dtype, plan, tokens)
    return _BUILT[key]


def install_refusal(message: str) -> None:
    """Wrap vLLM's ``get_rope`` so that a yarn_rope type fails with ``message`` (unsupported vLLM)."""
    from vllm.model_executor.layers import rotary_embedding

    original = rotary_embedding.get_rope
    if getattr(original, "_yarn_rope", False):
        return

    def get_rope(*args: Any, **kwargs: Any) -> Any:
        if is_ours(kwargs.get("rope_parameters", args[3] if len(args) > 3 else None)):
            raise RuntimeError(message)
        return original(*args, **kwargs)

    _replace(rotary_embedding, original, get_rope)


def _replace(package: Any, original: Any, wrapper: Any) -> None:
    wrapper._yarn_rope = True
    wrapper.__wrapped__ = original
    wrapper.__doc__ = original.__doc__
    package.get_rope = wrapper
    # Model files bind the name at import; rebind it in those already imported.
    for name, module in list(sys.modules.items()):
        if name.startswith("vllm.model_executor.models.") and getattr(module, "get_rope", None) is original:
            setattr(module, "get_rope", wrapper)  # noqa: B010 (a module object; mypy cannot see the name)


def install() -> None:
    """Wrap vLLM's ``get_rope`` (once) so that it builds yarn_rope's dynamic types."""
    from vllm.model_executor.layers import rotary_embedding

    original = rotary_embedding.get_rope
    if getattr(original, "_yarn_rope", False):
        return

    def get_rope(*args: Any, **kwargs: Any) -> Any:
        rope = kwargs.get("rope_parameters", args[3] if len(args) > 3 else None)
        if not is_ours(rope):
            return original(*args, **kwargs)
        return _get_rope(args, kwargs)

    _replace(rotary_embedding, original, get_rope)
