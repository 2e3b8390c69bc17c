"""evaluate reuses the base model's scores only when the evaluation would be identical."""

import os

import datasets

from kubetune.stages import evaluate as ev
from kubetune.stages.ingest import load_dataset_dir


def test_base_scores_are_reused_only_for_an_identical_evaluation(tiny_llama, tiny_tickets, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("KUBETUNE_HOME", str(tmp_path / "home"))
    calls = []
    real = ev.score_model
    monkeypatch.setattr(ev, "score_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    ds, tok_dir = tiny_tickets
    meta, _, val_records = load_dataset_dir(ds)
    val_rows = list(datasets.load_from_disk(str(tok_dir))["validation"])
    tok = AutoTokenizer.from_pretrained(tok_dir / "tokenizer")
    cfg = ev.EvaluateConfig(base_model=str(tiny_llama), max_examples=4, max_new_tokens=4, batch_size=4)
    args = (tok, val_records, val_rows, meta["shape"], ["A short general sentence about the weather."])

    first = ev._base_scores(cfg, *args)
    again = ev._base_scores(cfg, *args)
    assert len(calls) == 1 and again.pop("reused") is True
    assert again == first  # the same numbers, not recomputed

    ev._base_scores(ev.EvaluateConfig(base_model=str(tiny_llama), max_examples=3, max_new_tokens=4, batch_size=4),
                    *args)
    assert len(calls) == 2  # another setting: another key

    weights = next(tiny_llama.glob("*.safetensors"))
    st = weights.stat()
    os.utime(weights, (st.st_atime, st.st_mtime + 10))  # the base weights changed (as far as we can tell)
    ev._base_scores(cfg, *args)
    assert len(calls) == 3

    ev._base_scores(ev.EvaluateConfig(base_model=str(tiny_llama), max_examples=4, max_new_tokens=4, batch_size=4,
                                      reuse_base_scores=False), *args)
    assert len(calls) == 4
