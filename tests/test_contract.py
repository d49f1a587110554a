"""The contract `qtuning.module.gradient_scale` relies on, pinned so that an upgrade that changes it fails here:
Lightning divides each micro-batch's loss by ``accumulate_grad_batches`` under automatic optimization and not under
manual optimization, and DDP averages the gradients of its processes."""

from __future__ import annotations

import datetime

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qtuning.module import gradient_scale

INPUTS = torch.tensor([[1.0, 2.0], [3.0, 5.0], [7.0, 11.0], [13.0, 17.0]])  # one micro-batch per row


class Probe(L.LightningModule):
    """``loss = w · x`` per micro-batch, so the gradient of a sum of losses is the sum of their ``x``; records the
    gradient Lightning hands the optimizer."""

    def __init__(self, manual: bool, accumulation: int) -> None:
        super().__init__()
        self.automatic_optimization = not manual
        self.accumulation = accumulation
        self.weight = torch.nn.Parameter(torch.zeros(2))
        self.grads: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        loss = (self.weight * batch[0]).sum()
        if self.automatic_optimization:
            return loss
        self.manual_backward(loss)
        if (batch_idx + 1) % self.accumulation == 0:
            optimizer = self.optimizers()
            optimizer.step()
            optimizer.zero_grad()
        return None

    def on_before_optimizer_step(self, optimizer) -> None:
        self.grads.append(self.weight.grad.detach().clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # lr 0: every step sees the same weights

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(INPUTS), batch_size=None)


def fit(manual: bool, accumulation: int) -> list[torch.Tensor]:
    probe = Probe(manual, accumulation)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=1 if manual else accumulation,
    )  # fmt: skip
    trainer.fit(probe)
    return probe.grads


def test_automatic_optimization_divides_each_loss_by_the_accumulation():
    grads = fit(manual=False, accumulation=2)
    torch.testing.assert_close(torch.stack(grads), torch.stack([INPUTS[:2].sum(0), INPUTS[2:].sum(0)]) / 2)


def test_manual_optimization_leaves_the_summed_gradient():
    grads = fit(manual=True, accumulation=2)
    torch.testing.assert_close(torch.stack(grads), torch.stack([INPUTS[:2].sum(0), INPUTS[2:].sum(0)]))


def test_gradient_scale_undoes_both_and_divides_by_the_tokens():
    # 2 micro-batches of automatic optimization on 2 processes: each process's gradient is the mean over processes of
    # their accumulated means; times 2 * 2 it is the sum of all four, and over 40 tokens their token mean.
    lightning_ddp_left = INPUTS.sum(0) / 2 / 2
    scale = gradient_scale(torch.tensor(40.0), accumulation=2, world=2)
    torch.testing.assert_close(lightning_ddp_left * scale, INPUTS.sum(0) / 40)


def _ddp_worker(rank: int, out: str) -> None:
    # a file store, not a TCP port another test may hold; a timeout, so a lost peer fails the test instead of hanging
    store = f"file://{out}/store"
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        layer = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 1, bias=False))
        layer(INPUTS[rank : rank + 1]).sum().backward()
        torch.save(layer.module.weight.grad, f"{out}/grad{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes
def test_ddp_averages_the_gradients_of_its_processes(tmp_path):
    mp.start_processes(_ddp_worker, args=(str(tmp_path),), nprocs=2, join=True, start_method="spawn")
    for rank in range(2):
        torch.testing.assert_close(torch.load(tmp_path / f"grad{rank}.pt")[0], INPUTS[:2].mean(0))
