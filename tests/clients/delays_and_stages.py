"""Client code written against the reference implementation, as public projects write it.

Not imported by the tests: they run it as a script, once with the reference package ``DCLS``
and once with ``python -m ndcls.torch_bridge.as_dcls``, and compare what it saves.

    python delays_and_stages.py CHECKPOINT OUT

loads CHECKPOINT (a state_dict) if it exists and saves its own initial state_dict there if not,
trains a few steps, evaluates as the spiking-network projects do (``DCK.version = "max"``,
``SIG *= 0``, rounded positions) and writes outputs, gradients and parameters to OUT.
"""

import copy
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from DCLS.construct.modules import ConstructKernel1d, Dcls1d, Dcls2d, Dcls3_1d, _DclsN_Md, _DclsNd

torch.set_default_dtype(torch.float64)
torch.manual_seed(0)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        # synaptic delays: 1-D gauss kernels, SIG decreased by hand and frozen
        self.delay1 = Dcls1d(3, 4, kernel_count=3, dilated_kernel_size=9, padding=4, bias=True, version="gauss")
        self.delay2 = Dcls1d(4, 2, kernel_count=2, dilated_kernel_size=9, padding=4, bias=False, version="gauss")
        # a stage of depthwise 2-D layers sharing one set of positions and widths
        self.stage = nn.ModuleList(
            [Dcls2d(2, 2, kernel_count=3, dilated_kernel_size=7, padding=3, groups=2, version="max") for _ in range(2)]
        )
        for m in self.stage[1:]:
            m.P = self.stage[0].P
            m.SIG = self.stage[0].SIG
        # a 3-1D layer: dense over space, learned delay over time
        self.spatio_temporal = Dcls3_1d(2, 2, kernel_count=2, dense_kernel_size=3, dilated_kernel_size=5,
                                        padding=(1, 1, 2), version="v1")
        for m in (self.delay1, self.delay2):
            m.SIG.requires_grad = False

    def forward(self, x, img, vid):
        y = self.delay2(F.relu(self.delay1(x)))
        for m in self.stage:
            img = F.gelu(m(img))
        return y, img, self.spatio_temporal(vid)

    def clamp_parameters(self):
        for m in self.modules():
            if isinstance(m, (_DclsNd, _DclsN_Md)):
                m.clamp_parameters()

    def decrease_sig(self, alpha):
        with torch.no_grad():
            for m in (self.delay1, self.delay2):
                m.SIG *= alpha

    def round_pos(self):
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, Dcls1d):
                    m.P.round_()
                    m.clamp_parameters()


def main(checkpoint, out):
    model = Net()
    if os.path.exists(checkpoint):
        model.load_state_dict(torch.load(checkpoint), strict=True)
    else:
        with torch.no_grad():  # wide delays to start with, as the projects do
            for m in (model.delay1, model.delay2):
                m.SIG.fill_(2.0)
        torch.save(model.state_dict(), checkpoint)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 20, generator=gen)
    img = torch.randn(2, 2, 9, 9, generator=gen)
    vid = torch.randn(2, 2, 4, 4, 8, generator=gen)
    decay = [p for n, p in model.named_parameters() if not n.endswith((".P", ".SIG", "bias"))]
    no_decay = [p for n, p in model.named_parameters() if n.endswith((".P", ".SIG", "bias"))]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 1e-2}, {"params": no_decay, "weight_decay": 0}], lr=0.2)
    saved = {}
    for step in range(4):
        y, z, v = model(x, img, vid)
        loss = y.square().mean() + z.sin().mean() + v.square().mean()
        opt.zero_grad()
        loss.backward()
        if step == 0:
            saved.update({f"grad/{n}": p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
        model.clamp_parameters()
        model.decrease_sig(0.5)
    saved["train/loss"] = loss.detach()
    saved.update({f"param/{n}": p.detach().clone() for n, p in model.state_dict().items()})

    # evaluation with integer delays, as the spiking-network projects do it
    backup = copy.deepcopy(model.state_dict())
    twin = copy.deepcopy(model)
    model.eval()
    with torch.no_grad():
        for m in (model.delay1, model.delay2):
            m.SIG *= 0
            m.version = "max"
            m.DCK.version = "max"
        twin.delay1.DCK.version = "max"  # the DCK alone, as some projects do
        twin.delay2.DCK.version = "max"
        twin.delay1.SIG.zero_()
        twin.delay2.SIG.zero_()
        model.round_pos()
        twin.round_pos()
        saved["eval/out"] = model(x, img, vid)[0]
        saved["eval/twin"] = twin(x, img, vid)[0]
        saved["eval/kernel"] = model.delay1.DCK(model.delay1.weight, model.delay1.P, model.delay1.SIG)
    for m in (model.delay1, model.delay2):
        m.version = "gauss"
        m.DCK.version = "gauss"
    model.load_state_dict(backup, strict=True)
    model.train()
    saved["restored/out"] = model(x, img, vid)[0].detach()

    # a construction module on its own
    dck = ConstructKernel1d(4, 3, 1, 3, (9,), "gauss")
    saved["dck/kernel"] = dck(model.delay1.weight, model.delay1.P, model.delay1.SIG).detach()
    saved["meta"] = torch.tensor([isinstance(model.delay1, _DclsNd), model.stage[1].P is model.stage[0].P,
                                  not model.delay1.transposed, model.spatio_temporal.output_padding == (0, 0, 0)])
    torch.save(saved, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
