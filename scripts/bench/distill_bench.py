#!/usr/bin/env python
"""Distillation benchmark: (a) quality against cross-entropy training, (b) memory of the chunked loss,
(c) training speed against TRL's GKDTrainer.

    python scripts/bench/distill_bench.py --reference base --out scripts/bench/results/distill_base.json

(a) From the reference teacher, a student with half the layers (every other teacher layer, make_student)
    is trained for the same steps on the same token blocks in the same order, once with cross-entropy only
    and once per distillation variant; held-out perplexity (stdlib validation and test splits) is compared.
    ``--budgets`` repeats the CE baseline and the default recipe at other step counts.
(b) The logit loss over B·T = 8192 positions with a 32k vocabulary (student width 512, teacher 1024), forward
    + backward, in a fresh subprocess per variant; peak memory = growth of the peak RSS over the inputs.
(c) Tokens/s and peak RSS of a training run with DistillationTrainer vs trl's GKDTrainer (lmbda=0: no
    generation, i.e. the same off-policy distillation on the same batches), same teacher/student/data.

Prints markdown tables and writes everything to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import torch

ROOT = Path(__file__).resolve().parents[2]

# name -> (what it is, DistillationConfig overrides on top of COMMON). "ce" is the baseline.
QUALITY_VARIANTS: dict[str, tuple[str, dict]] = {
    "ce": ("cross-entropy only (baseline)", dict(kd_weight=0.0, ce_weight=1.0, hidden_weight=0.0)),
    "fkl": ("forward KL, T=1", dict(loss="forward_kl", kd_weight=1.0, ce_weight=0.0, hidden_weight=0.0)),
    "fkl_t2": ("forward KL, T=2", dict(loss="forward_kl", temperature=2.0, kd_weight=1.0, ce_weight=0.0,
                                       hidden_weight=0.0)),
    "fkl_ce": ("0.5 forward KL + 0.5 CE", dict(loss="forward_kl", kd_weight=0.5, ce_weight=0.5, hidden_weight=0.0)),
    "rkl_ce": ("0.5 reverse KL + 0.5 CE", dict(loss="reverse_kl", kd_weight=0.5, ce_weight=0.5, hidden_weight=0.0)),
    "jsd_ce": ("0.5 JSD(β=0.5) + 0.5 CE", dict(loss="jsd", beta=0.5, kd_weight=0.5, ce_weight=0.5,
                                               hidden_weight=0.0)),
    "sfkl_ce": ("0.5 skew forward KL(α=0.1) + 0.5 CE", dict(loss="skew_forward_kl", kd_weight=0.5, ce_weight=0.5,
                                                           hidden_weight=0.0)),
    "tvd_ce": ("0.5 TVD + 0.5 CE", dict(loss="tvd", kd_weight=0.5, ce_weight=0.5, hidden_weight=0.0)),
    "fkl_ce_cos": ("0.5 forward KL + 0.5 CE + 1.0 cosine hidden (uniform map)",
                   dict(loss="forward_kl", kd_weight=0.5, ce_weight=0.5, hidden_weight=1.0, hidden_loss="cosine")),
    "fkl_ce_mse": ("0.5 forward KL + 0.5 CE + 1.0 MSE hidden (uniform map)",
                   dict(loss="forward_kl", kd_weight=0.5, ce_weight=0.5, hidden_weight=1.0, hidden_loss="mse")),
    "prev_default": ("previous defaults: 1.0 forward KL + 0.5 CE + 3 cosine hidden",
                     dict(loss="forward_kl", temperature=1.0, kd_weight=1.0, ce_weight=0.5, hidden_weight=3.0,
                          hidden_loss="cosine")),
    "default": ("DistillationConfig defaults (1.0 forward KL + 0.5 CE + 10 cosine hidden)", dict()),
}

# What a quality run's result depends on besides the data: the cache key of --cache.
RESOLVED_FIELDS = ("loss", "temperature", "kd_weight", "ce_weight", "beta", "skew_alpha", "hidden_weight",
                   "hidden_loss", "layer_map", "loss_chunk_size", "learning_rate", "lr_scheduler_type", "warmup_steps",
                   "weight_decay", "per_device_train_batch_size", "gradient_accumulation_steps", "seed",
                   "max_grad_norm", "adam_beta1", "adam_beta2", "optim")

COMMON = dict(per_device_train_batch_size=8, learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=0.05,
              weight_decay=0.0, logging_steps=10, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
              seed=0, train_sampling_strategy="sequential")


def machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}


TABLES: list[str] = []  # every printed table, in order; saved as out["markdown"] for run.py's RESULTS.md


def emit(title: str, table: str) -> None:
    TABLES.append(f"{title}\n\n{table}\n")
    print(f"\n{title}\n\n{table}", flush=True)


def save(cli, out: dict) -> None:
    """Write what is measured so far (the quality section runs for hours; a stopped run keeps its rows)."""
    if cli.out:
        cli.out.parent.mkdir(parents=True, exist_ok=True)
        cli.out.write_text(json.dumps({**out, "markdown": "\n".join(TABLES)}, indent=2, default=str) + "\n")


def markdown(headers: list[str], rows: list[list]) -> str:
    def cell(value):
        if isinstance(value, float):
            if abs(value) < 100:
                return f"{value:.3f}"
            return f"{value:.2f}" if abs(value) < 1000 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# (a) quality
# --------------------------------------------------------------------------------------------------------
class Quality:
    def __init__(self, reference: str, block_size: int, max_blocks: int, eval_blocks: int,
                 cache_path: Path | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from hfcompress.core.data import load_blocks
        from hfcompress.models.reference import reference_model

        self.reference, self.block_size, self.num_eval_blocks = reference, block_size, eval_blocks
        self.cache_path = cache_path
        self.cache = None if cache_path is None else {}
        if cache_path and cache_path.is_file():
            for key, result in json.loads(cache_path.read_text()).items():
                self.cache[_normal_key(json.loads(key))] = result
        self.teacher_dir = reference_model(reference)
        self.tokenizer = AutoTokenizer.from_pretrained(self.teacher_dir)
        self.teacher = AutoModelForCausalLM.from_pretrained(self.teacher_dir).eval()
        self.train_blocks = load_blocks("stdlib", self.tokenizer, block_size, split="train", num_blocks=max_blocks,
                                        seed=0)
        self.eval_blocks = {split: load_blocks(f"stdlib:{split}", self.tokenizer, block_size, num_blocks=eval_blocks,
                                               seed=1) for split in ("validation", "test")}

    def perplexities(self, model) -> dict:
        from hfcompress.models.evaluate import perplexity

        return {split: perplexity(model, blocks, batch_size=16) for split, blocks in self.eval_blocks.items()}

    def run(self, name: str, overrides: dict, steps: int, output_dir: Path, student_layers=None) -> dict:
        from hfcompress import DistillationConfig, DistillationTrainer, make_student
        from hfcompress.core.data import BlockDataset
        from hfcompress.distillation.hidden import num_layers

        layers = student_layers or max(1, num_layers(self.teacher) // 2)
        settings = {**COMMON, **overrides}
        args = DistillationConfig(output_dir=str(output_dir / name), max_steps=steps, **settings)
        key = self.cache_key(args, steps, layers)
        if self.cache is not None and key in self.cache:
            cached = dict(self.cache[key])
            print(f"  ({name}: cached result of an identical run)", flush=True)
            return {**cached, "variant": name, "cached": True}
        torch.manual_seed(0)
        student = make_student(self.teacher, num_layers=layers)
        blocks = self.train_blocks[: steps * args.per_device_train_batch_size]
        trainer = DistillationTrainer(model=student, teacher_model=self.teacher, args=args,
                                      train_dataset=BlockDataset(blocks), processing_class=self.tokenizer)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        result = {"variant": name, "steps": steps, "train_tokens": int(blocks.numel()), "seconds": seconds,
                  "settings": {k: v for k, v in settings.items() if k not in ("report_to",)},
                  "resolved": {k: getattr(args, k) for k in RESOLVED_FIELDS},
                  "last_log": logs[-1] if logs else {}, **self.perplexities(student)}
        if self.cache is not None:
            self.cache[key] = result
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            self.cache_path.write_text(json.dumps(self.cache, indent=1, default=str) + "\n")
        return result

    def is_cached(self, overrides: dict, steps: int, student_layers=None) -> bool:
        from hfcompress import DistillationConfig
        from hfcompress.distillation.hidden import num_layers

        args = DistillationConfig(output_dir="unused", max_steps=steps, **{**COMMON, **overrides})
        layers = student_layers or max(1, num_layers(self.teacher) // 2)
        return self.cache is not None and self.cache_key(args, steps, layers) in self.cache

    def cache_key(self, args, steps: int, layers: int) -> str:
        """Everything that determines a run's result: the resolved objective (defaults included), the training
        arguments that matter, the data and the evaluation. Runs are deterministic (seed 0, one thread,
        sequential batches), so an identical key gives the identical result."""
        fields = {k: getattr(args, k) for k in RESOLVED_FIELDS}
        from hfcompress.models.reference import REFERENCE_SPECS

        revision = REFERENCE_SPECS[self.reference].revision  # another teacher revision is another run
        return _normal_key({"reference": self.reference, **({"revision": revision} if revision > 1 else {}),
                            "steps": steps, "layers": layers,
                            "block_size": self.block_size, "eval_blocks": self.num_eval_blocks, **fields})


def _normal_key(fields: dict) -> str:
    """JSON of the fields with every number as a float, so hidden_weight=10 and 10.0 are the same run."""
    fields = {k: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
              for k, v in fields.items()}
    return json.dumps(fields, sort_keys=True, default=str)


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def variant(spec: str) -> tuple[str, dict]:
    """``name`` or ``name:key=value:key=value`` (overrides on top of the named variant, e.g. ce:learning_rate=3e-3)."""
    name, *extra = spec.split(":")
    description, overrides = QUALITY_VARIANTS[name]
    changes = dict(item.split("=", 1) for item in extra)
    if changes:
        description += " (" + ", ".join(f"{k}={v}" for k, v in changes.items()) + ")"
    return description, {**overrides, **{k: _value(v) for k, v in changes.items()}}


def is_baseline(name: str) -> bool:
    """CE-only runs: 'ce' and its overrides ('ce:learning_rate=2e-3'); the best of them is the baseline."""
    return name.split(":")[0] == "ce"


def best_baseline(runs: dict) -> str:
    return min((name for name in runs if is_baseline(name)), key=lambda name: runs[name]["validation"])


def quality_section(cli, out: dict) -> None:
    budgets = sorted({cli.steps, *cli.budgets})
    bench = Quality(cli.reference, cli.block_size, max(budgets) * COMMON["per_device_train_batch_size"],
                    cli.eval_blocks, cache_path=cli.cache)
    teacher_ppl = bench.perplexities(bench.teacher)
    print(f"teacher {cli.reference}: validation ppl {teacher_ppl['validation']:.2f}, test {teacher_ppl['test']:.2f}",
          flush=True)
    work = ROOT / "scripts" / "bench" / "work" / "distill"
    names = cli.variants.split(",") if cli.variants else list(QUALITY_VARIANTS)
    if not any(is_baseline(name) for name in names):
        names.insert(0, "ce")

    def train(name: str, steps: int) -> dict:
        description, overrides = variant(name)
        result = bench.run(name.replace(":", "_").replace("=", ""), overrides, steps, work, cli.student_layers)
        result["description"] = description
        return result

    runs = {}
    for name in names:
        runs[name] = train(name, cli.steps)
        base = runs[best_baseline(runs)]
        print(f"  {name:12s} val {runs[name]['validation']:.3f}  test {runs[name]['test']:.3f}  "
              f"ratio {runs[name]['validation'] / base['validation']:.3f}  ({runs[name]['seconds']:.0f}s)",
              flush=True)
        out["quality_partial"] = runs
        save(cli, out)
    # Token-budget sweep: the budget variants (CE baselines and distillation recipes) at every step count.
    budget_names = cli.budget_variants.split(",") if cli.budget_variants else ["ce", "default"]
    if not any(is_baseline(name) for name in budget_names):
        budget_names.insert(0, "ce")
    budget_runs = []
    for steps in budgets if len(budgets) > 1 else []:
        at = {}
        for name in budget_names:
            if steps == cli.steps and name in runs:
                at[name] = runs[name]
            elif not cli.budget_cached_only or bench.is_cached(variant(name)[1], steps, cli.student_layers):
                at[name] = train(name, steps)
        base = best_baseline(at)
        print(f"  budget {steps}: " + ", ".join(f"{n} {r['validation']:.2f}" for n, r in at.items())
              + f" (baseline {base})", flush=True)
        budget_runs.append({"steps": steps, "tokens": steps * COMMON["per_device_train_batch_size"] * cli.block_size,
                            "baseline": base, "runs": at})
        out["budgets_partial"] = budget_runs
        save(cli, out)
    out.pop("quality_partial", None)
    out.pop("budgets_partial", None)
    baseline = best_baseline(runs)
    out["quality"] = {"reference": cli.reference, "teacher": teacher_ppl, "steps": cli.steps,
                      "tokens_per_step": COMMON["per_device_train_batch_size"] * cli.block_size,
                      "baseline": baseline, "runs": runs, "budgets": budget_runs}
    ce = runs[baseline]
    rows = [[name, run["description"], f'{run["settings"].get("learning_rate"):g}', run["validation"], run["test"],
             run["validation"] / ce["validation"], run["test"] / ce["test"]] for name, run in runs.items()]
    depth = f"{cli.student_layers} layers" if cli.student_layers else "half the layers"
    emit(f"### Quality: {cli.reference} teacher (val ppl {teacher_ppl['validation']:.2f}, test "
         f"{teacher_ppl['test']:.2f}), student with {depth}, {cli.steps} steps x "
         f"{COMMON['per_device_train_batch_size']}x{cli.block_size} tokens; ratios vs the best CE-only run "
         f"(`{baseline}`)",
         markdown(["variant", "objective", "lr", "val ppl", "test ppl", "val ratio vs CE", "test ratio vs CE"], rows))
    if budget_runs:
        headers = ["steps", "tokens", "best CE", "best CE val ppl"]
        for name in budget_names:
            headers += [f"`{name}` val ppl"] + ([] if is_baseline(name) else [f"`{name}` ratio"])
        rows = []
        for entry in budget_runs:
            base = entry["runs"][entry["baseline"]]["validation"]
            row = [entry["steps"], entry["tokens"], entry["baseline"], base]
            for name in budget_names:
                run = entry["runs"].get(name)
                row += [run["validation"] if run else "—"]
                if not is_baseline(name):
                    row += [run["validation"] / base if run else "—"]
            rows.append(row)
        emit("### Ratio vs token budget (validation perplexity; ratios vs the best CE-only run at that budget)",
             markdown(headers, rows))


# --------------------------------------------------------------------------------------------------------
# (b) memory of the loss step
# --------------------------------------------------------------------------------------------------------
def _reset_peak_rss() -> bool:
    """Linux: reset this process's peak-RSS counter (VmHWM) to its current RSS; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_child(variant: str, positions: int, vocab: int, student_width: int, teacher_width: int) -> dict:
    """Run one loss step (forward + backward) and report the growth of the peak RSS over the inputs.

    ``chunk_<n>``: the chunked loss (hfcompress's fused CPU kernel when built); ``chunk_<n>_eager``: the same
    with the kernel switched off (PyTorch's operators), for the time and memory the kernel saves."""
    if variant.endswith("_eager"):
        os.environ["HFCOMPRESS_NATIVE_KERNELS"] = "0"
    import psutil

    from hfcompress.distillation.losses import LMHead, LogitLoss, chunked_logit_loss, logit_loss_from_logits

    torch.manual_seed(0)
    student_hidden = torch.randn(positions, student_width, requires_grad=True)
    teacher_hidden = torch.randn(positions, teacher_width)
    student_weight = (torch.randn(vocab, student_width) * student_width ** -0.5).requires_grad_(True)
    teacher_weight = torch.randn(vocab, teacher_width) * teacher_width ** -0.5
    targets = torch.randint(0, vocab, (positions,))
    spec = LogitLoss(loss="forward_kl", temperature=1.0, kd_weight=0.5, ce_weight=0.5)
    # Touch the gradient buffers first, so both variants start from the same resident memory.
    student_hidden.grad = torch.zeros_like(student_hidden)
    student_weight.grad = torch.zeros_like(student_weight)
    baseline_rss = psutil.Process().memory_info().rss
    # Linux: reset the peak-RSS counter (VmHWM) to the current RSS, so the peak measured below is the loss
    # step's alone (without the reset, a step that stays under the peak of building its inputs reads 0).
    reset = _reset_peak_rss()
    baseline_peak = common.peak_rss_bytes()  # VmHWM (ru_maxrss where /proc is missing)
    started = time.perf_counter()
    if variant == "unchunked":
        student_logits = student_hidden @ student_weight.T  # (N, V) float32
        with torch.no_grad():
            teacher_logits = teacher_hidden @ teacher_weight.T
        total, _, _ = logit_loss_from_logits(student_logits, teacher_logits, targets, spec)
    else:
        chunk = int(variant.split("_")[1])
        total, _, _ = chunked_logit_loss(student_hidden, LMHead(student_weight), targets, spec, teacher_hidden,
                                         LMHead(teacher_weight), chunk_size=chunk)
    (total / positions).backward()
    seconds = time.perf_counter() - started
    peak = common.peak_rss_bytes()
    return {"variant": variant, "peak_growth_bytes": peak - max(baseline_rss, baseline_peak), "peak_reset": reset,
            "inputs_bytes": baseline_rss, "seconds": seconds, "loss": total.item() / positions}


def memory_section(cli, out: dict) -> None:
    variants = ["unchunked", "chunk_4096", "chunk_2048", "chunk_1024", "chunk_512", "chunk_256", "chunk_1024_eager",
                "chunk_512_eager"]
    results = []
    for variant in variants:
        results.append(common.run_json_child([sys.executable, __file__, "--memory-child", variant],
                                             f"memory child {variant}", timeout=1800))
        print(f"  {variant:11s} peak +{results[-1]['peak_growth_bytes'] / 2**20:,.0f} MiB "
              f"in {results[-1]['seconds']:.1f}s", flush=True)
    unchunked = results[0]["peak_growth_bytes"]
    for result in results:
        result["ratio_vs_unchunked"] = result["peak_growth_bytes"] / unchunked
    out["memory"] = {"positions": 8192, "vocab": 32000, "student_width": 512, "teacher_width": 1024,
                     "loss": "0.5 forward KL + 0.5 CE", "results": results}
    emit("### Memory of one loss step (forward+backward), N=8192 positions, V=32000, H_s=512, H_t=1024",
         markdown(["variant", "peak growth (MiB)", "ratio vs unchunked", "seconds", "loss"],
                   [[r["variant"], r["peak_growth_bytes"] / 2**20, r["ratio_vs_unchunked"], r["seconds"], r["loss"]]
                    for r in results]))


# --------------------------------------------------------------------------------------------------------
# (c) speed against TRL
# --------------------------------------------------------------------------------------------------------
def speed_child(trainer_name: str, reference: str, steps: int, batch: int, block_size: int, beta: float) -> dict:
    """Train `steps` steps with one trainer; tokens/s over the steps after the first two; peak RSS."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, default_data_collator

    from hfcompress import make_student
    from hfcompress.core.data import BlockDataset, load_blocks
    from hfcompress.distillation.hidden import num_layers
    from hfcompress.models.reference import reference_model

    teacher_dir = reference_model(reference)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    torch.manual_seed(0)
    student = make_student(teacher, num_layers=max(1, num_layers(teacher) // 2))
    blocks = load_blocks("stdlib:validation", tokenizer, block_size, num_blocks=steps * batch, seed=0)
    # TRL's trainers take a `datasets.Dataset`; both trainers get the same one.
    dataset = datasets.Dataset.from_dict({key: [row[key].tolist() for row in BlockDataset(blocks)]
                                          for key in ("input_ids", "attention_mask", "labels")})
    dataset.set_format("torch")

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())

    timer = StepTimer()
    common = dict(output_dir=str(ROOT / "scripts" / "bench" / "work" / "distill-speed" / trainer_name), max_steps=steps,
                  per_device_train_batch_size=batch, learning_rate=1e-4, logging_steps=steps, save_strategy="no",
                  report_to=[], use_cpu=True, disable_tqdm=True, seed=0, train_sampling_strategy="sequential")
    if trainer_name == "hfcompress":
        from hfcompress import DistillationConfig, DistillationTrainer

        args = DistillationConfig(loss="jsd", beta=beta, temperature=1.0, kd_weight=1.0, ce_weight=0.0, **common)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                                      processing_class=tokenizer, data_collator=default_data_collator,
                                      callbacks=[timer])
    else:
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        args = GKDConfig(lmbda=0.0, beta=beta, temperature=1.0, seq_kd=False, max_length=block_size, **common)
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                             processing_class=tokenizer, data_collator=default_data_collator, callbacks=[timer])
    trainer.train()
    steady = timer.times[2:]
    seconds = steady[-1] - steady[0]
    tokens = (len(steady) - 1) * batch * block_size
    return {"trainer": trainer_name, "steps": steps, "batch": batch, "block_size": block_size,
            "tokens_per_s": tokens / seconds, "seconds_per_step": seconds / (len(steady) - 1),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "final_loss": trainer.state.log_history[-1].get("train_loss")}


def speed_section(cli, out: dict) -> None:
    try:
        import trl
    except ImportError:  # `pip install --dry-run trl` shows it leaves transformers as is: install it beside us
        out["speed"] = {"skipped": "trl is not installed in this environment (pip install trl)"}
        print("speed: skipped, trl is not installed (pip install trl)", flush=True)
        return
    results = []
    for name in ("hfcompress", "trl_gkd"):
        command = [sys.executable, __file__, "--speed-child", name, "--reference", cli.reference,
                   "--speed-steps", str(cli.speed_steps), "--block-size", str(cli.block_size)]
        results.append(common.run_json_child(command, f"speed child {name}", timeout=3600))
        print(f"  {name:10s} {results[-1]['tokens_per_s']:,.0f} tokens/s, peak RSS "
              f"{results[-1]['peak_rss_bytes'] / 2**20:,.0f} MiB", flush=True)
    ours, theirs = results
    out["speed"] = {"reference": cli.reference, "trl_version": trl.__version__, "loss": "generalized JSD beta=0.5",
                    "results": results, "speedup": ours["tokens_per_s"] / theirs["tokens_per_s"]}
    emit(f"### Training speed: {cli.reference} teacher, half-depth student, batch 8x{cli.block_size}, "
         f"JSD(β=0.5), trl {trl.__version__} GKDTrainer(lmbda=0)",
         markdown(["trainer", "tokens/s", "s/step", "peak RSS (MiB)", "speed vs TRL"],
                   [[r["trainer"], r["tokens_per_s"], r["seconds_per_step"], r["peak_rss_bytes"] / 2**20,
                     r["tokens_per_s"] / theirs["tokens_per_s"]] for r in results]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", default="small", help="reference teacher size (tiny/small/base)")
    parser.add_argument("--sections", default="quality,memory,speed")
    parser.add_argument("--steps", type=int, default=150, help="training steps of the quality runs")
    parser.add_argument("--budgets", default="", help="other step counts for the token-budget sweep, e.g. 50,400")
    parser.add_argument("--variants", default="",
                        help="comma-separated quality variants (default: all), each 'name' or 'name:key=value:...'")
    parser.add_argument("--budget-variants", default="",
                        help="variants run at every --budgets step count (default: ce,default); the best CE-only "
                             "one is the baseline at each budget")
    parser.add_argument("--budget-cached-only", action="store_true",
                        help="in the budget sweep, only report the runs --cache already holds (no training); "
                             "missing cells show as —")
    parser.add_argument("--cache", type=Path, default=None,
                        help="JSON file of finished quality runs, keyed by everything that determines them; "
                             "identical runs are read from it instead of retrained")
    parser.add_argument("--student-layers", type=int, default=None, help="student depth (default: half the teacher's)")
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--eval-blocks", type=int, default=128)
    parser.add_argument("--speed-steps", type=int, default=12)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--speed-child", default=None, help=argparse.SUPPRESS)
    cli = parser.parse_args()
    cli.budgets = [int(b) for b in cli.budgets.split(",") if b]

    if cli.memory_child:
        print(json.dumps(memory_child(cli.memory_child, 8192, 32000, 512, 1024)))
        return
    if cli.speed_child:
        print(json.dumps(speed_child(cli.speed_child, cli.reference, cli.speed_steps, 8, cli.block_size, 0.5)))
        return

    import logging

    logging.basicConfig(level=logging.WARNING)
    out = {"command": " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]), "machine": machine()}
    sections = cli.sections.split(",")
    if "quality" in sections:
        quality_section(cli, out)
    if "memory" in sections:
        memory_section(cli, out)
        save(cli, out)
    if "speed" in sections:
        speed_section(cli, out)
    save(cli, out)
    if cli.out:
        print(f"\nwrote {cli.out}")


if __name__ == "__main__":
    main()
