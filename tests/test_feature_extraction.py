"""Feature extraction at stage level: embed (frozen encoder or decoder), train_head, evaluate_head,
register, and the registered text classifier loaded back from the registry by alias."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kubetune.errors import ConfigError, StageError
from kubetune.methods.features import artifact_dir, classification_metrics
from kubetune.methods.features import load_features
from kubetune.stages.embed import EmbedConfig, embed
from kubetune.stages.evaluate_head import EvaluateHeadConfig, evaluate_head
from kubetune.stages.ingest import IngestConfig, ingest
from kubetune.stages.register import RegisterConfig, register
from kubetune.stages.train_head import TrainHeadConfig, train_head
from kubetune.tracking import RunContext

# keys of eval.json that readers without EvalReport (jq, the KFP UI) rely on
REPORT_KEYS = {"evaluated", "primary_metric", "higher_is_better", "min_improvement", "candidate", "base",
               "champion", "champion_version", "forgetting", "beats_base", "beats_champion", "data_fingerprint"}
TEXTS = ["I love this blender, the design is excellent.", "Returned the tent because the material was awful.",
         "The toaster does what it says, the size is average."]


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    """The bundled reviews, ingested (grouped by product: 312 train / 48 validation rows, 3 labels)."""
    out = tmp_path_factory.mktemp("reviews") / "ds"
    ingest(IngestConfig(data_uri="bundled://reviews"), out)
    return out


def test_minilm_head_beats_baseline_and_registry_model_predicts_text(reviews, tmp_path, mlflow_uri):
    import mlflow.pyfunc

    from kubetune import tracking
    from kubetune.core.models import resolve

    backbone_file = Path(resolve("minilm-l6-v2")) / "model.safetensors"
    backbone_bytes = backbone_file.read_bytes()
    ctx = RunContext("reviews", "run-1", "feature-extraction")
    emb = embed(EmbedConfig(base_model="minilm-l6-v2"), reviews, tmp_path / "emb", ctx=ctx)
    assert emb.meta["dim"] == 384 and emb.meta["backbone_kind"] == "encoder"
    meta, t = load_features(tmp_path / "emb")
    assert t["train_x"].shape == (312, 384) and t["validation_x"].shape == (48, 384)
    assert meta["labels"] == ["negative", "neutral", "positive"]

    trained = train_head(TrainHeadConfig(head="linear"), tmp_path / "emb", tmp_path / "model", ctx=ctx)
    m = trained.metrics
    assert m["train_loss_last"] < m["train_loss_first"] / 10, m
    assert m["val_macro_f1"] > m["baseline_macro_f1"] + 0.3, m
    assert m["trainable_params"] == 384 * 3 + 3 and m["trainable_share"] < 1e-3
    manifest = json.loads((tmp_path / "model" / "kubetune_method.json").read_text())
    assert manifest["method"] == "feature-extraction" and manifest["base_model"] == "minilm-l6-v2"
    assert artifact_dir(tmp_path / "model", "backbone") is None  # packaged: referenced, not copied

    report = evaluate_head(EvaluateHeadConfig(model_name="reviews"), tmp_path / "model", tmp_path / "emb", reviews,
                           tmp_path / "eval.json", ctx=ctx).report.to_dict()
    assert REPORT_KEYS <= set(report) and report["evaluated"] and report["champion"] is None
    assert report["candidate"]["macro_f1"] == pytest.approx(m["val_macro_f1"])
    majority = t["train_y"].bincount().argmax().item()
    assert report["base"]["accuracy"] == pytest.approx((t["validation_y"] == majority).float().mean().item())
    assert report["beats_base"] and report["forgetting"] == 0.0

    first = register(RegisterConfig(model_name="reviews"), tmp_path / "model", tmp_path / "eval.json", ctx=ctx)
    assert first.promoted and first.version == "1"
    assert backbone_file.read_bytes() == backbone_bytes  # the backbone stayed frozen

    # The registered version is a text classifier: raw text in, labels out, by alias.
    model = mlflow.pyfunc.load_model("models:/reviews@champion")
    assert model.predict(TEXTS) == ["positive", "negative", "neutral"]
    import pandas as pd

    assert model.predict(pd.DataFrame({"text": TEXTS})) == ["positive", "negative", "neutral"]

    # A head no better than the champion: evaluated against v1 (its recorded numbers), not promoted.
    train_head(TrainHeadConfig(head="linear", epochs=1, learning_rate=1e-4), tmp_path / "emb", tmp_path / "weak")
    weak = evaluate_head(EvaluateHeadConfig(model_name="reviews"), tmp_path / "weak", tmp_path / "emb", reviews,
                         tmp_path / "eval2.json").report.to_dict()
    assert str(weak["champion_version"]) == "1" and weak["champion"]["macro_f1"] == pytest.approx(m["val_macro_f1"])
    assert not weak["beats_champion"]
    second = register(RegisterConfig(model_name="reviews"), tmp_path / "weak", tmp_path / "eval2.json")
    assert not second.promoted and str(tracking.get_alias("reviews", "champion").version) == "1"

    # Other validation data: the champion's recorded numbers do not apply; it is downloaded and run.
    other = tmp_path / "other"
    ingest(IngestConfig(data_uri="bundled://reviews", max_rows=200, seed=3), other)
    embed(EmbedConfig(base_model="minilm-l6-v2"), other, tmp_path / "emb2")
    again = evaluate_head(EvaluateHeadConfig(model_name="reviews"), tmp_path / "weak", tmp_path / "emb2", other,
                          tmp_path / "eval3.json").report.to_dict()
    assert str(again["champion_version"]) == "1" and again["champion"]["macro_f1"] > 0.9
    assert again["data_fingerprint"] != report["data_fingerprint"] and not again["beats_champion"]


def test_decoder_backbone_last_token_mlp_head_and_copied_backbone(tiny_llama, reviews, tmp_path):
    import mlflow.pyfunc

    from kubetune.methods.features import Head, embed_texts, load_backbone

    emb = embed(EmbedConfig(base_model=str(tiny_llama), pooling="last", max_length=64), reviews, tmp_path / "emb")
    assert emb.meta["backbone_kind"] == "decoder" and emb.meta["dim"] == 64
    trained = train_head(TrainHeadConfig(head="mlp", hidden_size=32, epochs=200), tmp_path / "emb",
                         tmp_path / "model")
    assert trained.metrics["train_loss_last"] < trained.metrics["train_loss_first"] - 0.3
    assert trained.metrics["trainable_params"] == 64 * 32 + 32 + 32 * 3 + 3
    # a local-folder backbone travels inside the model (a path means nothing on another machine)
    assert (artifact_dir(tmp_path / "model", "backbone") / "model.safetensors").exists()

    # last-token pooling reads the last real token, whatever the padding of the batch
    model, tok, _ = load_backbone(str(tiny_llama))
    alone = embed_texts(model, tok, [TEXTS[0]], "last", 64, 1)
    padded = embed_texts(model, tok, [TEXTS[0], TEXTS[0] + " and a much longer tail of extra words"], "last", 64, 2)
    assert torch.allclose(alone[0], padded[0], atol=1e-5)

    # the pyfunc model predicts what the head predicts on the backbone's features
    head = Head.load(artifact_dir(tmp_path / "model"))
    expected = head.predict(embed_texts(model, tok, TEXTS, "last", 64, 8))
    assert mlflow.pyfunc.load_model(str(tmp_path / "model")).predict(TEXTS) == expected


def test_embed_refuses_non_classification_data_and_bad_settings(tiny_llama, tmp_path):
    ds = tmp_path / "ds"
    ingest(IngestConfig(data_uri="bundled://tickets", max_rows=20), ds)
    with pytest.raises(StageError, match="shape 'classification'"):
        embed(EmbedConfig(base_model=str(tiny_llama)), ds, tmp_path / "emb")
    assert not (tmp_path / "emb").exists()
    with pytest.raises(ConfigError, match="'max_length'"):
        EmbedConfig(max_length=2)
    with pytest.raises(ConfigError, match="'epochs'"):
        TrainHeadConfig(epochs=0)


def test_classification_metrics_macro_f1():
    m = classification_metrics(["a", "a", "b", "b"], ["a", "b", "b", "b"], ["a", "b", "c"])
    assert m["accuracy"] == 0.75
    # F1(a) = 2/3, F1(b) = 4/5, F1(c) = 0 (never predicted nor present)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 4 / 5 + 0) / 3)
