"Write checkpoints to one path in a loop until killed; each holds a tensor and its checksum."
import sys
import torch
from folk_nb.trainer import atomic_save, CHECKPOINT_FORMAT

path = sys.argv[1]
i = 0
while True:
    w = torch.randn(2_000_000)
    atomic_save({'format': CHECKPOINT_FORMAT, 'i': i, 'w': w, 'sum': float(w.double().sum())}, path)
    print(i, flush=True)
    i += 1
