"""Does GRPO from the SFT model raise held-out exact match on the bundled ticket->JSON task?

Stages called directly (no kfp.local), on CPU: ingest with a grouped split (every JSON record
value held out is never a training target), tokenize, LoRA SFT as the `grpo` pipeline's
default (merged), then GRPO from it with the stage's settings; both models answer every
held-out ticket greedily and are scored by exact match of the JSON record (the judge, not the
training reward). Prints and writes per-model exact match with Wilson 95% intervals and the
paired difference with 95% intervals (Student t over tickets, kubetune.lib.stats; and a bootstrap),
and every held-out answer of both models.

    .venv/bin/python bench/grpo_tickets.py WORKDIR [key=value GRPO settings ...]
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return c - h, c + h


def paired_bootstrap(a: list[int], b: list[int], n_boot: int = 10000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    n = len(a)
    diffs = []
    for _ in range(n_boot):
        idx = [rng.randrange(n) for _ in range(n)]
        diffs.append(sum(b[i] - a[i] for i in idx) / n)
    diffs.sort()
    return diffs[int(0.025 * n_boot)], diffs[int(0.975 * n_boot)]


def answers(model_dir: str, records: list[dict]) -> list[str]:
    from kubetune.core import models
    from kubetune.core.scoring import generate
    from kubetune.lib.dataset import prompt_messages

    tok = models.load_tokenizer(model_dir)
    model = models.load_causal_lm(model_dir, device=models.pick_device()).eval()
    return generate(model, tok, [prompt_messages(r, "instruction") for r in records], 40, 48)


def main(argv: list[str]) -> None:
    import torch

    from kubetune.core.config import from_dict
    from kubetune.lib.stats import mean_interval
    from kubetune.lib.text_metrics import exact_match
    from kubetune.stages.grpo import GRPOConfig, grpo
    from kubetune.lib.dataset import load_dataset_dir
    from kubetune.stages.ingest import IngestConfig, ingest
    from kubetune.stages.tokenize_data import TokenizeConfig, tokenize_data
    from kubetune.stages.train_peft import train_peft
    from kubetune.core.train import TrainConfig

    # One thread: on a shared, loaded 2-core machine more threads oversubscribe and run far slower.
    torch.set_num_threads(1)
    work = Path(argv[0])
    overrides = dict(a.split("=", 1) for a in argv[1:])
    overrides = {k: json.loads(v) if v[:1] in "0123456789-[{tf" else v for k, v in overrides.items()}
    ds, tokd, sft = work / "ds", work / "tok", work / "sft"
    t0 = time.time()
    if not (sft / "merged" / "config.json").exists():
        ingest(IngestConfig(data_uri="bundled://tickets", validation_fraction=0.2, group_by="output"), ds)
        tokenize_data(TokenizeConfig(max_length=256), ds, tokd)
        train_peft(TrainConfig(method="lora", max_steps=30, learning_rate=1e-3, batch_size=2, merge=True), tokd, sft,
                   work / "workspace")
    t_sft = time.time() - t0
    _, _, val = load_dataset_dir(ds)
    refs = [r["output"] for r in val]
    cfg = from_dict(GRPOConfig, overrides, "grpo settings")
    tag = "-".join(f"{k}{v}" for k, v in sorted(overrides.items())) or "defaults"
    out = work / f"grpo-{tag}"
    t1 = time.time()
    result = grpo(cfg, sft, ds, out)
    t_grpo = time.time() - t1
    cached = work / "sft-answers.json"  # the SFT model's greedy answers do not change between GRPO runs
    if not cached.exists():
        cached.write_text(json.dumps(answers(str(sft / "merged"), val)))
    sft_answers, grpo_answers = json.loads(cached.read_text()), answers(str(out), val)
    sft_em = [int(exact_match(p, r)) for p, r in zip(sft_answers, refs)]
    grpo_em = [int(exact_match(p, r)) for p, r in zip(grpo_answers, refs)]
    n = len(refs)
    report = {
        "n_heldout": n, "split": "grouped by output (validation_fraction 0.2)", "grpo_settings": overrides,
        "sft_exact_match": sum(sft_em) / n, "sft_wilson95": wilson(sum(sft_em), n),
        "grpo_exact_match": sum(grpo_em) / n, "grpo_wilson95": wilson(sum(grpo_em), n),
        "difference": (sum(grpo_em) - sum(sft_em)) / n, "difference_bootstrap95": paired_bootstrap(sft_em, grpo_em),
        "difference_paired_t95": mean_interval([g - s for s, g in zip(sft_em, grpo_em)]),
        "grpo_better_on": sum(g > s for s, g in zip(sft_em, grpo_em)),
        "grpo_worse_on": sum(g < s for s, g in zip(sft_em, grpo_em)),
        "sft_s": round(t_sft, 1), "grpo_s": round(t_grpo, 1), "grpo_metrics": result.metrics,
        "reward_per_step": [round(h["reward"], 3) for h in result.history],
        "zero_std_per_step": [round(h["zero_std_fraction"], 2) for h in result.history],
        "answers": [{"reference": r, "sft": a, "grpo": b} for r, a, b in zip(refs, sft_answers, grpo_answers)],
    }
    print(json.dumps(report, indent=2))
    (work / f"report-{tag}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
