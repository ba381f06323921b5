"""``from_pretrained(..., quantization_config=HFCompressConfig(...))``: quantize a floating-point checkpoint while
transformers loads it, through transformers' own plug-in point for quantizers (``register_quantization_config``
/ ``register_quantizer``), and return a model on hfcompress's packed runtime.

    from transformers import AutoModelForCausalLM
    from hfcompress import HFCompressConfig

    model = AutoModelForCausalLM.from_pretrained("path/or/hub-id", quantization_config=HFCompressConfig(bits=4))

How it runs, like bitsandbytes' load-time quantization: transformers builds the model on the meta device and
streams the checkpoint in; each weight :class:`HFCompressQuantizer` targets (the ``nn.Linear``\\s that
``quantize`` would target) goes through :class:`RTNQuantize`, which rounds it (:func:`.api.rtn_weight`, the code
``quantize(model, QuantizationConfig(method="rtn"))`` runs) into the :class:`~.modules.CompressedLinear`
``quantize`` would install, and leaves an empty tensor where the float weight would go, so the float model never
exists in memory as a whole. After loading, the CompressedLinears take their Linears' places (with the biases
that loaded there) and become the packed modules :func:`~.runtime.load_compressed` builds from the checkpoint
``save_pretrained`` would write of them (:func:`.runtime.pack_compressed_linears`): the same modules, the same
logits. The weights quantize in checkpoint order, one at a time; ``model.hfcompress_report`` and config.json's
``hfcompress`` section record them as ``quantize`` does.

Only data-free quantization can run here (``from_pretrained`` has no way to pass calibration data): ``rtn``
at 2/3/4/8 bits, group-wise or per channel, symmetric or with zero points, min-max or MSE-searched clipping.
GPTQ/AWQ are ``hfcompress.quantize`` / ``hfcompress quantize``'s job; their checkpoints load with
``load_compressed``.

Saving: the packed modules hold kernel layouts, not the compressed-tensors tensors, so a packed model refuses
``save_pretrained`` (nothing is written). ``HFCompressConfig(packed=False)`` keeps the CompressedLinear modules
instead (what ``quantize`` leaves: dequantized on every call, slow), and ``save_pretrained`` then writes the
compressed-tensors checkpoint ``quantize`` + ``save_pretrained`` writes.

Pre-quantized compressed-tensors folders cannot come here: transformers gives them to its own
``CompressedTensorsHfQuantizer`` and refuses any other config class for them before a plug-in runs
(``AutoHfQuantizer.merge_quantization_configs``); ``load_compressed`` is the way to run them packed.

All coupling to transformers' quantizer internals (``HfQuantizer``'s hooks, ``ConversionOps``) is in this file;
tested against transformers 5.x.
"""

from __future__ import annotations

import difflib
import logging
import time

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..core.devices import resolve_device
from ..core.errors import ConfigError, HFCompressError
from . import calibrate as C
from . import coverage as CV
from . import ct_format
from .api import (QuantizationReport, _attach_report, _audit, _group_sizes, compressed_linear, rtn_without_data,
                  select_targets)
from .config import QuantizationConfig, QuantizationError
from .modules import CompressedLinear
from .packed import SAVE_PACKED_HINT
from .decode import enable_compiled_decode
from .runtime import pack_compressed_linears

logger = logging.getLogger(__name__)

QUANT_METHOD = "hfcompress"

class HFCompressConfig(QuantizationConfigMixin):
    """Load-time quantization by hfcompress, for ``from_pretrained(..., quantization_config=...)``.

    Args:
        method: ``"rtn"`` (round-to-nearest), the one method that needs no calibration data. GPTQ/AWQ need
            data that ``from_pretrained`` cannot pass: use ``hfcompress.quantize`` or ``hfcompress quantize``.
        bits: 2, 3, 4 or 8.
        group_size: input columns sharing a scale; ``None`` for one scale per output channel. Widths it does not
            divide fall back per layer as in ``quantize`` (with a warning).
        symmetric: no zero points (True) or one integer zero point per scale (False).
        observer: ``"minmax"`` or ``"mse"`` (search the clipping ratio that minimises each weight's error).
        ignore: module names/patterns left in floating point (default ``["lm_head"]``), as
            ``QuantizationConfig.ignore``.
        packed: return the packed runtime (our int4/int8 kernels; inference only, cannot be saved). False keeps
            compressed-tensors modules that ``save_pretrained`` writes as a checkpoint (slow to run).
        fuse_projections, quantize_embeddings, compile_decode: as in :func:`~hfcompress.load_compressed` (packed
            only; ``compile_decode=True`` makes ``generate()`` decode with a static KV cache and a compiled step).
    """

    def __init__(self, method: str = "rtn", bits: int = 4, group_size: int | None = 128, symmetric: bool = True,
                 observer: str = "minmax", ignore: list[str] | None = None, packed: bool = True,
                 fuse_projections: bool = True, quantize_embeddings: bool = False, compile_decode: bool = False,
                 quant_method: str = QUANT_METHOD):
        if quant_method != QUANT_METHOD:
            raise ConfigError(f"HFCompressConfig has quant_method {QUANT_METHOD!r}, got {quant_method!r}")
        self.quant_method = QUANT_METHOD
        self.method, self.bits, self.group_size, self.symmetric = method, bits, group_size, symmetric
        self.observer = observer
        self.ignore = ["lm_head"] if ignore is None else ignore
        self.packed, self.fuse_projections, self.quantize_embeddings = packed, fuse_projections, quantize_embeddings
        self.compile_decode = compile_decode
        self.post_init()

    _QUANTIZATION_FIELDS = ("method", "bits", "group_size", "symmetric", "observer", "ignore")
    _RUNTIME_FIELDS = ("packed", "fuse_projections", "quantize_embeddings", "compile_decode")

    def post_init(self) -> None:
        """Check every value (``QuantizationConfig``'s checks, then what load-time quantization can do)."""
        if self.method in ("gptq", "awq"):
            raise ConfigError(f"HFCompressConfig(method={self.method!r}): {self.method} needs calibration data, "
                              "which from_pretrained cannot pass; quantize with hfcompress.quantize(model, "
                              f"QuantizationConfig(method={self.method!r}), calibration_data=...) or `hfcompress "
                              f"quantize MODEL OUT --method {self.method}`, then run the checkpoint with "
                              "hfcompress.load_compressed(OUT)")
        if self.method == "cast" or str(self.method).startswith("bnb_"):
            hint = ("pass dtype=torch.bfloat16 (or float16) to from_pretrained" if self.method == "cast" else
                    "pass transformers' BitsAndBytesConfig to from_pretrained")
            raise ConfigError(f"HFCompressConfig(method={self.method!r}) is not a load-time method; {hint}")
        config = self.quantization_config()  # QuantizationConfig's checks and messages
        if config.method != "rtn":
            raise ConfigError(f"HFCompressConfig: method must be 'rtn', got {self.method!r}")
        for name in self._RUNTIME_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"HFCompressConfig: {name} must be True or False, got {getattr(self, name)!r}")

    def quantization_config(self) -> QuantizationConfig:
        """The ``QuantizationConfig`` whose ``quantize`` this load reproduces."""
        fields = {name: getattr(self, name) for name in self._QUANTIZATION_FIELDS}
        fields["ignore"] = list(fields["ignore"]) if isinstance(fields["ignore"], (list, tuple)) else fields["ignore"]
        return QuantizationConfig(**fields)

    def to_dict(self) -> dict:
        return {"quant_method": QUANT_METHOD,
                **{name: getattr(self, name) for name in self._QUANTIZATION_FIELDS + self._RUNTIME_FIELDS}}

    @classmethod
    def from_dict(cls, config_dict: dict, return_unused_kwargs: bool = False, **kwargs):
        known = ("quant_method",) + cls._QUANTIZATION_FIELDS + cls._RUNTIME_FIELDS
        unknown = [k for k in config_dict if k not in known]
        if unknown:
            close = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
            raise ConfigError(f"unknown HFCompressConfig key {unknown[0]!r}{hint}")
        return super().from_dict(config_dict, return_unused_kwargs=return_unused_kwargs, **kwargs)


def _single_device(device_map) -> torch.device:
    """The one device a ``device_map`` puts the whole model on (the packed runtime does not split a model)."""
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, dict):
        places = set(device_map.values())
        if len(places) != 1 or "disk" in places:
            raise ConfigError(f"HFCompressConfig: device_map puts the model on {sorted(map(str, places))}; the "
                              "packed runtime runs a model on one device: pass device_map='cpu' or 'cuda:N'")
        device_map = places.pop()
    if isinstance(device_map, int):
        device_map = f"cuda:{device_map}"
    return resolve_device(device_map)


class RTNQuantize(ConversionOps):
    """transformers' load-time operation on one targeted weight: RTN it (:meth:`HFCompressQuantizer.quantize_weight`)
    and hand back an empty placeholder for the float weight, so that nothing float of that size stays loaded."""

    def __init__(self, hf_quantizer: "HFCompressQuantizer"):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict, model=None, full_layer_name: str | None = None, **kwargs) -> dict:
        key, value = next(iter(input_dict.items()))
        tensor = value[0] if isinstance(value, list) else value
        full_layer_name = full_layer_name or key
        if not self.hf_quantizer.quantize_weight(model, full_layer_name.removesuffix(".weight"), tensor):
            return {full_layer_name: tensor}  # stays float; postprocessing raises, naming it
        return {full_layer_name: tensor.new_empty(0)}


class HFCompressQuantizer(HfQuantizer):
    """transformers' side of :class:`HFCompressConfig` (see the module docstring)."""

    requires_calibration = False
    quantization_config: HFCompressConfig

    def __init__(self, quantization_config: HFCompressConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.config = quantization_config.quantization_config()
        self.generator = None  # nearest rounding draws nothing (stochastic rounding is not offered here)
        self.targets: dict[str, int | None] = {}  # module name -> effective group size
        self.layers: dict = {}  # module name -> LayerReport
        self.pending: dict[str, CompressedLinear] = {}  # quantized while loading, installed after
        self.problems: list[str] = []
        self.device = torch.device("cpu")
        self.planned = None
        self.started = time.perf_counter()

    def validate_environment(self, device_map=None, **kwargs):
        if self.pre_quantized:  # not reached through from_pretrained (see the module docstring)
            raise ConfigError("HFCompressConfig quantizes floating-point checkpoints at load time; run a "
                              "quantized checkpoint with hfcompress.load_compressed(path)")
        self.device = _single_device(device_map)

    def update_device_map(self, device_map):
        # The whole model on the one device the packed runtime runs on (no accelerate dispatch across devices).
        return None if device_map is None and self.device.type == "cpu" else {"": str(self.device)}

    # ---- before the weights: the targets, checked on the meta-device model --------------------------------------
    def _process_model_before_weight_loading(self, model, **kwargs):
        self.started = time.perf_counter()
        tied_keys = dict(getattr(model, "all_tied_weights_keys", None) or {})  # tied only after loading
        self.planned = CV.plan(model, self.config.ignore, tied=tied_keys)
        targets = select_targets(model, self.config.ignore)
        tied = {key.removesuffix(".weight") for pair in tied_keys.items() for key in pair}
        for name in targets:
            if name in tied:  # as quantize refuses it (api._check_weights)
                raise QuantizationError(f"{name}.weight is tied to another weight of {type(model).__name__}; "
                                        f"add {name!r} to HFCompressConfig.ignore to keep it in floating point")
        self.targets = _group_sizes(targets, self.config.group_size)
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        name, _, leaf = param_name.rpartition(".")
        return leaf == "weight" and name in self.targets

    def get_quantize_ops(self):
        return RTNQuantize(self)

    def quantize_weight(self, model, name: str, tensor: torch.Tensor) -> bool:
        """RTN one weight as it loads into the CompressedLinear ``quantize`` would install; False (a problem noted)
        when it cannot be quantized. Errors are noted, not raised: transformers turns an exception here into a
        generic load report, and postprocessing raises ours.

        The module is swapped in only after loading: until then the float Linear keeps its place (with an empty
        weight), because transformers initialises the weights the checkpoint lacks by calling each model's
        ``_init_weights``, which may read a child's ``.weight`` (GPT-2's reads ``c_proj.weight``)."""
        source = model.get_submodule(name)
        weight = tensor.t() if C.is_conv1d(source) else tensor  # (out, in)
        if not torch.isfinite(weight).all():
            bad = int((~torch.isfinite(weight)).sum())
            self.problems.append(f"{name}.weight has {bad} NaN/Inf values in the checkpoint; fix the checkpoint "
                                 "or ignore the layer (HFCompressConfig.ignore)")
            return False
        group_size = self.targets[name]
        result, self.layers[name] = rtn_without_data(name, weight.detach(), group_size, self.config, self.generator)
        self.pending[name] = compressed_linear(source, result, self.config.bits, group_size)
        return True

    def _install_pending(self, model) -> None:
        """Put each CompressedLinear in its Linear's place, with the bias that loaded there (before or after)."""
        for name, module in self.pending.items():
            source = model.get_submodule(name)
            if source.bias is not None:
                module.bias.data = source.bias.detach().clone()
            model.set_submodule(name, module)
        self.pending = {}

    # ---- after the weights: report, then the packed runtime -------------------------------------------------------
    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.problems:
            raise QuantizationError(self.problems[0] + (f" ({len(self.problems)} layers)" if len(self.problems) > 1
                                                        else ""))
        self._install_pending(model)
        report = QuantizationReport(method="rtn", config=self.config.to_dict(),
                                    layers=[self.layers[n] for n in self.planned.targets if n in self.layers],
                                    seconds=time.perf_counter() - self.started)
        _audit(model, self.planned, report, lambda m: isinstance(m, CompressedLinear), strict=False)
        _attach_report(model, report)
        if not self.quantization_config.packed:
            # What quantize() leaves: save_pretrained writes the compressed-tensors checkpoint.
            model.config.quantization_config = ct_format.quantization_config(model)
            return model
        pack_compressed_linears(model, model.dtype, self.device, self.quantization_config.fuse_projections,
                                self.quantization_config.quantize_embeddings)
        if self.quantization_config.compile_decode:
            enable_compiled_decode(model)
        return model

    @property
    def is_compileable(self) -> bool:
        # generate() compiles only if the quantizer allows it: the packed modules trace without a graph break (our
        # kernels are custom ops with fake implementations; tests/runtime/test_decode.py)
        return bool(self.quantization_config.packed)

    def is_serializable(self, **kwargs) -> bool:
        if self.quantization_config.packed:
            logger.warning("a model loaded with HFCompressConfig(packed=True) runs packed kernel layouts and cannot "
                           "be saved: %s", SAVE_PACKED_HINT)
            return False
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _register(mapping: dict, name: str, cls, register) -> None:
    """Register ``cls`` under ``name`` through transformers' public decorator, once per process: importing
    this module again (``importlib.reload``, a second import path) replaces our own earlier class, while a
    class another package registered under the name is an error."""
    existing = mapping.get(name)
    if existing is None:
        register(name)(cls)
    elif existing is not cls:
        if existing.__module__ != cls.__module__ or existing.__qualname__ != cls.__qualname__:
            raise HFCompressError(f"transformers already has a quantizer {name!r} from {existing.__module__}; "
                                  f"hfcompress cannot register its own under that name")
        mapping[name] = cls  # our own class from an earlier import of this module


_register(AUTO_QUANTIZATION_CONFIG_MAPPING, QUANT_METHOD, HFCompressConfig, register_quantization_config)
_register(AUTO_QUANTIZER_MAPPING, QUANT_METHOD, HFCompressQuantizer, register_quantizer)
