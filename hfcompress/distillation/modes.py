"""Where the teacher signal comes from, beyond a live frozen teacher (``DistillationConfig.mode``).

The article this project started from names three ways to distil — offline, online and self — and each is a
:class:`TeacherSignal` here, which :class:`~.trainer.DistillationTrainer` asks for the loss of a batch:

* ``cache`` (offline, from a teacher cache, :mod:`.cache`): the teacher ran once; training reads its top-k
  distributions (and, with ``hidden_weight > 0``, the hidden states of the layers it stored) and holds **no
  teacher in memory**;
* ``online``: teacher and student train together. The teacher has its own AdamW optimizer (stepped after the
  student's, same gradient clipping) and learns from the labels' cross-entropy, optionally also from the
  student (deep mutual learning, Zhang et al. 2018: ``mutual_weight · T²·KL(q ‖ p)``); the student distils from
  the teacher's *current* outputs. The teacher is saved in ``output_dir/teacher`` (and in each checkpoint);
* ``self``: the model teaches itself. Its final-layer distribution (detached) teaches early exits — the outputs
  of ``exit_layers`` passed through the model's own final norm and LM head — so the first layers alone become a
  usable model (:func:`truncate`). Objective per token: ``ce_weight · CE(final) + kd_weight · mean_exits
  T²·D(p_final ‖ q_exit)``. With ``self_teacher='ema'`` the teacher is instead an exponential moving average of
  the model's own weights (:class:`EMATeacher`), whose final distribution teaches the model's final layer and the
  exits at ``exit_layers`` if any: ``ce_weight · CE(final) + kd_weight · mean_outputs T²·D(p_ema ‖ q_output)``.

Each signal sums its terms over the predicted tokens and normalises them exactly as the live loss does
(:func:`.losses.normalize`), and feeds the same ``kd_loss``/``ce_loss`` logs.
"""

from __future__ import annotations

import copy
import logging
import os

import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback

from ..core.errors import ConfigError
from .losses import LogitLoss, hidden_state_loss, next_token_targets, normalize, predicted_positions
from .teachers import unwrap

logger = logging.getLogger(__name__)


class TeacherSignal:
    """Computes a batch's loss for :class:`~.trainer.DistillationTrainer` in one of the non-live modes."""

    def compute_loss(self, trainer, model, inputs, return_outputs=False, num_items_in_batch=None):
        raise NotImplementedError

    def save_state(self, folder) -> None:
        """Write what a resumed run needs into a checkpoint folder being staged (nothing by default)."""

    def load_state(self, folder) -> None:
        """Restore what :meth:`save_state` wrote, on ``train(resume_from_checkpoint=...)``."""

    @staticmethod
    def _finish(trainer, model, total, kd, ce, count, outputs, return_outputs, num_items_in_batch, hidden=None):
        loss = normalize(total, num_items_in_batch, count)
        if num_items_in_batch is not None and trainer.args.average_tokens_across_devices:
            loss = loss * trainer.accelerator.num_processes
        mode = "train" if model.training else "eval"
        hidden = torch.zeros_like(kd) if hidden is None else hidden
        trainer._components[mode] += torch.stack([kd.detach(), ce.detach(), hidden.detach().to(kd),
                                                  torch.as_tensor(count).to(kd)]).to(torch.float64)
        return (loss, outputs) if return_outputs else loss


def _split(inputs):
    labels = inputs["labels"]
    model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "cache_index")}
    mask = predicted_positions(labels)  # (B, T)
    return model_inputs, mask, next_token_targets(labels, mask)


# --------------------------------------------------------------------------------------------------------
# cache: offline from a teacher cache
# --------------------------------------------------------------------------------------------------------
class CachedTeacher(TeacherSignal):
    def __init__(self, cache):
        self.cache = cache

    def compute_loss(self, trainer, model, inputs, return_outputs=False, num_items_in_batch=None):
        from .cache import bucket_forward_kl_grad, bucket_forward_kl_t1, bucket_logprobs
        from .losses import chunked_head_loss
        from .teachers import gathered_head, lm_head

        if "cache_index" not in inputs:
            raise ConfigError("mode='cache' trains on the cache's own blocks: use its dataset "
                              "(the default when train_dataset is None), whose examples carry 'cache_index'")
        spec, vocab = trainer.spec, self.cache.meta.vocab_size
        model_inputs, mask, targets = _split(inputs)
        hidden_weight = trainer.args.hidden_weight
        chunked = getattr(trainer, "_chunked", False)
        outputs = trainer._forward(model, model_inputs, need_hidden=True) if chunked else \
            model(**model_inputs, use_cache=False, **({"output_hidden_states": True} if hidden_weight else {}))
        device = outputs.hidden_states[-1].device if chunked else outputs.logits.device
        blocks = inputs["cache_index"].cpu()
        ids, logp, tail = self.cache.rows(blocks)  # (B*(T-1), k): positions 0..T-2
        rows = mask[:, :-1].reshape(-1).cpu()
        ids, logp, tail = ids[rows].to(device), logp[rows].to(device), tail[rows].to(device)  # (N, k), (N,)
        t = spec.temperature

        def objective(student_logits, start, end):  # (C, V) float32 logits of positions start:end
            student_logp = F.log_softmax(student_logits / t if t != 1.0 else student_logits, dim=-1)
            student_buckets, teacher_buckets = bucket_logprobs(student_logp, ids[start:end], logp[start:end],
                                                               tail[start:end], vocab)
            kd = spec._divergence(student_buckets, teacher_buckets)  # (C,), includes T²
            if t == 1.0:  # reuse the log-probs, as LogitLoss.per_position does
                ce = F.nll_loss(student_logp, targets[start:end], reduction="none")
            else:
                ce = F.cross_entropy(student_logits, targets[start:end], reduction="none")
            return spec.kd_weight * kd + spec.ce_weight * ce, kd, ce, student_logp, student_buckets, teacher_buckets

        def per_position(student_logits, start, end, need_grad):  # for chunked_head_loss
            if spec.loss == "forward_kl" and t == 1.0 and bool((targets[start:end] >= 0).all()):
                return bucket_forward_kl_t1(student_logits, ids[start:end], logp[start:end], tail[start:end],
                                            targets[start:end], spec.kd_weight, spec.ce_weight, need_grad)
            if need_grad and spec.loss != "forward_kl":  # other divergences: autograd on this chunk's logits
                leaf = student_logits.detach().requires_grad_(True)
                with torch.enable_grad():
                    weighted, kd, ce = objective(leaf, start, end)[:3]
                    (grad,) = torch.autograd.grad(weighted.sum(), leaf)
                return weighted.detach(), kd.detach(), ce.detach(), grad
            weighted, kd, ce, log_q, student_buckets, teacher_buckets = objective(student_logits, start, end)
            if not need_grad:
                return weighted, kd, ce, None
            # Closed form, as LogitLoss.per_position_and_grad: d(kd_weight T² KL)/dz = kd_weight T (q − p̂),
            # d CE/dz = softmax(z) − e_y (at T = 1 softmax(z) is q).
            grad = bucket_forward_kl_grad(log_q, ids[start:end], student_buckets, teacher_buckets)
            grad.mul_(spec.kd_weight * t)
            if spec.ce_weight:
                grad.add_(log_q.exp() if t == 1.0 else F.softmax(student_logits, dim=-1), alpha=spec.ce_weight)
                grad[torch.arange(grad.shape[0], device=grad.device), targets[start:end]] -= spec.ce_weight
            return weighted, kd, ce, grad

        if chunked:  # as the live loss: (chunk, V) logits at a time from the last hidden states and the LM head
            with gathered_head(model):
                head = lm_head(model, vocab)
                if trainer._check_heads:
                    trainer._verify_head("student", model, outputs, head)
                    trainer._check_heads = False
                total, kd, ce = chunked_head_loss(outputs.hidden_states[-1][mask], head, per_position,
                                                  chunk_size=trainer.args.loss_chunk_size)
        else:  # loss_chunk_size=0: the model's own full logits, autograd
            weighted, kd, ce = objective(outputs.logits[mask][:, :vocab].float(), 0, int(mask.sum()))[:3]
            total, kd, ce = weighted.sum(), kd.sum(), ce.sum()
        hidden = None
        if hidden_weight > 0:  # the live loss's hidden term, with the teacher's states read from the cache
            student_states = [trainer.hidden_projections(s, outputs.hidden_states[s + 1][mask])
                              for s in trainer.layer_map]  # (N, H) each
            teacher_states = [self.cache.hidden_rows(blocks, t)[rows].to(device)
                              for t in trainer.layer_map.values()]
            hidden = hidden_state_loss(student_states, teacher_states, trainer.args.hidden_loss)
            total = total + hidden_weight * hidden
        return self._finish(trainer, model, total, kd, ce, mask.sum(), outputs, return_outputs,
                            num_items_in_batch, hidden)


# --------------------------------------------------------------------------------------------------------
# online: teacher and student train together
# --------------------------------------------------------------------------------------------------------
ONLINE_TEACHER_DIR = "teacher"  # in each checkpoint and in output_dir
ONLINE_OPTIMIZER_FILE = "teacher_optimizer.safetensors"


def load_weights(model: torch.nn.Module, folder) -> None:
    """Load a ``save_pretrained`` folder's safetensors weights into ``model`` in place (every shard; weights
    tied to another are stored once): raises if a tensor is unknown or one of the model's is not found."""
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(folder) if f.startswith("model") and f.endswith(".safetensors"))
    if not files:
        raise ConfigError(f"{folder} holds no model*.safetensors weights")
    state = {}
    for name in files:
        state.update(load_file(os.path.join(folder, name)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded = {p.data_ptr() for n, p in model.state_dict().items() if n in state}
    untied = [n for n in missing if model.state_dict()[n].data_ptr() not in loaded]
    if unexpected or untied:
        raise ConfigError(f"{folder} does not match the teacher: unknown tensors {unexpected[:3]}, missing "
                          f"{untied[:3]}")


def save_optimizer_state(optimizer: torch.optim.Optimizer, path) -> None:
    """An optimizer's state dict as safetensors (no pickle): its tensors by "<param index>.<name>", its
    param groups as JSON metadata."""
    import json

    from safetensors.torch import save_file

    state = optimizer.state_dict()
    tensors = {f"{index}.{key}": value.detach().contiguous().cpu() for index, entry in state["state"].items()
               for key, value in entry.items()}
    save_file(tensors, path, metadata={"param_groups": json.dumps(state["param_groups"])})


def load_optimizer_state(optimizer: torch.optim.Optimizer, path) -> None:
    import json

    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        groups = json.loads(handle.metadata()["param_groups"])
        state: dict[int, dict] = {}
        for key in handle.keys():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = handle.get_tensor(key)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def check_trainable_teacher(teacher) -> None:
    """Online mode trains the teacher: refuse a quantized one or one whose parameters are all frozen."""
    from ..quantization.modules import CompressedLinear

    config = getattr(teacher, "config", None)
    quantized = getattr(teacher, "hf_quantizer", None) is not None or \
        getattr(config, "quantization_config", None) is not None or \
        any(isinstance(m, CompressedLinear) or type(m).__module__.startswith("bitsandbytes")
            for m in teacher.modules())
    if quantized:
        raise ConfigError(f"mode='online' trains the teacher, but {type(teacher).__name__} is quantized; pass the "
                          f"full-precision teacher (or use mode='live' to keep a quantized teacher frozen)")
    if not any(p.requires_grad for p in teacher.parameters()):
        raise ConfigError(f"mode='online' trains the teacher, but all of {type(teacher).__name__}'s parameters "
                          f"have requires_grad=False; unfreeze them (teacher.requires_grad_(True)) or use "
                          f"mode='live'")


class _OnlineTeacherCallback(TrainerCallback):
    """Steps the teacher's optimizer after the student's and saves the final teacher next to the student
    (checkpoints hold theirs through :meth:`OnlineTeacher.save_state`)."""

    def __init__(self, signal: "OnlineTeacher"):
        self.signal = signal

    def on_optimizer_step(self, args, state, control, **kwargs):
        teacher, optimizer = self.signal.teacher, self.signal.optimizer
        if args.max_grad_norm and args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(teacher.parameters(), args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def on_train_end(self, args, state, control, **kwargs):
        from ..core.atomic import atomic_folder

        if args.should_save:
            with atomic_folder(os.path.join(args.output_dir, ONLINE_TEACHER_DIR), overwrite=True) as folder:
                unwrap(self.signal.teacher).save_pretrained(folder)


class OnlineTeacher(TeacherSignal):
    def __init__(self, teacher, args):
        check_trainable_teacher(teacher)
        self.teacher = teacher.to(args.device).train()
        params = [p for p in teacher.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=args.teacher_learning_rate or args.learning_rate,
                                           weight_decay=args.weight_decay)
        self.mutual_weight = args.mutual_weight

    def save_state(self, folder) -> None:
        """The teacher as a ``from_pretrained`` folder (``teacher/``) and its optimizer's state
        (``teacher_optimizer.safetensors``), inside the checkpoint being staged, so both are published with it."""
        unwrap(self.teacher).save_pretrained(os.path.join(folder, ONLINE_TEACHER_DIR))
        save_optimizer_state(self.optimizer, os.path.join(folder, ONLINE_OPTIMIZER_FILE))

    def load_state(self, folder) -> None:
        teacher_dir = os.path.join(folder, ONLINE_TEACHER_DIR)
        if not os.path.isdir(teacher_dir):
            logger.warning("%s has no %s/; the online teacher restarts from the weights it was given", folder,
                           ONLINE_TEACHER_DIR)
            return
        load_weights(unwrap(self.teacher), teacher_dir)
        optimizer_file = os.path.join(folder, ONLINE_OPTIMIZER_FILE)
        if os.path.isfile(optimizer_file):
            load_optimizer_state(self.optimizer, optimizer_file)
        else:
            logger.warning("%s has no %s; the teacher's optimizer restarts", folder, ONLINE_OPTIMIZER_FILE)
        logger.info("restored the online teacher from %s", teacher_dir)

    def compute_loss(self, trainer, model, inputs, return_outputs=False, num_items_in_batch=None):
        spec = trainer.spec
        model_inputs, mask, targets = _split(inputs)
        self.teacher.train(model.training)
        student_out = model(**model_inputs, use_cache=False)
        teacher_out = self.teacher(**model_inputs, use_cache=False)
        rows = trainer.vocab_rows
        student_logits = student_out.logits[mask][:, :rows].float()  # (N, V)
        teacher_logits = teacher_out.logits[mask][:, :rows].float()
        weighted, kd, ce = spec.per_position(student_logits, teacher_logits.detach(), targets)
        teacher_loss = F.cross_entropy(teacher_logits, targets, reduction="none")
        if self.mutual_weight > 0:  # the teacher also learns from the student: T²·KL(q ‖ p) w.r.t. p
            teacher_loss = teacher_loss + self.mutual_weight * LogitLoss(temperature=spec.temperature).divergence(
                teacher_logits, student_logits.detach())
        total = weighted.sum() + teacher_loss.sum()
        return self._finish(trainer, model, total, kd.sum(), ce.sum(), mask.sum(), student_out, return_outputs,
                            num_items_in_batch)


# --------------------------------------------------------------------------------------------------------
# self: the final layer teaches early exits
# --------------------------------------------------------------------------------------------------------
def final_norm(model) -> torch.nn.Module:
    """The norm applied to the last decoder layer's output before the LM head (Llama ``model.norm``, GPT-2
    ``transformer.ln_f``, OPT ``decoder.final_layer_norm``...)."""
    base = unwrap(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", base)
    for holder in (decoder, getattr(decoder, "decoder", None)):
        for name in ("norm", "final_layernorm", "final_layer_norm", "ln_f"):
            module = getattr(holder, name, None) if holder is not None else None
            if isinstance(module, torch.nn.Module):
                return module
    raise ConfigError(f"mode='self' needs the final norm of {type(base).__name__}, which has none of the usual "
                      f"names (norm, ln_f, final_layer_norm); use a Llama/Mistral/Qwen2/GPT-2-style model")


def resolve_exit_layers(exit_layers: list[int] | None, layers: int, default_all: bool = True) -> list[int]:
    """Exit layers to train: given ones, checked against the depth; default every layer but the last (none with
    ``default_all=False``: the EMA teacher teaches the final layer by itself)."""
    if exit_layers is None and not default_all:
        return []
    if layers < 2:
        raise ConfigError(f"mode='self' needs at least 2 decoder layers (the model has {layers})")
    if exit_layers is None:
        return list(range(layers - 1))
    bad = [layer for layer in exit_layers if layer >= layers - 1]
    if bad:
        raise ConfigError(f"exit_layers {bad}: the model has {layers} decoder layers (0..{layers - 1}) and the "
                          f"last one is the teacher, so exits are layers 0..{layers - 2}")
    return list(exit_layers)


EMA_FILE = "ema.safetensors"  # the EMA teacher's weights inside a checkpoint folder (a resume continues from them)
EMA_FOLDER = "ema"  # output_dir/ema: the EMA copy at the end of training, a from_pretrained folder


def ema_update_(ema_params: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    """``ema ← decay·ema + (1 − decay)·param`` in place, for each pair (one fused ``lerp`` per list)."""
    torch._foreach_lerp_(ema_params, [p.to(e.dtype) for e, p in zip(ema_params, params)], 1.0 - decay)


class EMATeacher:
    """An exponential moving average of a model's weights, used as its teacher (``self_teacher='ema'``).

    A frozen copy (``requires_grad=False``, eval mode: no dropout) made when training starts, so its first
    distributions equal the model's; after every optimizer step, :meth:`update` moves each parameter toward the
    model's by ``1 − decay`` and copies the buffers. It reads the *unwrapped* model's parameters, which under DDP
    are the same on every rank after the step, so every rank's copy stays identical without communication.
    """

    def __init__(self, model, decay: float, device):
        self.decay = decay
        self.model = copy.deepcopy(unwrap(model)).to(device).eval().requires_grad_(False)

    def _pairs(self, model):
        source = dict(unwrap(model).named_parameters())
        names = [name for name, _ in self.model.named_parameters()]
        missing = [name for name in names if name not in source]
        if missing:
            raise ConfigError(f"the EMA teacher's parameters {missing[:3]} are not the model's; the model's structure "
                              f"changed after DistillationTrainer was created")
        return [dict(self.model.named_parameters())[n] for n in names], [source[n].detach() for n in names]

    @torch.no_grad()
    def update(self, model) -> None:
        ema_params, params = self._pairs(model)
        ema_update_(ema_params, params, self.decay)
        source = dict(unwrap(model).named_buffers())
        for name, buffer in self.model.named_buffers():
            if name in source:
                buffer.copy_(source[name])

    def save(self, path) -> None:
        from safetensors.torch import save_model

        save_model(self.model, str(path))

    def load(self, path) -> None:
        from safetensors.torch import load_model

        load_model(self.model, str(path))


class _EMACallback(TrainerCallback):
    """Updates the EMA teacher after each optimizer step; writes it to ``output_dir/ema`` when training ends."""

    def __init__(self, trainer, ema: EMATeacher):
        self.trainer, self.ema = trainer, ema

    def on_optimizer_step(self, args, state, control, **kwargs):
        if not self.trainer.accelerator.optimizer_step_was_skipped:  # a skipped fp16 step moved no weight
            self.ema.update(self.trainer.model)

    def on_train_end(self, args, state, control, **kwargs):
        from ..core.atomic import atomic_folder

        if args.should_save:
            with atomic_folder(os.path.join(args.output_dir, EMA_FOLDER), overwrite=True) as folder:
                self.ema.model.save_pretrained(folder)


class SelfDistillation(TeacherSignal):
    """``self_teacher='final'``: the final layer teaches the exits. ``'ema'``: the EMA copy teaches the final
    layer and the exits (see the module docstring)."""

    def __init__(self, trainer, args):
        from accelerate.utils import DistributedType

        from .hidden import num_layers

        model = trainer.model
        self.ema = None
        self.exits = resolve_exit_layers(args.exit_layers, num_layers(model), default_all=args.self_teacher == "final")
        if self.exits:
            final_norm(model)  # fail now, not at the first step
        if args.self_teacher == "ema":
            if trainer.accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
                raise ConfigError("self_teacher='ema' averages whole parameters, which DeepSpeed/FSDP shard; use "
                                  "DDP or one process, or self_teacher='final'")
            self.ema = EMATeacher(model, args.ema_decay, args.device)
            trainer.add_callback(_EMACallback(trainer, self.ema))

    def save_state(self, folder) -> None:
        if self.ema is not None:
            self.ema.save(os.path.join(folder, EMA_FILE))

    def load_state(self, folder) -> None:
        if self.ema is None:
            return
        path = os.path.join(folder, EMA_FILE)
        if os.path.isfile(path):
            self.ema.load(path)
            logger.info("restored the EMA teacher from %s", path)
        else:
            # The copy made at start-up is the resumed model's weights: the EMA restarts from them.
            logger.warning("%s has no %s; the EMA teacher restarts from the resumed model's weights", folder, EMA_FILE)

    def compute_loss(self, trainer, model, inputs, return_outputs=False, num_items_in_batch=None):
        spec = trainer.spec
        model_inputs, mask, targets = _split(inputs)
        outputs = model(**model_inputs, use_cache=False, output_hidden_states=bool(self.exits))
        rows = trainer.vocab_rows
        final = outputs.logits[mask][:, :rows].float()  # (N, V)
        ce = F.cross_entropy(final, targets, reduction="none")
        taught = []  # (student logits, teacher logits) pairs
        if self.ema is None:
            teacher = final.detach()
        else:
            with torch.no_grad():
                teacher = self.ema.model(**model_inputs, use_cache=False).logits[mask][:, :rows].float()  # (N, V)
            taught.append(final)
        if self.exits:
            head, norm = unwrap(model).get_output_embeddings(), final_norm(model)
            # hidden_states[i + 1] is block i's output (before the final norm, except the last block's).
            taught += [head(norm(outputs.hidden_states[layer + 1][mask]))[:, :rows].float() for layer in self.exits]
        kd = torch.zeros_like(ce)
        for student in taught:
            kd = kd + spec.divergence(student, teacher) / len(taught)
        total = (spec.kd_weight * kd + spec.ce_weight * ce).sum()
        return self._finish(trainer, model, total, kd.sum(), ce.sum(), mask.sum(), outputs, return_outputs,
                            num_items_in_batch)


def truncate(model, num_layers: int):
    """A copy of ``model`` with its first ``num_layers`` decoder layers, its embeddings, final norm and head."""
    from .hidden import num_layers as depth
    from .student import make_student

    layers = depth(model)
    if not 1 <= num_layers <= layers:
        raise ConfigError(f"cannot truncate to {num_layers} layers: the model has {layers} (choose 1..{layers})")
    return make_student(model, num_layers=num_layers, layer_selection=list(range(num_layers)))


# --------------------------------------------------------------------------------------------------------
# Trainer set-up of the non-live modes
# --------------------------------------------------------------------------------------------------------
def setup_trainer(trainer, model, teacher_model, teacher_cache, args, trainer_kwargs: dict) -> None:
    """``DistillationTrainer.__init__`` for ``args.mode`` in cache/online/self (see the module docstring)."""
    from .teachers import check_vocabularies, load_teacher

    mode = args.mode
    if teacher_cache is not None and mode != "cache":
        raise ConfigError(f"teacher_cache= is given but DistillationConfig.mode={mode!r}; set mode='cache'")
    if isinstance(model, (str, os.PathLike)):
        from ..core.pretrained import load_causal_lm

        model = load_causal_lm(model)
    tokenizer = trainer_kwargs.get("processing_class")
    signal: TeacherSignal
    teacher = None
    if mode == "cache":
        from .cache import CacheDataset, TeacherCache, weights_hash

        if teacher_cache is None:
            raise ConfigError("mode='cache' needs teacher_cache= (a folder written by `hfcompress cache-teacher`)")
        cache = TeacherCache(teacher_cache)
        named = teacher_model if isinstance(teacher_model, (str, os.PathLike)) else None
        cache.check(tokenizer=tokenizer, temperature=args.temperature, top_k=args.cache_top_k,
                    teacher=os.fspath(named) if named is not None else None,
                    teacher_hash=weights_hash(teacher_model) if isinstance(teacher_model, torch.nn.Module) else None,
                    vocab_size=unwrap(model).get_output_embeddings().weight.shape[0])
        if (cache.meta.sampling == "sample" or cache.meta.tail_draws) and args.loss != "forward_kl":
            raise ConfigError(f"{teacher_cache} holds sampled tokens, an unbiased estimate of the forward-KL gradient "
                              f"only; set loss='forward_kl' (got {args.loss!r}) or write a top-k cache without "
                              f"tail draws")
        teacher_model = None  # checked, not kept: no teacher in memory
        from .hidden import num_layers

        layer_map = cache.hidden_layer_map(args.layer_map, num_layers(model)) if args.hidden_weight > 0 else {}
        if trainer_kwargs.get("train_dataset") is None:
            trainer_kwargs["train_dataset"] = CacheDataset(cache)
        signal = CachedTeacher(cache)
    elif mode == "online":
        if teacher_model is None:
            raise ConfigError("mode='online' needs teacher_model (the teacher to train with the student)")
        teacher = load_teacher(teacher_model, args.teacher_model_init_kwargs)
    elif teacher_model is not None:  # self
        raise ConfigError("mode='self' has no separate teacher (the model teaches its own early exits); drop "
                          "teacher_model")
    Trainer.__init__(trainer, model=model, args=args, **trainer_kwargs)
    trainer.model_accepts_loss_kwargs = True
    trainer.spec = LogitLoss(loss=args.loss, temperature=args.temperature, kd_weight=args.kd_weight,
                             ce_weight=args.ce_weight, beta=args.beta, skew_alpha=args.skew_alpha)
    trainer.layer_map, trainer.hidden_projections, trainer.teacher_model = {}, None, None
    trainer.uses_teacher = False
    trainer._components = {m: torch.zeros(4, dtype=torch.float64, device=args.device) for m in ("train", "eval")}
    if mode == "cache":
        trainer.vocab_rows = signal.cache.meta.vocab_size
        trainer._set_signature_columns_if_needed()
        trainer._signature_columns.append("cache_index")  # keep it through remove_unused_columns
        if layer_map:
            from .hidden import HiddenStateProjections, hidden_width

            trainer.layer_map = layer_map
            trainer.hidden_projections = HiddenStateProjections(layer_map, hidden_width(trainer.model),
                                                                signal.cache.meta.hidden_size).to(args.device)
            if trainer.hidden_projections.has_parameters():
                trainer._setup_projections()
    elif mode == "online":
        if trainer.accelerator.num_processes > 1:
            raise ConfigError("mode='online' runs in a single process for now (the teacher is not wrapped for "
                              "data parallelism); launch one process")
        trainer.vocab_rows = check_vocabularies(trainer.model, teacher, tokenizer, None)
        signal = OnlineTeacher(teacher, args)
        trainer.teacher_model = signal.teacher
        trainer.add_callback(_OnlineTeacherCallback(signal))
    else:
        trainer.vocab_rows = unwrap(trainer.model).get_output_embeddings().weight.shape[0]
        signal = SelfDistillation(trainer, args)
    trainer.signal = signal

