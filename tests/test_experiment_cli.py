import json
import subprocess
import warnings

import numpy as np
import pytest

from deepclust_nb.cli import load_papers, main, parse_overrides
from deepclust_nb.experiment import (EXPERIMENTS, Experiment, Prediction, StaleRecordWarning, build_config,
                                     get_experiment, register, run_experiment, run_grid, target_table)
from deepclust_nb.records import RECORD_FIELDS, read_record


def test_kmeans_is_registered():
    load_papers()
    exp = get_experiment('kmeans')
    assert exp.variants == ('pixels',) and {'mnist', 'fashion_mnist', 'usps', 'cifar10_jpeg'} <= set(exp.datasets)
    assert all('source' in q for q in exp.quoted)


def test_run_writes_complete_record(tmp_path):
    load_papers()
    r = run_experiment('kmeans', 'pixels', 'digits', 'cpu', seed=1, results=tmp_path, n_init=2)
    p = tmp_path/'kmeans'/'pixels__digits__cpu__seed1.json'
    stored = read_record(p)
    for k in RECORD_FIELDS: assert k in stored
    assert stored == r and r['config']['n_init'] == 2 and r['n_samples'] == 1797 and r['split'] == 'all'
    assert np.array(r['confusion']).sum() == 1797
    assert not (tmp_path.parent/'checkpoints'/'kmeans'/'pixels__digits__cpu__seed1.pt').exists()


def test_labels_are_used_only_by_the_runner(tmp_path):
    "A fit_predict that returns constant clusters gets the ACC of the largest class; the runner does the evaluation."
    seen = {}
    def fp(cfg, variant, dataset, seed, device, checkpoint):
        seen.update(seed=seed, device=str(device), ckpt=str(checkpoint.path))
        return Prediction(np.zeros(10, dtype=int), np.array([0] * 6 + [1] * 4), 'test')
    register(Experiment('const', 'constant', ('one',), ('digits',), lambda v, d, p: {'epochs': 1}, fp))
    try:
        r = run_experiment('const', 'one', 'digits', seed=4, results=tmp_path / 'results', epochs=3)
        assert r['metrics']['acc'] == pytest.approx(0.6) and r['config']['epochs'] == 3 and seen['seed'] == 4
        assert seen['ckpt'].endswith('checkpoints/const/one__digits__cpu__seed4.pt')
        again = run_grid('const', ['one'], ['digits'], [4], results=tmp_path / 'results', epochs=3)
        assert again[0]['finished_at'] == r['finished_at']
    finally:
        del EXPERIMENTS['const']


def test_skipping_a_record_run_with_other_settings_warns(tmp_path):
    "A stored record is found by name; asking for it with other settings returns it (no re-run) but says what differs."
    load_papers()
    first = run_experiment('kmeans', 'pixels', 'digits', results=tmp_path, n_init=2)
    with pytest.warns(StaleRecordWarning, match="n_init=2 vs 3"):
        again = run_grid('kmeans', ['pixels'], ['digits'], [0], results=tmp_path, n_init=3)
    assert again[0]['finished_at'] == first['finished_at']
    with warnings.catch_warnings():
        warnings.simplefilter('error')       # the same settings: silent
        run_grid('kmeans', ['pixels'], ['digits'], [0], results=tmp_path, n_init=2)


def test_record_names_the_commit_the_run_started_from(tmp_path, monkeypatch):
    "A commit that lands while a run trains must not be credited with the run."
    def fp(cfg, variant, dataset, seed, device, checkpoint):
        monkeypatch.setenv('DEEPCLUST_COMMIT', 'landed-during-the-run')
        return Prediction(np.zeros(4, dtype=int), np.array([0, 0, 1, 1]), 'test')
    register(Experiment('const2', 'constant', ('one',), ('digits',), lambda v, d, p: {}, fp))
    monkeypatch.setenv('DEEPCLUST_COMMIT', 'at-start')
    try: assert run_experiment('const2', 'one', 'digits', results=tmp_path)['commit'] == 'at-start'
    finally: del EXPERIMENTS['const2']


def test_interrupted_run_resumes_and_says_so(tmp_path):
    "A run killed after its first epoch continues from the checkpoint; the record marks it resumed, a fresh run not."
    from deepclust_nb.train import run_epochs
    calls = []
    def fp(cfg, variant, dataset, seed, device, checkpoint):
        def epoch(e):
            calls.append(e)
            if cfg['crash'] and e == 1: raise KeyboardInterrupt
            return {'loss': float(e)}
        hist = run_epochs(3, epoch, checkpoint)
        return Prediction(np.zeros(4, dtype=int), np.array([0, 0, 1, 1]), 'test', history=hist)
    register(Experiment('const3', 'constant', ('one',), ('digits',), lambda v, d, p: {'crash': True}, fp))
    try:
        with pytest.raises(KeyboardInterrupt): run_experiment('const3', 'one', 'digits', results=tmp_path / 'results')
        r = run_experiment('const3', 'one', 'digits', results=tmp_path / 'results', crash=False)
        assert calls == [0, 1, 1, 2] and [h['epoch'] for h in r['history']] == [1, 2, 3] and r['resumed'] is True
        fresh = run_experiment('const3', 'one', 'digits', results=tmp_path / 'results', crash=False, tag='fresh')
        assert fresh['resumed'] is False
    finally: del EXPERIMENTS['const3']


@pytest.mark.parametrize('args,msg', [(('pixel', 'digits', 'cpu'), 'unknown variant'), (('pixels', 'stl10', 'cpu'), 'unknown dataset'),
                                      (('pixels', 'digits', 'gpu'), 'unknown protocol')])
def test_bad_names(args, msg):
    load_papers()
    with pytest.raises(ValueError, match=msg): build_config(get_experiment('kmeans'), *args)
    with pytest.raises(ValueError, match="unknown paper 'dac'"): get_experiment('dac')


def test_cli_main(tmp_path, capsys):
    assert main(['run', 'kmeans', '--dataset', 'digits', '--results', str(tmp_path), '--set', 'n_init=1', '--seed', '0', '2']) == 0
    assert sorted(p.name for p in (tmp_path/'kmeans').iterdir()) == ['pixels__digits__cpu__seed0.json', 'pixels__digits__cpu__seed2.json']
    assert 'ACC' in capsys.readouterr().out
    assert main(['run', 'kmeans', '--dataset', 'digits', '--results', str(tmp_path), '--epochs', '3']) == 2
    assert "no setting 'epochs'" in capsys.readouterr().err
    assert main(['run', 'nopaper', '--dataset', 'digits']) == 2
    assert main(['table', 'kmeans', '--results', str(tmp_path)]) == 0
    assert 'quoted: ADC Table 1' in capsys.readouterr().out
    assert main(['papers']) == 0 and 'kmeans' in capsys.readouterr().out
    assert parse_overrides(['a=1', 'b=x', 'c=[1, 2]']) == {'a': 1, 'b': 'x', 'c': [1, 2]}


def test_console_script(tmp_path):
    out = subprocess.run(['deepclust', 'datasets', '--root', str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and 'digits' in out.stdout and str(tmp_path) in out.stdout
    bad = subprocess.run(['deepclust', 'run', 'kmeans', '--dataset', 'mnist', '--protocol', 'gpu'], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and 'invalid choice' in bad.stderr


def test_cli_time_budget_pauses_with_exit_75_and_resumes(tmp_path, capsys):
    "Three epochs of 0.2 s under a 0.25 s budget: two paused calls (checkpoint kept), then the record; no epoch twice."
    import time
    from deepclust_nb.cli import EXIT_PAUSED
    from deepclust_nb.train import run_epochs
    calls = []
    def fp(cfg, variant, dataset, seed, device, checkpoint):
        def epoch(e):
            calls.append(e); time.sleep(0.2); return {'loss': 1.0 / (e + 1)}
        hist = run_epochs(cfg['epochs'], epoch, checkpoint)
        return Prediction(np.array([0, 0, 1, 1]), np.array([1, 1, 0, 0]), 'all', history=hist)
    register(Experiment('slices', 'slow epochs', ('one',), ('digits',), lambda v, d, p: {'epochs': 3}, fp))
    args = ['run', 'slices', '--dataset', 'digits', '--results', str(tmp_path / 'results'), '--time-budget', str(0.25 / 60)]
    try:
        assert main(args) == EXIT_PAUSED and 'paused' in capsys.readouterr().err
        assert (tmp_path / 'checkpoints' / 'slices' / 'one__digits__cpu__seed0.pt').exists()
        assert not (tmp_path / 'results' / 'slices').exists()
        assert [main(args), main(args)] == [EXIT_PAUSED, 0] and calls == [0, 1, 2]
        rec = read_record(tmp_path / 'results' / 'slices' / 'one__digits__cpu__seed0.json')
        assert rec['resumed'] and [h['epoch'] for h in rec['history']] == [1, 2, 3]
        assert not (tmp_path / 'checkpoints' / 'slices' / 'one__digits__cpu__seed0.pt').exists()
        assert main(args[:-1] + ['0']) == 2 and 'positive number' in capsys.readouterr().err
    finally: del EXPERIMENTS['slices']


def test_target_table_reads_records_and_judges_targets(tmp_path):
    "ACC 0.6 per run: a 55 % target is met with enough runs, a 65 % one is not; tags and protocols are kept apart."
    def fp(cfg, variant, dataset, seed, device, checkpoint):
        return Prediction(np.zeros(10, dtype=int), np.array([0] * 6 + [1] * 4), 'test')
    register(Experiment('const4', 'constant', ('one',), ('digits',), lambda v, d, p: {}, fp,
                        quoted=[{'dataset': 'digits', 'variant': 'one', 'acc': 99.0, 'source': 'Table 9', 'split': 'test'}]))
    try:
        res = tmp_path / 'results'
        run_grid('const4', ['one'], ['digits'], [0, 1], results=res)
        run_experiment('const4', 'one', 'digits', 'paper', 0, results=res)
        tt = target_table([dict(paper='const4', variant='one', dataset='digits', acc=55, seeds=2),
                           dict(paper='const4', variant='one', dataset='digits', acc=65, seeds=2),
                           dict(paper='const4', variant='one', dataset='digits', acc=55),            # 3 runs needed
                           dict(paper='const4', variant='one', dataset='digits', acc=55, tag='x')], res)
        assert list(tt.met) == ['yes', 'no', 'no', 'no']
        assert tt['ours, cpu'][0] == '60.0 ± 0.0 (n=2)' and tt['ours, paper'][0] == '60.0 (n=1)'
        assert tt['ours, cpu'][3] == '–' and tt['paper (quoted)'][0] == '99.0 (Table 9)'
        with pytest.raises(KeyError, match='lacks'): target_table([dict(paper='const4')], res)
        with pytest.raises(KeyError, match='unknown keys'):
            target_table([dict(paper='const4', variant='one', dataset='digits', acc=55, seed=2)], res)
        with pytest.raises(ValueError, match='unknown paper'): target_table([dict(paper='no', variant='a', dataset='b', acc=1)], res)
    finally:
        del EXPERIMENTS['const4']


def test_demo_command_runs_a_chapters_demo_path(capsys, real_data):
    "`deepclust demo` on a small budget: the code path of the chapter's demo (the full demo is a slow notebook cell)."
    real_data('mnist', 'test')                      # skips where MNIST is absent (fails in CI, which has it)
    from deepclust_nb.cli import main, run_demo
    from deepclust_nb.estimator import get_method
    assert get_method('embedding_space').demo == ('mnist', 'test', 'demo_mnist')
    r = run_demo('embedding_space', n=300, preset='demo')
    assert set(r) >= {'kmeans', 'embedding_space'} and 0 < r['embedding_space']['acc'] <= 1 and r['kmeans']['seconds'] >= 0
    out = capsys.readouterr().out
    assert 'kmeans on pixels' in out and 'embedding_space' in out
    assert main(['demo', 'kmeans']) == 2 and 'declares no demo' in capsys.readouterr().err
    assert main(['demo', 'no_such_method']) == 2


def test_run_experiment_applies_a_named_preset(tmp_path):
    import deepclust_nb.st_dac  # noqa: F401  (registers the paper)
    from deepclust_nb.experiment import run_experiment
    rec = run_experiment('st_dac', 'st1', 'digits', 'cpu', seed=0, results=tmp_path, preset='authors_code', epochs=1,
                         widths=(8, 8, 8), hidden=16, chunk=512, save_artifacts=False)
    assert rec['tag'] == 'authors_code' and rec['preset'] == 'authors_code'      # the tag names the preset
    cfg = rec['config']
    assert (cfg['self_label_target'], cfg['bn'], cfg['schedule'], cfg['chunk'], cfg['hidden']) == ('clean', 'batch', 'code', 512, 16)
    assert (tmp_path/'st_dac'/'st1__digits__cpu__seed0__authors_code.json').exists()
    with pytest.raises(ValueError, match='no preset'):
        run_experiment('st_dac', 'st1', 'digits', 'cpu', results=tmp_path, preset='nope')
