"""tokenize_data: response-only labels, chat templates, overlong handling, packing without leaks."""

from __future__ import annotations

import json

import pytest
import torch

from kubetune.errors import ConfigError, StageError
from kubetune.stages.ingest import IngestConfig, ingest
from kubetune.core.tokenization import IGNORE, TokenizeConfig, encode_chat, pack, setup_tokenizer
from kubetune.stages.tokenize_data import tokenize_data
from kubetune.core.train import PackedCollator


def _ingested(tmp_path, rows):
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ingest(IngestConfig(data_uri=str(src), validation_fraction=0.2), tmp_path / "ds")
    return tmp_path / "ds"


def test_labels_cover_assistant_turns_only(tiny_llama):
    tok = setup_tokenizer(TokenizeConfig(base_model=str(tiny_llama)))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one two"},
                {"role": "assistant", "content": "three four"}, {"role": "user", "content": "five"},
                {"role": "assistant", "content": "six seven"}]
    ids, labels = encode_chat(tok, messages)
    labelled = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])
    # both assistant turns (multi-turn), each with its end-of-turn token, nothing else
    assert labelled == "three four<|im_end|>\nsix seven<|im_end|>\n"
    assert all(lab in (IGNORE, i) for i, lab in zip(ids, labels))


def test_named_default_template_when_model_has_none(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "notemplate")
    (tmp_path / "notemplate" / "config.json").write_text((tiny_llama / "config.json").read_text())
    tok2 = setup_tokenizer(TokenizeConfig(base_model=str(tmp_path / "notemplate")))
    assert "<|im_start|>" in tok2.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)


def test_template_without_response_span_fails_loudly(tiny_llama, tmp_path):
    """A template that drops assistant content leaves an empty response mask: a hard error."""
    ds = _ingested(tmp_path, [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)])
    tok = setup_tokenizer(TokenizeConfig(base_model=str(tiny_llama)))
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}"
                         "{% endfor %}")
    tok.save_pretrained(tmp_path / "bad")
    (tmp_path / "bad" / "config.json").write_text((tiny_llama / "config.json").read_text())
    with pytest.raises(StageError, match="response mask is empty"):
        tokenize_data(TokenizeConfig(base_model=str(tmp_path / "bad")), ds, tmp_path / "tok")
    assert not (tmp_path / "tok").exists()


def test_overlong_dropped_or_truncated_with_counts(tiny_llama, tmp_path):
    rows = [{"instruction": "short", "output": "ok"}] + [{"instruction": "long " * 80 + str(i), "output": "x"}
                                                          for i in range(4)]
    rows += [{"instruction": f"s{i}", "output": f"y{i}"} for i in range(5)]
    ds = _ingested(tmp_path, rows)
    dropped = tokenize_data(TokenizeConfig(base_model=str(tiny_llama), max_length=64), ds, tmp_path / "a").counts
    total_dropped = dropped["train"]["dropped_overlong"] + dropped["validation"]["dropped_overlong"]
    assert total_dropped == 4
    cut = tokenize_data(TokenizeConfig(base_model=str(tiny_llama), max_length=64, overlong="truncate"), ds,
                        tmp_path / "b").counts
    # truncation cuts the response off the long ones, which then have nothing to learn: counted too
    assert cut["train"]["truncated"] + cut["validation"]["truncated"] == 4
    assert cut["train"]["dropped_no_response"] + cut["validation"]["dropped_no_response"] == 4


def test_pack_best_fit_restarts_positions_and_masks_boundaries():
    examples = [([1] * n, [5] * n) for n in (6, 3, 4, 2, 1)]
    rows = pack(examples, row_length=8)
    assert sorted(len(r["input_ids"]) for r in rows) == [8, 8]  # 6+2, 4+3+1
    for r in rows:
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0]
        assert all(r["labels"][s] == IGNORE for s in starts)  # no loss term reads across a boundary
        assert len(r["input_ids"]) == len(r["labels"]) == len(r["position_ids"])


def test_packed_logits_equal_each_example_alone(tiny_llama):
    """No attention crosses example boundaries: packed (and padded) logits equal solo logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").eval()
    g = torch.Generator().manual_seed(0)
    examples = [torch.randint(5, 500, (n,), generator=g).tolist() for n in (7, 12, 5)]
    rows = pack([(e, e) for e in examples], row_length=40)
    assert len(rows) == 1
    batch = PackedCollator(pad_token_id=0)([rows[0], {"input_ids": [9] * 4, "labels": [9] * 4,
                                                      "position_ids": list(range(4))}])
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        # order of examples inside the packed row, recovered from the position restarts
        starts = [i for i, p in enumerate(batch["position_ids"][0].tolist()) if p == 0]
        for s in starts[:3]:
            length = next(len(e) for e in examples if batch["input_ids"][0, s:s + len(e)].tolist() == e)
            alone = model(input_ids=batch["input_ids"][:, s:s + length][:1]).logits[0]
            torch.testing.assert_close(packed[s:s + length], alone, atol=1e-5, rtol=1e-4)
        # the check can fail: without position restarts, or with a KV cache (transformers then skips
        # packed-sequence detection), later examples see earlier ones
        leaky = model(input_ids=batch["input_ids"][:1]).logits[0]
        assert not torch.allclose(leaky[starts[1]:starts[2]], packed[starts[1]:starts[2]], atol=1e-3)
        cached = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True).logits[0]
        assert not torch.allclose(cached[starts[1]:starts[2]], packed[starts[1]:starts[2]], atol=1e-3)


def test_collator_refuses_batch_without_labels():
    with pytest.raises(StageError, match="no trainable label"):
        PackedCollator(0)([{"input_ids": [1, 2], "labels": [IGNORE, IGNORE], "position_ids": [0, 1]}])


def test_non_lm_shapes_are_refused_with_a_pointer(tiny_llama, tmp_path):
    ds = _ingested(tmp_path, [{"text": f"t{i}", "label": "a"} for i in range(6)])
    with pytest.raises(StageError, match="not for language-model training"):
        tokenize_data(TokenizeConfig(base_model=str(tiny_llama)), ds, tmp_path / "tok")


def test_the_method_decides_packing_where_the_rows_are_made(tiny_llama, tmp_path):
    """Prompt and prefix tuning prepend virtual tokens once per row: their rows stay one example each."""
    ds = _ingested(tmp_path, [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)])
    lora = tokenize_data(TokenizeConfig(base_model=str(tiny_llama), max_length=256, method="lora"), ds,
                         tmp_path / "lora").counts["train"]
    with pytest.warns(UserWarning, match="without packing"):
        cfg = TokenizeConfig(base_model=str(tiny_llama), max_length=256, method="prefix")
    prefix = tokenize_data(cfg, ds, tmp_path / "prefix").counts["train"]
    assert lora["rows"] < prefix["rows"] == prefix["examples"] == lora["examples"]
    assert json.loads((tmp_path / "prefix" / "meta.json").read_text())["tokenize"]["packing"] is False
    with pytest.raises(ConfigError, match="'method' must be one of"):
        TokenizeConfig(method="lorra")
