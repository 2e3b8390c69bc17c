"""Mixture of Agents: proposers, voting, synthesis, the HTTP proposer and the pyfunc.

The proposers are three fine-tunes of the tiny Llama on a synthetic ticket-routing task
(keyword → billing / network / hardware), of unequal quality by construction: "good" learns
the true labels, "mid" was taught that hardware tickets are network ones, "weak" also that
billing tickets are hardware ones. So on hardware tickets the two weaker proposers outvote
the good one: majority vote is measurably worse than the best proposer, and the weighted
vote has something real to fix.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from kubetune.methods import moa

LABELS = ["billing", "network", "hardware"]
KEYWORDS = {"billing": ["invoice", "refund", "billing"], "network": ["wifi", "router", "modem"], "hardware": ["battery", "screen", "printer"]}
FILLER = "the a of to and in is it that for on with please help today".split()
# What each proposer was taught (identity elsewhere).
TEACHING = {
    "good": {},
    "mid": {"hardware": "network"},
    "weak": {"hardware": "network", "billing": "hardware"},
}
MAX_NEW_TOKENS = 8  # "hardware" is several tokens of the tiny tokenizer


def tickets(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = LABELS[i % 3]  # balanced, so accuracies are exact multiples of 1/3 of errors
        # Keyword first, then a fixed number of filler words: the keyword sits at a fixed
        # distance from the answer, which a 2-layer model learns in tens of steps.
        words = [rng.choice(KEYWORDS[label])] + [rng.choice(FILLER) for _ in range(3)]
        out.append((" ".join(words), label))
    return out


def conversation(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"ticket: {text}"}]


def finetune(base: Path, out: Path, teaching: dict[str, str], steps: int = 50) -> Path:
    """A few AdamW steps on the answer tokens only; enough for the tiny Llama to learn the map.

    A plain loop rather than the training core: the proposers are test fixtures, and the
    MoA code under test only sees finished model folders.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # Tokenise once: templating every sampled example at every step costs more than the step.
    data = []
    for text, label in tickets(300, seed=1):
        prompt = tok.apply_chat_template(conversation(text), add_generation_prompt=True, tokenize=False)
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        a = tok(teaching.get(label, label) + tok.eos_token, add_special_tokens=False)["input_ids"]
        data.append((p + a, [-100] * len(p) + a))
    rng = random.Random(0)
    for _ in range(steps):
        ids, labels = zip(*rng.sample(data, 32))
        width = max(map(len, ids))
        x = torch.tensor([i + [tok.pad_token_id] * (width - len(i)) for i in ids])
        y = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
        mask = (x != tok.pad_token_id).long()
        model(input_ids=x, attention_mask=mask, labels=y).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine two
    spinning OpenMP threads per process made this file ~10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def folders(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moa-proposers")
    return {name: finetune(Path(tiny_llama), root / name, teaching) for name, teaching in TEACHING.items()}


@pytest.fixture(scope="module")
def proposers(folders) -> list[moa.LocalProposer]:
    return [moa.LocalProposer(path, name=name, max_new_tokens=MAX_NEW_TOKENS).load() for name, path in folders.items()]


@pytest.fixture(scope="module")
def answers(proposers):
    """Every proposer's answers on a validation and a test split (different seeds)."""
    splits = {"validation": tickets(30, seed=2), "test": tickets(30, seed=3)}
    out = {}
    for split, data in splits.items():
        convs = [conversation(t) for t, _ in data]
        out[split] = {
            "refs": [label for _, label in data],
            "convs": convs,
            "preds": {p.name: [c.text for c in moa.answer_all(p, convs, batch_size=16)] for p in proposers},
        }
    return out


def test_proposers_have_the_unequal_quality_they_were_built_with(answers):
    test = answers["test"]
    acc = {name: moa.accuracy(preds, test["refs"], LABELS) for name, preds in test["preds"].items()}
    # good ≈ 1, mid ≈ 2/3 (wrong on hardware), weak ≈ 1/3 (right on network only).
    assert acc["good"] >= 0.9, acc
    assert 0.5 <= acc["mid"] <= 0.8, acc
    assert acc["weak"] <= 0.45, acc


def test_weighted_vote_beats_majority_and_matches_best_single(answers):
    val, test = answers["validation"], answers["test"]
    weights = moa.fit_weights(val["preds"], val["refs"], LABELS)
    assert weights["good"] > weights["mid"] >= weights["weak"] >= 0.0

    n = len(test["refs"])
    rows = [{name: preds[i] for name, preds in test["preds"].items()} for i in range(n)]
    majority = [moa.majority_vote(r, LABELS) for r in rows]
    weighted = [moa.weighted_vote(r, weights, LABELS) for r in rows]
    best_single = max(moa.accuracy(p, test["refs"], LABELS) for p in test["preds"].values())
    acc_majority = moa.accuracy(majority, test["refs"], LABELS)
    acc_weighted = moa.accuracy(weighted, test["refs"], LABELS)
    # The task is built so that majority loses to the best proposer; otherwise the next
    # assertions would hold trivially.
    assert acc_majority < best_single - 0.2
    assert acc_weighted >= best_single
    assert acc_weighted >= acc_majority

    table = moa.comparison_table({**test["preds"], "moa/majority": majority, "moa/weighted": weighted}, test["refs"], labels=LABELS)
    assert [r["name"] for r in table][-2:] == ["moa/majority", "moa/weighted"]
    assert "| moa/weighted | " in moa.format_table(table)


def test_mixture_answer_calls_proposers_concurrently_and_agrees_with_batch_answers(proposers, answers):
    test = answers["test"]
    weights = {"good": 3.0, "mid": 1.0, "weak": 0.5}
    for i in range(3):
        out = moa.mixture_answer(proposers, test["convs"][i], mode="weighted", weights=weights, labels=LABELS, timeout=30)
        assert out.dropped == {}
        # One-by-one greedy answers equal the batched ones (left padding does not leak).
        assert out.proposals == {name: preds[i] for name, preds in test["preds"].items()}
        assert out.answer == moa.weighted_vote(out.proposals, weights, LABELS)
        assert out.tokens > 0


def test_fit_weights_falls_back_when_proposers_share_mistakes():
    # Two copies of a 70% proposer that err together outvote an 80% one under log-odds
    # weights (0.69 + 0.69 > 1.10); the validation check must notice and trust the best one.
    refs = ["a"] * 10
    good = ["a"] * 8 + ["b", "b"]
    copy = ["a"] * 5 + ["b"] * 3 + ["a", "a"]
    preds = {"good": good, "c1": copy, "c2": list(copy)}
    weights = moa.fit_weights(preds, refs, ["a", "b"])
    voted = [moa.weighted_vote({k: v[i] for k, v in preds.items()}, weights, ["a", "b"]) for i in range(10)]
    assert moa.accuracy(voted, refs) == 0.8
    assert moa.accuracy([moa.majority_vote({k: v[i] for k, v in preds.items()}) for i in range(10)], refs) == 0.7


def test_normalize_answer_and_majority_vote():
    assert moa.normalize_answer("  Answer: Network.\nbecause wifi", LABELS) == "network"
    assert moa.normalize_answer('"BILLING"', LABELS) == "billing"
    assert moa.normalize_answer("it is a hardware fault, not network", LABELS) == "hardware"
    assert moa.normalize_answer("Paris!") == "paris"
    assert moa.normalize_answer("hardw", LABELS) == "hardw"  # a truncated label is not a vote for it
    assert moa.majority_vote({"a": "Paris.", "b": "paris", "c": "Lyon"}) == "paris"
    assert moa.majority_vote({"a": "", "b": "Lyon", "c": None}) == "lyon"  # empty answers abstain
    assert moa.majority_vote({"a": "x", "b": "y"}) == "x"  # ties: earliest proposer
    assert moa.majority_vote({}) is None


def test_prompt_and_reference_for_each_record_shape():
    messages, ref = moa.prompt_and_reference({"text": "wifi down", "label": "network"}, LABELS)
    assert ref == "network" and messages[-1]["content"].endswith("billing, network, hardware.")
    assert moa.prompt_and_reference({"prompt": "2+2=", "completion": "4"}) == ([{"role": "user", "content": "2+2="}], "4")
    assert moa.prompt_and_reference({"instruction": "Add", "input": "2 2", "output": "4"})[0][0]["content"] == "Add\n\n2 2"
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    assert moa.prompt_and_reference(chat) == ([{"role": "user", "content": "hi"}], "hello")


class _Slow:
    def __init__(self, name, delay):
        self.name, self.delay = name, delay

    def __call__(self, messages, max_new_tokens=None):
        time.sleep(self.delay)
        return moa.Completion(text="late", tokens=1)


class _Broken:
    name = "broken"

    def __call__(self, messages, max_new_tokens=None):
        raise RuntimeError("boom")


def test_ask_all_drops_failing_and_late_proposers_without_waiting_for_them(proposers):
    t0 = time.perf_counter()
    round_ = moa.ask_all([proposers[0], _Slow("slow", 30), _Broken()], conversation("wifi help"), timeout=1)
    assert time.perf_counter() - t0 < 4
    assert list(round_.completions) == ["good"]
    assert round_.dropped["slow"].startswith("timeout")
    assert "boom" in round_.dropped["broken"]


class _Interrupted:
    name = "interrupted"

    def __call__(self, messages, max_new_tokens=None):
        raise KeyboardInterrupt


def test_ask_all_lets_ctrl_c_through_instead_of_dropping_the_proposer(proposers):
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        moa.ask_all([proposers[0], _Interrupted(), _Broken()], conversation("wifi help"), timeout=20)
    assert time.perf_counter() - t0 < 10  # raised when seen, not after the round's deadline


class _Recording:
    """Delegates to a real proposer and keeps the conversations it was sent."""

    def __init__(self, inner):
        self.inner, self.name, self.seen = inner, inner.name, []

    def __call__(self, messages, max_new_tokens=None):
        self.seen.append(messages)
        return self.inner(messages, max_new_tokens)


def test_synthesis_runs_two_layers_on_a_tiny_model(tiny_llama):
    aggregator = _Recording(moa.LocalProposer(tiny_llama, name="agg", max_new_tokens=6))
    proposals = {"p1": "network", "p2": "hardware", "p3": "network"}
    syn = moa.synthesize(aggregator, "ticket: wifi down", proposals, layers=2)
    assert isinstance(syn.text, str) and syn.tokens > 0
    assert len(syn.layers) == 2 and syn.layers[0] == proposals
    first, second = aggregator.seen
    assert first[0]["role"] == "system" and first[0]["content"].startswith(moa.AGGREGATE_PROMPT)
    assert "1. network\n2. hardware\n3. network" in first[0]["content"]
    assert first[-1] == {"role": "user", "content": "ticket: wifi down"}
    # Layer 1's output is what layer 2 reads.
    assert second[0]["content"].endswith("1. " + syn.layers[1]["agg"])


def test_aggregator_examples_are_chat_records_matching_what_synthesis_sends():
    records = moa.build_aggregator_examples(
        ["ticket: wifi", "ticket: invoice"],
        {"p1": ["network", "billing"], "p2": ["hardware", "billing"]},
        ["network", "billing"],
    )
    assert len(records) == 2
    first = records[0]["messages"]
    assert first[:-1] == moa.aggregate_messages("ticket: wifi", ["network", "hardware"])
    assert first[-1] == {"role": "assistant", "content": "network"}
    with pytest.raises(ValueError, match="align"):
        moa.build_aggregator_examples(["x"], {"p1": ["a", "b"]}, ["a"])


SERVER_DELAY = 4  # seconds the served model waits before every answer


@pytest.fixture(scope="module")
def server(folders):
    """A real OpenAI-compatible server of the good proposer on 127.0.0.1 (free port), slow
    on purpose: patient clients get answers, impatient ones and short deadlines time out."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubetune.serving.serve", "--model", str(folders["good"]), "--port", "0", "--name", "good", "--delay", str(SERVER_DELAY)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        line = []
        reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(120)
        assert line and "listening on" in line[0], f"server did not start: {line}"
        yield line[0].split()[3]
    finally:
        proc.terminate()
        proc.wait(10)


def test_http_proposer_against_a_real_local_server(server, proposers, answers):
    with urllib.request.urlopen(server + "/v1/models", timeout=10) as r:
        assert [m["id"] for m in json.loads(r.read())["data"]] == ["good"]

    patient = moa.HttpProposer(server, "good", timeout=60, name="good-http", max_new_tokens=MAX_NEW_TOKENS)
    conv = answers["test"]["convs"][0]
    completion = patient(conv)
    assert completion.text == answers["test"]["preds"]["good"][0]  # same greedy model, same answer
    assert completion.tokens > 0
    assert completion.latency_s >= SERVER_DELAY

    impatient = moa.HttpProposer(server, "good", timeout=1, name="impatient")
    t0 = time.perf_counter()
    with pytest.raises(TimeoutError):
        impatient(conv)
    assert time.perf_counter() - t0 < SERVER_DELAY

    # In a mixture: the impatient proposer fails on its own timeout, the patient one misses
    # the round's deadline; both are dropped and named, the local ones still answer.
    t0 = time.perf_counter()
    out = moa.mixture_answer([impatient, patient, proposers[1], proposers[2]], conv, mode="majority", labels=LABELS, timeout=2)
    assert time.perf_counter() - t0 < SERVER_DELAY
    assert set(out.proposals) == {"mid", "weak"}
    assert out.dropped["impatient"].startswith("error: TimeoutError")
    assert out.dropped["good-http"] == "timeout after 2s"
    assert out.answer in LABELS


def _register_folder(client, folder: Path, name: str, alias: str) -> None:
    """Register a plain model folder the way a register stage might: artifacts of a run."""
    import mlflow

    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(folder), artifact_path="model")
    client.create_registered_model(name)
    version = client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    client.set_registered_model_alias(name, alias, version.version)


def test_registry_proposer_and_registered_mixture_load_by_alias_and_answer(mlflow_uri, tmp_path, folders, answers, server):
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    from kubetune.methods.moa.pyfunc import log_moa_model

    # With a SQLite store, artifacts default to ./mlruns in the working directory; keep
    # them in this test's folder instead.
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("moa", artifact_location=(tmp_path / "artifacts").as_uri()))
    client = MlflowClient()
    _register_folder(client, folders["good"], "ticket-good", "champion")
    registry = moa.RegistryProposer("models:/ticket-good@champion", name="good", max_new_tokens=MAX_NEW_TOKENS)
    assert registry.resolved_uri == "models:/ticket-good/1"
    test = answers["test"]
    assert registry(test["convs"][1]).text == test["preds"]["good"][1]

    val = answers["validation"]
    weights = moa.fit_weights(val["preds"], val["refs"], LABELS)
    info = log_moa_model(
        [
            {"kind": "registry", "uri": "models:/ticket-good@champion", "name": "good"},
            {"kind": "local", "path": str(folders["mid"]), "name": "mid"},
            {"kind": "local", "path": str(folders["weak"]), "name": "weak"},
            {"kind": "http", "base_url": server, "model": "good", "timeout": 60, "name": "slow-http"},
        ],
        mode="weighted",
        weights=weights,
        labels=LABELS,
        timeout=2,
        max_new_tokens=MAX_NEW_TOKENS,
    )
    client.create_registered_model("ticket-moa")
    mv = client.create_model_version("ticket-moa", info.model_uri, run_id=info.run_id)
    client.set_registered_model_alias("ticket-moa", "champion", mv.version)

    loaded = mlflow.pyfunc.load_model("models:/ticket-moa@champion")
    prompts = [c[0]["content"] for c in test["convs"][:2]]
    out = loaded.predict(pd.DataFrame({"prompt": prompts}))
    assert list(out.columns) == ["answer", "proposals", "dropped", "tokens", "latency_s"]
    for i, row in out.iterrows():
        proposals = json.loads(row["proposals"])
        assert proposals == {name: test["preds"][name][i] for name in ("good", "mid", "weak")}
        assert row["answer"] == moa.weighted_vote(proposals, weights, LABELS)
        # The slow endpoint is dropped at the 2 s deadline, not waited on.
        assert "slow-http" in json.loads(row["dropped"])
        assert row["latency_s"] < SERVER_DELAY
    assert moa.accuracy(out["answer"].tolist(), test["refs"][:2], LABELS) == 1.0
