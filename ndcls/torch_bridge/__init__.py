"""torch bridge of ndcls: a differentiable ``construct`` and drop-in DCLS layers.

Imported explicitly (``import ndcls.torch_bridge``); ``import ndcls`` alone never imports torch.

* :func:`construct` -- the differentiable construction (a torch custom op, ``torch.compile``-able);
* :func:`conv` -- the differentiable direct convolution (:func:`ndcls.conv`, without building the
  kernel; a torch custom op as well);
* layers :class:`Dcls1d`, :class:`Dcls2d`, :class:`Dcls3d`, :class:`Dcls2_1d`, :class:`Dcls3_1d`,
  :class:`Dcls3_2d`, :class:`Dcls2dK1d` -- drop-in replacements for the reference ``dcls`` package;
  their ``method`` argument picks construct + dense convolution or the direct convolution
  ("auto": a cost model, :mod:`ndcls.torch_bridge.cost`, chooses per call);
  :mod:`ndcls.torch_bridge.modules` has all of the reference's names (``DCLS.construct.modules``);
* :func:`install_as_dcls` -- unmodified client code of the reference imports ndcls as ``DCLS``
  (or, without touching the code: ``python -m ndcls.torch_bridge.as_dcls script.py [args]``).
"""

from ndcls.torch_bridge._install import install_as_dcls, uninstall_as_dcls
from ndcls.torch_bridge._ops import construct, conv
from ndcls.torch_bridge.layers import Dcls1d, Dcls2_1d, Dcls2d, Dcls2dK1d, Dcls3_1d, Dcls3_2d, Dcls3d

__all__ = ["construct", "conv", "Dcls1d", "Dcls2d", "Dcls3d", "Dcls2_1d", "Dcls3_1d", "Dcls3_2d", "Dcls2dK1d",
           "install_as_dcls", "uninstall_as_dcls"]
