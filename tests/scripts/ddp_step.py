"torchrun worker: a few steps of NoisyToy (no noise, no dropout effect in eval-free way) on this rank's share."
import sys, dataclasses
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).parent))
from toy import NoisyToy, FixedLoader
from folk_nb.trainer import Trainer, TrainConfig, setup_distributed

out, steps = sys.argv[1], int(sys.argv[2])
sync_free = len(sys.argv) > 3 and sys.argv[3] == 'sync_free'   # non-finite steps skipped on the device
info = setup_distributed('cpu')
torch.manual_seed(0)
method = NoisyToy(noise=0.0)
method.backbone[2].p = 0.0                      # no dropout: both runs see the same computation
loader = FixedLoader(batch_size=8 // info.world_size, rank=info.rank, world_size=info.world_size)
cfg = TrainConfig(max_steps=steps, lr=1e-2, warmup_steps=1, out_dir=out, progress=False, log_every=1, sync_free=sync_free)
Trainer(method, loader, cfg, dist_info=info).fit()
if info.world_size > 1: torch.distributed.destroy_process_group()
