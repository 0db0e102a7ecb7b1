"""The estimator contract shared by every method: scikit-learn's conventions (check_estimator), one input path for every
image form, clear errors for bad input, save/load and pickling, the method registry (entry points and CLI), and
clustering a folder of one's own images from the command line."""
import csv
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.utils.estimator_checks import parametrize_with_checks

from deepclust_nb.adc import AssociativeDeepClustering
from deepclust_nb.baselines import PixelKMeans
from deepclust_nb.cli import main
from deepclust_nb.data import load_dataset, load_images
from deepclust_nb.embedding_space import EmbeddingClustering
from deepclust_nb.estimator import (METHODS, MODEL_FORMAT_VERSION, DeepClusterer, Method, load_methods, load_model, make,
                                    methods, register_method)
from deepclust_nb.gatcluster import GATCluster
from deepclust_nb.metrics import evaluate
from deepclust_nb.st_dac import DeepAdaptiveClustering
from deepclust_nb.variational_clustering import VariationalClustering

# The smallest configuration of each method that still runs every part of its fit (one or two epochs, tiny layers).
TINY = {
    'st_dac': lambda k=10, **kw: DeepAdaptiveClustering(k, 'st1', epochs=1, widths=(4, 4, 4), hidden=8, batch_size=16, **kw),
    'gatcluster': lambda k=10, **kw: GATCluster(k, widths=(4, 4, 4), att_size=2, M=32, m1=32, m2=16, epochs=1, **kw),
    'embedding_space': lambda k=10, **kw: EmbeddingClustering(k, hidden=(16,), rep_hidden=(16,), latent_dim=4, pretrain_epochs=1,
                                                              joint_epochs=1, batch_size=16, n_init=1, **kw),
    'adc': lambda k=10, **kw: AssociativeDeepClustering(k, steps=4, loss_warmup=2, batch_size=16, n_aug=1, widths=(4, 4),
                                                        emb_dim=8, chunk=2, **kw),
    'variational_clustering': lambda k=10, **kw: VariationalClustering(k, arch='mlp', epochs=1, batch_size=16, **kw),
    'kmeans': lambda k=10, **kw: PixelKMeans(k, n_init=1, **kw),
}


@pytest.fixture(scope='module')
def mnist64(real_data):
    x, y = real_data('mnist', 'test')
    return x[:64], y[:64]


# ---------------------------------------------------------------------------------------------------------------------
# One input path: the battery of 8 inputs x 5 estimators (and k-means)

@pytest.mark.parametrize('name', list(TINY))
def test_input_battery(name, mnist64):
    x, _ = mnist64
    u8 = (x * 255).round().to(torch.uint8)
    flat_ok = {'image_shape': (28, 28)} if name not in ('embedding_space', 'kmeans') else {}
    accepted = {'uint8 N x 1 x 28 x 28': (u8, {}), 'float N x 28 x 28': (x[:, 0], {}),
                'numpy float32 N x 1 x 28 x 28': (x.numpy(), {}), 'flat N x 784': (x.flatten(1).numpy(), flat_ok),
                'channels-last N x 28 x 28 x 1': (x.permute(0, 2, 3, 1).numpy(), {})}
    labels = {}
    for form, (X, kw) in accepted.items():
        est = TINY[name](random_state=0, **kw).fit(X)
        labels[form] = est.labels_
        assert est.labels_.shape == (64,) and est.labels_.dtype == np.int64, form
    nan = np.full((64, 1, 28, 28), np.nan, np.float32)
    for X, k, msg in [(nan, 10, 'NaN'), (x[:0], 10, 'no images|no samples'), (x * 255, 10, 'divide by 255'),
                      (x, 1, 'n_clusters must be an integer >= 2'), (x[:5], 10, 'need at least')]:
        with pytest.raises(ValueError, match=msg): TINY[name](k).fit(X)
    if name not in ('embedding_space', 'kmeans'):
        with pytest.raises(ValueError, match='pass image_shape'): TINY[name]().fit(x.flatten(1))


@pytest.mark.parametrize('name', list(TINY))
def test_forms_of_one_image_set_give_one_model(name, mnist64):
    "uint8 and its float copy, channels first or last, numpy or torch: the same tensor reaches the network, the same labels."
    x = (mnist64[0] * 255).round().to(torch.uint8)
    ref = TINY[name](random_state=0).fit(x).labels_
    for X in (x.float() / 255, x.permute(0, 2, 3, 1).numpy(), x[:, 0].numpy()):
        assert np.array_equal(TINY[name](random_state=0).fit(X).labels_, ref)


def test_a_torch_dataset_is_an_input(mnist64):
    x, y = mnist64
    ds = torch.utils.data.TensorDataset(x, y)                     # (image, label) pairs: the labels are dropped
    assert np.array_equal(TINY['kmeans'](random_state=0).fit(ds).labels_, TINY['kmeans'](random_state=0).fit(x).labels_)


# ---------------------------------------------------------------------------------------------------------------------
# scikit-learn's contract

@pytest.mark.parametrize('name', list(TINY))
def test_sklearn_contract_on_images(name, mnist64):
    x, _ = mnist64
    est = TINY[name](random_state=0)
    params = est.get_params()
    assert clone(est).get_params() == params
    with pytest.raises(NotFittedError): est.predict(x)
    assert est.fit(x) is est
    assert est.get_params() == params, 'fit must not change the parameters'
    assert np.array_equal(TINY[name](random_state=0).fit_predict(x), est.labels_)
    assert np.array_equal(est.predict(x), est.labels_)
    assert np.array_equal(pickle.loads(pickle.dumps(est)).predict(x), est.labels_)
    assert est.n_features_in_ == 784
    if hasattr(est, 'predict_proba'):
        p = est.predict_proba(x)
        assert p.shape == (64, 10) and np.allclose(p.sum(1), 1, atol=1e-4) and np.array_equal(p.argmax(1), est.labels_)
    if hasattr(est, 'transform'):
        assert est.transform(x).shape[0] == 64
    est.set_params(random_state=1)
    assert est.get_params()['random_state'] == 1


class _RowsAsImages:
    """Test adapter for scikit-learn's checks, which feed N x D tables of arbitrary reals: each value is squashed into
    (0, 1) with a sigmoid and, for the convolutional methods, each row is resized to an 8 x 8 image. Every check then
    runs the method's own fit, predict and parameter handling; the [0, 1] rule itself is tested above."""
    _as_image = True

    def _as_input(self, X, name='X'):
        from deepclust_nb.estimator import _to_tensor
        t = _to_tensor(X, name)
        if t.ndim == 2 and t.shape[0] > 0 and t.shape[1] > 0:
            if getattr(self, 'n_features_in_', None) not in (None, t.shape[1]) and not self._fitting:
                raise ValueError(f'X has {t.shape[1]} features, but {type(self).__name__} is expecting {self.n_features_in_} features as input')
            t = t.double()
            t = torch.where(torch.isfinite(t), torch.sigmoid(t), t).float()      # NaN and inf stay, for the checks of them
            if self._as_image: t = F.interpolate(t[:, None, None, :], size=(8, 8), mode='bilinear', align_corners=False)
            X = t
        return super()._as_input(X, name)

    def _fit_input(self, X, min_samples=1):
        a = X if torch.is_tensor(X) else np.asarray(X)
        n = a.shape[1] if a.ndim == 2 else None
        self._fitting = True
        try: out = super()._fit_input(X, min_samples)
        finally: self._fitting = False
        if n is not None: self.n_features_in_ = n                  # the table's columns, not the adapter's 64 pixels
        return out


class RowsEmbeddingClustering(_RowsAsImages, EmbeddingClustering): _as_image = False
class RowsPixelKMeans(_RowsAsImages, PixelKMeans): _as_image = False
class RowsDeepAdaptiveClustering(_RowsAsImages, DeepAdaptiveClustering): pass
class RowsGATCluster(_RowsAsImages, GATCluster): pass
class RowsAssociativeDeepClustering(_RowsAsImages, AssociativeDeepClustering): pass
class RowsVariationalClustering(_RowsAsImages, VariationalClustering): pass

CHECKED = [
    RowsEmbeddingClustering(3, hidden=(8,), rep_hidden=(8,), latent_dim=2, pretrain_epochs=1, joint_epochs=1, batch_size=4, n_init=1),
    RowsPixelKMeans(3, n_init=1),
    RowsDeepAdaptiveClustering(3, 'st0', epochs=1, widths=(2, 2, 2), hidden=4, batch_size=4),
    RowsGATCluster(3, widths=(2, 2, 2), att_size=2, M=8, m1=8, m2=4, epochs=1),
    RowsAssociativeDeepClustering(3, steps=2, loss_warmup=1, batch_size=4, n_aug=1, widths=(2, 2), emb_dim=4, chunk=1),
    RowsVariationalClustering(3, arch='mlp', epochs=1, batch_size=4),
]

# scikit-learn sets n_clusters = 1 in these checks, to fit one sample or one feature; one cluster is no clustering, and
# every method here refuses it with a clear error (which the tests above require).
ONE_CLUSTER = ('check_fit2d_1sample', 'check_fit2d_1feature', 'check_fit2d_predict1d', 'check_methods_subset_invariance',
               'check_dont_overwrite_parameters')


def _expected_failed(est):
    "The checks that do not apply, and why; every other check of scikit-learn runs and must pass."
    out = {c: 'sets n_clusters = 1, which every method refuses by design' for c in ONE_CLUSTER}
    if isinstance(est, (GATCluster, AssociativeDeepClustering, VariationalClustering)):
        # Networks with batch normalisation and a random augmentation: 'check_clustering' asks for ARI > 0.4 on three
        # blobs after one epoch of 2-filter layers, which tests the budget rather than the contract.
        out['check_clustering'] = 'one epoch of a 2-filter network on 3 blobs is not a clustering test (budget, not contract)'
    return out


@parametrize_with_checks(CHECKED, expected_failed_checks=_expected_failed)
def test_sklearn_check_estimator(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        check(estimator)


# ---------------------------------------------------------------------------------------------------------------------
# Save and load

@pytest.mark.parametrize('name', list(TINY))
def test_save_load_round_trip(name, mnist64, tmp_path):
    x, _ = mnist64
    est = TINY[name](random_state=0).fit(x)
    path = est.save(tmp_path/'model.pt')
    back = type(est).load(path)
    assert type(back) is type(est) and back.get_params() == {**est.get_params(), **({'augment': None} if 'augment' in est.get_params() else {})}
    assert np.array_equal(back.predict(x), est.predict(x))
    assert np.array_equal(load_model(path).predict(x), est.predict(x))
    if name != 'kmeans':
        with pytest.raises(ValueError, match='not a PixelKMeans'): PixelKMeans.load(path)


def test_bad_model_files(mnist64, tmp_path):
    est = TINY['kmeans']().fit(mnist64[0])
    est.save(tmp_path/'m.pt')
    (tmp_path/'cut.pt').write_bytes((tmp_path/'m.pt').read_bytes()[:100])
    with pytest.raises(ValueError, match='corrupt'): load_model(tmp_path/'cut.pt')
    state = torch.load(tmp_path/'m.pt', weights_only=True); state['format_version'] = MODEL_FORMAT_VERSION + 1
    torch.save(state, tmp_path/'new.pt')
    with pytest.raises(ValueError, match='upgrade deepclust_nb'): load_model(tmp_path/'new.pt')
    with pytest.raises(FileNotFoundError): load_model(tmp_path/'none.pt')
    with pytest.raises(NotFittedError): TINY['adc']().save(tmp_path/'unfitted.pt')


def test_no_lambdas_left_in_the_package():
    import deepclust_nb, re
    pkg = Path(deepclust_nb.__file__).parent
    hits = [f'{p.name}:{i + 1}' for p in pkg.glob('*.py') for i, line in enumerate(p.read_text().splitlines())
            if re.search(r'\blambda\b(?!_)', line) and 'key=lambda' not in line]
    assert not hits, f'lambdas stop estimators from pickling; found {hits}'


# ---------------------------------------------------------------------------------------------------------------------
# The registry, entry points and the command line

def test_registry_lists_and_makes_every_method():
    assert {'st_dac', 'gatcluster', 'embedding_space', 'adc', 'variational_clustering', 'kmeans'} <= set(methods())
    for name in methods():
        est = make(name, 'demo')
        assert isinstance(est, DeepClusterer)
        for preset in ('cpu', 'paper'): make(name, preset)
    assert make('adc', 'demo', steps=7).steps == 7
    with pytest.raises(ValueError, match="no preset 'best'"): make('adc', 'best')
    with pytest.raises(ValueError, match='unknown setting'): make('adc', 'demo', stepz=7)


TOY_PLUGIN = '''
import numpy as np
from deepclust_nb.baselines import PixelKMeans
from deepclust_nb.estimator import Method

class FirstPixel(PixelKMeans):
    "A toy third-party method: k-means on the first pixel only."
    def fit(self, X, y=None):
        super().fit(X)
        self.labels_ = (self._as_input(X)[:, 0].numpy() > 0.5).astype(np.int64)
        return self

def method():
    return Method('first_pixel', FirstPixel, {'demo': {'n_clusters': 2}}, 'a toy plug-in')
'''


def test_a_third_party_method_registers_through_an_entry_point(tmp_path, mnist64):
    "A package that declares a `deepclust_nb.methods` entry point appears in methods() and runs from the CLI."
    (tmp_path/'toy_plugin.py').write_text(TOY_PLUGIN)
    dist = tmp_path/'toy_plugin-0.1.dist-info'; dist.mkdir()
    (dist/'METADATA').write_text('Metadata-Version: 2.1\nName: toy-plugin\nVersion: 0.1\n')
    (dist/'entry_points.txt').write_text('[deepclust_nb.methods]\nfirst_pixel = toy_plugin:method\n')
    for j, img in enumerate(mnist64[0][:20]):
        Image.fromarray((img[0].numpy() * 255).astype(np.uint8)).save(tmp_path/f'{j:02d}.png')
    code = ('import sys; from deepclust_nb.estimator import methods; assert "first_pixel" in methods(), methods(); '
            'from deepclust_nb.cli import main; sys.exit(main(sys.argv[1:]))')
    env = {**os.environ, 'PYTHONPATH': f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", 'DEEPCLUST_PROGRESS': '0'}
    out = subprocess.run([sys.executable, '-c', code, 'run', 'first_pixel', '--data', str(tmp_path), '--out', str(tmp_path/'c.csv')],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(open(tmp_path/'c.csv')))
    assert len(rows) == 20 and {r['cluster'] for r in rows} <= {'0', '1'}


def test_a_method_registered_in_python_runs_from_the_cli(tmp_path, mnist64):
    register_method(Method('kmeans_copy', PixelKMeans, {'demo': {'n_init': 1}}, 'k-means again'))
    try:
        for j, img in enumerate(mnist64[0][:30]):
            Image.fromarray((img[0].numpy() * 255).astype(np.uint8)).save(tmp_path/f'{j:02d}.png')
        assert main(['run', 'kmeans_copy', '--data', str(tmp_path), '--out', str(tmp_path/'k.csv')]) == 0
        assert len(list(csv.DictReader(open(tmp_path/'k.csv')))) == 30
    finally: del METHODS['kmeans_copy']


def test_cli_clusters_own_images_saves_and_predicts(tmp_path, capsys):
    "A folder written from scikit-learn's digits in ImageFolder layout: CSV of clusters, metrics from the class folders, a saved model."
    x, y = load_dataset('digits', 'all')
    for j, (img, lab) in enumerate(zip(x, y)):
        (tmp_path/'digits'/str(int(lab))).mkdir(parents=True, exist_ok=True)
        Image.fromarray((img[0].numpy() * 255).round().astype(np.uint8)).save(tmp_path/'digits'/str(int(lab))/f'{j:04d}.png')
    args = ['run', 'adc', '--data', str(tmp_path/'digits'), '--out', str(tmp_path/'adc.csv'), '--save', str(tmp_path/'adc.pt'),
            '--set', 'steps=300', 'loss_warmup=100', 'lr_warmup=50', 'lr_decay_every=150']
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert 'against the 10 class folders: ACC' in printed
    rows = list(csv.DictReader(open(tmp_path/'adc.csv')))
    assert len(rows) == 1797 and set(rows[0]) == {'file', 'cluster', 'class'}
    data = load_images(tmp_path/'digits')
    acc = evaluate(data.y.numpy(), np.array([int(r['cluster']) for r in rows]))['acc']
    assert acc > 0.3, acc                                      # a short run, far above chance (0.1)
    (tmp_path/'flat').mkdir()
    for p in data.paths[:40]: shutil.copy(p, tmp_path/'flat'/Path(p).name)
    assert main(['predict', str(tmp_path/'adc.pt'), '--data', str(tmp_path/'flat'), '--out', str(tmp_path/'new.csv')]) == 0
    assert 'class folders' not in capsys.readouterr().out       # a flat folder has no labels: no metrics
    new = {Path(r['file']).name: r['cluster'] for r in csv.DictReader(open(tmp_path/'new.csv'))}
    old = {Path(r['file']).name: r['cluster'] for r in rows}
    assert new == {k: old[k] for k in new}                    # the saved model gives the same clusters


def test_shipped_demo_models_load_and_predict_as_recorded():
    "Each method's digits demo ships with the package (float16, <= 5 MB in all) and predicts what was recorded."
    from deepclust_nb.data import load_dataset
    from deepclust_nb.estimator import DEMO_WEIGHTS, demo_scores, load_demo, load_methods
    from deepclust_nb.metrics import cluster_acc
    scores = demo_scores()
    wanted = {n for n, m in load_methods().items() if 'demo' in m.presets and n != 'kmeans'}
    assert wanted <= set(scores), f'no shipped demo model for {sorted(wanted - set(scores))}: run deepclust demo-weights'
    assert sum((DEMO_WEIGHTS/f'{n}.pt').stat().st_size for n in scores) <= 5_000_000
    x, y = load_dataset('digits', 'all')
    for name, s in scores.items():
        m = load_demo(name)
        assert abs(cluster_acc(y, m.predict(x)) - s['acc']) < 0.01, name
        assert all(t.dtype == torch.float32 for t in getattr(m, m._modules[0]).state_dict().values() if t.is_floating_point())
    with pytest.raises(ValueError, match='no shipped demo model'): load_demo('nothing')
