"""AWQ int4/3/2 g32 on the tiny reference teacher at one calibration sequence length: perplexity, KL to fp32.

    python scripts/bench/awq_budget_check.py OUT.json SEQ_LEN

Run with PYTHONPATH on two hfcompress trees (e.g. a ``git archive`` of an earlier commit) to compare AWQ before and
after a change; ``int*_sd`` (the sum of every float tensor of the quantized model) tells whether the weights are
identical. Used for results/awq_search_tokens.md."""

from __future__ import annotations

import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hfcompress
from hfcompress.core.data import load_blocks
from hfcompress.models.evaluate import kl_to_reference, perplexity
from hfcompress.models.reference import reference_model
from hfcompress.quantization.api import quantize
from hfcompress.quantization.config import QuantizationConfig


def main() -> None:
    T = int(sys.argv[2])
    path = reference_model("tiny", progress=False)
    tok = AutoTokenizer.from_pretrained(path)
    cal = load_blocks("stdlib", tok, T, split="train", num_blocks=96, seed=0)
    ev = load_blocks("stdlib", tok, T, split="test", num_blocks=64, seed=0)
    fp = AutoModelForCausalLM.from_pretrained(path).eval()
    out = {"tree": hfcompress.__file__, "seq_len": T, "fp32": perplexity(fp, ev)}
    for bits in (4, 3, 2):
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_pretrained(path).eval()
        t0 = time.process_time()
        quantize(m, QuantizationConfig(method="awq", bits=bits, group_size=32, num_samples=96, seq_len=T),
                 calibration_data=cal, progress=False)
        cpu = time.process_time() - t0
        out[f"int{bits}"] = {"ppl": perplexity(m, ev), "kl_mnats": 1e3 * kl_to_reference(m, fp, ev), "cpu_s": cpu}
        out[f"int{bits}_sd"] = float(sum(p.double().sum() for p in m.state_dict().values() if p.is_floating_point()))
    print(json.dumps(out))
    with open(sys.argv[1], "w") as handle:
        json.dump(out, handle, indent=1)


if __name__ == "__main__":
    main()
