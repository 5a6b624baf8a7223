"""A test helper: record the aten operators that run, by name, optionally tagged (e.g. with the trainer's step).

Counting operators is how the tests check structural claims that do not depend on the device: how many batch-norm
kernels a layer launches, how many operators a loader batch costs, which operators read a value back to the host.
"""
from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode


class AtenOps(TorchDispatchMode):
    "Records (tag(), op name) for every aten operator run inside it; `counts` tallies the names."
    def __init__(self, tag=lambda: None):
        super().__init__(); self.tag, self.seen = tag, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append((self.tag(), str(func.overloadpacket).split('.')[-1]))
        return func(*args, **(kwargs or {}))

    @property
    def counts(self) -> Counter:
        return Counter(name for _, name in self.seen)
