"""The project's own invariants: the library is what the notebooks export, the notebooks are clean, the README is
generated from nbs/index.ipynb, and CI runs exactly the README's install and test commands."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _copy_project(dst: Path) -> Path:
    for name in ('settings.ini', 'setup.py'): shutil.copy(ROOT/name, dst/name)
    shutil.copytree(ROOT/'nbs', dst/'nbs', ignore=shutil.ignore_patterns('.ipynb_checkpoints', '_proc'))
    shutil.copytree(ROOT/'deepclust_nb', dst/'deepclust_nb', ignore=shutil.ignore_patterns('__pycache__'))
    return dst


def _tree(d: Path, pattern: str) -> dict:
    return {p.relative_to(d).as_posix(): p.read_text() for p in sorted(d.glob(pattern))}


def test_library_is_exported_from_notebooks(tmp_path):
    d = _copy_project(tmp_path)
    subprocess.run(['nbdev_export'], cwd=d, check=True, capture_output=True, timeout=300)
    assert _tree(d, 'deepclust_nb/*.py') == _tree(ROOT, 'deepclust_nb/*.py'), \
        'deepclust_nb/ differs from what nbdev_export writes: run nbdev_export and commit'


def test_notebooks_are_clean(tmp_path):
    d = _copy_project(tmp_path)
    subprocess.run(['nbdev_clean'], cwd=d, check=True, capture_output=True, timeout=300)
    assert _tree(d, 'nbs/*.ipynb') == _tree(ROOT, 'nbs/*.ipynb'), 'notebooks are not cleaned: run nbdev_clean and commit'


def _commands(text: str, kind: str) -> str:
    m = re.search(rf'^{kind}[^\n]*:\s*\n\s*\n```sh\n(.+?)\n```', text, re.M | re.S)
    assert m, f'README has no {kind} command block'
    return m.group(1).strip()


def test_ci_runs_the_readme_commands():
    readme, ci = (ROOT/'README.md').read_text(), (ROOT/'.ci'/'run').read_text()
    for kind in ('Install', 'Test'):
        cmd = _commands(readme, kind)
        assert '\n' not in cmd, f'the {kind} command must be one line'
        assert cmd in ci.splitlines(), f'.ci/run does not run the README {kind} command: {cmd}'


def test_readme_is_generated_from_index(tmp_path):
    subprocess.run(['jupyter', 'nbconvert', '--to', 'markdown', str(ROOT/'nbs'/'index.ipynb'), '--output-dir', str(tmp_path),
                    '--output', 'README', '--log-level', 'ERROR'], check=True, capture_output=True, timeout=300)
    assert (tmp_path/'README.md').read_text() == (ROOT/'README.md').read_text(), \
        'README.md is stale: regenerate it with jupyter nbconvert --to markdown nbs/index.ipynb --output-dir . --output README'


MAX_TRACKED_BYTES = 2_000_000


def _tracked_sizes() -> dict:
    out = subprocess.run(['git', 'ls-files', '-z'], cwd=ROOT, capture_output=True, check=True, timeout=60).stdout
    files = [f for f in out.decode().split('\0') if f]
    return {f: (ROOT/f).stat().st_size for f in files if (ROOT/f).is_file()}


def test_no_tracked_file_over_2mb():
    if not (ROOT/'.git').exists(): pytest.skip('not a git checkout')
    big = {f: s for f, s in _tracked_sizes().items() if s > MAX_TRACKED_BYTES}
    assert not big, f'tracked files over 2 MB (keep large outputs in the artifact cache, shrink notebook images): {big}'


def test_no_run_artifacts_are_tracked():
    "Run artifacts live in the cache (DEEPCLUST_CACHE); figures read the summaries kept beside the records."
    if not (ROOT/'.git').exists(): pytest.skip('not a git checkout')
    tracked = [f for f in _tracked_sizes() if f.endswith('.artifacts.pt')]
    assert not tracked, f'run artifacts are tracked (move them to the artifact cache): {tracked[:5]}'



def test_summaries_are_small():
    sizes = {p.name: p.stat().st_size for p in (ROOT/'results').glob('*/*.summary.npz')}
    assert all(s <= 1_000_000 for s in sizes.values()), {k: v for k, v in sizes.items() if v > 1_000_000}
