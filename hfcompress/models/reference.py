"""Reference models: a byte-level BPE tokenizer and a small Llama teacher trained on the offline corpus.

They are the embedded defaults of the quickstart, the examples and the benchmarks, so that everything runs
with no download. Training is deterministic (fixed seeds, fixed data order) and cached under
``$HFCOMPRESS_HOME/reference/<size>`` (default ``~/.cache/hfcompress``); a second call reuses the cache.
The folder is a normal ``save_pretrained`` checkpoint (safetensors + tokenizer) that loads with
``AutoModelForCausalLM``/``AutoTokenizer``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..core.data import load_stdlib_corpus, pack_blocks, token_stream, utf8_bytes
from ..core.errors import ConfigError

logger = logging.getLogger(__name__)

COMPLETION_MARKER = "reference_metrics.json"
RESUME_EVERY = 100  # steps between saved training states (seconds of training for the small/base teachers)


@dataclass(frozen=True)
class ReferenceSpec:
    """Architecture and training budget of one reference teacher."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    context: int
    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int
    seed: int = 0
    # Bump when the spec changes, so a stale cache of the same size is not reused.
    revision: int = 1


REFERENCE_SPECS: dict[str, ReferenceSpec] = {
    # For tests and smoke runs: trains in well under a minute.
    "tiny": ReferenceSpec(vocab_size=512, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=192,
                          context=128, steps=300, batch_size=16, learning_rate=3e-3, warmup_steps=20),
    # The quickstart teacher: <= 5 minutes on 2 CPU cores.
    "small": ReferenceSpec(vocab_size=4096, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=352,
                           context=256, steps=600, batch_size=8, learning_rate=2e-3, warmup_steps=30),
    # The benchmark teacher: ~10.5M parameters, ~35 minutes on 2 idle CPU cores. Its MLP width (688) is not a
    # multiple of 128, which exercises the group-size fallback of int4 quantization. Revision 1 trained
    # 900 steps and was undertrained: a half-depth student initialised from it passed it on validation
    # perplexity after 400 more steps of plain cross-entropy, which capped what distillation could show.
    "base": ReferenceSpec(vocab_size=8192, hidden_size=256, num_layers=8, num_heads=8, intermediate_size=688,
                          context=256, steps=2000, batch_size=8, learning_rate=2e-3, warmup_steps=40,
                          revision=2),
}


def hfcompress_home() -> Path:
    return Path(os.environ.get("HFCOMPRESS_HOME", Path.home() / ".cache" / "hfcompress")).expanduser()


def reference_path(size: str) -> Path:
    return hfcompress_home() / "reference" / f"{size}-v{_spec(size).revision}"


def _spec(size: str) -> ReferenceSpec:
    if size not in REFERENCE_SPECS:
        raise ConfigError(f"unknown reference size {size!r}; choose one of {', '.join(REFERENCE_SPECS)}")
    return REFERENCE_SPECS[size]


def train_tokenizer(texts: list[str], vocab_size: int, model_max_length: int = 2048):
    """Train a byte-level BPE tokenizer (GPT-2 style pre-tokenization) -> ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|pad|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|pad|>",
        model_max_length=model_max_length,
    )


def build_llama(spec: ReferenceSpec, vocab_size: int, tokenizer=None):
    """A freshly initialised Llama with the spec's shapes (untied embeddings, so ``lm_head`` is its own)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.context,
        tie_word_embeddings=False,
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
        eos_token_id=getattr(tokenizer, "eos_token_id", None),
        pad_token_id=getattr(tokenizer, "pad_token_id", None),
    )
    torch.manual_seed(spec.seed)
    return LlamaForCausalLM(config)


def unigram_perplexity(train_blocks: torch.Tensor, eval_blocks: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of the add-one-smoothed unigram model fit on ``train_blocks`` — the floor to beat."""
    counts = torch.bincount(train_blocks.flatten(), minlength=vocab_size).double() + 1.0
    log_probs = torch.log(counts / counts.sum())
    # Score the same positions the LM is scored on (every token but the first of each block).
    return math.exp(-log_probs[eval_blocks[:, 1:].flatten()].mean().item())


def _lr_at(step: int, spec: ReferenceSpec) -> float:
    if step < spec.warmup_steps:
        return spec.learning_rate * (step + 1) / spec.warmup_steps
    progress = (step - spec.warmup_steps) / max(1, spec.steps - spec.warmup_steps)
    return spec.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# --------------------------------------------------------------------------------------------------------
# Resuming an interrupted training
# --------------------------------------------------------------------------------------------------------
def _json_spec(spec: ReferenceSpec) -> dict:
    return json.loads(json.dumps(asdict(spec)))


def save_training_state(folder: Path, spec: ReferenceSpec, next_step: int, model, optimizer,
                        generator: torch.Generator, order: torch.Tensor, train_seconds: float) -> None:
    """Everything the loop of :func:`train_reference` needs to continue exactly: weights, AdamW moments, the
    data-order generator and permutation, and the next step (the tokenizer and blocks are deterministic).
    Written atomically, as safetensors + JSON (no pickle)."""
    from safetensors.torch import save_file

    from ..core.atomic import atomic_folder

    tensors = {f"model.{name}": value.detach().contiguous() for name, value in model.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value).contiguous()
    tensors["generator"], tensors["order"] = generator.get_state(), order.contiguous()
    with atomic_folder(folder, overwrite=True, manifest=False) as staged:
        save_file(tensors, str(staged / "state.safetensors"))
        (staged / "progress.json").write_text(json.dumps({"spec": _json_spec(spec), "next_step": next_step,
                                                          "train_seconds": train_seconds}) + "\n")


def load_training_state(folder: Path, spec: ReferenceSpec, model, optimizer, generator: torch.Generator):
    """Restore a state written by :func:`save_training_state` into ``model``/``optimizer``/``generator``;
    returns ``(next_step, order, train_seconds)``, or None when there is none for this spec."""
    from safetensors.torch import load_file

    try:
        progress = json.loads((folder / "progress.json").read_text())
        tensors = load_file(str(folder / "state.safetensors"))
    except (OSError, ValueError) as exc:
        if folder.exists():
            logger.warning("ignoring the unreadable training state in %s (%s)", folder, exc)
        return None
    if progress.get("spec") != _json_spec(spec):
        logger.warning("ignoring the training state in %s: it was written for another spec", folder)
        return None
    model.load_state_dict({name[len("model."):]: value for name, value in tensors.items() if name.startswith("model.")})
    state = optimizer.state_dict()
    state["state"] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state["state"].setdefault(int(index), {})[key] = value
    optimizer.load_state_dict(state)
    generator.set_state(tensors["generator"])
    return int(progress["next_step"]), tensors["order"], float(progress["train_seconds"])


def train_reference(size: str, output_dir: Path, progress: bool = True, resume_dir: Path | None = None,
                    save_every: int = 100) -> dict:
    """Train the tokenizer and teacher of ``size`` into ``output_dir``; returns the metrics written beside.

    With ``resume_dir``, the training state is saved there every ``save_every`` steps and, when one is found
    at the start, training continues from it: the result is the same as an uninterrupted run's.
    """
    from .evaluate import perplexity

    spec = _spec(size)
    torch.manual_seed(spec.seed)
    corpus = load_stdlib_corpus()
    started = time.perf_counter()
    tokenizer = train_tokenizer(corpus["train"]["text"], spec.vocab_size, model_max_length=spec.context)
    train_blocks = pack_blocks(corpus["train"]["text"], tokenizer, spec.context)  # (N, T)
    val_blocks = pack_blocks(corpus["validation"]["text"], tokenizer, spec.context)
    model = build_llama(spec, len(tokenizer), tokenizer)
    model.train()

    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, betas=(0.9, 0.95),
                                  weight_decay=0.1)
    generator = torch.Generator().manual_seed(spec.seed)
    order = torch.randperm(train_blocks.shape[0], generator=generator)
    first_step, seconds_before = 0, 0.0
    restored = load_training_state(resume_dir, spec, model, optimizer, generator) if resume_dir else None
    if restored is not None:
        first_step, order, seconds_before = restored
        logger.warning("resuming the interrupted training of reference %r at step %d of %d", size, first_step,
                       spec.steps)
    started -= seconds_before
    bar = tqdm(range(first_step, spec.steps), desc=f"training reference '{size}'", disable=not progress,
               initial=first_step, total=spec.steps)
    loss_value = float("nan")
    for step in bar:
        start = (step * spec.batch_size) % order.numel()
        index = order[start:start + spec.batch_size]
        if index.numel() < spec.batch_size:  # wrap around: a new epoch with a new permutation
            order = torch.randperm(train_blocks.shape[0], generator=generator)
            index = order[:spec.batch_size]
        batch = train_blocks[index]
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, spec)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if resume_dir is not None and (step + 1) % save_every == 0 and step + 1 < spec.steps:
            save_training_state(resume_dir, spec, step + 1, model, optimizer, generator, order,
                                time.perf_counter() - started)
    train_seconds = time.perf_counter() - started

    model.eval()
    val_perplexity = perplexity(model, val_blocks, batch_size=8)
    val_texts = corpus["validation"]["text"]
    metrics = {
        "size": size,
        "spec": asdict(spec),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens": spec.steps * spec.batch_size * spec.context,
        "train_seconds": round(train_seconds, 1),
        "final_train_loss": loss_value,
        "validation_perplexity": val_perplexity,
        # Per-token perplexities of different vocabularies are not comparable; bits per byte is.
        "validation_bits_per_byte": math.log2(val_perplexity) * token_stream(val_texts, tokenizer).numel()
        / utf8_bytes(val_texts),
        "unigram_validation_perplexity": unigram_perplexity(train_blocks, val_blocks, len(tokenizer)),
        "torch_threads": torch.get_num_threads(),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    # Written last: its presence marks a finished cache (reference_model checks it before reusing one).
    (output_dir / COMPLETION_MARKER).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def reference_model(size: str = "small", force: bool = False, progress: bool = True) -> Path:
    """Path of the cached reference teacher of ``size``, training it first if needed.

    The folder is written atomically (:func:`hfcompress.core.atomic.atomic_folder`: trained into a staging
    sibling, ``reference_metrics.json`` written last, then renamed), so a cache is either complete or absent.
    A training killed part-way resumes from its last saved state (every 100 steps, in a hidden ``.resume``
    folder beside the cache) and says so in the log; ``force=True`` starts again from step 0.
    """
    from ..core.atomic import atomic_folder, interrupted_saves

    spec = _spec(size)
    target = reference_path(size)
    if (target / COMPLETION_MARKER).is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    resume_dir = target.parent / f".{target.name}.resume"
    if force:
        shutil.rmtree(resume_dir, ignore_errors=True)
    elif not resume_dir.exists() and interrupted_saves(target):
        logger.warning("an earlier training of reference %r was interrupted before its first saved state; "
                       "training restarts from step 0 (%d steps)", size, spec.steps)
    elif target.exists() and not resume_dir.exists():
        logger.warning("%s has no %s (an incomplete cache); retraining reference %r", target, COMPLETION_MARKER,
                       size)
    with atomic_folder(target, overwrite=True) as scratch:
        metrics = train_reference(size, scratch, progress=progress, resume_dir=resume_dir,
                                  save_every=RESUME_EVERY)
    shutil.rmtree(resume_dir, ignore_errors=True)
    logger.info("reference %s: validation perplexity %.2f (unigram %.1f) in %.0fs", size,
                metrics["validation_perplexity"], metrics["unigram_validation_perplexity"],
                metrics["train_seconds"])
    return target


def reference_metrics(size: str) -> dict:
    path = reference_path(size) / COMPLETION_MARKER
    return json.loads(path.read_text()) if path.is_file() else {}
