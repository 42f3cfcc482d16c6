"""A small DCLS model trained for a few steps, on one process or as one rank of a DDP group.

Used by tests/test_distributed.py; the worker runs in processes started with
``torch.multiprocessing.spawn``, so it lives in an importable module.
"""

import datetime

import torch
import torch.nn as nn
import torch.nn.functional as F

from ndcls.torch_bridge import Dcls1d, Dcls2d
from ndcls.torch_bridge.training import clamp_parameters

STEPS = 3
GLOBAL_BATCH = 8


class Small(nn.Module):
    """A 1-D DCLS layer, then a stage of two depthwise 2-D layers that share P and SIG."""

    def __init__(self):
        super().__init__()
        self.temporal = Dcls1d(2, 4, kernel_count=3, dilated_kernel_size=7, padding=3, version="gauss")
        self.stage = nn.ModuleList(
            [Dcls2d(4, 4, kernel_count=3, dilated_kernel_size=5, padding=2, groups=4, version="gauss") for _ in range(2)]
        )
        self.stage[1].P = self.stage[0].P
        self.stage[1].SIG = self.stage[0].SIG
        self.head = nn.Linear(4, 1)

    def forward(self, x):  # x: (batch, 2, L, L)
        b, c, h, w = x.shape
        y = self.temporal(x.permute(0, 2, 3, 1).reshape(b * h, w, c).transpose(1, 2))  # along the last axis
        y = y.transpose(1, 2).reshape(b, h, w, -1).permute(0, 3, 1, 2)
        for m in self.stage:
            y = F.gelu(m(y))
        return self.head(y.mean((2, 3)))


def data():
    gen = torch.Generator().manual_seed(3)
    return torch.randn(GLOBAL_BATCH, 2, 6, 6, generator=gen, dtype=torch.float64), torch.randn(
        GLOBAL_BATCH, 1, generator=gen, dtype=torch.float64
    )


def make_model(state=None):
    torch.manual_seed(0)
    model = Small().double()
    if state is not None:
        model.load_state_dict(state, strict=True)
    return model


def optimizer(model):
    """Weight decay on the weights only: never on positions (P), widths (SIG) or biases."""
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    other = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}],
                             lr=0.05)


def train(model, step_fn, x, y):
    opt = optimizer(model)
    states = []
    for _ in range(STEPS):
        loss = F.mse_loss(step_fn(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        clamp_parameters(model)  # on every rank, after the step
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return states


def worker(rank, world_size, port, state, out_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        model = make_model(state)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        x, y = data()
        per_rank = GLOBAL_BATCH // world_size
        local = slice(rank * per_rank, (rank + 1) * per_rank)
        states = train(model, ddp, x[local], y[local])
        torch.save(states, f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()
