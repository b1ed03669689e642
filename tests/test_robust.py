"""The comparators' defining properties: GroupDRO's weight rises on the worst group, JTT's upweighted set is
exactly the first model's training errors and it retrains from the initial state, DFR changes no parameter but
the last layer's; the selection rules; every method name reads back into the settings that make it."""

from __future__ import annotations

import csv
from copy import deepcopy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from torch import nn

from ppi_med.engine import PPIIteration
from ppi_med.methods import method_settings
from ppi_med.ppi import PPIConfig
from ppi_med.robust import (
    JTT,
    DFRHandler,
    GroupDRO,
    GroupIndex,
    JTTHandler,
    RobustConfig,
    RobustLoss,
    batch_groups,
    fit_last_layer,
    last_linear,
    worst_group_accuracy,
)
from ppi_med.saliency import METHODS


def test_groupdro_weight_rises_on_the_worst_group_and_the_loss_follows_it():
    groups = GroupIndex(["A/0", "A/1", "B/0", "B/1"])
    dro = GroupDRO(groups, step_size=0.5)
    names = ["A/0", "A/1", "B/0", "B/1"] * 2
    # B/1 is the worst group at every step
    losses = torch.tensor([0.1, 0.2, 0.1, 2.0] * 2, requires_grad=True)
    weights = []
    for _ in range(5):
        loss = dro.loss(losses, names)
        weights.append(dro.q[groups.indices(["B/1"])].item())
    assert all(b > a for a, b in zip(weights, weights[1:])) and weights[-1] > 0.9
    assert float(dro.q.sum()) == pytest.approx(1.0)
    # the robust loss is the q-weighted group mean: its gradient goes mostly to the worst group's samples
    loss.backward()
    grad = losses.grad.reshape(2, 4).sum(dim=0)
    assert grad[3] > 10 * grad[:3].max()
    # a group absent from a batch keeps its weight
    before = dro.q.clone()
    dro.loss(torch.tensor([5.0, 5.0]), ["A/0", "A/0"])
    assert dro.q[0] > before[0] and dro.q[1] / dro.q[2] == pytest.approx(float(before[1] / before[2]))


def test_groupdro_names_an_unknown_group():
    dro = GroupDRO(GroupIndex(["A/0", "A/1"]))
    with pytest.raises(KeyError, match="'C/1' is not among the training groups"):
        dro.loss(torch.ones(1), ["C/1"])


def test_groups_come_from_the_record_or_its_site_and_label():
    assert batch_groups({"site": ["A", "B"], "label": torch.tensor([1, 0])}) == ["A/1", "B/0"]
    assert batch_groups({"group": ["cue1/0"], "label": torch.tensor([0])}) == ["cue1/0"]
    assert batch_groups({"label": torch.tensor([[1], [0]])}) == ["1", "0"]
    idx = GroupIndex.from_records([{"site": "A", "label": 1}, {"site": "A", "label": 1}, {"site": "B", "label": 0}])
    assert idx.names == ["A/1", "B/0"] and idx.counts.tolist() == [2.0, 1.0]


class _Digits(torch.utils.data.Dataset):
    """40 noisy 2-feature records; a tenth carry the wrong label, so a briefly trained model errs on some."""

    def __init__(self, n: int = 40, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.y = (torch.arange(n) % 2).long()
        self.x = torch.randn(n, 2, generator=g) + 1.5 * self.y[:, None].float()
        self.y[::10] = 1 - self.y[::10]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": self.y[i], "case": f"r{i}", "site": "A"}


def _trainer(net, data, robust_cfg, epochs, handlers):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    jtt = JTT(robust_cfg.upweight)
    loss = RobustLoss(robust_cfg, [data[i] for i in range(len(data))], jtt)
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=epochs,
        train_data_loader=loader,
        network=net,
        optimizer=opt,
        loss_function=nn.CrossEntropyLoss(),
        iteration_update=PPIIteration(PPIConfig(enabled=False), robust=loss),
        train_handlers=handlers(jtt, opt),
        decollate=False,
    )
    return trainer, jtt


def test_jtt_upweights_exactly_the_first_models_training_errors_and_retrains_from_the_start(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))
    initial = deepcopy(net.state_dict())
    data = _Digits()
    cfg = RobustConfig(method="jtt", jtt_epochs=1, upweight=5.0)
    plain = torch.utils.data.DataLoader(data, batch_size=16)
    seen = {}

    def keep_first_model(engine):  # attached before JTT's handler: the model that JTT reads its errors from
        seen["model"] = deepcopy(net)

    def keep_restart(engine):
        seen["restarted"] = deepcopy(net.state_dict())

    def handlers(jtt, opt):
        return [
            _Hook(Events.EPOCH_COMPLETED(once=1), keep_first_model),
            JTTHandler(jtt, net, opt, plain, cfg.jtt_epochs, tmp_path),
            _Hook(Events.EPOCH_COMPLETED(once=1), keep_restart),
        ]

    trainer, jtt = _trainer(net, data, cfg, 3, handlers)
    trainer.run()
    with torch.no_grad():
        pred = seen["model"].eval()(data.x).argmax(dim=1)
    expected = {f"r{i}" for i in torch.nonzero(pred != data.y).flatten().tolist()}
    assert expected and len(expected) < len(data)
    assert jtt.errors == expected
    with (tmp_path / "error_set.csv").open() as f:
        assert {row["case"] for row in csv.DictReader(f)} == expected
    for k, v in initial.items():  # the second stage starts from the initial weights
        assert torch.equal(seen["restarted"][k], v), k
    w = jtt.weights(["r0", "r1", *sorted(expected)[:1]])
    assert w.tolist()[-1] == 5.0 and w.tolist()[0] == (5.0 if "r0" in expected else 1.0)


def test_jtt_refuses_a_first_stage_that_leaves_nothing_to_retrain(tmp_path):
    net = nn.Linear(2, 2)
    cfg = RobustConfig(method="jtt", jtt_epochs=2)
    plain = torch.utils.data.DataLoader(_Digits(), batch_size=16)

    def handlers(jtt, opt):
        return [JTTHandler(jtt, net, opt, plain, 2, tmp_path)]

    with pytest.raises(ValueError, match="leaves no epoch to retrain"):
        _trainer(net, _Digits(), cfg, 2, handlers)


class _Hook:
    def __init__(self, event, fn) -> None:
        self.event, self.fn = event, fn

    def attach(self, engine) -> None:
        engine.add_event_handler(self.event, self.fn)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.BatchNorm1d(6))
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.backbone(x))


def _spurious_set(n: int, seed: int, p_agree: float):
    """Feature 0 carries the label weakly, feature 1 (the 'cue') agrees with it in ``p_agree`` of records."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    cue = np.where(rng.random(n) < p_agree, y, 1 - y)
    x = np.stack([y + rng.normal(0, 0.7, n), 3.0 * cue + rng.normal(0, 0.1, n), rng.normal(0, 1, n)], axis=1)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y), [f"cue{c}/{v}" for c, v in zip(cue, y)]


def test_dfr_changes_the_last_layer_only_and_balancing_the_groups_moves_it_off_the_cue(tmp_path):
    torch.manual_seed(0)
    net = _Net()
    x, y, groups = _spurious_set(200, 0, 0.9)
    # a trained model would read both; any fixed backbone shows the property
    loader = [{"image": x, "label": y, "group": groups}]
    before = deepcopy(net.state_dict())
    out = DFRHandler(net, loader, None, tmp_path / "model_dfr.pt", c=1.0, draws=5)()
    after = net.state_dict()
    head = {n for n, _ in net.named_parameters() if n.startswith("head.")}
    for k, v in before.items():
        same = torch.equal(after[k], v)
        assert same != (k in head), k  # every backbone tensor (buffers too) unchanged, the head changed
    assert last_linear(net) is net.head
    saved = torch.load(out, weights_only=True)["model"]
    assert torch.equal(saved["head.weight"], net.head.weight.detach())


def test_dfr_fit_balances_groups_so_a_cue_that_agrees_with_the_label_counts_less():
    x, y, groups = _spurious_set(400, 1, 0.9)
    feats, labels = x.numpy(), y.numpy()
    w_bal, _ = fit_last_layer(feats, labels, groups, 2, c=1.0, draws=5)
    w_all, _ = fit_last_layer(feats, labels, [str(v) for v in labels], 2, c=1.0, draws=5)
    # on the cue-balanced subsets the cue says nothing about the label; the lesion-like feature stays
    cue_share = lambda w: abs(float(w[1, 1])) / abs(float(w[1, 0]))  # noqa: E731
    assert cue_share(w_bal) < 0.5 * cue_share(w_all)
    with pytest.raises(ValueError, match="needs records of every class"):
        fit_last_layer(feats[labels == 1], labels[labels == 1], ["a"] * int((labels == 1).sum()), 2)


def test_worst_group_accuracy_is_the_lowest_groups():
    assert worst_group_accuracy([1, 1, 0, 0], [1, 0, 0, 0], ["A/1", "A/0", "A/0", "B/0"]) == 0.5
    assert worst_group_accuracy([1], [1], ["x"]) == 1.0


@pytest.mark.parametrize(
    "name",
    [
        "baseline",
        "ppi_wbp",
        "groupdro",
        "jtt",
        "dfr",
        "ppi_wbp+dfr",
        "random_mask+jtt",
        "ppi_gradcam_random_mask+jtt",
        "ppi_wbp_zero+dfr",
        "ppi_wbp:mode=detached,partner=roll+dfr",
    ],
)
def test_a_method_name_reads_back_into_the_settings_that_name_it(name):
    settings = method_settings(name, METHODS)
    ppi, robust = PPIConfig(**settings["ppi"]), RobustConfig(**settings["robust"])
    assert robust.method_name(ppi.method) == name


def test_bad_method_names_and_settings_are_named():
    with pytest.raises(ValueError, match="after '\\+' comes one of groupdro, jtt, dfr"):
        method_settings("ppi_wbp+mixup", METHODS)
    with pytest.raises(ValueError, match="robust method must be one of"):
        RobustConfig(method="irm")
    with pytest.raises(ValueError, match="jtt_epochs"):
        RobustConfig(method="jtt", jtt_epochs=0)
    assert RobustConfig(method="groupdro").weight_decay(1e-4) == 0.1
    assert RobustConfig().weight_decay(1e-4) == 1e-4


def test_jtt_loss_needs_case_ids():
    jtt = JTT(3.0)
    jtt.errors = frozenset({"a"})
    loss = RobustLoss(RobustConfig(method="jtt"), [], jtt)
    with pytest.raises(ValueError, match="'case' id"):
        loss.for_batch({"label": torch.tensor([0])}, torch.tensor([0]))
    fn = loss.for_batch({"case": ["a", "b"], "label": torch.tensor([0, 1])}, torch.tensor([0, 1]))
    z = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    per = F.cross_entropy(z, torch.tensor([0, 1]), reduction="none")
    assert float(fn(z, torch.tensor([0, 1]))) == pytest.approx(float((3 * per[0] + per[1]) / 4))
