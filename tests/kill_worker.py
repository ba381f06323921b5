"""Worker of tests/test_kill_save.py: forks savers, SIGKILLs them, and classifies what each kill left.

Run as ``python tests/kill_worker.py TEACHER_DIR WORK_DIR SEED``; prints one JSON line
``{scenario: [outcome, ...]}``. Imports happen once here; every trial forks a child that saves in a loop
(or runs a recipe / a training) and is killed with SIGKILL after a random delay, or kills itself at an
injected point (inside the tokenizer save, just before the final rename, between the two renames of a
replacement, between the file moves of a final Trainer save). The parent then looks at the target:

* ``absent``: no target, or one without config.json (nothing loads it);
* ``previous``: loads, and is exactly the version saved before the interrupted one;
* ``complete``: loads, and is exactly the interrupted save's version (it finished just in time);
* ``broken:<why>``: anything else: loads with other weights, fails its manifest, misses files.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers import logging as hf_logging  # noqa: E402

from hfcompress.core import atomic  # noqa: E402
from hfcompress.core.manifest import check_manifest  # noqa: E402

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()


def tiny_llama(vocab: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def suicide() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------------------------------------
# Running and classifying one trial
# --------------------------------------------------------------------------------------------------------
def run_child(body, delay: float | None) -> list[str]:
    """Fork; the child runs ``body(report)`` forever (``report(text)`` writes a line to the parent) and is
    killed after ``delay`` seconds (None: it kills itself). Returns the lines it reported."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read_fd)
        out = os.fdopen(write_fd, "w", buffering=1)
        try:
            body(lambda text: out.write(text + "\n"))
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(3)  # a body that returns or raises: reported as no kill
    os.close(write_fd)
    if delay is not None:
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_fd) as handle:
        lines = handle.read().splitlines()
    if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
        raise RuntimeError(f"the child was not killed (status {status}); it reported {lines[-3:]}")
    return lines


def same_weights(model, expected: dict) -> bool:
    state = model.state_dict()
    return state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)


def classify(folder: Path, versions: list[dict], begun: int | None) -> str:
    """``versions[k]`` is the state dict save ``k`` writes; ``begun`` the last save the child started."""
    if not (folder / "config.json").is_file():
        return "absent"
    try:
        model = AutoModelForCausalLM.from_pretrained(folder)
        AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # a folder that claims to be a model but does not load is broken
        return f"broken:does not load ({type(exc).__name__})"
    integrity = check_manifest(folder)
    if not integrity.has_manifest or integrity.problems:
        return f"broken:manifest {integrity.problems[:1] or integrity.notes[:1]}"
    if begun is not None and same_weights(model, versions[begun % len(versions)]):
        return "complete"
    if begun is not None and begun > 0 and same_weights(model, versions[(begun - 1) % len(versions)]):
        return "previous"
    return "broken:other weights"


def last_begun(lines: list[str]) -> int | None:
    begun = [int(line.split()[1]) for line in lines if line.startswith("begin ")]
    return begun[-1] if begun else None


# --------------------------------------------------------------------------------------------------------
# Scenarios
# --------------------------------------------------------------------------------------------------------
def save_checkpoint_trials(work: Path, tokenizer, rng: random.Random) -> dict[str, list[str]]:
    """save_checkpoint(overwrite=True) in a loop over two versions; killed at random times and at injected
    points."""
    from hfcompress.quantization.saving import save_checkpoint

    models = [tiny_llama(len(tokenizer), seed) for seed in (1, 2)]
    versions = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    start = time.perf_counter()
    save_checkpoint(models[0], work / "timing", tokenizer=tokenizer, max_shard_size="100KB")
    seconds = time.perf_counter() - start

    outcomes: dict[str, list[str]] = {}

    def loop(target: Path, inject=None):
        def body(report):
            if inject is not None:
                inject()
            k = 1  # save 0 was written before the fork
            while True:
                report(f"begin {k}")
                save_checkpoint(models[k % 2], target, tokenizer=tokenizer, max_shard_size="100KB", overwrite=True)
                k += 1
        return body

    def trial(name: str, index: int, delay: float | None, inject=None):
        target = work / f"{name}-{index}"
        save_checkpoint(models[0], target, tokenizer=tokenizer, max_shard_size="100KB")
        lines = run_child(loop(target, inject), delay)
        begun = last_begun(lines)
        outcome = classify(target, versions, begun)
        if name == "swap-interrupted":
            # The replacement died between its two renames: the next save (here: its cleanup) restores it.
            atomic.clean_stale(target)
            outcome += "+restored:" + classify(target, versions, begun)
        outcomes.setdefault(name, []).append(outcome)

    for index in range(10):  # random moments over about two saves
        trial("quantize-random", index, rng.uniform(0.0, 2.0 * seconds) + 0.05)

    def kill_in_tokenizer_save():
        original = type(tokenizer).save_pretrained

        def save_then_die(self, *args, **kwargs):
            files = original(self, *args, **kwargs)
            suicide()
            return files
        type(tokenizer).save_pretrained = save_then_die

    def kill_before_rename():
        original = atomic.publish

        def die_in_publish(staged, target, **kwargs):
            atomic.write_manifest(staged)
            suicide()  # everything written, manifest included: only the rename is missing
            return original(staged, target, **kwargs)
        atomic.publish = die_in_publish

    def kill_between_renames():
        atomic._exchange = lambda a, b: False  # as on a system without renameat2: two renames
        original = atomic.os.replace
        calls = []

        def replace_then_die(src, dst):
            original(src, dst)
            calls.append(dst)
            if ".old-" in Path(dst).name:  # the target was moved aside, the new one is not in yet
                suicide()
        atomic.os.replace = replace_then_die

    for index in range(2):
        trial("tokenizer-save", index, None, kill_in_tokenizer_save)
        trial("before-rename", index, None, kill_before_rename)
        trial("swap-interrupted", index, None, kill_between_renames)
    return outcomes


def trainer_trials(work: Path, teacher_dir: str, tokenizer, rng: random.Random) -> dict[str, list[str]]:
    """DistillationTrainer: the final save_model into a folder with checkpoints, and checkpoints mid-training."""
    from transformers.trainer_utils import get_last_checkpoint

    from hfcompress import DistillationConfig, DistillationTrainer, make_student
    from hfcompress.core.data import BlockDataset

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    blocks = torch.randint(0, len(tokenizer), (64, 16), generator=torch.Generator().manual_seed(0))

    def trainer_for(output: Path, **kwargs):
        torch.manual_seed(0)
        args = DistillationConfig(output_dir=str(output), report_to=[], use_cpu=True, disable_tqdm=True,
                                  per_device_train_batch_size=2, logging_steps=1000, loss_chunk_size=16,
                                  **{"save_strategy": "no", "max_steps": 1, **kwargs})
        return DistillationTrainer(model=make_student(teacher, num_layers=1), teacher_model=teacher, args=args,
                                   train_dataset=BlockDataset(blocks), processing_class=tokenizer)

    outcomes: dict[str, list[str]] = {}
    # Final save_model over a previous one, in a folder that also holds a checkpoint that must survive.
    base = trainer_for(work / "final-timing")
    base.train()
    versions = [{k: v.clone() for k, v in base.model.state_dict().items()}]
    versions.append({k: v + 0.5 for k, v in versions[0].items()})
    start = time.perf_counter()
    base.save_model()
    seconds = time.perf_counter() - start

    def final_loop(trainer, inject=None):
        def body(report):
            if inject is not None:
                inject()
            k = 1
            while True:
                report(f"begin {k}")
                trainer.model.load_state_dict(versions[k % 2])
                trainer.save_model()
                k += 1
        return body

    def kill_mid_move():
        original = atomic.os.replace
        moved = []

        def replace_then_maybe_die(src, dst):
            original(src, dst)
            moved.append(dst)
            if len(moved) == 3:  # some of the new files are in, config.json is not
                suicide()
        atomic.os.replace = replace_then_maybe_die

    for index in range(7):
        folder = work / f"final-{index}"
        trainer = trainer_for(folder, save_strategy="steps", save_steps=1)
        trainer.train()  # writes checkpoint-1
        trainer.model.load_state_dict(versions[0])
        trainer.save_model()
        injected = index >= 4
        lines = run_child(final_loop(trainer, kill_mid_move if injected else None),
                          None if injected else rng.uniform(0.0, 2.0 * seconds) + 0.05)
        outcome = classify(folder, versions, last_begun(lines))
        if not (folder / "checkpoint-1" / "config.json").is_file():
            outcome = "broken:checkpoint-1 lost"
        outcomes.setdefault("distill-save_model" + ("-mid-move" if injected else "-random"), []).append(outcome)

    # Checkpoints while training: whatever a kill leaves, the latest checkpoint-N is complete.
    for index in range(4):
        folder = work / f"train-{index}"
        trainer = trainer_for(folder, save_strategy="steps", save_steps=1, max_steps=10_000)
        lines = run_child(lambda report: trainer.train(), rng.uniform(0.5, 2.5))
        last = get_last_checkpoint(str(folder)) if folder.is_dir() else None
        if last is None:
            outcomes.setdefault("distill-checkpoint", []).append("absent")
            continue
        last = Path(last)
        needed = ["config.json", "model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                  "trainer_state.json"]
        missing = [name for name in needed if not (last / name).is_file()]
        integrity = check_manifest(last)
        if missing or integrity.problems or not integrity.has_manifest:
            outcomes.setdefault("distill-checkpoint", []).append(f"broken:{last.name} {missing or integrity.problems}")
            continue
        state = json.loads((last / "trainer_state.json").read_text())
        ok = state["global_step"] == int(last.name.split("-")[1])
        outcomes.setdefault("distill-checkpoint", []).append("complete" if ok else "broken:trainer_state step")
    return outcomes


def recipe_trials(work: Path, teacher_dir: str, rng: random.Random) -> dict[str, list[str]]:
    """A recipe killed during its stages: in the run it interrupted, each stage folder is absent or finished
    (marker, loads, manifest); "absent" when the stage in flight left nothing."""
    from hfcompress.runs.recipe import parse_recipe
    from hfcompress.runs.runner import STAGE_MARKER, run_recipe

    recipe = parse_recipe({"name": "kill", "model": teacher_dir, "stages": [
        {"quantize": {"name": "int8", "method": "rtn", "bits": 8, "group_size": None}},
        {"quantize": {"name": "bf16", "method": "cast", "dtype": "bfloat16", "input": "model"}}]})
    outcomes = []
    for index in range(4):
        run_dir = work / f"run-{index}"

        def body(report):
            for k in range(10_000):
                report(f"begin {k}")
                run_recipe(recipe, output=run_dir / f"{k}", progress=False)
        begun = last_begun(run_child(body, rng.uniform(0.3, 3.0)))
        if begun is None:
            outcomes.append("absent")
            continue
        problems, stages = [], sorted((run_dir / str(begun)).glob("0*"))  # the run in flight
        for stage_dir in stages:
            problems += [f"{stage_dir.name}: {p}" for p in check_manifest(stage_dir).problems]
            if not (stage_dir / STAGE_MARKER).is_file():
                problems.append(f"{stage_dir.name}: no {STAGE_MARKER}")
            try:
                AutoModelForCausalLM.from_pretrained(stage_dir)
            except Exception as exc:
                problems.append(f"{stage_dir.name}: does not load ({type(exc).__name__})")
        outcomes.append(f"broken:{problems}" if problems else "complete" if len(stages) == 2 else "absent")
    return {"recipe-stage": outcomes}


def main() -> None:
    teacher_dir, work, seed = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    outcomes = {}
    outcomes.update(save_checkpoint_trials(work / "quantize", tokenizer, rng))
    outcomes.update(trainer_trials(work / "distill", teacher_dir, tokenizer, rng))
    outcomes.update(recipe_trials(work / "recipe", teacher_dir, rng))
    print(json.dumps(outcomes))


if __name__ == "__main__":
    main()
