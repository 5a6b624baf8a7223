"""Value checks (folk_nb.checks): the switch, and that a training step of every method makes no host sync once they
are off, while with them on every method still rejects bad input values with its clear error.

Host syncs are counted with the PyTorch profiler on the CPU (`host_syncs`): every `.item()`, `bool(tensor)`,
`if tensor:`, `int(tensor)` and `.tolist()` runs `aten::_local_scalar_dense`, and value-dependent output sizes
(`nonzero`, boolean-mask indexing, `unique`, `masked_select`) run their own operators; the CPU records the same
operators a GPU run would wait on.
"""
import threading

import pytest
import torch

from folk_nb.checks import host_syncs, value_checks, value_checks_enabled
from folk_nb.data import GPUDataLoader, dataset_tensors
from folk_nb.methods import create_method

torch.set_num_threads(1)

VIT = dict(model='vit_tiny_patch16_224', img_size=32, patch_size=4,
           model_kwargs=dict(depth=2, embed_dim=64, num_heads=2))
RESNET = dict(model='resnet18', img_size=32, cifar_stem=True)
DECODER = dict(decoder_dim=64, decoder_depth=1, decoder_heads=2)
HEAD = dict(out_dim=256, head_hidden_dim=128, head_bottleneck_dim=64)
B = 8          # batch size; the loader covers exactly the B first sample images, so one FAMT refresh fills its bank

# name: (method, model, method options, fraction of the schedule at which the step runs)
CASES = {
    'mae-vit': ('mae', VIT, DECODER, 0.0),
    'famt-vit-random': ('famt', VIT, DECODER, 0.0),                      # before the first refresh
    'famt-vit-bank': ('famt', VIT, DECODER, 0.5),                        # attention bank, after a refresh
    'famt-vit-crop-prior': ('famt', VIT, dict(DECODER, attention_source='crop', freq_prior=True), 0.5),
    'famt-vit-crop-mix': ('famt', VIT, dict(DECODER, attention_source='crop', freq_prior=True, mix=0.5,
                                            smooth_cutoff=None), 0.5),
    'mfm-vit': ('mfm', VIT, {}, 0.0),
    'mfm-resnet': ('mfm', RESNET, {}, 0.0),
    'folk-vit': ('folk', VIT, HEAD, 0.0),
    'folk-resnet': ('folk', RESNET, HEAD, 0.0),
    'folk-vit-mfm-mask': ('folk', VIT, dict(HEAD, mask='mfm'), 0.0),
    'moco-resnet': ('moco', RESNET, dict(queue_size=64), 0.0),
    'moco-vit': ('moco', VIT, dict(queue_size=64), 0.0),
    'saliency_moco-resnet': ('saliency_moco', RESNET, dict(queue_size=64), 0.0),
    'saliency_moco-resnet-no-hard-negative': ('saliency_moco', RESNET, dict(queue_size=64, hard_negative=False), 0.0),
    'saliency_moco-resnet-cnn-saliency': ('saliency_moco', RESNET, dict(queue_size=64, saliency='resnet18',
                                                                        saliency_pretrained=False), 0.0),
    'saliency_moco-vit-spectral': ('saliency_moco', VIT, dict(queue_size=64, saliency='spectral'), 0.0),
    'saliency_moco-resnet-warped-key': ('saliency_moco', RESNET, dict(queue_size=64, saliency='warped_key'), 0.0),
}
TOTAL = 1000


def build(case):
    "A method of the case, in training mode at its point of the schedule, and one loader batch for it."
    name, model, opts, at = CASES[case]
    torch.manual_seed(0)
    t = dataset_tensors('samples', size=32)
    kw = dict(num_images=B) if name == 'famt' else {}
    m = create_method(name, **model, **opts, **kw).train()
    loader = GPUDataLoader(t['images'][:B], t['targets'][:B], views=m.recipe, batch_size=B, epoch_size=B,
                           device='cpu', size=32, seed=0)
    return m, next(iter(loader)), int(at * TOTAL)


def step(m, batch, at):
    "What the trainer asks of a method in one step (the optimiser aside)."
    m.schedule(at, TOTAL)
    m(batch)['loss'].backward()
    m.after_optimizer_step()


def test_switch_defaults_on_nests_and_is_per_thread():
    assert value_checks_enabled()
    with value_checks(False):
        assert not value_checks_enabled()
        seen = []
        t = threading.Thread(target=lambda: seen.append(value_checks_enabled())); t.start(); t.join()
        assert seen == [True]                         # another thread keeps the default
        with value_checks(True): assert value_checks_enabled()
        assert not value_checks_enabled()
    assert value_checks_enabled()
    with pytest.raises(TypeError, match='True or False'):
        with value_checks(0): pass


def test_host_syncs_counts_what_waits_for_the_device():
    x = torch.rand(16)
    assert host_syncs(lambda: x * 2) == {}
    assert host_syncs(lambda: (x.item() if x.numel() == 1 else float(x[0]), bool(x.sum() > 0)))['aten::_local_scalar_dense'] == 2
    assert host_syncs(lambda: x[x > 0.5])['aten::nonzero'] == 1
    assert host_syncs(lambda: torch.unique(x)) != {}


@pytest.mark.parametrize('case', list(CASES))
def test_a_step_without_value_checks_makes_no_host_sync(case):
    m, batch, at = build(case)
    step(m, batch, at)                                # the first step (checks on; FAMT refreshes its bank here)
    if CASES[case][0] == 'famt' and at: assert not m.pending   # outside a refresh window
    with value_checks(False):
        syncs = host_syncs(lambda: step(m, batch, at))
    assert syncs == {}, f"{case}: {dict(syncs)}"


@pytest.mark.parametrize('case', ['mae-vit', 'famt-vit-bank', 'famt-vit-crop-prior', 'mfm-resnet', 'folk-vit',
                                  'moco-resnet', 'saliency_moco-resnet', 'saliency_moco-vit-spectral'])
def test_with_value_checks_on_bad_views_fail_clearly(case):
    m, batch, at = build(case)
    step(m, batch, at)
    bad = dict(batch, views=[v * 255 for v in batch['views']])   # a loader that forgot to divide by 255
    m.schedule(at, TOTAL)
    with pytest.raises(ValueError, match=r'un-normalised images in \[0, 1\]'):
        m(bad)
    with value_checks(False):
        m(bad)                                        # the same batch passes when the values are not read


def test_famt_refresh_window_makes_two_host_syncs_per_step():
    "Inside a refresh window FAMT reads the range of the indices that write the bank, and whether any map is stale."
    m, batch, at = build('famt-vit-bank')
    m.schedule(at, TOTAL)
    assert m.pending
    with value_checks(False):
        syncs = host_syncs(lambda: m(batch)['loss'].backward())
    assert syncs == {'aten::_local_scalar_dense': 2}
    assert not m.pending


def test_famt_checks_index_and_boxes_on_the_first_step_before_its_first_refresh():
    m, batch, _ = build('famt-vit-random')
    m.schedule(0, TOTAL)
    assert m.version == 0
    bad_index = dict(batch, index=batch['index'] + B)
    with pytest.raises(ValueError, match=r'indices: expected values in \[0, 7\]'):
        m(bad_index)
    bad_boxes = dict(batch, boxes=[b * 2 for b in batch['boxes']])
    with pytest.raises(ValueError, match='crop_boxes'):
        m(bad_boxes)
    with value_checks(False):
        m(bad_index)                                  # not read before the first refresh when checks are off
