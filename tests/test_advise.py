"""`kubetune advise` on a table of scenarios: the class of recommendation, and its reasons.

Each scenario names what a practitioner would recommend (the issue's examples first) and the
test checks that advice lands in that class, that the printed reasoning carries the memory
estimate of the choice, and, where a GPU measurement or a compare result is given, that the
measured number is printed next to the estimate.
"""

from __future__ import annotations

import argparse
import json

import pytest

from kubetune.tools.advise import Advice, DataSummary, add_advise_parser, recommend
from kubetune.errors import ConfigError

SCENARIOS = [
    # (id, recommend(...) arguments, acceptable classes)
    ("issue: 500 examples + 8 GB GPU + 7B model -> QLoRA",
     dict(data=500, base_model="7b", gpu_memory_gb=8, gpu_count=1, need="style"), {"qlora"}),
    ("70B on one 80 GB GPU -> QLoRA",
     dict(data=2_000, base_model="70b", gpu_memory_gb=80, gpu_count=1, need="format"), {"qlora"}),
    ("13B on one 16 GB GPU -> QLoRA",
     dict(data=5_000, base_model="13b", gpu_memory_gb=16, gpu_count=1, need="behaviour"), {"qlora"}),
    ("8B on one 48 GB GPU, a few thousand examples -> LoRA",
     dict(data=3_000, base_model="8b", gpu_memory_gb=48, gpu_count=1, need="format"), {"lora"}),
    ("big GPUs + lots of data + style change -> full or LoRA",
     dict(data=DataSummary(examples=200_000, shape="chat", mean_tokens=400), base_model="8b", gpu_memory_gb=141,
          gpu_count=8, need="style"), {"full", "lora"}),
    ("SmolLM2 on one 24 GB GPU, 480 tickets to JSON -> LoRA",
     dict(data="bundled://tickets", gpu_memory_gb=24, gpu_count=1, need="format"), {"lora"}),
    ("CPU-only classification -> feature extraction",
     dict(data="bundled://reviews"), {"feature-extraction"}),
    ("classification with few examples on a GPU -> feature extraction first",
     dict(data=DataSummary(examples=800, shape="classification", mean_tokens=60), base_model="8b",
          gpu_memory_gb=80, gpu_count=1, task="classification"), {"feature-extraction"}),
    ("fast-changing facts -> RAG",
     dict(data=5_000, base_model="8b", gpu_memory_gb=80, gpu_count=1, need="fresh-facts"), {"rag"}),
    ("issue: question answering over a document store -> RAG",
     dict(data="DOCS", base_model="8b", gpu_memory_gb=24, gpu_count=1, task="qa"), {"rag"}),
    ("70B on one 24 GB GPU -> nothing fits",
     dict(data=1_000, base_model="70b", gpu_memory_gb=24, gpu_count=1), {"none"}),
]


@pytest.fixture
def documents(tmp_path):
    """A small document store: text records, no labels or answers."""
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": f"Policy {i}: refunds for order type {i} are processed within {i % 9 + 2} days "
                                 f"after the return arrives at warehouse {i % 4}."}) for i in range(40)]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("name,kwargs,expected", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_scenario(name, kwargs, expected, documents, tmp_path):
    kwargs = dict(kwargs)
    if kwargs["data"] == "DOCS":
        kwargs["data"] = documents
    advice = recommend(**kwargs, measured_json=tmp_path / "none.json")
    text = advice.text()
    assert advice.kind in expected, text
    assert advice.rag == (advice.kind == "rag")
    if advice.kind in advice.candidates:
        # the reasoning carries the memory estimate of the choice and of the others
        mem = advice.candidates[advice.kind].memory
        assert f"Memory of the choice: estimate {mem.gib():.2f} GiB" in text, text
        assert advice.candidates[advice.kind].fits
        assert "Time:" in text and advice.time["hours"] > 0
        assert advice.settings["command"].startswith("kubetune run ")
    if advice.kind == "none":
        assert not any(c.fits for c in advice.candidates.values())
    for cand in advice.candidates.values():
        assert f"estimate {cand.memory.gib():6.2f} GiB" in text


def test_qlora_for_7b_on_8gb_says_why_lora_does_not_fit(tmp_path):
    advice = recommend(500, base_model="7b", gpu_memory_gb=8, gpu_count=1, need="style",
                       measured_json=tmp_path / "none.json")
    lora, qlora = advice.candidates["lora"], advice.candidates["qlora"]
    assert not lora.fits and qlora.fits
    assert qlora.memory.total <= 0.9 * 8 * 2**30 < lora.memory.total
    assert "LoRA does not fit" in advice.text()
    assert advice.settings["train_settings"]["batch_size"] == qlora.memory.batch_size


def test_measured_gpu_peak_is_printed_next_to_the_estimate(tmp_path):
    measured = tmp_path / "memory_gpu.json"
    measured.write_text(json.dumps({"device": "NVIDIA H200", "rows": [
        {"model": "smollm2-135m", "method": "lora", "batch_size": 8, "seq_len": 1024, "measured_gib": 7.21,
         "estimate_gib": 7.13, "ratio": 0.989},
        {"model": "smollm2-135m", "method": "full", "batch_size": 8, "seq_len": 1024, "error": "timeout"},
    ]}))
    advice = recommend("bundled://tickets", gpu_memory_gb=24, gpu_count=1, need="format", measured_json=measured)
    assert advice.kind == "lora"
    text = advice.text()
    est = advice.candidates["lora"].memory.gib()
    assert f"Memory of the choice: estimate {est:.2f} GiB (measured 7.21 GiB on H200 at batch 8 x 1024, where the " \
           f"estimate was 7.13 GiB)" in text, text
    assert advice.candidates["full"].measured is None  # a failed measurement is not a number


def test_compare_result_is_cited_and_decides(tmp_path):
    compare = tmp_path / "compare.json"
    rows = [
        {"method": "lora", "metric_name": "exact_match", "base": 0.10, "tuned": 0.62, "forgetting": 0.01,
         "trainable_params": 4_884_480, "peak_mem_bytes": 2.1 * 2**30, "wall_s": 300, "tokens_per_s": 70},
        {"method": "full", "metric_name": "exact_match", "base": 0.10, "tuned": 0.71, "forgetting": 0.06,
         "trainable_params": 134_515_008, "peak_mem_bytes": 3.3 * 2**30, "wall_s": 350, "tokens_per_s": 72},
        {"method": "ia3", "metric_name": "exact_match", "base": 0.10, "tuned": 0.30, "forgetting": 0.0,
         "trainable_params": 100_000, "peak_mem_bytes": 1.9 * 2**30, "wall_s": 280, "tokens_per_s": 75},
    ]
    compare.write_text(json.dumps({"rows": rows}))
    advice = recommend("bundled://tickets", gpu_memory_gb=24, gpu_count=1, need="format", compare_json=compare,
                       measured_json=tmp_path / "none.json")
    text = advice.text()
    assert advice.kind == "full", text  # measured 0.09 better than LoRA, and it fits
    assert "exact_match 0.100 -> 0.620 (+0.520)" in text and "forgetting +0.060" in text
    # within the margin the rule's choice stands
    rows[1]["tuned"] = 0.63
    compare.write_text(json.dumps(rows))
    advice = recommend("bundled://tickets", gpu_memory_gb=24, gpu_count=1, need="format", compare_json=compare,
                       measured_json=tmp_path / "none.json")
    assert advice.kind == "lora"
    assert "no method that fits beat lora" in advice.text()
    # a loss (lower is better) turns the comparison around
    for r in rows:
        r["metric_name"] = "eval_loss"
    rows[0]["tuned"], rows[1]["tuned"], rows[2]["tuned"] = 0.9, 0.5, 1.5
    compare.write_text(json.dumps(rows))
    advice = recommend("bundled://tickets", gpu_memory_gb=24, gpu_count=1, need="format", compare_json=compare,
                       measured_json=tmp_path / "none.json")
    assert advice.kind == "full"


def test_bad_inputs_name_the_setting():
    with pytest.raises(ConfigError, match="'need'"):
        recommend(100, need="vibes")
    with pytest.raises(ConfigError, match="'task'"):
        recommend(100, task="poetry")
    with pytest.raises(ConfigError, match="'data'"):
        recommend(None)


def test_cli_prints_the_reasoning_and_json(capsys, tmp_path):
    parser = argparse.ArgumentParser(prog="kubetune")
    add_advise_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["advise", "--examples", "500", "--base-model", "7b", "--gpu-memory", "8",
                              "--need", "style", "--measured", str(tmp_path / "none.json")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("kubetune advise: qlora")
    assert "Memory of the choice: estimate" in out and "LoRA does not fit" in out
    args = parser.parse_args(["advise", "--data", "bundled://reviews", "--json", "--measured", str(tmp_path / "x")])
    assert args.func(args) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["kind"] == "feature-extraction" and payload["data"]["examples"] == 360
    assert payload["candidates"]["feature-extraction"]["memory"]["total"] > 0


def test_advice_round_trips_to_json(tmp_path):
    advice = recommend(1_000, base_model="8b", gpu_memory_gb=80, gpu_count=1, measured_json=tmp_path / "x")
    assert isinstance(advice, Advice)
    again = json.loads(json.dumps(advice.to_dict()))
    assert again["method"] == advice.method and set(again["candidates"]) == set(advice.candidates)
