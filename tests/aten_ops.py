"""A test helper: record the aten operators that run, by name, optionally tagged (e.g. with the trainer's step).

Counting operators is how the tests check structural claims that do not depend on the device: how many batch-norm
kernels a layer launches, how many operators a loader batch costs, which operators read a value back to the host.
"""
from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode


class AtenOps(TorchDispatchMode):
    "Records (tag(), op name) for every aten operator run inside it; `counts` tallies the names, `computed` all but views."
    def __init__(self, tag=lambda: None):
        super().__init__(); self.tag, self.seen, self.views = tag, [], set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket).split('.')[-1]
        self.seen.append((self.tag(), name))
        if func.is_view: self.views.add(name)        # aliases its input (view, select, expand, ...): launches no kernel
        return func(*args, **(kwargs or {}))

    @property
    def counts(self) -> Counter:
        return Counter(name for _, name in self.seen)

    @property
    def computed(self) -> Counter:
        "The ops that compute something (each a kernel launch on a GPU): `counts` without the views."
        return Counter(name for _, name in self.seen if name not in self.views)
