"""Training on several processes: two gloo ranks on CPU against one process, and the bundles under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import mlflow
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bundle_files import GA_BUNDLE, MULTI_GPU, config_list, workdir
from ignite.engine import Events
from local_servers import free_ports
from monai.data import DistributedSampler
from monai.engines import SupervisedTrainer
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ppi_med.engine import PPIIteration
from ppi_med.ppi import PPIConfig, PPIObjective

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[1]
WORLD, PER_RANK, N, EPOCHS = 2, 4, 16, 2
MODES = {
    "baseline": {"enabled": False},
    "detached": {"mode": "detached", "warmup_epochs": 0},
    "differentiable": {"mode": "differentiable", "warmup_epochs": 0},
}


class _Indexed(Dataset):
    """Fixed images and labels (both classes in every rank's batch), each item carrying its index."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(7)
        self.x = torch.rand(N, 1, 12, 12, generator=g)
        self.y = torch.arange(N) % 2
        self.x[self.y == 1, :, 3:7, 3:7] += 0.8

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": self.y[i], "index": i}


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        nn.Linear(4, 2),
    )  # fmt: skip


def _worker(rank: int, port: int, mode: str, out: str) -> None:
    torch.set_num_threads(1)
    # a stuck collective fails the test after two minutes instead of gloo's default half hour
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(minutes=2)
    )
    try:
        data = _Indexed()
        sampler = DistributedSampler(data, num_replicas=WORLD, rank=rank, shuffle=True, seed=3)
        loader = DataLoader(data, batch_size=PER_RANK, sampler=sampler)
        net = _net()
        ddp = nn.parallel.DistributedDataParallel(net)
        seen: list[list[int]] = []
        trainer = SupervisedTrainer(
            device=torch.device("cpu"),
            max_epochs=EPOCHS,
            train_data_loader=loader,
            network=ddp,
            optimizer=torch.optim.SGD(net.parameters(), lr=0.5),
            loss_function=nn.CrossEntropyLoss(),
            iteration_update=PPIIteration(PPIConfig(**MODES[mode])),
            decollate=False,
        )
        trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: seen.append(e.state.batch["index"].tolist()))
        trainer.run()
        torch.save({"state": net.state_dict(), "seen": seen}, f"{out}/rank{rank}.pt")
    finally:
        # both ranks reach the end before either leaves (rank 0 hosts the rendezvous store); the group goes
        # with the process: an explicit destroy_process_group() crashed a gloo rank at exit now and then
        dist.barrier()


@pytest.mark.parametrize("mode", list(MODES))
def test_two_ranks_train_the_weights_one_process_computes_from_their_shards(mode, tmp_path):
    procs = mp.spawn(_worker, args=(free_ports()[0], mode, str(tmp_path)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 240
    while not procs.join(timeout=5):  # raises if a rank failed
        if time.monotonic() > deadline:
            for proc in procs.processes:
                proc.kill()
            pytest.fail("the two ranks did not finish within 4 minutes")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    steps = len(ranks[0]["seen"])
    assert steps == EPOCHS * N // (WORLD * PER_RANK)
    for e in range(EPOCHS):  # each epoch the ranks see disjoint shards that cover the data set
        per_rank = [{i for b in r["seen"][e * 2 : (e + 1) * 2] for i in b} for r in ranks]
        assert not per_rank[0] & per_rank[1] and per_rank[0] | per_rank[1] == set(range(N))
    # one process, same initial weights and global batches: each rank's part of a step is its own PPI loss
    # (pairs and batch-norm statistics are per rank), and DDP averages the parts' gradients
    data, net = _Indexed(), _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    objective = PPIObjective(PPIConfig(**MODES[mode]))
    for step in range(steps):
        opt.zero_grad()
        for r in ranks:
            idx = torch.tensor(r["seen"][step])
            net.train()
            out = objective(net, data.x[idx], data.y[idx], epoch=step // 2 + 1)
            (out.loss / WORLD).backward()
        opt.step()
    for name, p in net.named_parameters():
        for r in ranks:
            torch.testing.assert_close(r["state"][name], p.detach(), atol=2e-5, rtol=1e-4, msg=name)
    assert not torch.equal(ranks[0]["state"]["0.weight"], _net().state_dict()["0.weight"])  # it trained


def test_the_ga_bundle_under_torchrun_writes_one_run_once(tmp_path):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_ports()[0]),
        "-m", "monai.bundle", "run",
        "--config_file", config_list(GA_BUNDLE, MULTI_GPU),
        "--default_dataset_dir", str(tmp_path / "data"), "--dataset_dir", str(tmp_path / "data"),
        "--synthetic#sites", "['A','B']", "--synthetic#subjects_per_site", "8", "--synthetic#n_bscans", "4",
        "--synthetic#height", "32", "--synthetic#width", "48", "--synthetic#cue_site", "B",
        "--spatial_size", "[4,32,48]", "--network_def#width", "4", "--batch_size", "4", "--max_epochs", "2",
        "--ppi#warmup_epochs", "0", "--runs_dir", str(tmp_path / "runs"),
        "--tracking_uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=workdir(tmp_path), capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()  # the data set built once, one run folder
    models = run_dir / "models"
    assert {p.name for p in models.iterdir()} == {"checkpoint_epoch=2.pt", "model_best.pt", "model_final.pt"}
    state = torch.load(models / "model_final.pt", weights_only=True)["model"]
    assert not any(k.startswith("module.") for k in state)  # the plain module's keys: loads without DDP
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ga_ppi").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_auc")] == [1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss_con")] == [1, 2]
