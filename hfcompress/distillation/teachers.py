"""The teacher: loading, freezing, placement under ``accelerate``, vocabulary alignment, LM-head access.

Placement follows the parallelism of the run:

* single process and DDP: ``accelerator.prepare_model(..., evaluation_mode=True)`` moves it to the device
  and applies mixed precision, but does not wrap it in DDP (it has no gradients to reduce): one full
  replica per rank;
* FSDP2: sharded like the student, with accelerate's ``fsdp2_prepare_model`` (its parameters become
  DTensors; the LM head is gathered once per step for the chunked loss). FSDP1 keeps a replica (its flat
  parameters cannot be read outside forward);
* DeepSpeed ZeRO-3: sharded with a DeepSpeed inference engine (no optimizer), as TRL's trainers do; under
  ZeRO-1/2 it is replicated (ZeRO stage 0).

The FSDP and DeepSpeed paths need GPUs and are not exercised by the CPU test-suite.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os

import torch

from ..core.errors import ConfigError, ModelLoadError
from ..core.pretrained import load_auto_tokenizer, load_causal_lm
from .losses import LMHead

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------
# Loading and freezing
# --------------------------------------------------------------------------------------------------------
def _init_kwargs(init_kwargs: dict | None) -> dict:
    kwargs = dict(init_kwargs or {})
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ConfigError(f"teacher_model_init_kwargs dtype {dtype!r} is not a torch dtype; use e.g. 'bfloat16'")
        kwargs["dtype"] = getattr(torch, dtype)
        kwargs.pop("torch_dtype", None)
    quantization = kwargs.get("quantization_config")
    if isinstance(quantization, dict) and ("load_in_8bit" in quantization or "load_in_4bit" in quantization):
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(**quantization)
    return kwargs


def load_teacher(teacher, init_kwargs: dict | None = None):
    """A model object is used as is; a path / Hub id is loaded with ``init_kwargs`` (``reference:<size>`` is
    resolved by the caller: :func:`hfcompress.models.loading.resolve_model`)."""
    if isinstance(teacher, (str, os.PathLike)):
        return load_causal_lm(teacher, **_init_kwargs(init_kwargs))
    if init_kwargs:
        raise ConfigError("teacher_model_init_kwargs is set but teacher_model is already a model object; pass "
                          "the teacher as a path to load it with those kwargs, or drop them")
    if not isinstance(teacher, torch.nn.Module):
        raise ConfigError(f"teacher_model must be a model, a path or a Hub id, got {type(teacher).__name__}")
    return teacher


def freeze(model):
    """Eval mode (no dropout), no gradients: the teacher is a fixed function of the inputs.

    Only for teachers hfcompress owns (loaded from a path, or wrapped for sharding): a teacher object passed by
    the caller is only put in eval mode (:func:`use_as_teacher`), so a student copied from it later still trains.
    """
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def use_as_teacher(teacher, owned: bool):
    """The teacher in eval mode; its parameters' ``requires_grad`` is switched off only when ``owned``.

    The teacher's forward runs under ``torch.no_grad`` either way, so leaving a caller's flags alone costs no
    memory: no graph is recorded through it and no gradient reaches its parameters.
    """
    return freeze(teacher) if owned else teacher.eval()


def prepare_teacher(teacher, accelerator):
    """Place (and, under ZeRO-3, shard) the frozen teacher for this ``accelerate`` run."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return _prepare_deepspeed_teacher(teacher, accelerator)
    if accelerator.distributed_type == DistributedType.FSDP:
        if getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) == 2:
            from accelerate.utils import fsdp2_prepare_model

            return freeze(fsdp2_prepare_model(accelerator, teacher))
        logger.info("FSDP1: the teacher is replicated on every rank; use fsdp_version 2 to shard it")
    # No gradient ever reaches it (forward under no_grad); its requires_grad flags are the caller's.
    return accelerator.prepare_model(teacher, evaluation_mode=True).eval()


def _prepare_deepspeed_teacher(teacher, accelerator):
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    # Inference only: no optimizer, scheduler or optimizer offload for the teacher.
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    if zero.get("stage") != 3:
        zero["stage"] = 0  # replicate: ZeRO-1/2 shard optimizer state, which the teacher does not have
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    return freeze(engine)


# --------------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------------
def _embedding_rows(model) -> int:
    head = unwrap(model).get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise ConfigError(f"{type(unwrap(model)).__name__} has no output embeddings (LM head); distillation needs "
                          f"a causal LM such as AutoModelForCausalLM")
    # A ZeRO-3-partitioned parameter is empty locally and keeps its real shape in `ds_shape`.
    return int(getattr(head.weight, "ds_shape", head.weight.shape)[0])


def teacher_tokenizer(teacher_source):
    """The teacher's tokenizer when it can be found locally (path or a model loaded from a folder), else None."""
    candidates = []
    if isinstance(teacher_source, (str, os.PathLike)):
        candidates.append(os.fspath(teacher_source))
    elif isinstance(teacher_source, torch.nn.Module):
        candidates.append(getattr(getattr(teacher_source, "config", None), "_name_or_path", "") or "")
    for candidate in candidates:
        if not candidate:
            continue
        if not os.path.isdir(os.path.expanduser(candidate)):
            continue  # a Hub id: loading its tokenizer may need the network; fall back to the size check
        try:
            return load_auto_tokenizer(candidate)
        except (ModelLoadError, OSError, ValueError):
            return None
    return None


def check_vocabularies(student, teacher, tokenizer=None, teacher_tok=None) -> int:
    """Number of vocabulary rows the two LM heads share; raises if the tokenizers genuinely differ.

    * With both tokenizers: every token of the student's tokenizer must have the same id in the teacher's
      (identical tokenizers, possibly with extra tokens appended on the teacher's side).
    * Embedding matrices are often padded past the tokenizer (to a multiple of 64/128, or different padding
      in student and teacher); those rows are never a real token, so both heads are compared on the first
      ``len(tokenizer)`` rows.
    """
    student_rows, teacher_rows = _embedding_rows(student), _embedding_rows(teacher)
    if tokenizer is not None and teacher_tok is not None:
        student_vocab, teacher_vocab = tokenizer.get_vocab(), teacher_tok.get_vocab()
        mismatched = [tok for tok, idx in student_vocab.items() if teacher_vocab.get(tok) != idx]
        if mismatched:
            example = mismatched[0]
            raise ConfigError(
                f"the student and teacher use different tokenizers: {len(mismatched)} of {len(student_vocab)} "
                f"student tokens have another id (or none) in the teacher's, e.g. {example!r} is "
                f"{student_vocab[example]} vs {teacher_vocab.get(example)}; logit distillation needs a shared "
                f"vocabulary: use a student built from the teacher's tokenizer (make_student)")
    if tokenizer is not None:
        vocab = len(tokenizer)
    else:
        vocab = min(student_rows, teacher_rows)
        if student_rows != teacher_rows:
            logger.warning("student and teacher LM heads have %d and %d rows and no tokenizer was given; comparing "
                           "the first %d rows (pass processing_class to check the vocabulary)",
                           student_rows, teacher_rows, vocab)
    for name, rows in (("student", student_rows), ("teacher", teacher_rows)):
        if rows < vocab:
            raise ConfigError(f"the {name}'s LM head has {rows} rows but the tokenizer has {vocab} tokens: they do "
                              f"not share a vocabulary; use the {name}'s own tokenizer or resize its embeddings")
    if student_rows != teacher_rows:
        logger.info("aligning LM heads on the first %d vocabulary rows (student %d, teacher %d rows)",
                    vocab, student_rows, teacher_rows)
    return vocab


# --------------------------------------------------------------------------------------------------------
# The LM head, also when it is sharded
# --------------------------------------------------------------------------------------------------------
def unwrap(model):
    """The ``PreTrainedModel`` inside DDP / DeepSpeed / compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None or inner is model:
            return model
        model = inner


def _full(tensor):
    # FSDP2 shards parameters as DTensors; gather once per step (differentiable: its backward reduce-scatters).
    if tensor is not None and isinstance(tensor, torch.distributed.tensor.DTensor):
        return tensor.full_tensor()
    return tensor


def lm_head(model, vocab_rows: int | None = None) -> LMHead:
    """The LM head of ``model`` as an :class:`LMHead`, restricted to the first ``vocab_rows`` rows.

    Logit transforms known from configs are carried over (Cohere ``logit_scale``, Granite
    ``logits_scaling``, Gemma ``final_logit_softcapping``); the trainer checks on its first batch that
    ``LMHead`` reproduces the model's own logits.
    """
    base = unwrap(model)
    head = base.get_output_embeddings()
    weight, bias = _full(head.weight), _full(getattr(head, "bias", None))
    if vocab_rows is not None:
        weight = weight[:vocab_rows]
        bias = None if bias is None else bias[:vocab_rows]
    config = base.config.get_text_config()
    scale = float(getattr(config, "logit_scale", None) or 1.0)
    if getattr(config, "logits_scaling", None):
        scale /= float(config.logits_scaling)
    return LMHead(weight=weight, bias=bias, scale=scale, softcap=getattr(config, "final_logit_softcapping", None))


@contextlib.contextmanager
def gathered_head(model):
    """Gather a ZeRO-3-partitioned LM head for reading (no-op otherwise)."""
    head = unwrap(model).get_output_embeddings()
    params = [p for p in head.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield
