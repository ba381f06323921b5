"""A lean decode step for :func:`.runtime.load_compressed` models, behind ``model.generate()``.

At batch 1 a small model's decode step is dominated by per-token overhead, not by its weight kernels: SmolLM2-135M
runs 30 eager decoder layers per token, each a few dozen PyTorch ops and Python calls (RMSNorm, rotary, the
KV-cache append, residuals), so our int4 kernels alone left it at ~8 tok/s where llama.cpp decodes ~40.
transformers already has what gpt-fast showed closes that gap: a static KV cache (fixed shapes, updated in place)
and an automatically ``torch.compile``'d forward for the decode steps (prefill stays eager). This module switches
them on for a packed model, so users keep calling ``generate``:

* ``generation_config.cache_implementation = "static"`` and a ``CompileConfig`` (fullgraph; on the CPU Inductor's
  C++ wrapper; transformers compiles automatically only on GPUs, ``_compile_all_devices`` is its switch for the
  CPU).
  Inductor fuses each layer's norms, rotary, cache update and residuals into a few C++ loops around our kernels,
  which it calls directly (their fake kernels in :mod:`hfcompress.core.native` let it trace them; fused q/k/v
  and gate/up stay one call each: :class:`.packed.SharedInputProjections` traces without a graph break).
* Attention through :func:`decode_sdpa_attention` (registered with transformers' ``AttentionInterface``):
  transformers' own SDPA lets a lone query token attend grouped K/V heads in place only in eager mode, and under
  ``torch.compile`` copies K/V to every query head; with a static cache that is a copy of the whole cache per
  layer per token, and the CPU flash kernel at one query row per head costs ~4x the grouped layout in bfloat16.
  On the CPU a lone query token runs on hfcompress's own kernel (``hfcompress::decode_attention``: grouped K/V
  read in place, the static cache's unused tail skipped, ~10 us a SmolLM2 layer against ~40 us for ATen's flash
  kernel); elsewhere on SDPA (eager) or on the same math written out for Inductor to fuse (compiled).
* Dynamo's guards on the model's modules are skipped (:func:`skip_module_guards`): evaluating them cost as much
  per step as the LM head's kernel. Reload the model rather than changing its modules after the first ``generate``.
* If compiling fails (no C++ compiler for Inductor, an op Dynamo cannot trace under ``fullgraph``...), decode
  falls back to the eager forward with one warning; results are the same either way.

Costs: the first ``generate`` compiles (one to three minutes on a small busy CPU, once per process, less when
Inductor's cache in ``/tmp/torchinductor_$USER`` already holds the kernels; a
longer ``max_length`` than any before recompiles once, after which the cache length is a dynamic dimension).
The static cache is allocated for the longest ``max_length`` seen, and attention reads all of it every step
(masked), so set ``model.generation_config.max_cache_len`` only as large as needed.
"""

from __future__ import annotations

import inspect
import logging
import types

import torch
import torch.nn.functional as F
from torch import nn

from ..core import native

logger = logging.getLogger(__name__)

DECODE_ATTENTION = "hfcompress_sdpa"


def decode_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except that one query token attends grouped K/V heads in place, compiled or
    not (see the module docstring). Same math as transformers' eager path: query head h reads K/V head
    h // groups (``repeat_kv``'s order)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    batch, heads, q_len, dim = query.shape
    plain = (q_len != 1 or groups == 1 or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
             or kwargs.get("output_attentions", False)
             or (attention_mask is not None and attention_mask.shape[1] != 1))
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else dim ** -0.5
    if (not dropout and query.device.type == "cpu" and key.dtype == query.dtype and value.dtype == query.dtype
            and query.dtype in (torch.float32, torch.bfloat16, torch.float64) and native.kernels_available()):
        # Our kernel: one call, grouped K/V read in place, the mask's excluded positions skipped.
        mask = None if attention_mask is None else attention_mask.reshape(batch, attention_mask.shape[-1])
        out = native.decode_attention(query.reshape(batch, heads, dim), key, value, mask, scale)  # (B, H, Dv)
        return out.unsqueeze(1), None  # (B, 1, H, Dv), transformers' layout
    grouped = query.reshape(batch, heads // groups, groups, dim)  # (B, KV heads, groups, D): one row per query head
    if dropout or not torch.compiler.is_compiling():
        # The mask (B, 1, 1, L) is the same for every head and row: it broadcasts over (B, KV heads, groups, L).
        out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                             scale=scaling)  # (B, KV heads, groups, Dv)
    else:
        # Compiled: the same softmax(q k^T s + mask) v written as broadcast products and sums, which Inductor
        # fuses into loops of the step's own C++ (nothing of size (.., L, D) is materialised). At one query row per
        # head a library call costs more in setup than the arithmetic: ATen's flash attention ~40 us a layer on
        # a CPU, two bmm calls ~36 us, these loops a few us.
        acc = torch.promote_types(query.dtype, torch.float32)  # float32 sums for 16-bit activations
        scores = (grouped.to(acc).unsqueeze(-2) * key.to(acc).unsqueeze(-3)).sum(-1) * scale  # (B, KVH, groups, L)
        if attention_mask is not None:
            scores = (scores.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool
                      else scores + attention_mask)
        probs = scores.softmax(dim=-1)
        out = (probs.unsqueeze(-1) * value.unsqueeze(-3).to(acc)).sum(-2).to(value.dtype)  # (B, KV heads, groups, Dv)
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(DECODE_ATTENTION, decode_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(DECODE_ATTENTION, sdpa_mask)  # the same boolean masks as "sdpa"


def inductor_backend():
    """The ``torch.compile`` backend of the decode step (a function, so tests can make it fail)."""
    return "inductor"


def _compile_errors() -> tuple[type[BaseException], ...]:
    """What a failed compile raises: Dynamo's errors (a graph break under fullgraph, tracing) and Inductor's, which
    wrap e.g. a C++ compiler that cannot be run. A genuine error in the model raises again in the eager rerun."""
    from torch._dynamo.exc import TorchDynamoException

    errors: list[type[BaseException]] = [TorchDynamoException]
    try:
        from torch._inductor.exc import CppCompileError

        errors.append(CppCompileError)
    except ImportError:  # pragma: no cover - older torch
        pass
    return tuple(errors)


def _root_cause(exc: BaseException) -> str:
    """'Type: first line' of the innermost cause (Dynamo wraps a backend's error in BackendCompilerFailed)."""
    while (inner := getattr(exc, "inner_exception", None) or exc.__cause__) is not None:
        exc = inner
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def skip_module_guards(guard_entries) -> list[bool]:
    """Dynamo guard filter of the decode step: drop the guards on the model's modules (their attributes,
    parameters and buffers), keep the rest (the inputs, the static cache, globals).

    Each call of a compiled function first evaluates its guards; with a guard per module attribute and per
    packed buffer that is ~1.2 ms of a 7-8 ms SmolLM2-135M step on one core (torch.profiler's "TorchDynamo Cache
    Lookup"), as much as the int8 head's kernel. A loaded packed model's modules do not change between decode
    steps, which is the contract this relies on (the filter is PyTorch's
    ``torch.compiler.skip_guard_on_all_nn_modules_unsafe``): parameters are still read at every call, so
    in-place weight updates are seen, but changing a module's structure, dtype or Python attributes after the
    first ``generate`` is not detected -- load the model again (or call ``torch._dynamo.reset()``) instead."""
    return torch.compiler.skip_guard_on_all_nn_modules_unsafe(guard_entries)


def _compiled_call(model, compile_config, state: dict):
    """``torch.compile(model.__call__)`` with ``compile_config``, once per model and config (what transformers'
    ``get_compiled_call`` does), in a cache of compiled entries of this model's own (``isolate_recompiles``).

    Every model of a class shares its forward's code object and so, by default, Dynamo's cache of compiled
    entries; what tells two models apart is the guards on their modules. :func:`skip_module_guards` drops
    those, so without isolation a second model (int4 after int8, say) would run the first one's graph."""
    options = compile_config.to_dict()
    if state.get("config") != options or "compiled" not in state:
        isolate = "isolate_recompiles" in inspect.signature(torch.compile).parameters
        if not isolate and (options.get("options") or {}).get("guard_filter_fn") is not None:
            options["options"].pop("guard_filter_fn")  # older torch: keep the guards rather than share entries
        state["config"] = compile_config.to_dict()
        state["compiled"] = torch.compile(model.__call__, **options, **({"isolate_recompiles": True} if isolate else {}))
    return state["compiled"]


def _guarded_compiled_call(model, compile_config):
    """transformers' compiled forward (``PreTrainedModel.get_compiled_call``), run eagerly instead, with one
    warning, if compiling it fails. Bound to the model instance by :func:`enable_compiled_decode`."""
    state = model.__dict__.setdefault("_hfcompress_decode", {"failed": None})
    compiled = _compiled_call(model, compile_config or model.generation_config.compile_config, state)

    def forward(*args, **kwargs):
        if state["failed"] is None:
            try:
                return compiled(*args, **kwargs)
            except _compile_errors() as exc:
                state["failed"] = _root_cause(exc)
                logger.warning("compile_decode: torch.compile of the decode step failed (%s); decoding with the "
                               "eager forward instead (same results, slower). Load with compile_decode=False to "
                               "skip the attempt.", state["failed"])
        return model(*args, **kwargs)

    return forward


def enable_compiled_decode(model) -> bool:
    """Make ``model.generate()`` decode with a static KV cache and a compiled forward (see the module docstring).
    Returns False, with a warning, for an architecture transformers cannot compile with a static cache."""
    from transformers import CompileConfig

    if not getattr(type(model), "_can_compile_fullgraph", False):
        logger.warning("compile_decode: %s does not support a static KV cache in transformers; decoding eagerly",
                       type(model).__name__)
        return False
    if model.config._attn_implementation == "sdpa":
        _register_attention()
        model.set_attn_implementation(DECODE_ATTENTION)
    on_cpu = model.device.type == "cpu"
    backend = inductor_backend()
    if on_cpu:
        options = {"guard_filter_fn": skip_module_guards}
        # Inductor's C++ wrapper: the step's ~150 kernel calls and allocations run from compiled C++ instead of
        # generated Python (SmolLM2-135M int4: 7.8 instead of 8.9 CPU ms per step, the same tokens), for about
        # twice the compile time.
        if backend == "inductor":
            options["cpp_wrapper"] = True
        config = CompileConfig(fullgraph=True, backend=backend, mode=None, options=options)
    else:  # CUDA graphs ("reduce-overhead", transformers' default) exist on GPUs only; torch.compile takes a mode
        # or options, not both, so the guard filter stays off there (CUDA graphs replay without Python anyway)
        config = CompileConfig(fullgraph=True, backend=backend, mode="reduce-overhead")
    config._compile_all_devices = True  # transformers' switch to compile on CPUs too
    model.generation_config.cache_implementation = "static"
    model.generation_config.compile_config = config
    # The one hook generate() offers on the compiled callable: PreTrainedModel.get_compiled_call, overridden on
    # this instance only, so that a failed compile falls back instead of failing generate().
    model.get_compiled_call = types.MethodType(_guarded_compiled_call, model)
    return True


def compiled_decode_status(model) -> str:
    """"compiled", "eager (compile failed: ...)", "not compiled yet" or "off", for reports and tests."""
    if not isinstance(getattr(model, "get_compiled_call", None), types.MethodType) or \
            getattr(model.get_compiled_call, "__func__", None) is not _guarded_compiled_call:
        return "off"
    state = model.__dict__.get("_hfcompress_decode")
    if state is None:
        return "not compiled yet"
    return f"eager (compile failed: {state['failed']})" if state["failed"] else "compiled"
