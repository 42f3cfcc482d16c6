"""The reference implementation's module ``DCLS.construct.modules``, provided by ndcls.

Client code of the reference (PyPI ``dcls``, import ``DCLS``) imports its layers from
``DCLS.construct.modules``; this module has the same public names, so changing that one import
line to ``from ndcls.torch_bridge.modules import ...`` is enough, and
:func:`ndcls.torch_bridge.install_as_dcls` (or ``python -m ndcls.torch_bridge.as_dcls script.py``)
makes the unchanged line resolve here. See docs/torch.md, "Migrating from the reference".

=====================  ==================================================================
name                   what it is here
=====================  ==================================================================
``Dcls1d/2d/3d``       the N-D layers (base class ``_DclsNd``)
``Dcls3_1d``           the 3-1D layer (base class ``_DclsN_Md``); ``Dcls2_1d`` and
                       ``Dcls3_2d`` are ndcls additions
``Dcls2dK1d``          a 1-D learned kernel in a 2-D convolution (base class ``_DclsNd``)
``ConstructKernel*``   the ``DCK`` objects of the layers: ``K = DCK(weight, P, SIG)``
=====================  ==================================================================
"""

from ndcls.torch_bridge.layers import (
    ConstructKernel1d,
    ConstructKernel2_1d,
    ConstructKernel2d,
    ConstructKernel3_1d,
    ConstructKernel3_2d,
    ConstructKernel3d,
    Dcls1d,
    Dcls2_1d,
    Dcls2d,
    Dcls2dK1d,
    Dcls3_1d,
    Dcls3_2d,
    Dcls3d,
    _DclsN_Md,
    _DclsNd,
)

#: the reference's flag for its optional CUDA depthwise kernel (``depthwise_conv2d_implicit_gemm``),
#: which ndcls never uses
install_implicit_gemm = False

__all__ = [
    "Dcls1d", "Dcls2d", "Dcls3d", "Dcls2_1d", "Dcls3_1d", "Dcls3_2d", "Dcls2dK1d",
    "ConstructKernel1d", "ConstructKernel2d", "ConstructKernel3d", "ConstructKernel3_1d",
    "ConstructKernel2_1d", "ConstructKernel3_2d", "install_implicit_gemm",
]
