"""``QuantizationConfig``: what to quantize, how, and with which calibration — one serializable dataclass.

Every field has a simple type (str/int/float/bool/None/list[str]) so it maps 1:1 to a YAML key and a CLI flag.
Invalid values fail in ``__post_init__`` with a one-line :class:`~hfcompress.core.errors.ConfigError`, before any
model is touched.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
from dataclasses import dataclass, field

from ..core.errors import ConfigError, HFCompressError



class QuantizationError(HFCompressError):
    """The model cannot be quantized as asked (already quantized, NaN weights, tied weights...)."""


INT_METHODS = ("rtn", "gptq", "awq")
BNB_METHODS = ("bnb_int8", "bnb_nf4", "bnb_fp4")
METHODS = ("cast",) + INT_METHODS + BNB_METHODS
CALIBRATED_METHODS = ("gptq", "awq")
BITS = (2, 3, 4, 8)
ROUNDINGS = ("nearest", "stochastic")
OBSERVERS = ("minmax", "mse")
CAST_DTYPES = ("float16", "bfloat16")
BNB_COMPUTE_DTYPES = ("float32", "float16", "bfloat16")

# The fields each method reads (besides ``method``). Setting another field to a non-default value is an error,
# and to_dict() (the model card, config.json's ``hfcompress.quantization``) lists only these.
_INTEGER_FIELDS = ("bits", "group_size", "symmetric", "rounding", "seed", "observer", "ignore", "num_samples",
                   "seq_len", "calibration_dtype", "sequential_targets")
_GPTQ_FIELDS = ("damp", "block_size", "act_order", "static_groups", "true_sequential")
_BNB_4BIT_FIELDS = ("ignore", "bnb_double_quant", "bnb_compute_dtype", "bnb_block_size")
METHOD_FIELDS: dict[str, tuple[str, ...]] = {
    "cast": ("dtype",),
    "rtn": _INTEGER_FIELDS,
    "gptq": _INTEGER_FIELDS + _GPTQ_FIELDS,
    "awq": _INTEGER_FIELDS,
    "bnb_int8": ("ignore", "bnb_threshold"),
    "bnb_nf4": _BNB_4BIT_FIELDS,
    "bnb_fp4": _BNB_4BIT_FIELDS,
}


@dataclass
class QuantizationConfig:
    """How :func:`hfcompress.quantize` quantizes a model. See ``docs``/README for a walk-through."""

    method: str = field(default="rtn", metadata={"help": (
        "cast (fp16/bf16), rtn (round-to-nearest), gptq (Frantar et al. 2022), awq (Lin et al. 2023), or the "
        "bitsandbytes methods bnb_int8 / bnb_nf4 / bnb_fp4")})
    bits: int = field(default=4, metadata={"help": "integer weight bits for rtn/gptq/awq: 2, 3, 4 or 8"})
    group_size: int | None = field(default=128, metadata={"help": (
        "input columns sharing one scale (group-wise); None for one scale per output channel. Layers whose "
        "width it does not divide fall back to the largest power of two below it that does, else per-channel")})
    symmetric: bool = field(default=True, metadata={"help": (
        "symmetric (no zero point) or asymmetric (one integer zero point per scale)")})
    rounding: str = field(default="nearest", metadata={"help": (
        "nearest, or stochastic (unbiased: E[dequantize(quantize(w))] = w; uses seed)")})
    seed: int = field(default=0, metadata={"help": "seed for stochastic rounding and calibration sampling"})
    observer: str = field(default="minmax", metadata={"help": (
        "how scales are chosen: minmax (full range) or mse (search the clipping ratio that minimises the "
        "quantization error, weighted by calibration activations when calibration data is given)")})
    ignore: list[str] = field(default_factory=lambda: ["lm_head"], metadata={"help": (
        "module names to leave unquantized: an exact name, a name suffix after a dot ('lm_head' matches "
        "'model.lm_head'), or a regular expression prefixed with 're:'")})
    num_samples: int = field(default=128, metadata={"help": (
        "calibration sequences of seq_len tokens. Texts are concatenated and cut into sequences; data holding "
        "fewer than num_samples x seq_len tokens is used whole, with a warning (fewer than 128 tokens in all "
        "is refused)")})
    seq_len: int = field(default=256, metadata={"help": "tokens per calibration sequence"})
    damp: float = field(default=0.01, metadata={"help": (
        "GPTQ dampening, as a fraction of the mean Hessian diagonal added to the diagonal")})
    block_size: int = field(default=128, metadata={"help": "GPTQ lazy-batch block size (columns)"})
    act_order: bool = field(default=True, metadata={"help": (
        "GPTQ: quantize columns in order of decreasing Hessian diagonal, with every group's scales fixed from "
        "the original weights (llm-compressor's default actorder='static'); False: columns in order, each "
        "group's scales from the already-updated weights (the original GPTQ)")})
    static_groups: bool = field(default=True, metadata={"help": (
        "GPTQ without act_order: fix every group's scales from the original weights before the column sweep "
        "(as llm-compressor does) instead of from the already-updated weights when the sweep reaches the "
        "group (the original GPTQ). With act_order the scales are always fixed up front")})
    true_sequential: bool = field(default=True, metadata={"help": (
        "gptq: one forward pass per decoder layer, each linear quantized when the calibration batches reach it, "
        "from the outputs of the already-quantized linears before it in the layer (GPTQ's 'true sequential' "
        "order; about half the forward passes). Holds every calibration batch's activations inside one layer "
        "at once. False: every linear of a layer from the layer's floating-point pass, then a second pass for "
        "the next layer's inputs (llm-compressor's order; holds only the layer inputs)")})
    calibration_dtype: str | None = field(default=None, metadata={"help": (
        "gptq/awq: run the calibration forward passes under torch.autocast in this dtype (bfloat16 or "
        "float16; input statistics still accumulate in float32), e.g. to calibrate a float32 model ~2x "
        "faster on CPUs with bf16 matrix units; None: the model's own dtype")})
    dtype: str = field(default="bfloat16", metadata={"help": "target dtype of method='cast': float16 or bfloat16"})
    sequential_targets: list[str] | None = field(default=None, metadata={"help": (
        "names (or 're:' patterns) of the decoder-layer modules calibrated one at a time; found "
        "automatically for Llama/Mistral/Qwen2/GPT-2/OPT/BERT-style models")})
    bnb_threshold: float = field(default=6.0, metadata={"help": "bnb_int8: LLM.int8 outlier threshold"})
    bnb_double_quant: bool = field(default=True, metadata={"help": "bnb_nf4/bnb_fp4: quantize the scales too"})
    bnb_compute_dtype: str = field(default="float32", metadata={"help": (
        "bnb_nf4/bnb_fp4: dtype of the matmul: float32, float16 or bfloat16")})
    bnb_block_size: int = field(default=64, metadata={"help": "bnb_nf4/bnb_fp4: values per absmax block"})

    def __post_init__(self):
        _check_choice("method", self.method, METHODS)
        _check_type("bits", self.bits, int)
        if self.method in INT_METHODS and self.bits not in BITS:
            raise ConfigError(f"bits={self.bits} is not supported; choose one of {', '.join(map(str, BITS))}")
        if self.group_size is not None:
            _check_type("group_size", self.group_size, int)
            if self.group_size < 1:
                raise ConfigError(f"group_size must be a positive integer or None (per-channel), "
                                  f"got {self.group_size}")
        _check_type("symmetric", self.symmetric, bool)
        _check_choice("rounding", self.rounding, ROUNDINGS)
        _check_type("seed", self.seed, int)
        _check_choice("observer", self.observer, OBSERVERS)
        if isinstance(self.ignore, str):
            self.ignore = [self.ignore]
        if not isinstance(self.ignore, list) or not all(isinstance(p, str) and p for p in self.ignore):
            raise ConfigError("ignore must be a list of module names/patterns, e.g. ['lm_head']")
        for name in ("num_samples", "seq_len", "block_size", "bnb_block_size"):
            _check_type(name, getattr(self, name), int)
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be at least 2 tokens, got {self.seq_len}")
        _check_type("damp", self.damp, (int, float))
        if not 0 <= self.damp < 1:
            raise ConfigError(f"damp must be in [0, 1) (a fraction of the mean Hessian diagonal), got {self.damp}")
        _check_type("act_order", self.act_order, bool)
        _check_type("static_groups", self.static_groups, bool)
        _check_type("true_sequential", self.true_sequential, bool)
        if self.calibration_dtype is not None:
            _check_choice("calibration_dtype", self.calibration_dtype, CAST_DTYPES)
        _check_choice("dtype", self.dtype, CAST_DTYPES)
        if self.sequential_targets is not None:
            if isinstance(self.sequential_targets, str):
                self.sequential_targets = [self.sequential_targets]
            if not all(isinstance(p, str) and p for p in self.sequential_targets):
                raise ConfigError("sequential_targets must be a list of module names or 're:' patterns")
        _check_type("bnb_threshold", self.bnb_threshold, (int, float))
        if self.bnb_threshold < 0:
            raise ConfigError(f"bnb_threshold must be >= 0 (0 disables outlier decomposition), "
                              f"got {self.bnb_threshold}")
        _check_type("bnb_double_quant", self.bnb_double_quant, bool)
        _check_choice("bnb_compute_dtype", self.bnb_compute_dtype, BNB_COMPUTE_DTYPES)
        if self.bnb_block_size not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ConfigError(f"bnb_block_size must be a power of two in 32..4096, got {self.bnb_block_size}")
        stray = [name for name in self.non_default_fields() if name not in self.applicable_fields()]
        if stray:
            raise ConfigError(f"{', '.join(stray)} {'does' if len(stray) == 1 else 'do'} not apply to "
                              f"method={self.method!r}; its fields are: {', '.join(self.applicable_fields())}")

    # ----------------------------------------------------------------------------------------------------
    @property
    def needs_calibration(self) -> bool:
        return self.method in CALIBRATED_METHODS

    def applicable_fields(self) -> tuple[str, ...]:
        """The fields ``method`` reads (``method`` itself not included)."""
        return METHOD_FIELDS[self.method]

    def non_default_fields(self) -> list[str]:
        defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                    for f in dataclasses.fields(self)}
        return [name for name, default in defaults.items() if name != "method" and getattr(self, name) != default]
    @property
    def weight_bits(self) -> int:
        """Bits per weight the method stores (``bits`` only means this for rtn/gptq/awq)."""
        if self.method == "cast":
            return 16
        if self.method in BNB_METHODS:
            return 8 if self.method == "bnb_int8" else 4
        return self.bits

    def to_dict(self) -> dict:
        """``method`` and the fields it reads (what the card and config.json record)."""
        return {"method": self.method, **{name: copy.deepcopy(getattr(self, name))
                                          for name in self.applicable_fields()}}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict) -> "QuantizationConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [key for key in data if key not in names]
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown quantization config key {key!r}{hint}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "QuantizationConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"quantization config is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError("quantization config JSON must be an object")
        return cls.from_dict(data)


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{name}={value!r} is not supported{hint}; choose one of {', '.join(choices)}")


def _check_type(name: str, value, types) -> None:
    # bool is an int subclass: refuse True/False where a number is expected, and numbers where a bool is.
    expected = types if isinstance(types, tuple) else (types,)
    if bool in expected:
        ok = isinstance(value, bool)
    else:
        ok = isinstance(value, expected) and not isinstance(value, bool)
    if not ok:
        names = " or ".join(t.__name__ for t in expected)
        raise ConfigError(f"{name} must be {names}, got {value!r}")
