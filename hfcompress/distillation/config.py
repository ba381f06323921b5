"""``DistillationConfig``: ``transformers.TrainingArguments`` plus the fields of knowledge distillation.

Only distillation fields live here; everything else (learning rate, batch size, schedule, logging, saving,
``accelerate`` settings) is a ``TrainingArguments`` field. A few of those get new defaults chosen by the
benchmark (``scripts/bench/distill_bench.py``): see the comment above them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from ..core.errors import ConfigError

LOGIT_LOSSES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
HIDDEN_LOSSES = ("mse", "cosine")
LAYER_MAP_NAMES = ("uniform", "last")
MODES = ("live", "cache", "online", "self")
SELF_TEACHERS = ("final", "ema")
DEFAULT_HIDDEN_WEIGHT = 10.0  # live mode only: cache mode distils hidden states only when asked (they cost space)
HIDDEN_MODES = ("live", "cache")  # the modes with teacher hidden states


@dataclass
class DistillationConfig(TrainingArguments):
    r"""Arguments of :class:`~hfcompress.distillation.trainer.DistillationTrainer`.

    The training objective per predicted token is

    ``kd_weight * T² * D(p_T ‖ q_T) + ce_weight * CE(q_1, label) + hidden_weight * H(student, teacher)``

    where ``p_T``/``q_T`` are the teacher/student next-token distributions at temperature ``T``, ``D`` the
    divergence named by ``loss``, and ``H`` the hidden-state loss averaged over the mapped layers. Every term
    is summed over the predicted tokens (``labels != -100``) and divided by the number of such tokens in the
    whole optimizer step (all gradient-accumulation micro-batches and all data-parallel ranks).
    """

    # ----- logit distillation -----
    loss: str = field(
        default="forward_kl",
        metadata={"help": "Divergence between teacher and student next-token distributions: "
                          "'forward_kl' KL(teacher‖student) (Hinton et al. 2015), 'reverse_kl' KL(student‖teacher) "
                          "(MiniLLM, Gu et al. 2024), 'jsd' generalized Jensen-Shannon with `beta` (GKD, Agarwal et "
                          "al. 2024), 'skew_forward_kl'/'skew_reverse_kl' with `skew_alpha` (DistiLLM, Ko et al. "
                          "2024), 'tvd' total variation distance (Wen et al. 2023)."},
    )
    temperature: float = field(
        default=1.0,
        metadata={"help": "Softmax temperature T > 0 applied to both models' logits for the distillation term; "
                          "the term is multiplied by T² so its gradient scale does not shrink with T (Hinton et "
                          "al. 2015). The cross-entropy term always uses T = 1."},
    )
    kd_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the logit-distillation term (>= 0)."},
    )
    ce_weight: float = field(
        default=0.5,
        metadata={"help": "Weight of the ordinary next-token cross-entropy on the data's labels (>= 0)."},
    )
    beta: float = field(
        default=0.5,
        metadata={"help": "For loss='jsd': interpolation weight in [0, 1] of the generalized JSD, normalised by "
                          "1/(beta(1-beta)) so that beta=0 is forward KL and beta=1 is reverse KL, continuously."},
    )
    skew_alpha: float = field(
        default=0.1,
        metadata={"help": "For the skew losses: mixing weight alpha in [0, 1) of the skewed distribution, e.g. "
                          "skew forward KL = KL(p ‖ alpha p + (1-alpha) q) (DistiLLM uses 0.1). 0 gives plain KL."},
    )
    # ----- where the teacher signal comes from -----
    mode: str = field(
        default="live",
        metadata={"help": "'live': a frozen teacher runs beside the student (offline distillation); 'cache': "
                          "offline from a teacher cache written once by `hfcompress cache-teacher` (pass "
                          "teacher_cache=; no teacher in memory); 'online': teacher and student train together, "
                          "the teacher with its own optimizer and cross-entropy; 'self': the model's final layer "
                          "teaches early exits at `exit_layers` through its own final norm and LM head, so it can "
                          "be truncated (`hfcompress truncate`). See hfcompress/distillation/modes.py."},
    )
    cache_top_k: int | None = field(
        default=None,
        metadata={"help": "mode='cache': the top-k the run expects the cache to hold (checked; None: any)."},
    )
    teacher_learning_rate: float | None = field(
        default=None,
        metadata={"help": "mode='online': the teacher's (constant) AdamW learning rate; default: learning_rate."},
    )
    mutual_weight: float = field(
        default=0.0,
        metadata={"help": "mode='online': weight of the teacher's own distillation term T²·KL(q_student ‖ "
                          "p_teacher) next to its cross-entropy (deep mutual learning, Zhang et al. 2018); 0: the "
                          "teacher learns from the labels only."},
    )
    exit_layers: list[int] | str | None = field(
        default=None,
        metadata={"help": "mode='self': 0-based decoder layers whose outputs are early exits (through the final "
                          "norm and LM head), as a list or comma-separated string such as '1,3'; default: every "
                          "layer but the last."},
    )
    self_teacher: str = field(
        default="final",
        metadata={"help": "mode='self': what teaches. 'final': the model's own final layer (detached) teaches the "
                          "early exits at `exit_layers`; 'ema': an exponential-moving-average copy of the model "
                          "(weights updated after each optimizer step as ema = ema_decay·ema + (1-ema_decay)·model, "
                          "never trained by gradients) teaches the model's final layer, and also the early exits "
                          "when `exit_layers` is given (mean teacher, Tarvainen & Valpola 2017; the EMA teacher of "
                          "self-distillation, e.g. DINO). The EMA copy is saved in each checkpoint and in "
                          "`output_dir/ema` at the end; the saved model is the trained one, as in every mode."},
    )
    ema_decay: float = field(
        default=0.999,
        metadata={"help": "self_teacher='ema': the decay d in [0, 1) of the EMA update ema = d·ema + (1-d)·model "
                          "after each optimizer step (the teacher averages the last ~1/(1-d) steps; 0 makes it a "
                          "copy of the model one step behind)."},
    )
    # ----- hidden-state distillation -----
    hidden_weight: float | None = field(
        default=None,
        metadata={"help": "Weight of the hidden-state loss (>= 0); 0 turns hidden-state distillation off. Default: "
                          "10 in the live mode (with 'cosine' the benchmark's best on the base teacher at 50 and "
                          "150 steps, scripts/bench/results/distill_base.md); 0 in the other modes. mode='cache' "
                          "reads the teacher's hidden states from the cache (`cache-teacher --hidden-layers`); "
                          "online and self distil logits only and need 0."},
    )
    hidden_loss: str = field(
        default="cosine",
        metadata={"help": "Hidden-state loss per mapped layer pair: 'mse' (mean squared error over the hidden "
                          "dimension) or 'cosine' (1 - cosine similarity)."},
    )
    layer_map: dict[str, int] | str | None = field(
        default="uniform",
        metadata={"help": "Which student layer mimics which teacher layer (0-based transformer blocks; layer i is "
                          "the output of block i, the last one after the final norm): 'uniform' (student layer i "
                          "-> teacher layer round((i+1)*L_t/L_s)-1), 'last' (last -> last), or a "
                          "{student_layer: teacher_layer} dict / JSON string such as '{\"1\": 3, \"3\": 7}'. "
                          "Learned linear projections map student widths to teacher widths when they differ."},
    )
    # ----- memory -----
    loss_chunk_size: int = field(
        default=1024,
        metadata={"help": "Token positions per chunk of the logit losses. Logits are computed chunk by chunk from "
                          "the final hidden states and the LM-head weights, and each chunk's gradient is taken "
                          "right away, so full (batch, seq, vocab) float32 logits never exist. 0 uses the models' "
                          "full logits (more memory; for models whose logits are not a plain linear head)."},
    )
    # ----- teacher -----
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for `from_pretrained` when the teacher is given as a path or Hub id, "
                          "as a dict or JSON string, e.g. '{\"dtype\": \"bfloat16\"}' or a bitsandbytes "
                          "'{\"quantization_config\": {\"load_in_8bit\": true}}' to hold the teacher in less "
                          "memory."},
    )

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"DistillationConfig.mode={self.mode!r} is unknown; choose one of {', '.join(MODES)}")
        if self.hidden_weight is None:
            self.hidden_weight = DEFAULT_HIDDEN_WEIGHT if self.mode == "live" else 0.0
        if self.mode not in HIDDEN_MODES and self.hidden_weight > 0:
            raise ConfigError(f"DistillationConfig.hidden_weight={self.hidden_weight}: mode={self.mode!r} has no "
                              f"teacher hidden states; set hidden_weight=0")
        if self.self_teacher not in SELF_TEACHERS:
            raise ConfigError(f"DistillationConfig.self_teacher={self.self_teacher!r} is unknown; choose one of "
                              f"{', '.join(SELF_TEACHERS)}")
        if self.self_teacher != "final" and self.mode != "self":
            raise ConfigError(f"DistillationConfig.self_teacher={self.self_teacher!r} is for mode='self' "
                              f"(got mode={self.mode!r})")
        if isinstance(self.ema_decay, bool) or not isinstance(self.ema_decay, (int, float)) \
                or not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"DistillationConfig.ema_decay must be a number in [0, 1), got {self.ema_decay!r}; "
                              f"0.999 averages about the last 1000 steps")
        self.exit_layers = _parse_layer_list(self.exit_layers)
        if self.exit_layers is not None and self.mode != "self":
            raise ConfigError(f"DistillationConfig.exit_layers is for mode='self' (got mode={self.mode!r})")
        if self.cache_top_k is not None and self.cache_top_k < 1:
            raise ConfigError(f"DistillationConfig.cache_top_k must be >= 1, got {self.cache_top_k}")
        if self.mutual_weight < 0:
            raise ConfigError(f"DistillationConfig.mutual_weight must be >= 0, got {self.mutual_weight}")
        if self.teacher_learning_rate is not None and not self.teacher_learning_rate > 0:
            raise ConfigError(f"DistillationConfig.teacher_learning_rate must be > 0, got {self.teacher_learning_rate}")
        self.teacher_model_init_kwargs = _parse_json_dict(self.teacher_model_init_kwargs, "teacher_model_init_kwargs")
        self.layer_map = normalize_layer_map(self.layer_map)
        for name in ("temperature", "kd_weight", "ce_weight", "beta", "skew_alpha", "hidden_weight", "loss_chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"DistillationConfig.{name} must be a number, got {value!r}")
        if self.loss not in LOGIT_LOSSES:
            raise ConfigError(f"DistillationConfig.loss={self.loss!r} is not a known divergence; choose one of "
                              f"{', '.join(LOGIT_LOSSES)}")
        if self.hidden_loss not in HIDDEN_LOSSES:
            raise ConfigError(f"DistillationConfig.hidden_loss={self.hidden_loss!r} is unknown; choose one of "
                              f"{', '.join(HIDDEN_LOSSES)}")
        if not self.temperature > 0:
            raise ConfigError(f"DistillationConfig.temperature must be > 0, got {self.temperature}; "
                              f"use 1.0 for the plain distributions")
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"DistillationConfig.beta must be in [0, 1] (0 = forward KL, 1 = reverse KL), "
                              f"got {self.beta}")
        if not 0.0 <= self.skew_alpha < 1.0:
            raise ConfigError(f"DistillationConfig.skew_alpha must be in [0, 1), got {self.skew_alpha}")
        for name in ("kd_weight", "ce_weight", "hidden_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"DistillationConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.kd_weight == 0 and self.ce_weight == 0 and self.hidden_weight == 0:
            raise ConfigError("DistillationConfig: kd_weight, ce_weight and hidden_weight are all 0, so there is "
                              "nothing to train; set kd_weight > 0")
        if self.loss_chunk_size < 0:
            raise ConfigError(f"DistillationConfig.loss_chunk_size must be >= 0 (0 = unchunked), "
                              f"got {self.loss_chunk_size}")
        super().__post_init__()


def _parse_json_dict(value, name: str) -> dict | None:
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"DistillationConfig.{name} is not valid JSON ({exc.msg}): {value!r}") from exc
        if isinstance(parsed, dict):
            return parsed
    raise ConfigError(f"DistillationConfig.{name} must be a dict or a JSON object string, got {value!r}")


def _parse_layer_list(value) -> list[int] | None:
    if value is None or isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool)
                                                         for v in value):
        if value is not None and any(v < 0 for v in value):
            raise ConfigError(f"DistillationConfig.exit_layers {value} names a negative layer; layers count from 0")
        return value if value is None else sorted(set(value))
    if isinstance(value, str):
        try:
            return _parse_layer_list([int(part) for part in value.split(",") if part.strip()])
        except ValueError:
            pass
    raise ConfigError(f"DistillationConfig.exit_layers must be a list of layer numbers or a string such as '1,3', "
                      f"got {value!r}")


def normalize_layer_map(layer_map) -> str | dict[int, int]:
    """``'uniform'``/``'last'`` stay names; a dict or JSON string becomes ``{student_layer: teacher_layer}``.

    Whether the layers exist is checked against the models by the trainer (see ``hidden.resolve_layer_map``).
    """
    if layer_map is None:
        return "uniform"
    if isinstance(layer_map, str):
        if layer_map in LAYER_MAP_NAMES:
            return layer_map
        if not layer_map.lstrip().startswith("{"):
            raise ConfigError(f"DistillationConfig.layer_map={layer_map!r} is unknown; use 'uniform', 'last' or a "
                              f"JSON object such as '{{\"1\": 3}}'")
        layer_map = _parse_json_dict(layer_map, "layer_map")
    if not isinstance(layer_map, dict) or not layer_map:
        raise ConfigError(f"DistillationConfig.layer_map must be 'uniform', 'last' or a non-empty "
                          f"{{student_layer: teacher_layer}} dict, got {layer_map!r}")
    result = {}
    for student, teacher in layer_map.items():
        try:
            s, t = int(student), int(teacher)
        except (TypeError, ValueError):
            raise ConfigError(f"DistillationConfig.layer_map entry {student!r}: {teacher!r} is not a pair of layer "
                              f"numbers") from None
        if s < 0 or t < 0:
            raise ConfigError(f"DistillationConfig.layer_map entry {s}: {t} names a negative layer; layers are "
                              f"numbered from 0")
        result[s] = t
    return result
