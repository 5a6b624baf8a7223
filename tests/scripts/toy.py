"A tiny method and loader for trainer tests (importable from subprocesses and torchrun workers)."
import torch
from torch import nn
from folk_nb.methods import Method


class NoisyToy(Method):
    "A small conv net regressing a fixed function of the image, with dropout and input noise (global RNG)."
    name, recipe = 'noisy_toy', 'mae'

    def __init__(self, width: int = 8, noise: float = 0.1, nan_steps: list = None, signal_at: int = -1):
        super().__init__(width=width, noise=noise, nan_steps=nan_steps or [], signal_at=signal_at)
        self.backbone = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Dropout(0.2),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 3))
        self.register_buffer('steps_seen', torch.zeros((), dtype=torch.long))
        self.step = 0

    def schedule(self, step, total_steps, steps_per_epoch=None):
        self.step = step
        if step == self.config['signal_at']:
            import os, signal
            os.kill(os.getpid(), signal.SIGTERM)
        return {'noise': self.config['noise']}

    def forward(self, batch):
        x = batch['views'][0]
        noise = self.config['noise'] * torch.randn_like(x) if self.config['noise'] else 0
        pred = self.backbone(x + noise)
        loss = (pred - x.mean((2, 3)) * 2).pow(2).mean()
        if self.step in self.config['nan_steps']: loss = loss * float('nan')
        self.steps_seen += 1
        return dict(loss=loss, loss_mse=loss.detach())

    def embed(self, x):
        return self.backbone[:-1](x)


class FixedLoader:
    "Deterministic batches of one global tensor; with rank/world_size each rank takes its share of every batch."
    def __init__(self, n=32, batch_size=8, size=16, rank=0, world_size=1, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 3, size, size, generator=g)
        self.global_batch, self.rank, self.world = batch_size * world_size, rank, world_size
        self.batch_size, self.epoch = batch_size, 0

    def set_epoch(self, e): self.epoch = e
    def __len__(self): return len(self.x) // self.global_batch

    def __iter__(self):
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(100 + self.epoch))
        for i in range(len(self)):
            idx = order[i * self.global_batch:(i + 1) * self.global_batch][self.rank::self.world]
            yield {'views': [self.x[idx]], 'index': idx}
