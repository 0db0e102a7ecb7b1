import random
import time

import numpy as np
import pytest
import torch

from deepclust_nb.data import load_dataset
from deepclust_nb.metrics import evaluate
from deepclust_nb.train import (Checkpoint, ResumableState, atomic_save, device_name, get_device, kmeans, minibatches,
                                minutes_per_epoch, predict_batched, progress, run_epochs, seed_everything,
                                TimeBudgetExhausted, time_budget)


def test_device_choice(monkeypatch):
    monkeypatch.delenv('DEEPCLUST_DEVICE', raising=False)
    assert get_device().type == ('cuda' if torch.cuda.is_available() else 'cpu')
    assert get_device('cpu') == torch.device('cpu')
    monkeypatch.setenv('DEEPCLUST_DEVICE', 'cpu')
    assert get_device() == torch.device('cpu') and device_name().startswith('cpu')
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match='CUDA is not available'): get_device('cuda')


def test_seed_everything():
    seed_everything(7); a = (random.random(), np.random.rand(), torch.rand(3))
    seed_everything(7); b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    with pytest.raises(ValueError): seed_everything(-3)
    with pytest.raises(ValueError): seed_everything(1.5)


def test_minibatches():
    seen = torch.cat(list(minibatches(103, 10)))
    assert torch.equal(seen.sort().values, torch.arange(103))
    assert [len(b) for b in minibatches(103, 10, drop_last=True)] == [10] * 10
    torch.manual_seed(0); a = list(minibatches(50, 8))
    torch.manual_seed(0); b = list(minibatches(50, 8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(ValueError): list(minibatches(5, 0))
    assert list(progress(range(3), desc='x')) == [0, 1, 2]


def test_predict_batched_matches_full_pass():
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Dropout(0.5)).train()
    x = torch.randn(1234, 5)
    out = predict_batched(net, x, batch_size=100)
    assert net.training
    net.eval()
    torch.testing.assert_close(out, net(x))
    assert not out.requires_grad
    a, b = predict_batched(lambda t: (t.sum(1), t * 2), x, 333)
    torch.testing.assert_close(b, 2 * x)


def test_kmeans_on_digits_and_errors():
    x, y = load_dataset('digits', 'all')
    r = kmeans(x.flatten(1), 10, n_init=10, seed=0)
    assert evaluate(y, r.labels)['acc'] > 0.6 and r.labels.dtype == np.int64 and r.centers.shape == (10, 64)
    r2 = kmeans(x.flatten(1), 10, n_init=10, seed=0)
    assert np.array_equal(r.labels, r2.labels)
    with pytest.raises(ValueError, match='2-D'): kmeans(x, 10)
    with pytest.raises(ValueError, match='k must be'): kmeans(x.flatten(1), 1)
    with pytest.raises(ValueError, match='exceeds'): kmeans(x.flatten(1)[:5], 10)
    bad = x.flatten(1).clone(); bad[3, 3] = float('inf')
    with pytest.raises(ValueError, match='NaN or infinite'): kmeans(bad, 10)


def _train(path, crash_at=None, epochs=5, every=1):
    "A denoising autoencoder on the digits with shuffling, noise and dropout: every generator matters."
    seed_everything(0)
    x = load_dataset('digits', 'train')[0].flatten(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2), torch.nn.Linear(32, 64))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    state = ResumableState(threshold=0.9)
    def epoch_fn(epoch):
        total = 0.0
        for i, idx in enumerate(minibatches(len(x), 100)):
            if epoch == crash_at and i == 5: raise KeyboardInterrupt
            xb = x[idx] + 0.1 * torch.randn(len(idx), 64) + np.random.rand() * 0.01 + random.random() * 0.01
            loss = torch.nn.functional.mse_loss(model(xb), x[idx])
            opt.zero_grad(); loss.backward(); opt.step(); total += loss.item()
        sched.step(); state['threshold'] -= 0.01
        return {'loss': total, 'threshold': state['threshold']}
    hist = run_epochs(epochs, epoch_fn, Checkpoint(path, every=every), {'model': model, 'opt': opt, 'sched': sched, 'state': state})
    return model, hist


@pytest.mark.parametrize('crash_at', [0, 2, 4])
def test_resume_gives_identical_result(tmp_path, crash_at):
    ref, h_ref = _train(tmp_path/'ref.pt')
    with pytest.raises(KeyboardInterrupt): _train(tmp_path/'run.pt', crash_at=crash_at)
    resumed, h = _train(tmp_path/'run.pt')
    assert all(torch.equal(p, q) for p, q in zip(ref.parameters(), resumed.parameters()))
    untimed = lambda hist: [{k: v for k, v in e.items() if k not in ('seconds', 'epoch_seconds')} for e in hist]
    assert untimed(h) == untimed(h_ref) and len(h) == 5
    assert all(e['epoch_seconds'] > 0 for e in h)       # the epochs before the crash keep theirs from the checkpoint


def test_time_budget_runs_in_slices_that_resume_exactly(tmp_path):
    "A budget shorter than an epoch: each call runs one epoch, saves (also between `every`) and stops; the end is bit for bit."
    ref, h_ref = _train(tmp_path/'ref.pt')
    stops = []
    while True:
        try:
            with time_budget(1e-6): model, h = _train(tmp_path/'run.pt', every=3)
            break
        except TimeBudgetExhausted as e:
            stops.append((e.epoch, e.n_epochs))
            assert e.checkpoint == tmp_path/'run.pt' and torch.load(e.checkpoint, weights_only=False)['progress']['epoch'] == e.epoch
    assert stops == [(1, 5), (2, 5), (3, 5), (4, 5)]
    assert all(torch.equal(p, q) for p, q in zip(ref.parameters(), model.parameters()))
    untimed = lambda hist: [{k: v for k, v in e.items() if k not in ('seconds', 'epoch_seconds')} for e in hist]
    assert untimed(h) == untimed(h_ref)


def test_time_budget_limits_and_errors(tmp_path):
    calls = []
    with time_budget(60):                      # ample: nothing stops
        run_epochs(3, lambda e: calls.append(e) or {}, Checkpoint(tmp_path/'a.pt'))
    assert calls == [0, 1, 2]
    with time_budget(1e-6), pytest.warns(UserWarning, match='without a checkpoint'):
        assert len(run_epochs(3, lambda e: {})) == 3           # no checkpoint: ignoring the budget loses nothing
    with time_budget(1e-6), time_budget(3600):                 # an inner budget cannot extend an outer one
        with pytest.raises(TimeBudgetExhausted, match='after epoch 1 of 3'):
            run_epochs(3, lambda e: {}, Checkpoint(tmp_path/'b.pt'))
    for bad in (0, -1, float('nan'), float('inf'), '5', True):
        with pytest.raises(ValueError, match='positive number of seconds'):
            with time_budget(bad): pass
    with time_budget(None): assert len(run_epochs(2, lambda e: {}, Checkpoint(tmp_path/'c.pt'))) == 2


def test_epoch_seconds_time_each_epoch():
    h = run_epochs(3, lambda e: time.sleep(0.02 * (e + 1)) or {'e': e})
    assert [e['e'] for e in h] == [0, 1, 2]
    assert all(0.02 * (i + 1) <= e['epoch_seconds'] < 0.02 * (i + 1) + 2.0 for i, e in enumerate(h))   # generous: a loaded CI machine
    assert minutes_per_epoch(h) == pytest.approx(sum(e['epoch_seconds'] for e in h) / 3 / 60)
    assert minutes_per_epoch([{'epoch': 1}]) is None


def test_checkpoint_every_and_errors(tmp_path):
    ck = Checkpoint(tmp_path/'c.pt', every=2)
    calls = []
    run_epochs(5, lambda e: calls.append(e) or {}, ck, {})
    assert torch.load(tmp_path/'c.pt', weights_only=False)['progress']['epoch'] == 5
    assert calls == [0, 1, 2, 3, 4]
    assert run_epochs(5, lambda e: calls.append(e), ck, {}) and calls == [0, 1, 2, 3, 4]   # finished: nothing redone
    with pytest.raises(ValueError): Checkpoint(tmp_path/'x.pt', every=0)
    (tmp_path/'bad.pt').write_bytes(b'nope')
    with pytest.raises(RuntimeError, match='unreadable'): Checkpoint(tmp_path/'bad.pt').restore()
    with pytest.raises(KeyError, match='no state for'): ck.restore(model=torch.nn.Linear(1, 1))
    ck.clear(); assert not (tmp_path/'c.pt').exists()


def test_atomic_save_leaves_no_temporary(tmp_path):
    atomic_save({'a': torch.ones(3)}, tmp_path/'sub'/'f.pt')
    assert [p.name for p in (tmp_path/'sub').iterdir()] == ['f.pt']
    class Boom:
        def __reduce__(self): raise RuntimeError('cannot pickle')
    with pytest.raises(RuntimeError): atomic_save({'x': Boom()}, tmp_path/'sub'/'f.pt')
    assert [p.name for p in (tmp_path/'sub').iterdir()] == ['f.pt']
    assert torch.equal(torch.load(tmp_path/'sub'/'f.pt')['a'], torch.ones(3))


def test_progress_postfix_shows_losses_and_largest_cluster(monkeypatch):
    from deepclust_nb.train import _postfix, progress
    assert _postfix({'loss': 0.5, 'largest_cluster': 0.91, 'seconds': 3.0}) == {'loss': '0.5', 'largest': '91%'}
    assert 'largest' in _postfix({'l_a': 1., 'l_b': 2., 'l_c': 3., 'l_d': 4., 'largest_cluster': 0.1})   # never cut off
    monkeypatch.setenv('DEEPCLUST_PROGRESS', '0')
    assert progress(range(3)).disable
