"""``DistillationTrainer``: a ``transformers.Trainer`` whose loss is distillation from a frozen teacher.

What it overrides and why:

* ``__init__`` loads/freezes/places the teacher, checks the vocabularies, builds the hidden-state
  projections, and makes the Trainer count the step's predicted tokens (``num_items_in_batch``).
* ``compute_loss`` runs both models and sums the losses of :mod:`hfcompress.distillation.losses` over the
  predicted tokens, divided by the step's token count (exact under gradient accumulation and DDP).
* ``create_optimizer`` adds the projections as one more parameter group (so their optimizer state is
  checkpointed and restored with the rest); ``train`` restores their weights on resume; a callback writes
  them beside each checkpoint (never into the student).
* ``log`` adds the per-loss components (``kd_loss``, ``ce_loss``, ``hidden_loss``: per-token means over
  the logging window, over all ranks).
* ``prediction_step`` evaluates the loss only (the chunked loss never builds full logits to return).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..core.errors import ConfigError, DataError, ModelLoadError
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
    freeze,
    gathered_head,
    lm_head,
    load_teacher,
    prepare_teacher,
    teacher_tokenizer,
    unwrap,
)

logger = logging.getLogger(__name__)

COMPONENTS = ("kd", "ce", "hidden")


class _ProjectionsCallback(TrainerCallback):
    """Clears the projections' gradients after each optimizer step (the Trainer clears only the student's)
    and writes the projections into each checkpoint folder, next to (not inside) the student."""

    def __init__(self, trainer: "DistillationTrainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.hidden_projections.zero_grad(set_to_none=True)

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if args.should_save and os.path.isdir(folder):
            save_projections(self.trainer.hidden_projections, folder)


class DistillationTrainer(Trainer):
    """Train ``model`` (the student) to match ``teacher_model`` under :class:`DistillationConfig`.

    ``model`` / ``teacher_model``: a model, or a path / Hub id / ``reference:<size>`` (the teacher is loaded
    with ``args.teacher_model_init_kwargs``). Datasets yield ``input_ids``/``attention_mask``/``labels``
    (``labels == -100`` marks tokens not to predict), e.g. :class:`hfcompress.core.data.BlockDataset`. Other
    arguments are those of ``transformers.Trainer``. ``args.mode`` other than ``live`` (``cache`` with
    ``teacher_cache=DIR``, ``online``, ``self``) is set up and computed by :mod:`.modes`.
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

            return setup_trainer(self, model, teacher_model, teacher_cache, args, dict(
                data_collator=data_collator, train_dataset=train_dataset, eval_dataset=eval_dataset,
                processing_class=processing_class, **kwargs))
        if model is None or teacher_model is None:
            raise ConfigError("DistillationTrainer needs both model (the student) and teacher_model")
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            if dataset is not None and hasattr(dataset, "__len__") and len(dataset) == 0:
                raise DataError(f"{name} is empty: distillation needs at least one example")
        if isinstance(model, (str, os.PathLike)):
            from ..models.loading import load_model

            model = load_model(os.fspath(model))
        teacher = freeze(load_teacher(teacher_model, args.teacher_model_init_kwargs))
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        # Our loss takes `num_items_in_batch`; this makes the Trainer count it (labels[..., 1:] != -100, summed
        # over the accumulation micro-batches and, with average_tokens_across_devices, over the ranks) and not
        # rescale the loss by the number of accumulation steps again.
        self.model_accepts_loss_kwargs = True

        self.spec = LogitLoss(loss=args.loss, temperature=args.temperature, kd_weight=args.kd_weight,
                              ce_weight=args.ce_weight, beta=args.beta, skew_alpha=args.skew_alpha)
        self.vocab_rows = check_vocabularies(self.model, teacher, processing_class, teacher_tokenizer(teacher_model))
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

        self._check_heads = args.loss_chunk_size > 0
        self._accepts_logits_to_keep = "logits_to_keep" in inspect.signature(unwrap(self.model).forward).parameters
        self._components = {mode: torch.zeros(len(COMPONENTS) + 1, dtype=torch.float64, device=args.device)
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
        projections = self.hidden_projections
        if resume_from_checkpoint and projections is not None and projections.has_parameters():
            folder = resume_from_checkpoint
            if folder is True:
                folder = get_last_checkpoint(self.args.output_dir)
                if folder is None:
                    raise ModelLoadError(f"resume_from_checkpoint=True but {self.args.output_dir} has no "
                                         f"checkpoint-* folder")
            if load_projections(projections, folder):
                logger.info("restored hidden-state projections from %s", folder)
            else:
                logger.warning("%s has no hidden-state projections; they start from their initialisation", folder)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)

    # ---------------------------------------------------------------------------------------------------
    # The loss
    # ---------------------------------------------------------------------------------------------------
    def _forward(self, model, inputs: dict, need_hidden: bool):
        kwargs = {"output_hidden_states": True} if need_hidden else {}
        if self.args.loss_chunk_size > 0 and self._accepts_logits_to_keep:
            # The chunked loss projects hidden states itself: skip the model's own (B, T, V) logits, except for
            # the last position of the first batch, kept to check that our LM head reproduces them.
            kwargs["logits_to_keep"] = 1 if self._check_heads else torch.empty(0, dtype=torch.long)
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
        chunked = args.loss_chunk_size > 0
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
        if num_items_in_batch is not None and args.average_tokens_across_devices:
            # num_items_in_batch counts all ranks' tokens while DDP averages gradients over ranks: scale back up.
            loss = loss * self.accelerator.num_processes

        mode = "train" if model.training else "eval"
        self._components[mode] += torch.stack([kd.detach(), ce.detach(), hidden.detach(),
                                               mask.sum().to(kd.dtype)]).to(torch.float64)
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
