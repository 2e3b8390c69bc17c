"""Sparse upcycling into Mixture of Experts: equivalence at init, what trains, routing, reload."""

from __future__ import annotations

import random

import pytest
import torch

from kubetune.experimental import moe


@pytest.fixture(scope="module")
def dense(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def _ids(seed=0, shape=(2, 16), vocab=500):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _tiny_dense(model_type: str):
    """A random tiny Qwen2 / Qwen3 / GPT-2 built from its config (no files, no network)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(vocab_size=500, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    if model_type == "gpt2":
        kwargs = dict(vocab_size=500, n_embd=64, n_layer=2, n_head=4)
    else:
        kwargs.update(intermediate_size=128, num_key_value_heads=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kwargs)).eval()


# ------------------------------------------------------------------ equivalence at init


@pytest.mark.parametrize(
    "source, kwargs, target",
    [
        ("llama", dict(), "MixtralForCausalLM"),
        ("llama", dict(every_k_layers=2), "Qwen2MoeForCausalLM"),
        ("llama", dict(kind="lora"), "MixtralForCausalLM"),
        ("qwen2", dict(), "Qwen2MoeForCausalLM"),
        ("qwen3", dict(every_k_layers=2), "Qwen3MoeForCausalLM"),
    ],
)
def test_upcycled_model_equals_dense_without_noise_and_stays_close_with_the_default(dense, source, kwargs, target):
    """Exactly the dense function at ``noise_std=0``; at the default noise (what train_moe uses) a
    small perturbation of it: the same next-token predictions and a loss within 1% of the dense one."""
    base = dense if source == "llama" else _tiny_dense(source)
    ids = _ids()

    def loss(m):
        return float(m(input_ids=ids, labels=ids).loss)

    with torch.no_grad():
        ref = base(ids).logits
        exact = moe.upcycle(base, noise_std=0.0, **kwargs).eval()
        assert type(exact).__name__ == target
        assert torch.allclose(exact(ids).logits, ref, atol=1e-5), "upcycled model must compute the dense function"
        if kwargs.get("kind") != "lora":
            default = moe.upcycle(base, **kwargs).eval()  # noise_std: the default, the stage's too
            diff = (default(ids).logits - ref).abs().max().item()
            assert 1e-5 < diff < 0.1 * ref.abs().max().item(), f"noise must perturb the experts a little, got {diff}"
            assert torch.equal(default(ids).logits.argmax(-1), ref.argmax(-1))
            assert abs(loss(default) - loss(base)) < 0.01 * loss(base)
    # every_k_layers=2 keeps layer 0 dense and upcycles layer 1
    expected_layers = [1] if kwargs.get("every_k_layers") == 2 else [0, 1]
    assert [i for i, _ in moe.moe_blocks(exact)] == expected_layers


def test_the_stage_upcycles_with_the_default_noise_the_equivalence_test_checks():
    import inspect

    from kubetune.stages.train_moe import MoEConfig

    assert MoEConfig().noise_std == inspect.signature(moe.upcycle).parameters["noise_std"].default > 0


def test_unsupported_family_and_settings_fail_clearly(dense):
    with pytest.raises(ValueError, match="gpt2.*supported families are llama"):
        moe.upcycle(_tiny_dense("gpt2"))
    with pytest.raises(ValueError, match="top_k"):
        moe.upcycle(dense, top_k=1)
    with pytest.raises(ValueError, match="every_k_layers"):
        moe.upcycle(dense, every_k_layers=3)  # 2 layers: nothing left to upcycle


# ------------------------------------------------------------------ what trains


def _train(model, batches, steps, lr=1e-2):
    model.train()
    model.config.output_router_logits = True
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def _lm_batch(ids):
    return {"input_ids": ids, "labels": ids.clone()}


@pytest.mark.parametrize("kind, train_rest", [("experts", False), ("lora", False), ("experts", True)])
def test_only_intended_parameters_change(dense, kind, train_rest):
    model = moe.upcycle(dense, kind=kind)
    trainable = set(moe.freeze_for_moe(model, train_rest=train_rest))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model, [_lm_batch(_ids(s)) for s in range(2)], steps=3)

    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable, f"frozen but changed: {changed - trainable}; unchanged: {trainable - changed}"
    assert any(".mlp.gate." in n for n in changed)
    if kind == "lora":
        assert any("lora_B" in n for n in changed)
        assert not any(".base_" in n for n in trainable), "the shared base MLP of LoRA experts stays frozen"
    if train_rest:
        assert any("self_attn" in n for n in changed)
    else:
        assert all(".mlp.gate." in n or ".mlp.experts." in n for n in trainable)


def _router_grad_norm(model, ids):
    model.zero_grad()
    model.train()
    model(**_lm_batch(ids)).loss.backward()
    return sum(block.gate.weight.grad.norm().item() for _, block in moe.moe_blocks(model))


def test_router_gets_lm_gradient_once_symmetry_is_broken(dense):
    ids = _ids(3)
    identical = moe.upcycle(dense, noise_std=0.0)  # aux loss off: output_router_logits is False
    broken = moe.upcycle(dense, noise_std=0.05)
    # Identical experts + renormalised top-k weights: routing cannot change the output.
    assert _router_grad_norm(identical, ids) < 1e-6
    assert _router_grad_norm(broken, ids) > 1e-4


def test_router_z_loss_adds_its_gradient(dense):
    ids = _ids(4)
    coef = 0.1
    model = moe.upcycle(dense, noise_std=0.05)
    moe.freeze_for_moe(model)
    model.train()

    def router_grads():
        return [block.gate.weight.grad.clone() for _, block in moe.moe_blocks(model)]

    model.zero_grad()
    model(**_lm_batch(ids)).loss.backward()
    without = router_grads()

    zl = moe.RouterZLoss(model, coef)
    model.zero_grad()
    model(**_lm_batch(ids)).loss.backward()
    with_z = router_grads()
    zl.remove()

    # The expected extra gradient: coef * d/dW sum over layers of router_z_loss(router logits).
    model.zero_grad()
    out = model(input_ids=ids, output_router_logits=True)
    (coef * sum(moe.router_z_loss(logits) for logits in out.router_logits)).backward()
    expected = router_grads()

    for w, z, e in zip(without, with_z, expected):
        assert e.norm() > 1e-6
        assert torch.allclose(z - w, e, atol=1e-6, rtol=1e-4)
    assert len(zl.values) == 1 and zl.values[0] > 0


def test_router_losses_count_once_per_optimizer_step_under_gradient_accumulation(dense, tmp_path):
    """Two micro-batches of one row (accumulation 2) give the gradient of one step's loss:
    the window's mean LM loss + coef × the mean balance loss + coef × the mean z-loss."""
    import datasets
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    aux_coef, z_coef = 0.5, 0.2
    model = moe.upcycle(dense, noise_std=0.05, router_aux_loss_coef=aux_coef)
    moe.freeze_for_moe(model)
    model.config.output_router_logits = True
    rows = [_ids(seed, shape=(1, 16))[0] for seed in (7, 8)]
    captured = []

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            captured.extend(block.gate.weight.grad.clone() for _, block in moe.moe_blocks(model))

    before = {k: v.clone() for k, v in model.state_dict().items()}
    z_loss = moe.router_losses(model, aux_coef, z_coef, accumulation_steps=2)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=1,
                             gradient_accumulation_steps=2, learning_rate=1.0, optim="sgd", max_grad_norm=0.0,
                             lr_scheduler_type="constant", use_cpu=True, report_to=[], save_strategy="no",
                             logging_strategy="no", disable_tqdm=True)
    data = datasets.Dataset.from_list([{"input_ids": r.tolist(), "labels": r.tolist()} for r in rows])
    Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator,
            callbacks=[Capture()]).train()
    z_loss.remove()
    assert captured and z_loss.values

    # The same step by hand, on the weights before it.
    model.load_state_dict(before)
    model.zero_grad()
    for ids in rows:
        out = model(input_ids=ids[None], output_router_logits=True)
        lm = torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), ids[1:])
        z = sum(moe.router_z_loss(logits) for logits in out.router_logits)
        ((lm + aux_coef * out.aux_loss + z_coef * z) / 2).backward()
    for (_, block), g in zip(moe.moe_blocks(model), captured):
        assert torch.allclose(g, block.gate.weight.grad, atol=1e-6, rtol=1e-4)


# ------------------------------------------------------------------ routing on two sub-tasks

_COUNT = "one two three four five six seven eight nine ten".split()
_SHOP = "router modem laptop phone printer invoice refund billing login password".split()


def _two_task_batches(tokenizer, n=8, seed=0):
    """Two sub-tasks in one stream: counting up in number words, and a fixed product cycle."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        words = _COUNT if i % 2 == 0 else _SHOP
        start = rng.randrange(len(words))
        texts.append(" ".join(words[(start + j) % len(words)] for j in range(12)))
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return [{"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}]


def test_routing_is_not_collapsed_on_two_mixed_sub_tasks(dense, tokenizer):
    model = moe.upcycle(dense, num_experts=4, top_k=2, noise_std=0.05, router_aux_loss_coef=0.05)
    moe.freeze_for_moe(model)
    batches = _two_task_batches(tokenizer)
    losses = _train(model, batches, steps=12, lr=2e-2)
    assert losses[-1] < losses[0] - 0.5, losses  # it learns

    top1 = moe.expert_utilisation(model, batches, top1=True)
    for layer, shares in top1.items():
        assert max(shares) < 0.7, f"layer {layer} collapsed onto one expert: {shares}"
        assert sum(s > 0.05 for s in shares) >= 2, f"layer {layer} uses fewer than two experts: {shares}"

    # The two sub-tasks are routed differently (total variation between their top-1 shares).
    count_only = [{k: v[0::2] for k, v in batches[0].items()}]
    shop_only = [{k: v[1::2] for k, v in batches[0].items()}]
    a = moe.expert_utilisation(model, count_only, top1=True)
    b = moe.expert_utilisation(model, shop_only, top1=True)
    tv = max(0.5 * sum(abs(x - y) for x, y in zip(a[layer], b[layer])) for layer in a)
    assert tv > 0.2, (a, b)


def test_utilisation_counts_what_the_router_picks_and_skips_padding(dense):
    model = moe.upcycle(dense, num_experts=4, top_k=2)
    ids = _ids(7, shape=(1, 8))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])

    def collapse(module, args, output):
        # Real tokens go to experts (0, 1), in that order; padding to (3, 2), which must not count.
        logits, scores, _ = output
        indices = torch.tensor([[0, 1]] * 6 + [[3, 2]] * 2)
        return logits, scores, indices

    handles = [block.gate.register_forward_hook(collapse) for _, block in moe.moe_blocks(model)]
    batch = [{"input_ids": ids, "attention_mask": mask}]
    assert moe.expert_utilisation(model, batch) == {0: [0.5, 0.5, 0.0, 0.0], 1: [0.5, 0.5, 0.0, 0.0]}
    assert moe.expert_utilisation(model, batch, top1=True) == {0: [1.0, 0, 0, 0], 1: [1.0, 0, 0, 0]}
    for handle in handles:
        handle.remove()
    honest = moe.expert_utilisation(model, batch)
    assert all(sum(s > 0 for s in shares) > 2 for shares in honest.values()), honest


# ------------------------------------------------------------------ reporting


def test_param_counts_follow_the_architecture(dense):
    cfg = dense.config
    dense_total = sum(p.numel() for p in dense.parameters())
    mlp = 3 * cfg.hidden_size * cfg.intermediate_size  # gate, up, down
    router = 4 * cfg.hidden_size
    layers = cfg.num_hidden_layers

    full = moe.param_counts(moe.upcycle(dense, num_experts=4, top_k=2))
    assert full.total == dense_total + layers * (3 * mlp + router)
    assert full.active == dense_total + layers * (1 * mlp + router)

    half = moe.param_counts(moe.upcycle(dense, num_experts=4, top_k=2, every_k_layers=2))
    shared_gate = cfg.hidden_size  # Qwen2-MoE's gate of its (zero-width) shared expert
    assert half.total == dense_total + (3 * mlp + router + shared_gate)  # only layer 1 is sparse
    assert half.active == dense_total + (mlp + router + shared_gate)

    r = 8
    lora_per_expert = r * (cfg.hidden_size + 2 * cfg.intermediate_size) + r * (cfg.intermediate_size + cfg.hidden_size)
    lora = moe.param_counts(moe.upcycle(dense, num_experts=4, top_k=2, kind="lora", lora_rank=r))
    assert lora.total == dense_total + layers * (4 * lora_per_expert + router)
    assert lora.active == dense_total + layers * (2 * lora_per_expert + router)


def test_plot_utilisation_draws_every_layer_and_expert(tmp_path):
    util = {0: [0.4, 0.3, 0.2, 0.1], 3: [0.25, 0.25, 0.25, 0.25]}
    fig = moe.plot_utilisation(util)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "3"]
    assert len(ax.get_xticklabels()) == 4
    assert sorted(t.get_text() for t in ax.texts)[:2] == ["0.10", "0.20"]
    fig.savefig(tmp_path / "u.png")
    assert (tmp_path / "u.png").stat().st_size > 1000


# ------------------------------------------------------------------ save, reload, generate


@pytest.mark.parametrize("kwargs", [dict(), dict(every_k_layers=2), dict(kind="lora")])
def test_saved_model_reloads_with_plain_transformers_and_generates(dense, tokenizer, tmp_path, kwargs):
    from transformers import AutoModelForCausalLM

    model = moe.upcycle(dense, **kwargs)
    moe.freeze_for_moe(model)
    _train(model, [_lm_batch(_ids(5))], steps=2)  # trained weights, LoRA B no longer zero
    ids = _ids(6)
    with torch.no_grad():
        expected = model(ids).logits
    moe.merge_lora_experts(model)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, expected, atol=1e-5), "merging must not change the function"
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="eager").eval()
    assert type(reloaded).__name__ == type(model).__name__
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, expected, atol=1e-5)
    prompt = tokenizer("one two three", return_tensors="pt")
    generated = reloaded.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 5


# ------------------------------------------------------------------ through TRL's trainer


def test_lora_experts_train_through_sft_trainer_and_report(dense, tokenizer, tmp_path):
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    model = moe.upcycle(dense, kind="lora", num_experts=4, top_k=2, router_aux_loss_coef=0.01)
    moe.freeze_for_moe(model)
    lines = [b["input_ids"] for b in _two_task_batches(tokenizer, n=16)][0]
    data = Dataset.from_dict({"input_ids": [row.tolist() for row in lines]})
    z_loss = moe.RouterZLoss(model, coef=1e-3)
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(tmp_path / "out"),
            max_steps=4,
            per_device_train_batch_size=4,
            learning_rate=5e-3,
            logging_steps=2,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
        ),
        train_dataset=data,
        processing_class=tokenizer,
    )
    trainer.callback_handler.callbacks.insert(0, moe.make_router_loss_callback(z_loss))
    reported = []  # what a reporting callback such as MLflow's sees, as it runs after ours

    class Recorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            reported.append(dict(logs))

    trainer.add_callback(Recorder())
    trainer.train()
    z_loss.remove()

    logged = [entry for entry in reported if "loss" in entry]
    assert len(logged) == 2
    assert all(entry["aux_loss"] > 0 and entry["router_z_loss"] > 0 for entry in logged), logged
    counts = moe.param_counts(model)
    assert counts.active < counts.total
    util = moe.expert_utilisation(model, [{"input_ids": lines}])
    assert sorted(util) == [0, 1] and all(abs(sum(s) - 1) < 1e-9 for s in util.values())
