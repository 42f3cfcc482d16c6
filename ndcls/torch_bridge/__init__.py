"""torch bridge of ndcls: a differentiable ``construct`` and drop-in DCLS layers.

Imported explicitly (``import ndcls.torch_bridge``); ``import ndcls`` alone never imports torch.
"""

from ndcls.torch_bridge._ops import construct

__all__ = ["construct"]
