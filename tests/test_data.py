import bz2, gzip, hashlib, os, shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from deepclust_nb.data import (DATASETS, DEFAULT_DATA_ROOT, CorruptDatasetError, DatasetNotFoundError, data_root,
                               dataset_names, dataset_status, get_spec, imbalanced_indices, imbalanced_subset,
                               load_dataset, retention_rates, stratified_indices, stratified_subset, to_grayscale)

USPS_COUNTS = {'train': [1194, 1005, 731, 658, 652, 556, 664, 645, 542, 644],
               'test': [359, 264, 198, 166, 200, 160, 170, 147, 166, 177]}
MNIST_MD5 = {'train-images-idx3-ubyte': '6bbc9ace898e44ae57da46a324031adb',
             'train-labels-idx1-ubyte': 'a25bea736e30d166cdddb491f175f624',
             't10k-images-idx3-ubyte': '2646ac647ad5339dbf082846283269ea',
             't10k-labels-idx1-ubyte': '27ae3e4e09519cfbb04c329615203637'}


def md5(path): return hashlib.md5(Path(path).read_bytes()).hexdigest()


@pytest.mark.parametrize('name', ['mnist', 'fashion_mnist', 'usps', 'cifar10_jpeg', 'digits'])
@pytest.mark.parametrize('split', ['train', 'test'])
def test_shapes_counts_ranges(real_data, name, split):
    spec = get_spec(name)
    x, y = real_data(name, split)
    assert tuple(x.shape) == (spec.counts[split], *spec.shape)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0.9
    assert y.unique().tolist() == list(range(10))


def test_usps_class_counts(real_data):
    for split in ('train', 'test'):
        _, y = real_data('usps', split)
        assert torch.bincount(y).tolist() == USPS_COUNTS[split]


def test_all_is_train_then_test(real_data):
    xtr, ytr = real_data('mnist', 'train'); xte, yte = real_data('mnist', 'test')
    x, y = real_data('mnist', 'all')
    assert len(x) == 70000 and torch.equal(x[:60000], xtr) and torch.equal(y[60000:], yte)


def test_mnist_unpacked_md5(real_data):
    real_data('mnist', 'train'); real_data('mnist', 'test')
    raw = data_root()/'MNIST'/'raw'
    for f, h in MNIST_MD5.items():
        if (raw/f).exists(): assert md5(raw/f) == h, f


def test_unpacks_gz_and_caches(real_data, tmp_path):
    real_data('mnist', 'test')  # skip when there is no MNIST at all
    src = data_root()/'MNIST'/'raw'
    raw = tmp_path/'MNIST'/'raw'; raw.mkdir(parents=True)
    for f in MNIST_MD5:
        if (src/(f + '.gz')).exists(): shutil.copy(src/(f + '.gz'), raw)
        else:
            with open(src/f, 'rb') as i, gzip.open(raw/(f + '.gz'), 'wb') as o: shutil.copyfileobj(i, o)
    x, y = load_dataset('mnist', 'all', root=tmp_path)
    for f, h in MNIST_MD5.items(): assert md5(raw/f) == h
    assert (tmp_path/'.deepclust_cache'/'mnist-train.pt').exists()
    assert not list(raw.glob('*.tmp*')) and not list((tmp_path/'.deepclust_cache').glob('*.tmp'))
    shutil.rmtree(raw)   # with the raw files gone, the second load can only come from the cache
    x2, y2 = load_dataset('mnist', 'all', root=tmp_path)
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_damaged_cache_is_rebuilt(real_data, tmp_path):
    real_data('usps', 'test')
    shutil.copytree(data_root()/'USPS', tmp_path/'USPS', ignore=shutil.ignore_patterns('*.pt'))
    x, _ = load_dataset('usps', 'test', root=tmp_path)
    (tmp_path/'.deepclust_cache'/'usps-test.pt').write_bytes(b'garbage')
    x2, _ = load_dataset('usps', 'test', root=tmp_path)
    assert torch.equal(x, x2)


def test_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv('DEEPCLUST_DATA', raising=False)
    assert data_root() == DEFAULT_DATA_ROOT
    monkeypatch.setenv('DEEPCLUST_DATA', str(tmp_path))
    assert data_root() == tmp_path
    assert data_root('/elsewhere') == Path('/elsewhere')


def test_unknown_name_and_split():
    with pytest.raises(ValueError, match='available datasets: mnist, fashion_mnist, usps, cifar10_jpeg'):
        load_dataset('imagenet')
    with pytest.raises(ValueError, match="unknown split 'val'"):
        load_dataset('digits', 'val')


@pytest.mark.parametrize('name,expect', [('mnist', 'MNIST/raw'), ('fashion_mnist', 'FashionMNIST/raw'),
                                         ('usps', 'usps.bz2'), ('cifar10_jpeg', 'cifar10-jpeg.zip'),
                                         ('cifar10', 'cifar-10-batches-py')])
def test_missing_dataset_says_where(tmp_path, monkeypatch, name, expect):
    monkeypatch.delenv('DEEPCLUST_DOWNLOAD', raising=False)
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset(name, 'train', root=tmp_path)
    msg = str(e.value)
    assert expect in msg and str(tmp_path) in msg and 'DEEPCLUST_DATA' in msg


def test_partial_dataset_names_missing_files(real_data, tmp_path):
    real_data('mnist', 'test')
    raw = tmp_path/'MNIST'/'raw'; raw.mkdir(parents=True)
    src = data_root()/'MNIST'/'raw'
    shutil.copy(src/'t10k-labels-idx1-ubyte', raw)
    with pytest.raises(DatasetNotFoundError, match='train-images-idx3-ubyte'):
        load_dataset('mnist', 'test', root=tmp_path)


def test_truncated_gz_is_corrupt(real_data, tmp_path):
    real_data('fashion_mnist', 'test')
    src = data_root()/'FashionMNIST'/'raw'
    raw = tmp_path/'FashionMNIST'/'raw'; raw.mkdir(parents=True)
    for f in ['train-images-idx3-ubyte', 'train-labels-idx1-ubyte', 't10k-labels-idx1-ubyte']: shutil.copy(src/f, raw)
    data = gzip.compress((src/'t10k-images-idx3-ubyte').read_bytes())
    (raw/'t10k-images-idx3-ubyte.gz').write_bytes(data[:len(data) // 2])
    with pytest.raises(CorruptDatasetError, match='t10k-images-idx3-ubyte'):
        load_dataset('fashion_mnist', 'test', root=tmp_path)
    assert not (raw/'t10k-images-idx3-ubyte').exists(), 'no half-unpacked file under the final name'


def test_wrong_md5_is_corrupt(real_data, tmp_path):
    real_data('mnist', 'test')
    src = data_root()/'MNIST'/'raw'
    raw = tmp_path/'MNIST'/'raw'; raw.mkdir(parents=True)
    for f in MNIST_MD5: shutil.copy(src/f, raw)
    b = bytearray((raw/'t10k-labels-idx1-ubyte').read_bytes()); b[100] ^= 1
    (raw/'t10k-labels-idx1-ubyte').write_bytes(bytes(b))
    with pytest.raises(CorruptDatasetError, match='expected md5'):
        load_dataset('mnist', 'test', root=tmp_path)


def test_truncated_usps_is_corrupt(real_data, tmp_path):
    real_data('usps', 'test')
    (tmp_path/'USPS').mkdir()
    data = (data_root()/'USPS'/'usps.t.bz2').read_bytes()
    (tmp_path/'USPS'/'usps.t.bz2').write_bytes(data[:len(data) // 3])
    with pytest.raises(CorruptDatasetError, match='usps.t.bz2'):
        load_dataset('usps', 'test', root=tmp_path)


def test_bad_cifar_zip_is_corrupt(tmp_path):
    (tmp_path/'CIFAR10-jpeg').mkdir()
    (tmp_path/'CIFAR10-jpeg'/'cifar10-jpeg.zip').write_bytes(b'PK not really a zip')
    with pytest.raises(CorruptDatasetError, match='expected md5'):
        load_dataset('cifar10_jpeg', 'test', root=tmp_path)


def test_dataset_status(tmp_path):
    st = {s['name']: s for s in dataset_status(tmp_path)}
    assert set(st) == set(dataset_names())
    assert st['digits']['available'] and not st['mnist']['available']


def test_stratified_subset():
    x, y = load_dataset('digits', 'all')
    xs, ys = stratified_subset(x, y, 500, seed=0)
    assert len(xs) == 500
    np.testing.assert_allclose(torch.bincount(ys).numpy() / 500, torch.bincount(y).numpy() / len(y), atol=0.01)
    assert torch.equal(stratified_indices(y, 500, 1), stratified_indices(y, 500, 1))
    assert not torch.equal(stratified_indices(y, 500, 1), stratified_indices(y, 500, 2))
    assert torch.equal(stratified_indices(y, len(y)), torch.arange(len(y)))
    with pytest.raises(ValueError, match='n must be in'): stratified_indices(y, len(y) + 1)
    with pytest.raises(ValueError, match='1-D'): stratified_indices(y.view(-1, 1), 10)


def test_imbalanced_sampling():
    np.testing.assert_allclose(retention_rates(0.5, 3).numpy(), [0.5, 0.75, 1.0])
    y = torch.arange(10).repeat_interleave(20000)
    kept = torch.bincount(y[imbalanced_indices(y, 0.3, seed=0)], minlength=10).double() / 20000
    np.testing.assert_allclose(kept.numpy(), retention_rates(0.3).numpy(), atol=0.015)
    assert kept[-1] == 1.0
    x = torch.randn(len(y), 1)
    xs, ys = imbalanced_subset(x, y, 0.3, seed=0)
    assert len(xs) == len(ys) < len(y)
    with pytest.raises(ValueError, match='r_min'): imbalanced_indices(y, 1.5)
    with pytest.raises(ValueError, match='at least 2 classes'): retention_rates(0.5, 1)


def test_to_grayscale():
    x = torch.rand(5, 3, 4, 4)
    g = to_grayscale(x)
    assert g.shape == (5, 1, 4, 4)
    torch.testing.assert_close(g, (0.2989 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]), atol=1e-3, rtol=0)
    one = torch.rand(2, 1, 4, 4)
    assert to_grayscale(one) is one
    with pytest.raises(ValueError, match='expected N x 1|3'): to_grayscale(torch.rand(2, 2, 4, 4))


def test_jpeg_decoder_matches_pil(real_data):
    "The batched torchvision decoder and the PIL fallback give the same pixels (to rounding) on the JPEG copy."
    from PIL import Image
    from deepclust_nb.data import _decode_jpegs
    real_data('cifar10_jpeg', 'test')
    paths = sorted((data_root()/'CIFAR10-jpeg'/'test'/'cat').glob('*.jpg'))[:20]
    fast = _decode_jpegs(paths)
    pil = torch.stack([torch.from_numpy(np.array(Image.open(p).convert('RGB'))).permute(2, 0, 1) for p in paths])
    assert fast.shape == pil.shape == (20, 3, 32, 32) and fast.dtype == torch.uint8
    assert (fast.int() - pil.int()).abs().float().mean() < 1.0


def test_dataset_available_and_required(tmp_path, monkeypatch):
    from deepclust_nb.data import dataset_available
    monkeypatch.delenv('DEEPCLUST_REQUIRE_DATA', raising=False); monkeypatch.delenv('DEEPCLUST_DOWNLOAD', raising=False)
    assert dataset_available('digits', root=tmp_path)                 # ships with scikit-learn
    assert not dataset_available('cifar10_jpeg', root=tmp_path)       # an empty root: absent, no error
    monkeypatch.setenv('DEEPCLUST_REQUIRE_DATA', '1')
    with pytest.raises(DatasetNotFoundError, match='cifar10_jpeg|CIFAR'): dataset_available('cifar10_jpeg', root=tmp_path)
    with pytest.raises(ValueError, match='available datasets'): dataset_available('cifar-10')


def test_photo_patches_are_real_colour_images():
    from deepclust_nb.data import photo_patches
    p = photo_patches(20, 24, seed=3)
    assert p.shape == (20, 3, 24, 24) and p.dtype == torch.float32
    assert 0 <= float(p.min()) and float(p.max()) <= 1
    assert float((p[:, 0] - p[:, 1]).abs().mean()) > 0.01               # colour, not grey copies
    assert torch.equal(p, photo_patches(20, 24, seed=3)) and not torch.equal(p, photo_patches(20, 24, seed=4))
