"""The HTML book builds offline from the executed notebooks, and reads as a book: every page of the reading order,
its figures, local MathJax, and no broken internal link. Building takes about a minute."""
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from execnb.nbio import read_nb

from deepclust_nb.book import BOOK_PARTS, book_notebooks, build_book, prepare_notebook

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT/'nbs'


@pytest.fixture(scope='module')
def book(tmp_path_factory):
    out = tmp_path_factory.mktemp('book')
    index = build_book(out, NBS)
    assert index == out/'index.html' and index.exists()
    return out


class _Links(HTMLParser):
    def __init__(self):
        super().__init__(); self.hrefs, self.ids, self.imgs, self.scripts = [], set(), [], []
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get('id'): self.ids.add(a['id'])
        if tag == 'a' and a.get('href'): self.hrefs.append(a['href'])
        if tag == 'img' and a.get('src'): self.imgs.append(a['src'])
        if tag == 'script' and a.get('src'): self.scripts.append(a['src'])


def _parse(path: Path) -> _Links:
    p = _Links(); p.feed(path.read_text(encoding='utf-8')); return p


def test_every_page_of_the_reading_order_exists(book):
    names = book_notebooks(NBS)
    assert names == [n for _, part in BOOK_PARTS for n in part]
    for name in [*names, 'index', 'api']: assert (book/f'{name}.html').exists(), name
    front = (book/'index.html').read_text()
    for part, _ in BOOK_PARTS: assert part in front, f'the front page lacks the part {part!r}'


def test_pages_embed_their_notebooks_figures(book, tmp_path):
    for name in book_notebooks(NBS):
        nb = read_nb(prepare_notebook(NBS/f'{name}.ipynb', tmp_path/f'{name}.ipynb'))
        n_png = sum('image/png' in o.get('data', {}) for c in nb.cells for o in c.get('outputs', []))
        imgs = [s for s in _parse(book/f'{name}.html').imgs if '_images/' in s or s.startswith('data:image')]
        assert len(imgs) >= n_png, f'{name}: {len(imgs)} images on the page, {n_png} in the notebook'
        for s in imgs:
            if not s.startswith('data:'): assert (book/s).exists(), f'{name}: missing image {s}'


def test_math_renders_offline(book):
    page = _parse(book/'30_embedding_space.html')
    mathjax = [s for s in page.scripts if 'mathjax' in s.lower()]
    assert mathjax, 'no MathJax script on a chapter with equations'
    assert not any(s.startswith(('http:', 'https:', '//')) for s in mathjax), f'MathJax from the network: {mathjax}'
    assert all((book/s.split('?')[0]).exists() for s in mathjax)
    assert '\\(' in (book/'30_embedding_space.html').read_text() or 'math notranslate' in (book/'30_embedding_space.html').read_text()


def test_internal_links_resolve(book):
    pages = {p: _parse(p) for p in book.glob('*.html')}
    broken = []
    for page, parsed in pages.items():
        for href in parsed.hrefs:
            if re.match(r'^(https?:|mailto:|javascript:)', href) or href.startswith('#') and len(href) == 1: continue
            target, _, anchor = href.partition('#')
            path = (page.parent/target).resolve() if target else page
            if not path.exists(): broken.append(f'{page.name}: {href}'); continue
            if anchor and path.suffix == '.html':
                ids = pages[path].ids if path in pages else _parse(path).ids
                if anchor not in ids: broken.append(f'{page.name}: {href} (no such anchor)')
    assert not broken, f'{len(broken)} broken links, e.g. {broken[:8]}'


@pytest.mark.skipif(not (shutil.which('chromium') or shutil.which('chromium-browser')), reason='headless Chromium not installed')
def test_pages_render_in_a_headless_browser(book, tmp_path):
    "Screenshots of the front page and the template chapter: non-blank PNGs (the files are kept under figures/ by hand)."
    from PIL import Image
    exe = shutil.which('chromium') or shutil.which('chromium-browser')
    for name in ('index', '30_embedding_space'):
        shot = tmp_path/f'{name}.png'
        subprocess.run([exe, '--headless', '--no-sandbox', '--disable-gpu', '--virtual-time-budget=5000', '--window-size=1280,1600',
                        f'--screenshot={shot}', (book/f'{name}.html').as_uri()], check=True, capture_output=True, timeout=120)
        im = Image.open(shot).convert('L')
        assert im.size == (1280, 1600) and len(set(im.getdata())) > 20, f'{name}: the screenshot is blank'
