"""Hidden-state distillation: which layers are matched, and the learned projections between widths.

Layers are numbered 0..L-1 by transformer block; layer i is ``outputs.hidden_states[i + 1]`` (index 0 is
the embeddings; in transformers the last entry is the final-norm output, i.e. the LM head's input).

The projections are trainer state, not part of the student: they live beside the student, are optimised
with it, and are written to their own ``hidden_projections.safetensors`` in each checkpoint folder so a
resumed run continues with them; the saved student never contains them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..core.errors import ConfigError, ModelLoadError

PROJECTIONS_FILE = "hidden_projections.safetensors"


def num_layers(model) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.num_hidden_layers)


def hidden_width(model) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.hidden_size)


def resolve_layer_map(layer_map, student_layers: int, teacher_layers: int) -> dict[int, int]:
    """``'uniform'``/``'last'``/dict -> ``{student_layer: teacher_layer}``, checked against both depths.

    ``uniform`` pairs student layer i with teacher layer round((i+1)·L_t/L_s) − 1: each student layer stands
    for a contiguous group of teacher layers and mimics the group's output; the last layers always pair.
    """
    if layer_map == "uniform":
        return {i: max(0, round((i + 1) * teacher_layers / student_layers) - 1) for i in range(student_layers)}
    if layer_map == "last":
        return {student_layers - 1: teacher_layers - 1}
    if not isinstance(layer_map, dict):
        raise ConfigError(f"layer_map must be 'uniform', 'last' or a {{student_layer: teacher_layer}} dict, "
                          f"got {layer_map!r}")
    resolved = {}
    for student, teacher in layer_map.items():
        student, teacher = int(student), int(teacher)
        if not 0 <= student < student_layers:
            raise ConfigError(f"layer_map names student layer {student}, but the student has {student_layers} "
                              f"layers (0..{student_layers - 1}); fix the layer_map key")
        if not 0 <= teacher < teacher_layers:
            raise ConfigError(f"layer_map maps student layer {student} to teacher layer {teacher}, but the teacher "
                              f"has {teacher_layers} layers (0..{teacher_layers - 1}); fix the layer_map value")
        resolved[student] = teacher
    return dict(sorted(resolved.items()))


class HiddenStateProjections(nn.Module):
    """One bias-free linear map (student width -> teacher width) per matched student layer.

    Initialised to the identity on the leading dimensions, which is exact when the student's hidden
    dimensions are the teacher's leading ones (``make_student`` with a narrower ``hidden_size``). With equal
    widths no projection is learned (FitNets' regressor, Romero et al. 2015, is needed only to bridge widths).
    """

    def __init__(self, layer_map: dict[int, int], student_width: int, teacher_width: int):
        super().__init__()
        self.layer_map = dict(layer_map)
        self.student_width, self.teacher_width = student_width, teacher_width
        self.maps = nn.ModuleDict()
        if student_width != teacher_width:
            for student_layer in self.layer_map:
                linear = nn.Linear(student_width, teacher_width, bias=False)
                with torch.no_grad():
                    linear.weight.copy_(torch.eye(teacher_width, student_width))
                self.maps[str(student_layer)] = linear

    def forward(self, student_layer: int, states: torch.Tensor) -> torch.Tensor:
        key = str(student_layer)
        return self.maps[key](states) if key in self.maps else states

    def has_parameters(self) -> bool:
        return len(self.maps) > 0

    def metadata(self) -> dict[str, str]:
        return {"layer_map": json.dumps({str(k): v for k, v in self.layer_map.items()}),
                "student_width": str(self.student_width), "teacher_width": str(self.teacher_width)}


def save_projections(projections: HiddenStateProjections, folder: str | os.PathLike) -> Path:
    """Write the projections to ``folder/hidden_projections.safetensors`` (with the layer map as metadata)."""
    from safetensors.torch import save_file

    path = Path(folder) / PROJECTIONS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: param.detach().cpu().contiguous() for name, param in projections.state_dict().items()}
    save_file(tensors, str(path), metadata=projections.metadata())
    return path


def load_projections(projections: HiddenStateProjections, folder: str | os.PathLike) -> bool:
    """Restore projections written by :func:`save_projections`; False if the folder has none.

    The saved layer map and widths must match the current ones (resuming with another layer map would
    silently attach projections to the wrong layers).
    """
    from safetensors import safe_open

    path = Path(folder) / PROJECTIONS_FILE
    if not path.is_file():
        return False
    with safe_open(str(path), framework="pt") as handle:
        saved = handle.metadata() or {}
        expected = projections.metadata()
        if saved != expected:
            raise ModelLoadError(f"{path} was written for layer_map/widths {saved}, but this run uses {expected}; "
                                 f"resume with the same layer_map and models")
        state = {name: handle.get_tensor(name) for name in handle.keys()}
    projections.load_state_dict(state)
    return True
