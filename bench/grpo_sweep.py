"""GRPO settings against the `grpo` pipeline's own split: SFT start vs GRPO, several seeds.

The stages are called directly with the pipeline's defaults (ingest's default grouped split of
the bundled tickets, tokenize at 256 tokens, LoRA SFT at 1e-3 merged, GRPO with the pipeline's
rewards and sizes), then each model answers the first 48 held-out tickets greedily, as the
pipeline's evaluate stage does, and is judged by exact match of the whole JSON record (not the
training reward). Every (SFT steps, seed) pair trains its own SFT model; each GRPO setting in
CONFIGS starts from it with the same seed. One JSON line per GRPO run, written as it finishes.

    python bench/grpo_sweep.py OUT.jsonl --sft-steps 30,40 --seeds 0,1,2 \
        --configs '[{}, {"rewards": "exact_match:1.0"}]' [--precision fp32] [--base PATH]

``--precision fp32`` makes a GPU run do the CPU's arithmetic (SFT and GRPO), so a sweep run on
a GPU stands for the CPU pipeline; the decisions it informs are still confirmed on CPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from grpo_tickets import answers  # the evaluate stage's greedy answers (bench/ is the script's folder)

# The `grpo` pipeline's defaults (pipelines/grpo.py), restated because the pipeline module needs
# kfp, which a GPU machine running this need not have; tests/test_defaults.py fails when they drift.
PIPELINE_GRPO = {"steps": 12, "learning_rate": 5e-5, "rewards": "json_fields:1.0,format:0.2",
                 "prompts_per_step": 8, "num_generations": 4}
PIPELINE_SFT = {"learning_rate": 1e-3, "batch_size": 2, "lora_rank": 16, "merge": True}


def judge(preds: list[str], refs: list[str]) -> dict:
    from kubetune.lib.text_metrics import exact_match, field_accuracy

    em = [int(exact_match(p, r)) for p, r in zip(preds, refs)]
    fields = [field_accuracy(p, r) or 0.0 for p, r in zip(preds, refs)]
    return {"em": em, "exact_match": sum(em) / len(em), "field_accuracy": sum(fields) / len(fields)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--sft-steps", default="30")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--configs", default="[{}]", help="JSON list of GRPO setting overrides")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--base", default="smollm2-135m-instruct")
    ap.add_argument("--n", type=int, default=48, help="held-out tickets judged (the pipeline: 48)")
    ap.add_argument("--work", default="")
    ap.add_argument("--eager-generation", action="store_true",
                    help="no compiled decode on CUDA: each GRPO run would recompile it for its new model")
    args = ap.parse_args()
    if args.eager_generation:
        import dataclasses

        from kubetune.methods.rl import grpo as method

        train_grpo = method.train_grpo
        method.train_grpo = lambda path, ex, rw, cfg, *a, **k: train_grpo(
            path, ex, rw, dataclasses.replace(cfg, compiled_generation=False), *a, **k)

    from kubetune.core.config import from_dict
    from kubetune.core.train import TrainConfig
    from kubetune.lib.dataset import load_dataset_dir
    from kubetune.lib.stats import paired_difference
    from kubetune.stages.grpo import GRPOConfig, grpo
    from kubetune.stages.ingest import IngestConfig, ingest
    from kubetune.stages.tokenize_data import TokenizeConfig, tokenize_data
    from kubetune.stages.train_peft import train_peft

    work = Path(args.work or tempfile.mkdtemp(prefix="grpo-sweep-"))
    ds, tokd = work / "ds", work / "tok"
    if not (ds / "meta.json").exists():
        ingest(IngestConfig(data_uri="bundled://tickets"), ds)
        tokenize_data(TokenizeConfig(base_model=args.base, max_length=256, method="lora"), ds, tokd)
    _, _, val = load_dataset_dir(ds)
    val = val[: args.n]
    refs = [r["output"] for r in val]
    configs = json.loads(args.configs)
    out = Path(args.out)
    for sft_steps in [int(s) for s in args.sft_steps.split(",")]:
        for seed in [int(s) for s in args.seeds.split(",")]:
            sft = work / f"sft{sft_steps}-seed{seed}"
            t0 = time.time()
            if not (sft / "merged" / "config.json").exists():
                train_peft(TrainConfig(base_model=args.base, method="lora", max_steps=sft_steps, seed=seed,
                                       precision=args.precision, **PIPELINE_SFT), tokd, sft, work / "workspace")
            t_sft = time.time() - t0
            start = judge(answers(str(sft / "merged"), val), refs)
            for overrides in configs:
                settings = {**PIPELINE_GRPO, "seed": seed, "precision": args.precision, **overrides}
                cfg = from_dict(GRPOConfig, settings, "grpo settings")
                tag = "-".join(f"{k}{v}" for k, v in sorted(overrides.items())) or "defaults"
                gdir = work / f"grpo-sft{sft_steps}-seed{seed}-{tag}".replace("/", "_").replace(":", "_")
                t1 = time.time()
                result = grpo(cfg, sft, ds, gdir)
                t_grpo = time.time() - t1
                end = judge(answers(str(gdir), val), refs)
                paired = paired_difference("em", end["em"], start["em"])
                row = {"sft_steps": sft_steps, "seed": seed, "overrides": overrides, "n": len(refs),
                       "sft_em": start["exact_match"], "grpo_em": end["exact_match"],
                       "sft_fields": start["field_accuracy"], "grpo_fields": end["field_accuracy"],
                       "better": int(paired["em_better"]), "worse": int(paired["em_worse"]),
                       "sft_em_list": start["em"], "grpo_em_list": end["em"],
                       "reward_per_step": [round(h["reward"], 3) for h in result.history],
                       "kl_last": result.metrics["kl_last"], "sft_s": round(t_sft, 1), "grpo_s": round(t_grpo, 1)}
                print(json.dumps({k: v for k, v in row.items() if not k.endswith("_list")}), flush=True)
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
