import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from deepclust_nb.metrics import (_brute_force_acc, ari, as_labels, cluster_acc, cluster_mapping, cluster_purity, evaluate,
                                  mapped_confusion, nmi)


@pytest.mark.parametrize('n_classes,n_clusters', [(3, 3), (4, 2), (2, 5), (5, 5), (4, 6)])
def test_acc_matches_brute_force(n_classes, n_clusters):
    rng = np.random.default_rng(n_classes * 10 + n_clusters)
    for _ in range(25):
        t, p = rng.integers(0, n_classes, 25), rng.integers(0, n_clusters, 25)
        assert cluster_acc(t, p) == pytest.approx(_brute_force_acc(t, p))


def test_acc_invariant_to_relabelling():
    rng = np.random.default_rng(0)
    t, p = rng.integers(0, 10, 500), rng.integers(0, 10, 500)
    perm = rng.permutation(10)
    assert cluster_acc(t, perm[p]) == pytest.approx(cluster_acc(t, p))
    assert cluster_acc(t, t) == 1.0 and cluster_acc(t, perm[t]) == 1.0


def test_known_values():
    assert cluster_acc([0, 0, 1, 1, 2, 2, 2], [1, 1, 1, 0, 0, 0, 2]) == pytest.approx(4 / 7)
    assert cluster_acc([0, 0, 1, 1], [0, 1, 2, 3]) == pytest.approx(0.5)   # more clusters than classes
    assert cluster_acc([0, 1, 2, 3], [0, 0, 0, 0]) == pytest.approx(0.25)  # fewer clusters than classes


def test_mapping_is_one_to_one_and_optimal():
    m = cluster_mapping([0, 0, 1, 1, 2, 2], [7, 7, 3, 3, 3, 5])
    assert m == {7: 0, 3: 1, 5: 2}
    assert len(set(m.values())) == len(m)


def test_nmi_ari_match_sklearn():
    rng = np.random.default_rng(1)
    t, p = rng.integers(0, 10, 1000), rng.integers(0, 8, 1000)
    assert nmi(t, p) == pytest.approx(normalized_mutual_info_score(t, p))
    assert ari(t, p) == pytest.approx(adjusted_rand_score(t, p))
    r = evaluate(torch.tensor(t), list(p))
    assert set(r) == {'acc', 'nmi', 'ari'} and r['acc'] == pytest.approx(cluster_acc(t, p))


def test_accepts_arrays_lists_tensors():
    t = [0, 1, 1, 2]
    for conv in (list, np.array, torch.tensor, lambda a: torch.tensor(a, dtype=torch.float32)):
        assert evaluate(conv(t), conv(t)) == {'acc': 1.0, 'nmi': 1.0, 'ari': 1.0}


@pytest.mark.parametrize('a,b,msg', [([0, 1], [0, 1, 1], 'differ in length'), (np.zeros((2, 2)), np.zeros((2, 2)), '1-D'),
                                     ([0.5, 1], [0, 1], 'integer labels'), ([np.nan, 1], [0, 1], 'integer labels'),
                                     ([], [], 'empty'), (['a', 'b'], [0, 1], 'integer labels')])
def test_bad_input(a, b, msg):
    for f in (cluster_acc, nmi, ari, evaluate):
        with pytest.raises(ValueError, match=msg): f(a, b)


def test_mapped_confusion_diagonal():
    rng = np.random.default_rng(2)
    t = rng.integers(0, 5, 300); p = (t + 2) % 5
    p[:30] = rng.integers(0, 5, 30)
    cm = mapped_confusion(t, p)
    assert cm.shape == (5, 5) and np.trace(cm) / len(t) == pytest.approx(cluster_acc(t, p))
    assert mapped_confusion([0, 0, 1], [0, 1, 2]).shape == (2, 3)


def test_purity_many_to_one():
    assert cluster_purity([0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 1]) == pytest.approx(4 / 6)
    assert cluster_purity([0, 0, 1, 1], [0, 1, 2, 3]) == 1.0                   # refinement: pure, ACC only 0.5
    assert cluster_purity([0, 0, 1, 1], [5, 5, 5, 5]) == pytest.approx(0.5)
    y = np.repeat(np.arange(10), 10)
    assert cluster_purity(y, y // 2) == pytest.approx(0.5)                    # K = 5 < 10 classes: the 5 largest at most
    rng = np.random.default_rng(3)
    for _ in range(50):
        t, p = rng.integers(0, 5, 60), rng.integers(0, 8, 60)
        assert cluster_acc(t, p) <= cluster_purity(t, p) <= 1.0
        # brute force: the majority class of every cluster
        assert cluster_purity(t, p) == pytest.approx(sum(np.bincount(t[p == c]).max() for c in np.unique(p)) / len(t))
    with pytest.raises(ValueError): cluster_purity([0, 1], [0])
