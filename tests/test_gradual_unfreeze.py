"""Gradual unfreezing: what trains in each epoch, at which rate, in which mode; correct under
real DDP and on resume. And LP-FT's linear probe."""

from __future__ import annotations

import itertools
import os
import sys

import pytest
import torch

from helpers import REPO, RecordTraining, build, check_run, run_cli, same, snapshot, trainer
from transfer_learning.errors import ConfigError
from transfer_learning.model.backbones import efficientnet_lite0
from transfer_learning.model.strategies import GradualUnfreeze
from transfer_learning.run.checkpoints import safe_load

PROBES = {"PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}


def test_stages_split_the_blocks_from_the_top_and_ramp_from_a_fraction_of_the_head_rate():
    net = efficientnet_lite0(num_classes=3)
    strategy = GradualUnfreeze(head_lr=1e-3, backbone_lr=1e-4, freeze_epochs=2, stages=3, ramp_from=0.02)
    strategy.prepare(net)
    names = [n for n, _ in net.blocks()]  # 11 blocks, input side first
    groups = strategy.param_groups(net)
    assert [g["name"] for g in groups] == ["backbone/stage1", "backbone/stage2", "backbone/stage3", "head"]
    sizes = [len(g["params"]) for g in groups[:3]]
    blocks = dict(net.blocks())
    assert sizes == [sum(len(blocks[n]) for n in names[7:]), sum(len(blocks[n]) for n in names[3:7]),
                     sum(len(blocks[n]) for n in names[:3])]  # fmt: skip
    assert strategy.unfreeze_epochs() == [2, 3, 4]
    assert [strategy.frozen_blocks(net, e) for e in range(6)] == [11, 11, 7, 3, 0, 0]
    # Stage 1 unfreezes at epoch 2 at 0.02 * head_lr = 2e-5 = 0.2 * backbone_lr, reaches 1 after one epoch.
    assert [strategy.lr_scale("backbone/stage1", p) for p in (0, 1.99, 2, 2.5, 3, 9)] == pytest.approx(
        [0, 0, 0.2, 0.6, 1, 1]
    )
    assert strategy.lr_scale("backbone/stage3/no_decay", 4.25) == pytest.approx(0.4)
    assert strategy.lr_scale("head", 0) == 1
    with pytest.raises(ConfigError, match=r"strategy\.stages=12: this backbone has 11 blocks"):
        GradualUnfreeze(stages=12).param_groups(net)
    assert "never unfreezes" in GradualUnfreeze(freeze_epochs=3).check_epochs(3)
    assert "1 stage(s) never train" in GradualUnfreeze(stages=3).check_epochs(3)
    assert GradualUnfreeze(stages=3).check_epochs(4) is None
    with pytest.raises(ConfigError, match=r"strategy\.freeze_epochs=-1"):
        GradualUnfreeze(freeze_epochs=-1)


@pytest.mark.parametrize("keep_bn_stats", [False, True])
def test_each_epoch_trains_exactly_the_unfrozen_stages_at_their_ramped_rates(shapes_dir, keep_bn_stats):
    """3 stages from the top, one frozen epoch: per batch, every group's rate; per epoch, which
    blocks require gradients and are in train mode, and which blocks (parameters and BatchNorm
    statistics) changed. With strategy.freeze_bn_stats (the default), unfrozen blocks train with
    their BatchNorm layers in eval mode: affine weights move, running statistics stay pretrained."""
    module, datamodule = build(
        shapes_dir, "strategy=gradual_unfreeze", "strategy.stages=3", "scheduler=constant",
        f"strategy.freeze_bn_stats={keep_bn_stats}", image_size=48,
    )  # fmt: skip
    pretrained = snapshot(module)
    stats = {n: [b.clone() for b in m.buffers()] for n, m in RecordTraining._blocks(module)}
    head_before = module.net.head.weight.detach().clone()
    record = RecordTraining()
    trainer(callbacks=[record], max_epochs=4, limit_train_batches=3).fit(module, datamodule)

    names = list(pretrained)  # input side first
    stage_of = {n: 3 if i < 3 else 2 if i < 7 else 1 for i, n in enumerate(names)}
    start = {1: 1, 2: 2, 3: 3}  # the epoch each stage unfreezes in
    head_lr, backbone_lr, ramp_from = 2e-3, 2e-4, 0.01
    assert len(record.batches) == 12
    assert sum(bool(v) for v in record.batches[0]["norm_train"].values()) >= 9  # blocks with BatchNorm
    for b in record.batches:
        progress = b["epoch"] + b["batch"] / 3
        assert b["lr"]["head"] == pytest.approx(head_lr)
        for stage in (1, 2, 3):
            since = progress - start[stage]
            a = ramp_from * head_lr / backbone_lr
            expected = 0.0 if since < 0 else backbone_lr * min(1.0, a + (1 - a) * since)
            where = (b["epoch"], b["batch"], stage)
            assert b["lr"][f"backbone/stage{stage}"] == pytest.approx(expected), where
        for n in names:
            trains = b["epoch"] >= start[stage_of[n]]
            assert b["grad"][n] is trains, (b["epoch"], n)
            assert all(x is (trains and not keep_bn_stats) for x in b["norm_train"][n]), (b["epoch"], n)
            if not keep_bn_stats:
                assert b["train"][n] is trains, (b["epoch"], n)

    assert not torch.equal(module.net.head.weight, head_before)
    blocks = RecordTraining._blocks(module)
    for epoch, after in enumerate(record.after_epoch):
        for n, m in blocks:
            if epoch < start[stage_of[n]]:  # frozen so far: weights and BatchNorm statistics as pretrained
                assert same(after[n], pretrained[n]), (epoch, n)
            else:
                params = len(list(m.parameters()))
                assert not same(after[n][:params], pretrained[n][:params]), (epoch, n)
                if stats[n]:  # a block with BatchNorm statistics
                    assert same(after[n][params:], stats[n]) is keep_bn_stats, (epoch, n)


def test_a_frozen_phase_records_no_autograd_graph_for_the_frozen_blocks(shapes_dir):
    """What makes a frozen epoch cost no backward work: the loss's graph reaches the head's
    parameters only (all frozen) or the unfrozen blocks' (partly frozen)."""
    module, _ = build(shapes_dir, "strategy=gradual_unfreeze", "strategy.stages=3", image_size=48)
    module.train()
    x, y = torch.randn(2, 3, 48, 48), torch.tensor([0, 1])

    def reached(epoch: int) -> set[int]:
        module.strategy.on_epoch_start(module.net, epoch)
        module.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(module(x), y).backward()
        return {id(p) for p in module.net.backbone.parameters() if p.grad is not None}

    blocks = module.net.blocks()
    assert reached(0) == set()
    assert reached(1) == {id(p) for _, ps in blocks[7:] for p in ps}
    assert reached(3) == {id(p) for p in module.net.backbone.parameters()}


def test_layer_decay_trains_every_block_in_train_mode_in_every_epoch(shapes_dir):
    module, datamodule = build(shapes_dir, "strategy=layer_decay", "scheduler=constant", image_size=48)
    pretrained = snapshot(module)
    record = RecordTraining()
    trainer(callbacks=[record], max_epochs=2, limit_train_batches=2).fit(module, datamodule)
    rates = module.strategy.block_lrs(module.net)
    for b in record.batches:
        assert all(b["grad"].values()) and all(b["train"].values())
        assert {k.removeprefix("block/"): v for k, v in b["lr"].items() if k != "head"} == pytest.approx(
            rates
        )
    for after in record.after_epoch:
        assert all(not same(after[n], pretrained[n]) for n in pretrained)


def test_lp_ft_starts_fine_tuning_from_the_probe_a_reference_logistic_regression_finds(shapes_dir, tmp_path):
    """The probe's head equals scikit-learn's LogisticRegression on the same features (same L2),
    and fine-tuning then trains every parameter at the configured rates."""
    from sklearn.linear_model import LogisticRegression

    module, datamodule = build(
        shapes_dir, "strategy=lp_ft", "strategy.probe_weight_decays=[0.001]",
        f"paths.feature_cache_dir={tmp_path}", "scheduler=constant", image_size=64,
    )  # fmt: skip

    class HeadAtStart(RecordTraining):
        def on_train_start(self, trainer, pl_module):
            self.head = [t.detach().clone() for t in pl_module.net.head.parameters()]

    record = HeadAtStart()
    pretrained = snapshot(module)
    trainer(callbacks=[record], max_epochs=1, limit_train_batches=2).fit(module, datamodule)

    features = module._features_before_fit()  # what the build path handed over: the probe's features
    x, y = features["train"].features[0].double().numpy(), features["train"].labels.numpy()
    reference = LogisticRegression(C=1 / (1e-3 * len(y)), max_iter=5000, tol=1e-10).fit(x, y)
    weight, bias = record.head

    def objective(w, b):  # what both minimise: mean cross-entropy + 0.5 * L2 * |w|^2
        w, b = torch.as_tensor(w, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
        logits = torch.from_numpy(x) @ w.T + b
        return float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)) + 0.5e-3 * w.pow(2).sum())

    assert objective(weight, bias) == pytest.approx(
        objective(reference.coef_, reference.intercept_), rel=1e-5
    )
    assert torch.allclose(weight.double(), torch.from_numpy(reference.coef_), atol=2e-3)
    centred = torch.from_numpy(reference.intercept_ - reference.intercept_.mean())  # softmax ignores a shift
    assert torch.allclose(bias.double() - bias.double().mean(), centred, atol=1e-2)  # |b| up to ~5
    vx, vy = features["val"].features[0], features["val"].labels
    probe_acc = float(((vx @ weight.T + bias).argmax(1) == vy).float().mean())
    assert module.probe_result["val_acc"] == pytest.approx(probe_acc, abs=1e-6)
    assert probe_acc > 0.5  # 5 classes: far above chance on pretrained features
    assert record.batches[0]["lr"] == {"backbone": 1e-4, "head": 1e-4}
    assert all(record.batches[0]["grad"].values()) and all(record.batches[0]["train"].values())
    assert all(not same(record.after_epoch[0][n], pretrained[n]) for n in pretrained)


@pytest.mark.slow
def test_ddp_gradual_unfreeze_synchronises_the_body_after_it_unfreezes(tmp_path, shapes_dir):
    """Two real processes (gloo): the frozen epoch leaves the body pretrained on both; after the
    unfreeze epoch the body has trained and is identical on both ranks, though each saw other
    batches."""
    replicas = tmp_path / "replicas"
    result = run_cli(
        tmp_path, "trainer=ddp_cpu", f"data.root={shapes_dir}", "input.image_size=48", "data.batch_size=8",
        "strategy=gradual_unfreeze", "trainer.max_epochs=2", "logger=csv", "worst_samples=0",
        "+callbacks.replicas._target_=probes.SaveReplicas", f"+callbacks.replicas.folder={replicas}",
        env=PROBES,
    )  # fmt: skip
    check_run(tmp_path, result, "gradual_unfreeze")
    assert "find_unused_parameters=True" in result.stdout + result.stderr
    pretrained = efficientnet_lite0(num_classes=5).backbone.state_dict()
    saved = {(r, e): torch.load(replicas / f"rank{r}-epoch{e}.pt") for r in (0, 1) for e in (0, 1)}
    assert saved[0, 0]["world_size"] == 2
    assert saved[0, 0]["first_labels"] != saved[1, 0]["first_labels"]  # each rank its own shard
    for rank in (0, 1):
        assert not any(saved[rank, 0]["requires_grad"]) and all(saved[rank, 1]["requires_grad"])
        assert all(torch.equal(saved[rank, 0]["backbone"][k], v) for k, v in pretrained.items())
    after = [saved[r, 1]["backbone"] for r in (0, 1)]
    float_keys = [k for k, v in pretrained.items() if v.is_floating_point()]
    assert all(torch.equal(after[0][k], after[1][k]) for k in float_keys if "running" not in k)
    changed = [k for k in float_keys if "running" not in k and not torch.equal(after[0][k], pretrained[k])]
    assert len(changed) > 0.9 * len([k for k in float_keys if "running" not in k])


@pytest.mark.slow
def test_resume_after_the_unfreeze_epoch_ends_where_the_uninterrupted_run_ends(tmp_path, shapes_dir):
    """Killed right after the unfreeze epoch's checkpoint, resumed: the body keeps training, and
    the run ends with the uninterrupted run's weights and optimizer state."""
    args = [f"data.root={shapes_dir}", "input.image_size=48", "data.batch_size=8",
            "strategy=gradual_unfreeze",
            "strategy.ramp_epochs=2", "logger=csv", "trainer.max_epochs=4", "worst_samples=0"]  # fmt: skip
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir()
    killed.mkdir()
    assert run_cli(straight, *args).returncode == 0
    stopped = run_cli(killed, *args, "+callbacks.kill._target_=probes.KillAtEpoch", "+callbacks.kill.epoch=2",
                      env=PROBES)  # fmt: skip
    assert stopped.returncode == -9, stopped.stderr[-2000:]
    last = killed / "run" / "checkpoints" / "last.ckpt"
    interrupted = safe_load(last)
    assert interrupted["epoch"] == 1  # the unfreeze epoch is done, the ramp is not
    resumed = run_cli(killed, *args, f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    final, expected = safe_load(last), safe_load(straight / "run" / "checkpoints" / "last.ckpt")
    assert final["epoch"] == expected["epoch"] == 3
    for key, value in expected["state_dict"].items():
        assert torch.allclose(final["state_dict"][key].float(), value.float(), atol=1e-5, rtol=1e-4), key
    body = [k for k in expected["state_dict"] if k.startswith("net.backbone.") and k.endswith("weight")]
    moved = [k for k in body if not torch.equal(final["state_dict"][k], interrupted["state_dict"][k])]
    assert len(moved) > 0.9 * len(body)  # the resumed run trained the body
    assert final["base_lrs"] == pytest.approx(expected["base_lrs"])
    assert final["lr_schedulers"][0]["last_epoch"] == expected["lr_schedulers"][0]["last_epoch"]
    (opt_final,), (opt_expected,) = final["optimizer_states"], expected["optimizer_states"]
    assert [g["lr"] for g in opt_final["param_groups"]] == pytest.approx(
        [g["lr"] for g in opt_expected["param_groups"]]
    )
    for index, state in opt_expected["state"].items():
        got = opt_final["state"][index]
        assert torch.allclose(got["exp_avg_sq"], state["exp_avg_sq"], atol=1e-8, rtol=1e-3), index
        assert float(got["step"]) == float(state["step"])
    assert sys.executable  # the runs above are real processes


@pytest.mark.parametrize("scheduler", ["cosine", "one_cycle"])
def test_the_unfreeze_ramp_multiplies_any_schedule_without_disturbing_it(shapes_dir, scheduler):
    """The ramp sits on top of the schedule: torch's chainable CosineAnnealingLR (which steps
    from the group's current rate) and the one-cycle factor both go on as if there were no ramp,
    while the body trains at schedule x ramp; the head's and the body's ratio is kept."""
    import math

    from transfer_learning.model.schedules import one_cycle

    module, datamodule = build(
        shapes_dir, "strategy=gradual_unfreeze", "strategy.ramp_epochs=2", f"scheduler={scheduler}",
        "trainer.max_epochs=4", image_size=32,
    )  # fmt: skip
    record = RecordTraining()
    epochs, batches = 4, 2
    trainer(callbacks=[record], max_epochs=epochs, limit_train_batches=batches).fit(module, datamodule)
    head_lr, backbone_lr = 2e-3, 2e-4
    if scheduler == "cosine":
        factors = [0.5 * (1 + math.cos(math.pi * b["epoch"] / epochs)) for b in record.batches]
    else:
        reference = one_cycle(torch.optim.SGD([torch.zeros(1)], lr=1.0), total_steps=epochs * batches)
        factors = []
        for _ in record.batches:
            factors.append(reference.get_last_lr()[0])
            reference.optimizer.step()
            reference.step()
    strategy = module.strategy
    for b, factor in zip(record.batches, factors, strict=True):
        progress = b["epoch"] + b["batch"] / batches
        assert b["lr"]["head"] == pytest.approx(head_lr * factor, rel=1e-6)
        expected = backbone_lr * factor * strategy.lr_scale("backbone", progress)
        assert b["lr"]["backbone"] == pytest.approx(expected, rel=1e-6, abs=1e-12), b
    assert record.batches[-1]["lr"]["backbone"] > 0


def test_one_cycle_rises_then_falls_and_keeps_the_groups_ratio():
    a, b = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 0.1}])
    from transfer_learning.model.schedules import one_cycle

    schedule = one_cycle(optimizer, total_steps=100, pct_start=0.25)
    rates = []
    for _ in range(100):
        rates.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        schedule.step()
    head = [r[0] for r in rates]
    assert head[0] == pytest.approx(1 / 25) and max(head) == pytest.approx(1.0) and head.index(1.0) == 25
    assert head[-1] == pytest.approx(1 / 25 / 1e4, rel=1e-3)
    assert all(x <= y for x, y in itertools.pairwise(head[:26]))
    assert all(x >= y for x, y in itertools.pairwise(head[25:]))
    assert all(r[1] == pytest.approx(0.1 * r[0]) for r in rates)
