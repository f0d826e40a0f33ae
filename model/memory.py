"""Bytes of tensor memory that code holds, counted by the tensors' storages, on any device.

This is what a GPU's caching allocator reports as allocated (`torch.cuda.memory_allocated`, less
its rounding to blocks), measured the same way on the CPU and on the meta device, where no
allocator keeps count: the activation memory of a training step, before it runs on a GPU.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary


class TensorMemoryMeter(TorchDispatchMode):
    """Counts the storages of the tensors that operators create under it, for as long as they live.

    `current` is what is alive now, `peak` the most at any moment since entering. Autograd's saved
    tensors and what backward allocates, `.grad` buffers included, are counted too (the engine runs
    operators under the modes of the thread that called backward). Tensors made before entering,
    parameters among them, are not, nor views of them.
    """

    def __init__(self) -> None:
        super().__init__()
        self._counted = WeakIdKeyDictionary()
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # A view or an in-place result shares an input's storage: nothing new was allocated.
        inputs = [t.untyped_storage() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                if not any(storage is seen for seen in inputs):
                    self._count(storage)
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        if storage in self._counted:
            return
        size = storage.nbytes()
        self._counted[storage] = weakref.finalize(storage, self._release, size)
        self.current += size
        self.peak = max(self.peak, self.current)

    def _release(self, size: int) -> None:
        self.current -= size
