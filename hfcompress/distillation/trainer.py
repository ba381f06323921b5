"""``DistillationTrainer``: a ``transformers.Trainer`` whose loss is distillation from a frozen teacher.

What it overrides and why:

* ``__init__`` loads/places the teacher (eval mode; a caller's teacher keeps its ``requires_grad`` flags),
  checks the vocabularies and that the student can learn, builds the hidden-state projections, and makes
  the Trainer count the step's predicted tokens (``num_items_in_batch``).
* ``compute_loss`` runs both models and sums the losses of :mod:`hfcompress.distillation.losses` over the
  predicted tokens, divided by the step's token count (exact under gradient accumulation and DDP).
* ``create_optimizer`` adds the projections as one more parameter group (so their optimizer state is
  checkpointed and restored with the rest); ``train`` restores their weights on resume; ``_save_checkpoint``
  writes them beside each checkpoint (never into the student), with the state of a non-live mode's teacher
  signal (the EMA teacher of ``self_teacher='ema'``).
* ``_save_checkpoint`` / ``save_model`` make every save atomic (:mod:`hfcompress.core.atomic`): a checkpoint
  is staged in a hidden folder and renamed into place complete; the final model is moved in with
  ``config.json`` last. ``compute_loss`` stops at the first NaN/Inf loss, naming the step; nothing is saved
  after it.
* ``log`` adds the per-loss components (``kd_loss``, ``ce_loss``, ``hidden_loss``: per-token means over
  the logging window, over all ranks).
* ``prediction_step`` evaluates the loss only (the chunked loss never builds full logits to return).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..core.atomic import publish, publish_files
from ..core.errors import ConfigError, DataError, HFCompressError, ModelLoadError
from .config import DistillationConfig
from .hidden import (
    HiddenStateProjections,
    hidden_width,
    load_projections,
    num_layers,
    resolve_layer_map,
    save_projections,
)
from .losses import (
    LogitLoss,
    chunked_logit_loss,
    hidden_state_loss,
    logit_loss_from_logits,
    next_token_targets,
    normalize,
    predicted_positions,
)
from .teachers import (
    check_vocabularies,
    gathered_head,
    lm_head,
    load_teacher,
    prepare_teacher,
    teacher_tokenizer,
    unwrap,
    use_as_teacher,
)

logger = logging.getLogger(__name__)

COMPONENTS = ("kd", "ce", "hidden")


def _student_head_unreadable(accelerator) -> bool:
    """Whether the chunked loss cannot read the student's LM head weight outside its forward: under FSDP1 it is a
    view into a sharded flat parameter (empty or partial between forwards, and ``summon_full_params`` would cut
    the gradient). Under FSDP2 it is a DTensor whose ``full_tensor()`` is a differentiable all-gather
    (:func:`~hfcompress.distillation.teachers.lm_head`), so the chunked loss stays on; under DeepSpeed ZeRO-3 it
    is gathered for the step. There the student's own logits are used (``loss_chunk_size=0``), with a warning."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return False
    if getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) == 2:
        return False
    logger.warning("FSDP1: the student's LM head cannot be read outside its forward pass, so the distillation "
                   "loss uses the models' full logits (as loss_chunk_size=0; more memory); use fsdp_version 2 for "
                   "the chunked loss")
    return True
class NonFiniteLossError(HFCompressError):
    """A training loss became NaN or infinite: training stops and no final model is saved."""


class _ProjectionsCallback(TrainerCallback):
    """Clears the projections' gradients after each optimizer step (the Trainer clears only the student's).
    They are written into each checkpoint by ``DistillationTrainer._save_checkpoint``, next to (not inside)
    the student."""

    def __init__(self, trainer: "DistillationTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.hidden_projections.zero_grad(set_to_none=True)


def check_trainable_student(student, teacher) -> None:
    """A student that cannot learn fails here, in one line, instead of deep inside autograd at the first step."""
    if student is teacher:
        raise ConfigError("model (the student) and teacher_model are the same object; distil into a copy "
                          "(copy.deepcopy(teacher) or make_student(teacher, ...))")
    if not any(param.requires_grad for param in student.parameters()):
        raise ConfigError(f"the student ({type(student).__name__}) has no trainable parameters: every parameter has "
                          f"requires_grad=False (frozen, or copied from a frozen model); call "
                          f"student.requires_grad_(True), or attach trainable adapters")


class DistillationTrainer(Trainer):
    """Train ``model`` (the student) to match ``teacher_model`` under :class:`DistillationConfig`.

    ``model`` / ``teacher_model``: a model, or a path / Hub id (the teacher is loaded with
    ``args.teacher_model_init_kwargs``; resolve ``reference:<size>`` first with ``models.loading.resolve_model``).
    Datasets yield ``input_ids``/``attention_mask``/``labels`` (``labels == -100`` marks tokens not to predict),
    e.g. :class:`hfcompress.core.data.BlockDataset`. Other arguments are those of ``transformers.Trainer``.
    ``args.mode`` other than ``live`` (``cache`` with ``teacher_cache=DIR``, ``online``, ``self``) is set up and
    computed by :mod:`.modes`.
    """

    signal = None  # the teacher signal of the cache/online/self modes (hfcompress.distillation.modes)

    def __init__(self, model=None, teacher_model=None, args: DistillationConfig | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, teacher_cache=None, **kwargs):
        if args is None:
            args = DistillationConfig(output_dir="distillation-output")
        if not isinstance(args, DistillationConfig):
            raise ConfigError(f"DistillationTrainer needs a DistillationConfig, got {type(args).__name__}")
        if args.mode != "live" or teacher_cache is not None:
            from .modes import setup_trainer

            setup_trainer(self, model, teacher_model, teacher_cache, args, dict(
                data_collator=data_collator, train_dataset=train_dataset, eval_dataset=eval_dataset,
                processing_class=processing_class, **kwargs))
            if args.mode == "cache":  # the cache's loss is chunked like the live one (modes.CachedTeacher)
                self._setup_chunked_loss()
            return
        if model is None or teacher_model is None:
            raise ConfigError("DistillationTrainer needs both model (the student) and teacher_model")
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            if dataset is not None and hasattr(dataset, "__len__") and len(dataset) == 0:
                raise DataError(f"{name} is empty: distillation needs at least one example")
        if isinstance(model, (str, os.PathLike)):
            from ..core.pretrained import load_causal_lm

            model = load_causal_lm(model)
        teacher = use_as_teacher(load_teacher(teacher_model, args.teacher_model_init_kwargs),
                                 owned=not isinstance(teacher_model, torch.nn.Module))
        check_trainable_student(model, teacher)
        # Before Trainer.__init__, which creates output_dir: a refused pair of models leaves nothing behind.
        vocab_rows = check_vocabularies(model, teacher, processing_class, teacher_tokenizer(teacher_model))
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        # Our loss takes `num_items_in_batch`; this makes the Trainer count it (labels[..., 1:] != -100, summed
        # over the accumulation micro-batches and, with average_tokens_across_devices, over the ranks) and not
        # rescale the loss by the number of accumulation steps again.
        self.model_accepts_loss_kwargs = True

        self.spec = LogitLoss(loss=args.loss, temperature=args.temperature, kd_weight=args.kd_weight,
                              ce_weight=args.ce_weight, beta=args.beta, skew_alpha=args.skew_alpha)
        self.vocab_rows = vocab_rows
        self.uses_teacher = args.kd_weight > 0 or args.hidden_weight > 0
        self.teacher_model = prepare_teacher(teacher, self.accelerator) if self.uses_teacher else None

        self.layer_map: dict[int, int] = {}
        self.hidden_projections = None
        if args.hidden_weight > 0:
            self.layer_map = resolve_layer_map(args.layer_map, num_layers(self.model), num_layers(teacher))
            self.hidden_projections = HiddenStateProjections(self.layer_map, hidden_width(self.model),
                                                             hidden_width(teacher)).to(args.device)
            if self.hidden_projections.has_parameters():
                self._setup_projections()

        self._setup_chunked_loss()
        # Per-loss sums for logging, on the device (no host sync per step); float64 where the device has it.
        counter_dtype = torch.float32 if torch.device(args.device).type == "mps" else torch.float64
        self._components = {mode: torch.zeros(len(COMPONENTS) + 1, dtype=counter_dtype, device=args.device)
                            for mode in ("train", "eval")}

    # ---------------------------------------------------------------------------------------------------
    # Hidden-state projections: optimised with the student, synchronised across ranks, saved apart
    # ---------------------------------------------------------------------------------------------------
    def _setup_projections(self) -> None:
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
            raise ConfigError("hidden-state projections (student and teacher widths differ) are supported under "
                              "DDP and single-process runs, not DeepSpeed/FSDP; set hidden_weight=0 or use a "
                              "student of the teacher's width")
        if self.accelerator.num_processes > 1:
            # The projections live outside the DDP-wrapped student, so average their gradients ourselves, once
            # per optimizer step (when the Trainer marks the micro-batch as the one that syncs).
            world = self.accelerator.num_processes

            def average(param):
                if self.accelerator.sync_gradients and param.grad is not None:
                    torch.distributed.all_reduce(param.grad)
                    param.grad.div_(world)

            for param in self.hidden_projections.parameters():
                param.register_post_accumulate_grad_hook(average)
        self.add_callback(_ProjectionsCallback(self))

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        projections = self.hidden_projections
        if projections is not None and projections.has_parameters():
            params = list(projections.parameters())
            if not any(p is params[0] for group in optimizer.param_groups for p in group["params"]):
                optimizer.add_param_group({"params": params, "weight_decay": 0.0})
        return optimizer

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        self._remove_interrupted_checkpoints()
        projections = self.hidden_projections
        folder = resume_from_checkpoint
        if folder is True:
            folder = get_last_checkpoint(self.args.output_dir)
            if folder is None:
                raise ModelLoadError(f"resume_from_checkpoint=True but {self.args.output_dir} has no "
                                     f"checkpoint-* folder")
        if folder and projections is not None and projections.has_parameters():
            if load_projections(projections, folder):
                logger.info("restored hidden-state projections from %s", folder)
            else:
                logger.warning("%s has no hidden-state projections; they start from their initialisation", folder)
        if folder and self.signal is not None:
            self.signal.load_state(folder)  # e.g. the EMA teacher of mode='self'
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)

    # ---------------------------------------------------------------------------------------------------
    # Saving: atomic checkpoints and final model; nothing saved after a non-finite loss
    # ---------------------------------------------------------------------------------------------------
    # A checkpoint is written by the Trainer into `.checkpoint-N.partial/checkpoint-N` (the Trainer builds its
    # path from `_get_output_dir`, redirected here while it saves), completed with the projections, then
    # published as `checkpoint-N` by one rename (hfcompress.core.atomic.publish). `get_last_checkpoint` only
    # matches `checkpoint-<digits>`, so a checkpoint killed half-way is never the one a resume picks.
    _staging_parent: str | None = None
    _nonfinite_step: int | None = None

    def _get_output_dir(self, trial) -> str:
        return self._staging_parent or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, f".{name}.partial")  # the same path on every rank (rng_state_<rank>.pth)
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging_parent = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_parent = None
        staged, final = os.path.join(staging, name), os.path.join(run_dir, name)
        if self.args.should_save:
            best = self.state.best_model_checkpoint
            if best and Path(best).parent == Path(staging):  # the Trainer saw the staging path as the best one
                self.state.best_model_checkpoint = final
                self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
            if self.hidden_projections is not None and self.hidden_projections.has_parameters():
                save_projections(self.hidden_projections, staged)
            if self.signal is not None:
                self.signal.save_state(staged)  # inside the staged checkpoint: published with it, complete
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish(staged, final, overwrite=True)
            shutil.rmtree(staging, ignore_errors=True)
            from transformers.trainer_utils import rotate_checkpoints

            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the student (and tokenizer) to ``output_dir``: staged in a hidden folder inside it, then moved
        in with ``config.json`` last (:func:`hfcompress.core.atomic.publish_files`), so the folder's
        ``checkpoint-*`` folders stay and it loads only once the whole new model is there. Refused after a
        non-finite loss or with non-finite weights."""
        if self._staging_parent is not None:  # inside _save_checkpoint: already writing into a staging folder
            return super().save_model(output_dir, _internal_call=_internal_call)
        self._check_saveable()
        folder = Path(output_dir or self.args.output_dir)
        staged = folder / ".hfcompress-save.partial"  # the same path on every rank (collective saves)
        if self.args.should_save:
            shutil.rmtree(staged, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        super().save_model(str(staged), _internal_call=True)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish_files(staged, folder)
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _remove_interrupted_checkpoints(self) -> None:
        """Staging folders of checkpoints a killed run did not finish (never resumed from: incomplete)."""
        if self.args.should_save and os.path.isdir(self.args.output_dir):
            for staging in Path(self.args.output_dir).glob(f".{PREFIX_CHECKPOINT_DIR}-*.partial"):
                logger.warning("removing %s: a checkpoint interrupted while it was being written", staging)
                shutil.rmtree(staging, ignore_errors=True)

    def _check_saveable(self) -> None:
        if self._nonfinite_step is not None:
            raise NonFiniteLossError(f"not saving: the training loss became non-finite at step "
                                     f"{self._nonfinite_step}, so this student is not a trained model; fix the run "
                                     f"(see the error raised by train()) and train again")
        for name, param in unwrap(self.model).named_parameters():
            if param.numel() and not bool(torch.isfinite(param.detach()).all()):
                raise NonFiniteLossError(f"not saving: the student's parameter {name!r} holds NaN/Inf values; "
                                         f"lower learning_rate or enable max_grad_norm and train again")

    def _check_finite_loss(self, loss: torch.Tensor, parts: dict[str, torch.Tensor]) -> None:
        """Stop at the first NaN/Inf training loss, naming the step and the loss term, before it reaches the
        weights (the optimizer step of this batch never runs)."""
        if bool(torch.isfinite(loss.detach()).all()):
            return
        step = self.state.global_step + 1
        self._nonfinite_step = step
        terms = ", ".join(f"{name}={float(value.detach()):.4g}" for name, value in parts.items())
        raise NonFiniteLossError(
            f"the distillation loss is {float(loss.detach()):.4g} at step {step} of {self.state.max_steps} ({terms}): "
            f"training stopped and no final model was saved (checkpoints before step {step} are intact); lower "
            f"learning_rate, check the data, or train in bfloat16/float32 instead of float16")

    # ---------------------------------------------------------------------------------------------------
    # The loss
    # ---------------------------------------------------------------------------------------------------
    def _setup_chunked_loss(self) -> None:
        """Whether the logit loss is computed chunk by chunk from the student's last hidden states and LM head
        (``loss_chunk_size`` > 0 and a readable head), and the first batch's check that the head is plain."""
        self._chunked = self.args.loss_chunk_size > 0 and not _student_head_unreadable(self.accelerator)
        self._check_heads = self._chunked
        self._accepts_logits_to_keep = "logits_to_keep" in inspect.signature(unwrap(self.model).forward).parameters

    def _forward(self, model, inputs: dict, need_hidden: bool):
        kwargs = {"output_hidden_states": True} if need_hidden else {}
        if self._chunked and self._accepts_logits_to_keep:
            # The chunked loss projects hidden states itself: skip the model's own (B, T, V) logits, except for
            # the last position of the first batch, kept to check that our LM head reproduces them.
            kwargs["logits_to_keep"] = 1 if self._check_heads else torch.empty(
                0, dtype=torch.long, device=inputs["input_ids"].device)
        return model(**inputs, use_cache=False, **kwargs)

    @torch.no_grad()
    def _verify_head(self, name: str, model, outputs, head) -> None:
        theirs = outputs.logits[:, -1, :self.vocab_rows].float()  # (B, V)
        ours = head.logits(outputs.hidden_states[-1][:, -1].float(), head.weight.float(),
                           None if head.bias is None else head.bias.float())
        tolerance = 2e-2 * theirs.abs().max().clamp(min=1.0)
        if not torch.allclose(ours, theirs, rtol=2e-2, atol=float(tolerance)):
            raise ConfigError(f"the {name}'s logits are not its LM head applied to its last hidden state "
                              f"({type(unwrap(model)).__name__} transforms them in a way the chunked loss does not "
                              f"know); set loss_chunk_size=0 to use the model's own logits")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.signal is not None:
            return self.signal.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
        args = self.args
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        mask = predicted_positions(labels)  # (B, T): position t predicts labels[t+1]
        targets = next_token_targets(labels, mask)  # (N,)
        chunked = self._chunked
        need_hidden = chunked or args.hidden_weight > 0

        student_out = self._forward(model, model_inputs, need_hidden)
        teacher_out = None
        if self.uses_teacher:
            with torch.no_grad():
                teacher_out = self._forward(self.teacher_model, model_inputs, need_hidden)
        if need_hidden and (student_out.hidden_states is None
                            or (teacher_out is not None and teacher_out.hidden_states is None)):
            raise ConfigError(f"hidden_weight={args.hidden_weight} / loss_chunk_size={args.loss_chunk_size} need "
                              f"hidden states, but the student or teacher returns none for "
                              f"output_hidden_states=True; set hidden_weight=0 and loss_chunk_size=0")
        teacher_for_logits = teacher_out if args.kd_weight > 0 else None

        if chunked:
            with gathered_head(model), gathered_head(self.teacher_model) if teacher_for_logits else contextlib.nullcontext():
                student_head = lm_head(model, self.vocab_rows)
                teacher_head = lm_head(self.teacher_model, self.vocab_rows) if teacher_for_logits else None
                if self._check_heads:
                    self._verify_head("student", model, student_out, student_head)
                    if teacher_head is not None:
                        self._verify_head("teacher", self.teacher_model, teacher_out, teacher_head)
                    self._check_heads = False
                weighted, kd, ce = chunked_logit_loss(
                    student_out.hidden_states[-1][mask], student_head, targets, self.spec,
                    teacher_out.hidden_states[-1][mask] if teacher_head is not None else None, teacher_head,
                    chunk_size=args.loss_chunk_size)
        else:
            student_logits = student_out.logits[mask][:, :self.vocab_rows]  # (N, V)
            teacher_logits = teacher_for_logits.logits[mask][:, :self.vocab_rows] if teacher_for_logits else None
            weighted, kd, ce = logit_loss_from_logits(student_logits, teacher_logits, targets, self.spec)

        total = weighted
        hidden = torch.zeros_like(kd)
        if args.hidden_weight > 0:
            student_states = [self.hidden_projections(s, student_out.hidden_states[s + 1][mask])
                              for s in self.layer_map]
            teacher_states = [teacher_out.hidden_states[t + 1][mask] for t in self.layer_map.values()]
            hidden = hidden_state_loss(student_states, teacher_states, args.hidden_loss)
            total = total + args.hidden_weight * hidden

        loss = normalize(total, num_items_in_batch, mask.sum())
        if model.training:
            self._check_finite_loss(loss, {"kd_loss": kd, "ce_loss": ce, "hidden_loss": hidden})
        if num_items_in_batch is not None and args.average_tokens_across_devices:
            # num_items_in_batch counts all ranks' tokens while DDP averages gradients over ranks: scale back up.
            loss = loss * self.accelerator.num_processes

        mode = "train" if model.training else "eval"
        self._components[mode] += torch.stack([kd.detach(), ce.detach(), hidden.detach(),
                                               mask.sum().to(kd.dtype)]).to(self._components[mode])
        return (loss, student_out) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        return super().prediction_step(model, inputs, prediction_loss_only=True, ignore_keys=ignore_keys)

    # ---------------------------------------------------------------------------------------------------
    # Logging
    # ---------------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if "loss" in logs else "eval" if "eval_loss" in logs else None
        if mode is not None:
            # Every rank logs at the same step, so this reduction is matched on all ranks.
            sums = self.accelerator.reduce(self._components[mode], reduction="sum").tolist()
            self._components[mode].zero_()
            tokens = max(sums[-1], 1.0)
            prefix = "" if mode == "train" else "eval_"
            active = {"kd": self.args.kd_weight > 0, "ce": True, "hidden": self.args.hidden_weight > 0}
            for name, value in zip(COMPONENTS, sums):
                if active[name]:
                    logs[f"{prefix}{name}_loss"] = value / tokens
        super().log(logs, start_time)
