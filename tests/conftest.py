"""Shared pytest fixtures.

CIFAR-10 comes from the JPEG archive `cifar10-jpg.tar.gz` (see data/README.md), looked for at
$FOLK_NB_CIFAR10_ARCHIVE, then `../shared/data/` beside the repository, then `data/`. Tests that need it are
skipped with a message when it is absent, except under CI=true, where a missing archive is an error.
"""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARCHIVE_NAME = 'cifar10-jpg.tar.gz'


def _archive_candidates():
    env = os.environ.get('FOLK_NB_CIFAR10_ARCHIVE')
    if env: return [Path(env).expanduser()]
    return [REPO.parent / 'shared' / 'data' / ARCHIVE_NAME, REPO / 'data' / ARCHIVE_NAME]


@pytest.fixture(scope='module')
def one_thread():
    "Tiny models, for a module that asks for it: one intra-op thread is several times faster than two fighting over"
    " a shared 2-core machine."
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='session')
def cifar10_archive() -> Path:
    "Path of the CIFAR-10 JPEG archive (skip, or fail under CI=true, when it is absent)."
    for p in _archive_candidates():
        if p.is_file(): return p
    msg = (f"CIFAR-10 archive {ARCHIVE_NAME} not found (looked at {', '.join(map(str, _archive_candidates()))}); "
           "set FOLK_NB_CIFAR10_ARCHIVE to its path")
    if os.environ.get('CI', '').lower() == 'true': pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope='session')
def cifar10_root(cifar10_archive) -> Path:
    """A data folder holding cifar10/{train,test}/<class>/*.jpg: $FOLK_NB_DATA, else the repository's git-ignored
    data/. `prepare_cifar10` extracts the archive there once (atomically) and later sessions, and the notebooks,
    reuse it: extracting 60,000 small files takes from seconds to a minute on a busy disk."""
    from folk_nb.data import data_root, prepare_cifar10
    root = data_root(os.environ.get('FOLK_NB_DATA', REPO / 'data'))
    prepare_cifar10(root, archive=cifar10_archive)
    return root
