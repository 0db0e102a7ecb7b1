import json

import pandas as pd
import pytest

from deepclust_nb.records import (RECORD_FIELDS, fmt_mean_std, load_records, make_record, paper_vs_ours, read_record,
                                  record_path, results_dir, run_name, summarize, validate_record, write_record)


def rec(**kw):
    base = dict(paper='p', variant='v', dataset='mnist', split='all', protocol='cpu', seed=0,
                metrics={'acc': 0.5, 'nmi': 0.4, 'ari': 0.3}, config={'epochs': 2, 't': (1, 2)},
                device='cpu: test', wall_seconds=1.0)
    base.update(kw)
    return make_record(**base)


def test_schema_fields_present():
    r = rec(history=[{'epoch': 1, 'loss': 0.1}])
    for k in RECORD_FIELDS: assert k in r
    assert r['config']['t'] == [1, 2] and r['history'][0]['loss'] == 0.1 and 'dirty' in r
    json.dumps(r)


@pytest.mark.parametrize('change,msg', [({'protocol': 'gpu'}, 'protocol'), ({'split': 'val'}, 'split'),
                                        ({'seed': '0'}, "'seed'"), ({'metrics': {'acc': 0.5, 'nmi': 0.1}}, "'ari'"),
                                        ({'metrics': {'acc': 1.5, 'nmi': 0.1, 'ari': 0.1}}, 'out of range')])
def test_validation_errors(change, msg):
    with pytest.raises(ValueError, match=msg): validate_record({**rec(), **change})
    with pytest.raises(ValueError, match='lacks the field'): validate_record({k: v for k, v in rec().items() if k != 'commit'})


def test_write_read_roundtrip_atomic(tmp_path):
    r = rec(seed=3, tag='rmin0.1')
    p = write_record(r, tmp_path)
    assert p == tmp_path/'p'/'v__mnist__cpu__seed3__rmin0.1.json' == record_path(r, tmp_path)
    assert read_record(p) == r
    assert [f.name for f in (tmp_path/'p').iterdir()] == [p.name]
    with pytest.raises(ValueError): write_record({**r, 'protocol': 'x'}, tmp_path)
    assert [f.name for f in (tmp_path/'p').iterdir()] == [p.name]


def test_load_summarize_and_table(tmp_path):
    for s, acc in enumerate([0.6, 0.7, 0.8]): write_record(rec(seed=s, metrics={'acc': acc, 'nmi': 0.5, 'ari': 0.4}), tmp_path)
    write_record(rec(variant='w', seed=0), tmp_path)
    df = load_records('p', tmp_path)
    assert len(df) == 4 and set(df.columns) >= {'acc', 'nmi', 'ari', 'seed', 'commit'}
    s = summarize(df).set_index('variant')
    assert s.loc['v', 'n'] == 3 and s.loc['v', 'acc_mean'] == pytest.approx(0.7) and s.loc['v', 'acc_std'] == pytest.approx(0.1)
    assert pd.isna(s.loc['w', 'acc_std'])            # one run has no spread: NaN, not 0
    t = paper_vs_ours(df, [{'dataset': 'mnist', 'variant': 'v', 'acc': 97.5, 'source': 'Table 3', 'split': 'all'}])
    ours = t[(t.variant == 'v') & (t.source == 'ours')].iloc[0]
    assert ours['ACC'] == '70.0 ± 10.0 (n=3)'
    quoted = t[t.source.str.startswith('quoted')].iloc[0]
    assert quoted['ACC'] == '97.5' and quoted['NMI'] == '–' and quoted['source'] == 'quoted: Table 3'
    assert load_records('none', tmp_path).empty and summarize(load_records('none', tmp_path)).empty


def test_helpers(monkeypatch, tmp_path):
    assert run_name('v', 'd', 'cpu', 1) == 'v__d__cpu__seed1'
    assert fmt_mean_std(0.5, 0.01, 2) == '50.0 ± 1.0 (n=2)' and fmt_mean_std(float('nan'), 0, 0) == '–'
    monkeypatch.setenv('DEEPCLUST_RESULTS', str(tmp_path))
    assert results_dir() == tmp_path


def test_committed_records_are_valid():
    "Every record in the repository's results/ follows the schema (tables are rendered from them)."
    df = load_records()
    for p in df.path: read_record(p)


def test_git_commit_from_the_environment(tmp_path, monkeypatch):
    "A shipped copy (the GPU machine's .git need not match its tree) is told its commit in $DEEPCLUST_COMMIT, which wins."
    from deepclust_nb.records import git_commit, project_root
    monkeypatch.setenv('DEEPCLUST_COMMIT', 'abc123')
    assert git_commit(tmp_path) == {'commit': 'abc123', 'dirty': False}
    assert git_commit(project_root())['commit'] == 'abc123'
    monkeypatch.delenv('DEEPCLUST_COMMIT')
    assert git_commit(tmp_path)['commit'] == 'unknown'


def test_tagged_runs_get_their_own_rows(tmp_path):
    for s in range(2): write_record(rec(seed=s), tmp_path)
    write_record(rec(seed=0, tag='pre50', metrics={'acc': 0.9, 'nmi': 0.9, 'ari': 0.9}), tmp_path)
    t = paper_vs_ours(load_records('p', tmp_path), []).set_index('variant')
    assert t.loc['v', 'ACC'] == '50.0 ± 0.0 (n=2)' and t.loc['v (pre50)', 'ACC'] == '90.0 (n=1)'


def test_results_table_pools_every_seed_and_keeps_quotes(tmp_path):
    from deepclust_nb.records import results_table, write_record
    recs = [rec(seed=s, metrics={'acc': a, 'nmi': 0.5, 'ari': 0.4}) for s, a in ((0, 0.9), (1, 0.7), (2, 0.8))]
    for r in recs: write_record(r, tmp_path)
    t = results_table([{'row': 'paper', 'dataset': recs[0]['dataset'], 'quoted': {'acc': 97.08, 'split': 'all', 'source': 'Table II', 'selection': 'best epoch (labels)'}},
                       {'row': 'ours', 'dataset': recs[0]['dataset'], 'variant': recs[0]['variant']}], recs[0]['paper'], tmp_path)
    assert list(t.seeds) == ['–', 3]
    assert t.loc[1, 'ACC'] == '80.0 ± 10.0' and t.loc[0, 'ACC'] == '97.08' and t.loc[0, 'selection'] == 'best epoch (labels)'
    with pytest.raises(KeyError, match='unknown keys'):
        results_table([{'row': 'x', 'dataset': 'd', 'variants': 'full'}], recs[0]['paper'], tmp_path)
