"""What the benchmark scripts share: the machine's load average around a run, and the results tail that appends one
JSON line per measured row (bench name, date, command, device, the run's settings, then the row) to bench/results/."""
import json, os, shlex, sys
from datetime import datetime, timezone
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / 'results'
# CUDA runtime calls that block the host until the device has caught up (what torch.profiler lists on the CPU side)
SYNC_RUNTIME = ('cudaStreamSynchronize', 'cudaDeviceSynchronize', 'cudaEventSynchronize', 'cudaMemcpy',
                'cuStreamSynchronize', 'cuCtxSynchronize')


def device_words(device) -> str:
    "The device as the .jsonl rows name it: 'cuda: <GPU name>' or 'cpu: <N> threads'."
    import torch
    if device.type == 'cuda': return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {torch.get_num_threads()} threads"


def load_average():
    "The machine's 1-minute load average (None where the OS has none)."
    return os.getloadavg()[0] if hasattr(os, 'getloadavg') else None


def warn_if_busy(
    before,              # `load_average()` before the run
    after,               # `load_average()` after it
    factor: float,       # busy when the larger one exceeds factor x the CPU count
    consequence: str,    # what that means for this benchmark's numbers
) -> None:
    "Print a note when the machine was busy during the run."
    if before is not None and after is not None and os.cpu_count() and max(before, after) > factor * os.cpu_count():
        print(f"note: the machine was busy (1-min load {before:.1f} -> {after:.1f} on {os.cpu_count()} CPUs): {consequence}")


def load_pair(before, after) -> list:
    "The load averages as stored with each row: [before, after], 2 decimals (None where unknown)."
    return [None if before is None else round(before, 2), None if after is None else round(after, 2)]


def command_line(script: str, argv=None) -> str:
    "The command as run: `sys.argv` from a shell, else `script` with the `argv` given to `main` (tests, notebooks)."
    return 'python ' + shlex.join(sys.argv if argv is None else [script, *argv])


def append_rows(
    path: Path,          # the .jsonl file (created with its folder)
    rows: list,          # one dict per measured row
    bench: str,          # the benchmark's name, stored as 'bench'
    command: str,        # `command_line(...)`
    device: str,         # the device, in words
    **settings,          # the run's settings, stored (in this order) after bench, date, command and device
) -> None:
    "Append one JSON line per row: the run's common fields, then the row's own."
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    common = dict(bench=bench, date=datetime.now(timezone.utc).isoformat(timespec='seconds'), command=command,
                  device=device, **settings)
    with open(path, 'a') as f:
        for r in rows: f.write(json.dumps({**common, **r}) + '\n')
    print(f"appended {len(rows)} rows to {path}")
