"torchrun worker: a time-budgeted run in which rank 1's steps are slower; each rank writes where it stopped."
import sys, json, time
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).parent))
from toy import NoisyToy, FixedLoader
from folk_nb.trainer import Trainer, TrainConfig, setup_distributed

out = Path(sys.argv[1])
info = setup_distributed('cpu')
torch.manual_seed(0)


class Slower(NoisyToy):
    "Rank 1 takes 6 ms longer per forward: its clock runs ahead of rank 0's."
    def forward(self, batch):
        if info.rank == 1: time.sleep(0.006)
        return super().forward(batch)


method = Slower(noise=0.0)
loader = FixedLoader(batch_size=8 // info.world_size, rank=info.rank, world_size=info.world_size)
cfg = TrainConfig(epochs=100_000, time_budget_min=0.03, lr=1e-2, out_dir=str(out / 'run'), progress=False,
                  log_every=10_000, ckpt_every=10 ** 6)
t = Trainer(method, loader, cfg, dist_info=info)
s = t.fit()
(out / f'rank{info.rank}.json').write_text(json.dumps(dict(steps=s['steps'], train_seconds=s['train_seconds'],
                                                         status=s['status'], total_steps=t.total_steps,
                                                         clock_syncs=t.clock_syncs)))
torch.distributed.destroy_process_group()
