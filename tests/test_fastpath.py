"""The GPU fast path computes what the reference path computes (checked here on the CPU).

On the CPU the packed attention runs its per-example SDPA fallback and the loss its eager
chunk kernel; the GPU kernels (varlen FlashAttention, compiled chunks) are checked against
these same fallbacks by `bench/bench_train.py --check` on the GPU machine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kubetune.core import fastpath as fp


def _tiny_llama(seed: int = 0, tied: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=300, tie_word_embeddings=tied,
        max_position_embeddings=256,
    )
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg).float()


def _rows(lengths, seed=0, vocab=300, prompt=3):
    """One example per row; the first `prompt` tokens of each carry no loss."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in lengths:
        ids = rng.integers(1, vocab, n).tolist()
        labels = [-100] * prompt + ids[prompt:]
        rows.append({"input_ids": ids, "labels": labels, "position_ids": list(range(n))})
    return rows


def test_packed_row_attends_only_within_each_example():
    model = _tiny_llama()
    fp.register_attention()
    examples = [torch.randint(1, 300, (n,)) for n in (7, 12, 5, 9)]
    row = fp.build_row([(e.numpy(), e.numpy()) for e in examples], [0, 1, 2, 3], 40)
    assert row.cu_seqlens.tolist()[:5] == [0, 7, 19, 24, 33] and row.cu_seqlens[-1] == 40
    model.config._attn_implementation = fp.ATTN_IMPLEMENTATION
    packed = model(
        input_ids=row.input_ids[None], position_ids=row.position_ids[None],
        kt_cu_seqlens=row.cu_seqlens, kt_max_seqlen=row.max_seqlen,
    ).logits[0, :33]
    model.config._attn_implementation = "eager"
    alone = torch.cat([model(input_ids=e[None]).logits[0] for e in examples])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    # and the plain causal model over the same row differs: the check above can fail
    crossed = model(input_ids=row.input_ids[None, :33]).logits[0]
    assert (crossed[7:] - alone[7:]).abs().max() > 1e-3


def test_build_row_targets_never_cross_examples():
    a, b = np.arange(10, 15), np.arange(20, 24)
    row = fp.build_row([(a, a), (b, b)], [0, 1], 12, pad_token_id=0)
    tgt = row.targets.tolist()
    assert tgt[:9] == [11, 12, 13, 14, -100, 21, 22, 23, -100]
    assert tgt[9:] == [-100] * 3  # padding is never a target
    assert row.n_tokens == 9 and row.n_targets == 7
    assert row.position_ids.tolist()[:9] == [0, 1, 2, 3, 4, 0, 1, 2, 3]


def test_split_and_pack_keep_every_example_once():
    rows = [{"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3, 4, 5], "position_ids": [0, 1, 0, 1, 2]}]
    ex = fp.split_examples(rows)
    assert [e[0].tolist() for e in ex] == [[1, 2], [3, 4, 5]]
    lengths = np.random.default_rng(0).integers(1, 50, 200).tolist()
    bins = fp.pack_bins(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(200))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    # best-fit decreasing wastes little: within one row of the lower bound
    assert len(bins) <= -(-sum(lengths) // 64) + 1


@pytest.mark.parametrize("need_weight_grad", [True, False])
def test_linear_cross_entropy_matches_logits_path(need_weight_grad):
    torch.manual_seed(1)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=need_weight_grad)
    t = torch.randint(0, 50, (37,))
    t[::4] = -100
    n_valid = int((t != -100).sum())
    loss = fp.linear_cross_entropy(h, w, t, 1.0 / n_valid, chunk=8)  # 5 chunks, last one short
    ref = F.cross_entropy(h @ w.t(), t, ignore_index=-100)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-6)
    (2 * loss).backward()
    gh, gw = h.grad.clone(), (w.grad.clone() if need_weight_grad else None)
    h.grad = None
    if need_weight_grad:
        w.grad = None
    (2 * ref).backward()
    torch.testing.assert_close(gh, h.grad)
    if need_weight_grad:
        torch.testing.assert_close(gw, w.grad)


def test_first_step_loss_equals_transformers_padded_loss():
    model = _tiny_llama()
    rows = _rows([9, 14, 6, 11])
    # the reference: the same examples as one padded batch, transformers' own loss
    L = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    labels = torch.full((len(rows), L), -100)
    mask = torch.zeros(len(rows), L, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    got = fp.fast_train(model, rows, max_steps=1, lr=0.0, tokens_per_step=64, compile=False)
    assert got["final_loss"] == pytest.approx(ref, rel=1e-5)
    assert model.config._attn_implementation == "eager"  # restored


def _motif_rows(n_rows=24, seed=0):
    """A learnable task: every example repeats one short random motif."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_rows):
        motif = rng.integers(1, 300, 4).tolist()
        ids = (motif * 8)[: rng.integers(12, 32)]
        rows.append({"input_ids": ids, "labels": ids, "position_ids": list(range(len(ids)))})
    return rows


def test_training_lowers_loss_and_leaves_frozen_params_alone():
    model = _tiny_llama()
    for p in model.model.layers[0].parameters():
        p.requires_grad_(False)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    seen = []
    out = fp.fast_train(
        model, _motif_rows(), max_steps=20, lr=1e-2, tokens_per_step=128, compile=False,
        on_step=lambda step, loss, lr, tokens: seen.append((step, loss, tokens)),
    )
    assert [s for s, _, _ in seen] == list(range(20))
    assert all(0 < t <= 128 for _, _, t in seen)
    assert np.mean(out["losses"][-4:]) < np.mean(out["losses"][:4]) - 0.5
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_peft_model_trains_its_adapters_only():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fp.fast_train(model, _motif_rows(8), max_steps=2, lr=1e-2, tokens_per_step=128, compile=False)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert any("lora_B" in n for n in changed)


def test_flops_formula_counts_what_it_says():
    # 1.24B Llama-3.2-1B shape: 6·(N − V·d) + 12·L·d·S
    n, emb = 1_235_814_400, 128256 * 2048
    assert fp.flops_per_token(n, emb, 16, 2048, 2048) == 6 * (n - emb) + 12 * 16 * 2048 * 2048
    assert fp.mean_context([2, 2]) == 2.0 and fp.mean_context([1, 3]) == pytest.approx(2.5)


# --------------------------------------------------------------------------- the step's arithmetic


def _capture_grads(model):
    """Each trainable parameter's gradient as it stands after the step's last backward."""
    grads = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.register_post_accumulate_grad_hook(lambda p, n=n: grads.__setitem__(n, p.grad.detach().clone()))
    return grads


def _masked_rows(prompts, n=32, seed=0):
    """Rows of exactly n tokens, example i with its first prompts[i] tokens out of the loss."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in prompts:
        ids = rng.integers(1, 300, n).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * p + ids[p:], "position_ids": list(range(n))})
    return rows


def test_accumulating_k_rows_equals_one_row_of_k_times_the_tokens():
    rows = _masked_rows([2, 20, 9])  # 29, 11 and 22 targets: a per-row mean would weigh them wrongly
    runs = []
    for tokens, accum in ((32, 3), (96, 1)):
        model = _tiny_llama()
        grads = _capture_grads(model)
        out = fp.fast_train(model, rows, max_steps=1, lr=0.0, tokens_per_step=tokens, grad_accum=accum,
                            grad_clip=None, compile=False)
        runs.append((out["final_loss"], grads))
    (loss_k, grads_k), (loss_1, grads_1) = runs
    assert loss_k == pytest.approx(loss_1, rel=1e-6)
    assert grads_k.keys() == grads_1.keys() and grads_k
    for n in grads_k:
        torch.testing.assert_close(grads_k[n], grads_1[n], rtol=1e-5, atol=1e-7)


def test_loss_and_gradients_are_the_mean_over_the_steps_target_tokens():
    rows = _masked_rows([2, 20, 9, 30])
    model = _tiny_llama()
    ref_model = _tiny_llama()
    ids = torch.tensor([r["input_ids"] for r in rows])
    labels = torch.tensor([r["labels"] for r in rows])
    ref = ref_model(input_ids=ids, labels=labels).loss  # transformers: mean over every target of the batch
    ref.backward()
    grads = _capture_grads(model)
    out = fp.fast_train(model, rows, max_steps=1, lr=0.0, tokens_per_step=64, grad_accum=2, grad_clip=None,
                        compile=False)
    assert out["final_loss"] == pytest.approx(ref.item(), rel=1e-5)
    ref_grads = dict(ref_model.named_parameters())
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n].grad, rtol=1e-4, atol=1e-6)


def test_schedule_is_transformers_own_curve():
    from transformers import get_scheduler

    seen = []
    fp.fast_train(_tiny_llama(), _motif_rows(8), max_steps=10, lr=1e-3, warmup_steps=3, lr_scheduler="cosine",
                  tokens_per_step=128, compile=False, on_step=lambda s, loss, lr, t: seen.append(lr))
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
    sched = get_scheduler("cosine", optimizer=opt, num_warmup_steps=3, num_training_steps=10)
    want = []
    for _ in range(10):
        want.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert seen == pytest.approx(want)


def test_activation_checkpointing_changes_nothing_but_memory():
    model = _tiny_llama()
    plain = fp.fast_train(_tiny_llama(), _motif_rows(), max_steps=4, lr=1e-3, tokens_per_step=128, compile=False)
    recomputed = fp.fast_train(model, _motif_rows(), max_steps=4, lr=1e-3, tokens_per_step=128, compile=False,
                               activation_checkpointing=[1])
    assert recomputed["losses"] == pytest.approx(plain["losses"], rel=1e-6)
    assert "forward" not in vars(model.model.layers[1])  # the layer is itself again
    with pytest.raises(ValueError, match="activation_checkpointing"):
        fp.fast_train(model, _motif_rows(), max_steps=1, lr=0.0, tokens_per_step=128, compile=False,
                      activation_checkpointing=[7])


# --------------------------------------------------------------------------- checkpoints


def _lora(dropout=0.1):
    from peft import LoraConfig, get_peft_model

    model = _tiny_llama()
    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"))


class _Crash(Exception):
    pass


def test_resume_after_a_crash_ends_where_the_uninterrupted_run_ends(tmp_path):
    # LoRA dropout draws from the RNG: resuming equal needs the RNG, optimizer, schedule and data position
    kw = dict(max_steps=12, lr=1e-2, warmup_steps=2, lr_scheduler="cosine", tokens_per_step=128, compile=False)
    whole = fp.fast_train(_lora(), _motif_rows(), **kw)["losses"]

    def crash(step, *_):
        if step == 9:
            raise _Crash

    with pytest.raises(_Crash):
        fp.fast_train(_lora(), _motif_rows(), checkpoint_dir=tmp_path, save_steps=4, on_step=crash, **kw)
    assert fp.last_checkpoint(tmp_path).name == "fast-checkpoint-8"
    resumed = fp.fast_train(_lora(), _motif_rows(), checkpoint_dir=tmp_path, save_steps=4, **kw)
    assert resumed["resumed_from"] == 8
    assert resumed["losses"] == pytest.approx(whole, rel=1e-6)


def test_a_half_written_checkpoint_is_never_resumed(tmp_path):
    from kubetune.core.train import COMPLETE_MARKER

    fp.fast_train(_tiny_llama(), _motif_rows(8), max_steps=5, lr=1e-3, tokens_per_step=128, compile=False,
                  checkpoint_dir=tmp_path, save_steps=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fast-checkpoint-2", "fast-checkpoint-4"]
    (tmp_path / "fast-checkpoint-6.tmp").mkdir()  # killed while writing: never renamed into place
    (tmp_path / "fast-checkpoint-6.tmp" / COMPLETE_MARKER).write_text("6")
    (tmp_path / "fast-checkpoint-4" / COMPLETE_MARKER).unlink()  # written, never marked
    assert fp.last_checkpoint(tmp_path).name == "fast-checkpoint-2"


_KILL_SCRIPT = """
import json, sys, time
sys.path.insert(0, {tests!r})
from test_fastpath import _lora, _motif_rows
from kubetune.core import fastpath as fp
out = fp.fast_train(_lora(), _motif_rows(), max_steps=30, lr=1e-2, tokens_per_step=128, compile=False,
                    checkpoint_dir={ckpt!r}, save_steps=5, on_step=lambda *a: time.sleep(0.2))
json.dump(out["losses"], open({result!r}, "w"))
"""


def test_kill_9_and_the_same_command_again_resumes(tmp_path):
    import json
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    script = tmp_path / "train.py"
    script.write_text(_KILL_SCRIPT.format(tests=str(Path(__file__).parent), ckpt=str(tmp_path / "ckpt"),
                                          result=str(tmp_path / "losses.json")))
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen([sys.executable, str(script)], env=env)
    deadline = time.time() + 120
    while fp.last_checkpoint(tmp_path / "ckpt") is None and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (tmp_path / "losses.json").exists()
    subprocess.run([sys.executable, str(script)], env=env, check=True, timeout=180)
    resumed = json.loads((tmp_path / "losses.json").read_text())
    whole = fp.fast_train(_lora(), _motif_rows(), max_steps=30, lr=1e-2, tokens_per_step=128,
                          compile=False)["losses"]
    assert len(resumed) == 30
    assert resumed[-1] == pytest.approx(whole[-1], rel=1e-2)


# --------------------------------------------------------------------------- several processes


def _two_rank_worker(rank: int, init_file: str, out: str):
    import json

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    result = {}
    kw = dict(max_steps=6, lr=1e-2, tokens_per_step=64, grad_accum=1, compile=False)
    for name, make in (("full", _tiny_llama), ("lora", lambda: _lora(dropout=0.0))):
        model = make()
        result[name] = fp.fast_train(model, _motif_rows(), checkpoint_dir=f"{out}-{name}", save_steps=3, **kw)["losses"]
        if name == "full":  # sharded by FSDP2: gathered for saving
            fp.save_sharded_model(model, f"{out}-model")
        # a rerun of the same command resumes from the sharded checkpoint of step 3 and ends the same
        again = fp.fast_train(make(), _motif_rows(), checkpoint_dir=f"{out}-{name}", save_steps=3, **kw)
        result[name + "_resumed"] = [again["resumed_from"], again["losses"]]
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


def test_two_gloo_processes_follow_the_one_process_run_step_for_step(tmp_path):
    """2 processes × 1 row per step (FSDP2 for full, DDP for LoRA) = 1 process × 2 rows per step."""
    import json

    import torch.multiprocessing as mp
    from transformers import LlamaForCausalLM

    out = str(tmp_path / "two.json")
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "init"), out), nprocs=2)
    two = json.loads((tmp_path / "two.json").read_text())
    kw = dict(max_steps=6, lr=1e-2, tokens_per_step=64, grad_accum=2, compile=False)
    one_full = _tiny_llama()
    for name, model in (("full", one_full), ("lora", _lora(dropout=0.0))):
        one = fp.fast_train(model, _motif_rows(), **kw)["losses"]
        assert one[-1] < one[0] - 0.05, one  # it trains: the comparison is not between two flat lines
        np.testing.assert_allclose(two[name], one, atol=1e-3, rtol=0)
        assert two[name + "_resumed"][0] == 3
        np.testing.assert_allclose(two[name + "_resumed"][1], one, atol=1e-3, rtol=0)
    saved = LlamaForCausalLM.from_pretrained(tmp_path / "two.json-model")
    for (n, a), b in zip(one_full.state_dict().items(), saved.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3, msg=n)


# --------------------------------------------------------------------------- settings


def test_every_train_config_field_is_honoured_or_sends_the_run_to_the_trainer():
    """A TrainConfig field the fast path's table does not list fails here: say what the fast path
    does with it in fastpath.SETTINGS (until then fast_path_blocker sends every run to the Trainer)."""
    from dataclasses import fields

    from kubetune.core.train import TrainConfig

    assert {f.name for f in fields(TrainConfig)} == set(fp.SETTINGS)


def test_a_setting_the_fast_path_does_not_know_sends_the_run_to_the_trainer():
    from dataclasses import field, make_dataclass

    from kubetune.core.train import TrainConfig

    Later = make_dataclass("Later", [("a_later_setting", int, field(default=0))], bases=(TrainConfig,))
    model = _tiny_llama()
    assert fp.fast_path_blocker(TrainConfig(), model, "cuda") is None
    assert "a_later_setting" in fp.fast_path_blocker(Later(), model, "cuda")


@pytest.mark.parametrize("change, reason", [
    ({}, None),
    ({"lr_scheduler": "cosine", "gradient_checkpointing": True, "precision": "bf16-mixed",
      "gradient_accumulation_steps": 4, "optimizer": "adamw_torch_fused"}, None),
    ({"method": "qlora"}, "qlora"),
    ({"method": "prefix"}, "prefix"),
    ({"precision": "fp32"}, "precision=fp32"),
    ({"optimizer": "adafactor"}, "optimizer=adafactor"),
    ({"lr_scheduler": "no_such_schedule"}, "lr_scheduler 'no_such_schedule'"),
    ({"lr_scheduler": "reduce_lr_on_plateau"}, "lr_scheduler 'reduce_lr_on_plateau'"),
    ({"lr_scheduler": "constant_with_warmup", "optimizer": "adamw_torch"}, None),
    ({"fast_path": "off"}, "fast_path=off"),
    ({"eval_steps": 5}, "eval_steps=5"),
])
def test_fast_path_blocker_names_the_setting(change, reason):
    from kubetune.core.train import TrainConfig

    got = fp.fast_path_blocker(TrainConfig(**change), _tiny_llama(), "cuda")
    assert got is None if reason is None else reason in got
    if "fast_path" not in change:
        assert "CUDA" in fp.fast_path_blocker(TrainConfig(**change), _tiny_llama(), "cpu")
