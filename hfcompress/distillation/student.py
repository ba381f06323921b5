"""``make_student``: a smaller model of the teacher's architecture, initialised from the teacher's weights.

Depth: the student keeps ``num_layers`` of the teacher's transformer blocks, by default every k-th one
(DistilBERT, Sanh et al. 2019, §3: "initialize the student from the teacher by taking one layer out of
two"), with the teacher's embeddings, final norm and LM head. ``"keep-last"`` takes the same layers but the
teacher's last in place of the last one kept: on SmolLM2-135M (30 -> 15 layers, 20k training tokens) it gave
2.3-2.5x lower perplexity than ``"uniform"`` (which drops layer 29), on the 4-layer ``small`` reference teacher
3-8% higher (scripts/bench/results/layer_selection_small.md); neither wins on both, so ``"uniform"`` stays
the default.

Width: with a smaller ``hidden_size`` / ``intermediate_size``, each teacher tensor is cut to the leading
block of the new shape ("weight selection", Xu et al. 2024, *Initializing Models with Larger Ones*): the
same leading indices are kept along every hidden dimension, so residual stream, norms and embeddings stay
consistent. The head dimension is kept and the number of heads scaled, so whole heads are selected.
"""

from __future__ import annotations

import copy
import logging
import os

import torch
from torch import nn

from ..core.errors import ConfigError

logger = logging.getLogger(__name__)


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def uniform_layers(teacher_layers: int, num_layers: int) -> list[int]:
    """Every k-th teacher layer from the first, k = L_t / L_s (rounded down per index): 8 -> 4 keeps 0, 2, 4, 6."""
    return [(i * teacher_layers) // num_layers for i in range(num_layers)]


def keep_last_layers(teacher_layers: int, num_layers: int) -> list[int]:
    """:func:`uniform_layers` with the teacher's last layer in place of the last one kept: 30 -> 15 keeps
    0, 2, ..., 26, 29 (``uniform``: 0, 2, ..., 28)."""
    return uniform_layers(teacher_layers, num_layers)[:-1] + [teacher_layers - 1]


# Named layer selections of make_student: name -> (teacher layers, student layers) -> teacher layer indices.
LAYER_SELECTIONS = {"uniform": uniform_layers, "keep-last": keep_last_layers}


def _decoder_layers(model, count: int) -> str:
    """Qualified name of the ``ModuleList`` holding the model's ``count`` transformer blocks."""
    found = [name for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) == count and name]
    if not found:
        raise ConfigError(f"cannot find the list of {count} transformer layers in {type(model).__name__}; "
                          f"make_student supports models with one nn.ModuleList of decoder layers")
    return min(found, key=len)  # the outermost such list (e.g. 'model.layers', 'transformer.h')


def _set(config, name: str, value) -> None:
    if not hasattr(config, name):
        raise ConfigError(f"{type(config).__name__} has no '{name}', so make_student cannot change it; leave it "
                          f"at None to keep the teacher's value")
    setattr(config, name, value)


def _narrower_heads(config, teacher_config, hidden_size: int) -> None:
    heads = getattr(teacher_config, "num_attention_heads", None)
    if heads is None:
        return
    head_dim = getattr(teacher_config, "head_dim", None) or teacher_config.hidden_size // heads
    if hidden_size % head_dim:
        raise ConfigError(f"hidden_size={hidden_size} is not a multiple of the teacher's head dimension "
                          f"{head_dim}; pick a multiple of {head_dim} so whole attention heads are kept")
    new_heads = hidden_size // head_dim
    config.num_attention_heads = new_heads
    if getattr(config, "head_dim", None) is not None:
        config.head_dim = head_dim
    kv = getattr(teacher_config, "num_key_value_heads", None)
    if kv is not None:
        group = heads // kv  # query heads per key/value head (GQA); keep the grouping
        if new_heads % group:
            raise ConfigError(f"hidden_size={hidden_size} gives {new_heads} heads, not a multiple of the teacher's "
                              f"{group} query heads per key/value head; pick a multiple of {group * head_dim}")
        config.num_key_value_heads = new_heads // group


def _select_layer_lists(config, teacher_layers: int, selection: list[int]) -> None:
    """Per-layer config lists (e.g. ``layer_types`` for sliding/full attention) follow the kept layers."""
    for name, value in list(vars(config).items()):
        if "layer" in name and isinstance(value, (list, tuple)) and len(value) == teacher_layers:
            setattr(config, name, type(value)(value[i] for i in selection))


def _leading_block(tensor: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    if tensor.shape == shape:
        return tensor
    if tensor.ndim != len(shape) or any(s > t for s, t in zip(shape, tensor.shape)):
        return None
    return tensor[tuple(slice(0, s) for s in shape)]


def make_student(teacher, num_layers: int, hidden_size: int | None = None, intermediate_size: int | None = None,
                 layer_selection: str | list[int] = "uniform"):
    """A student of the teacher's class with ``num_layers`` blocks, initialised from the teacher.

    ``teacher``: a model, or a path / Hub id (``reference:<size>``: resolve it first with
    :func:`hfcompress.models.loading.resolve_model`).
    ``layer_selection``: ``"uniform"`` (every k-th layer), ``"keep-last"`` (the same, but the teacher's last
    layer as the student's last) or the explicit teacher layer indices to keep.
    ``hidden_size`` / ``intermediate_size``: narrower widths (None keeps the teacher's); teacher tensors are
    cut to their leading block. Returns the student in train mode, on the teacher's device and dtype.
    """
    if isinstance(teacher, (str, os.PathLike)):
        from ..core.pretrained import load_causal_lm

        teacher = load_causal_lm(teacher)
    config = getattr(teacher, "config", None)
    if not isinstance(teacher, nn.Module) or config is None or not hasattr(_text_config(config), "num_hidden_layers"):
        raise ConfigError(f"teacher must be a transformers model with num_hidden_layers in its config (or a path to "
                          f"one), got {type(teacher).__name__}")
    teacher_config = _text_config(teacher.config)
    teacher_layers = int(teacher_config.num_hidden_layers)
    if not isinstance(num_layers, int) or not 1 <= num_layers <= teacher_layers:
        raise ConfigError(f"num_layers must be an integer in 1..{teacher_layers} (the teacher's depth), "
                          f"got {num_layers!r}")
    if isinstance(layer_selection, str) and layer_selection in LAYER_SELECTIONS:
        selection = LAYER_SELECTIONS[layer_selection](teacher_layers, num_layers)
    elif isinstance(layer_selection, (list, tuple)):
        selection = [int(i) for i in layer_selection]
        if len(selection) != num_layers:
            raise ConfigError(f"layer_selection has {len(selection)} entries but num_layers={num_layers}; give "
                              f"one teacher layer index per student layer")
        bad = [i for i in selection if not 0 <= i < teacher_layers]
        if bad:
            raise ConfigError(f"layer_selection names teacher layer {bad[0]}, but the teacher has {teacher_layers} "
                              f"layers (0..{teacher_layers - 1})")
        if len(set(selection)) != len(selection):
            raise ConfigError(f"layer_selection {selection} repeats a layer; give distinct teacher layers")
    else:
        raise ConfigError(f"layer_selection must be one of {', '.join(map(repr, LAYER_SELECTIONS))} or a list of "
                          f"teacher layer indices, got {layer_selection!r}")

    config = copy.deepcopy(teacher.config)
    text_config = _text_config(config)
    text_config.num_hidden_layers = num_layers
    _select_layer_lists(text_config, teacher_layers, selection)
    if hidden_size is not None and hidden_size != teacher_config.hidden_size:
        if hidden_size > teacher_config.hidden_size:
            raise ConfigError(f"hidden_size={hidden_size} is wider than the teacher's {teacher_config.hidden_size}; "
                              f"a student should be smaller")
        _set(text_config, "hidden_size", hidden_size)
        _narrower_heads(text_config, teacher_config, hidden_size)
    if intermediate_size is not None:
        name = "intermediate_size" if hasattr(text_config, "intermediate_size") else "n_inner"
        _set(text_config, name, intermediate_size)

    param = next(teacher.parameters())
    student = type(teacher)(config).to(device=param.device, dtype=param.dtype)

    # Map every student tensor to its teacher tensor: same name, with the layer index translated.
    teacher_prefix = _decoder_layers(teacher, teacher_layers) + "."
    teacher_state = teacher.state_dict()
    student_state = student.state_dict()
    loaded, fresh = {}, []
    for name, target in student_state.items():
        source_name = name
        if name.startswith(teacher_prefix):
            index, _, rest = name[len(teacher_prefix):].partition(".")
            source_name = f"{teacher_prefix}{selection[int(index)]}.{rest}"
        source = teacher_state.get(source_name)
        block = None if source is None else _leading_block(source, target.shape)
        if block is None:
            fresh.append(name)
        else:
            loaded[name] = block.to(target.dtype).clone()
    student.load_state_dict(loaded, strict=False)
    if fresh:
        logger.info("make_student: %d tensors keep their fresh initialisation (no teacher tensor of a compatible "
                    "shape): %s", len(fresh), ", ".join(fresh[:8]))
    if hasattr(student, "tie_weights"):
        student.tie_weights()
    student.config.hfcompress_student_of = {
        "teacher": getattr(teacher.config, "_name_or_path", "") or type(teacher).__name__,
        "teacher_layers": selection,
    }
    return student.train()
