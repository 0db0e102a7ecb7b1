import numpy as np
from sklearn.exceptions import NotFittedError
import pytest
import torch

from deepclust_nb.data import load_dataset
from deepclust_nb.embedding_space import (DenoisingAutoencoder, EmbeddingClustering, RepresentationNetwork,
                                          embedding_loss, entropy, es_config, joint_gradients, kl_divergence, mlp,
                                          reconstruction_loss, student_t_similarity)
from deepclust_nb.metrics import evaluate
from deepclust_nb.train import Checkpoint, kmeans

SMALL = dict(hidden=(64, 32), rep_hidden=(32, 16), latent_dim=4)


def test_similarities_sum_to_one_symmetric_zero_diagonal():
    z = torch.randn(30, 10, dtype=torch.float64)
    for alpha in (1.0, 20.0):
        p = student_t_similarity(z, alpha)
        assert torch.isclose(p.sum(), torch.tensor(1.0, dtype=torch.float64))
        assert torch.allclose(p, p.T) and torch.all(p.diagonal() == 0) and torch.all(p[~torch.eye(30, dtype=bool)] > 0)
    c = student_t_similarity(z, 20.0, 'column')
    assert torch.allclose(c.sum(0), torch.ones(30, dtype=torch.float64)) and torch.all(c.diagonal() == 0)
    with pytest.raises(ValueError, match='normalize'): student_t_similarity(z, 1.0, 'rows')


def test_similarity_hand_computed():
    z = torch.tensor([[0.0], [1.0], [3.0]])
    k = lambda d2: (1 + d2) ** -1.0
    num = {(0, 1): k(1), (0, 2): k(9), (1, 2): k(4)}
    total = 2 * sum(num.values())
    p = student_t_similarity(z, 1.0)
    for (i, j), v in num.items(): assert p[i, j].item() == pytest.approx(v / total)


def test_cross_entropy_identity_and_minimum():
    p = student_t_similarity(torch.randn(25, 10), 20.0)
    q = student_t_similarity(torch.randn(25, 10), 1.0)
    assert embedding_loss(p, q).item() == pytest.approx((entropy(p) + kl_divergence(p, q)).item(), rel=1e-5)
    assert embedding_loss(p, p).item() == pytest.approx(entropy(p).item(), rel=1e-5)
    assert embedding_loss(p, q) > embedding_loss(p, p)
    with pytest.raises(ValueError, match='differ in shape'): embedding_loss(p, q[:3, :3])


def test_identity_init_is_relu_and_trains_only_first_d_units():
    rep = RepresentationNetwork(4, (32, 16), init='identity')
    z = torch.randn(50, 4)
    assert torch.equal(rep(z), z.clamp(min=0))
    rep(z).sum().backward()
    hidden = [m for m in rep.net if isinstance(m, torch.nn.Linear)][:-1]
    for m in hidden:                      # zero weights + zero bias + ReLU: units beyond the first 4 get no gradient
        assert m.weight.grad[4:].abs().sum() == 0 and m.bias.grad[4:].abs().sum() == 0
        assert m.weight.grad[:4].abs().sum() > 0
    assert not torch.equal(RepresentationNetwork(4, (32, 16))(z), z.clamp(min=0))
    with pytest.raises(ValueError, match='init must be'): RepresentationNetwork(4, init='orthogonal')
    assert es_config('full', 'mnist', 'cpu')['rep_init'] == 'default'


def test_gradient_paths():
    torch.manual_seed(0)
    ae, rep = DenoisingAutoencoder(16, noise_std=0.0, **{k: v for k, v in SMALL.items() if k != 'rep_hidden'}), RepresentationNetwork(4, (32, 16))
    x = torch.rand(10, 16)
    gamma = 0.3
    joint_gradients(ae, rep, x, gamma=gamma)
    def loss_parts():
        z, lg = ae(x)
        return reconstruction_loss(lg, x), embedding_loss(student_t_similarity(z, 8.0, 'joint'), student_t_similarity(rep(z), 1.0, 'joint'))
    enc, dec, rp = list(ae.encoder.parameters()), list(ae.decoder.parameters()), list(rep.parameters())
    l_r, l_e = loss_parts()
    g_r_enc = torch.autograd.grad(l_r, enc, retain_graph=True)
    g_e_enc = torch.autograd.grad(l_e, enc, retain_graph=True)
    g_e_dec = torch.autograd.grad(l_e, dec, retain_graph=True, allow_unused=True)
    g_e_rep = torch.autograd.grad(l_e, rp, retain_graph=True)
    g_r_dec = torch.autograd.grad(l_r, dec)
    assert all(g is None for g in g_e_dec), 'L_E must not reach the decoder'
    for prm, a, b in zip(enc, g_r_enc, g_e_enc): torch.testing.assert_close(prm.grad, a + gamma * b, atol=1e-4, rtol=1e-4)
    for prm, g in zip(dec, g_r_dec): torch.testing.assert_close(prm.grad, g, atol=1e-4, rtol=1e-4)
    for prm, g in zip(rp, g_e_rep): torch.testing.assert_close(prm.grad, g, atol=1e-6, rtol=1e-4)   # L_E alone, not gamma * L_E


def test_shapes_and_noise():
    ae = DenoisingAutoencoder(784)
    z, logits = ae.eval()(torch.rand(3, 784))
    assert z.shape == (3, 10) and logits.shape == (3, 784)
    assert [m.out_features for m in ae.encoder if isinstance(m, torch.nn.Linear)] == [500, 500, 2000, 10]
    assert [m.out_features for m in ae.decoder if isinstance(m, torch.nn.Linear)] == [2000, 500, 500, 784]
    assert [m.out_features for m in RepresentationNetwork(10).net if isinstance(m, torch.nn.Linear)] == [2000, 500, 500, 10]
    x = torch.rand(4, 784)
    assert torch.equal(ae.eval().corrupt(x), x) and not torch.equal(ae.train().corrupt(x), x)
    with pytest.raises(ValueError): mlp([3])
    with pytest.raises(ValueError, match='reduction'): reconstruction_loss(logits, torch.rand(3, 784), 'max')


def test_bad_input():
    X = np.random.rand(200, 8)
    for bad, msg in [(dict(n_clusters=1), 'n_clusters'), (dict(cluster_space='pixels'), 'cluster_space'),
                     (dict(optimizer='rmsprop'), 'optimizer'), (dict(gamma=0.0), 'gamma must be > 0')]:
        est = EmbeddingClustering(**{**SMALL, **bad})          # __init__ stores; fit validates (scikit-learn's rule)
        with pytest.raises(ValueError, match=msg): est.fit(X)
    Xn = X.copy(); Xn[3, 2] = np.nan
    with pytest.raises(ValueError, match='NaN'): EmbeddingClustering(**SMALL).fit(Xn)
    with pytest.raises(ValueError, match='is 1-D'): EmbeddingClustering(**SMALL).fit(np.random.rand(200))
    with pytest.raises(ValueError, match=r'\[0, 1\]'): EmbeddingClustering(**SMALL).fit(255 * X)
    with pytest.raises(ValueError, match='at least 100 vectors'): EmbeddingClustering(**SMALL).fit(np.random.rand(50, 8))
    est = EmbeddingClustering(**SMALL, pretrain_epochs=1, joint_epochs=1, n_init=1).fit(X)
    with pytest.raises(ValueError, match=r'shape \(5,\), the model was fitted on \(8,\)'): est.predict(np.random.rand(3, 5))
    with pytest.raises(NotFittedError, match='fit first'): EmbeddingClustering().transform(np.random.rand(3, 8))


def test_images_in_any_form_give_the_same_model():
    x = load_dataset('digits', 'train')[0][:300]
    kw = dict(**SMALL, pretrain_epochs=1, joint_epochs=1, n_init=1)
    ref = EmbeddingClustering(**kw).fit(x.flatten(1)).labels_
    u8 = (x * 255).round().to(torch.uint8)
    for form in (x, x.numpy(), x[:, 0].numpy(), x.permute(0, 2, 3, 1).numpy()):
        assert np.array_equal(EmbeddingClustering(**kw).fit(form).labels_, ref)
    assert EmbeddingClustering(**kw).fit(u8).labels_.shape == (300,)


def test_authors_optimizer_and_batch_order_and_divergence(tmp_path):
    X = load_dataset('digits', 'train')[0].flatten(1)
    est = EmbeddingClustering(**SMALL, optimizer='sgd_nesterov', shuffle=False, recon_reduction='mean', pretrain_epochs=2,
                              joint_epochs=1, n_init=1)
    opt = est._optimizer(torch.nn.Linear(2, 2).parameters())
    assert isinstance(opt, torch.optim.SGD) and opt.defaults['nesterov'] and opt.defaults['momentum'] == 0.9
    seen, orig = [], torch.randperm
    def spy(*a, **k):
        if 'generator' not in k: seen.append(a)
        return orig(*a, **k)
    try:                      # a fixed batch order never draws a permutation from the global generator
        torch.randperm = spy
        est.fit(X)
    finally: torch.randperm = orig
    assert not [a for a in seen if a and a[0] == len(X)]
    l_r = [h['l_r'] for h in est.history_]
    assert np.isfinite(l_r).all() and l_r[1] < l_r[0]
    ck = tmp_path/'run.pt'
    with pytest.raises(FloatingPointError, match='pre-training diverged'):
        EmbeddingClustering(**SMALL, optimizer='sgd_nesterov', lr=100., pretrain_epochs=2, joint_epochs=0).fit(
            X, checkpoint=Checkpoint(ck))


def test_beats_kmeans_on_digits():
    x, y = load_dataset('digits', 'all'); X = x.flatten(1)
    est = EmbeddingClustering(10, hidden=(256, 256, 512), rep_hidden=(512, 256, 256), pretrain_epochs=30, joint_epochs=30,
                              random_state=0).fit(X)
    ours, pixels = evaluate(y, est.labels_), evaluate(y, kmeans(X, 10, seed=0).labels)
    assert ours['acc'] > pixels['acc'] and ours['nmi'] > pixels['nmi'] + 0.03
    assert np.array_equal(est.predict(X[:100]), est.labels_[:100])
    assert est.transform(X).shape == (len(X), 10)


def test_cached_pretraining_and_resume_are_exact(tmp_path):
    X = load_dataset('digits', 'train')[0].flatten(1)
    kw = dict(**SMALL, pretrain_epochs=3, joint_epochs=3, n_init=2, random_state=1)
    ref = EmbeddingClustering(**kw).fit(X)
    first = EmbeddingClustering(**kw).fit(X, pretrained=tmp_path/'pre.pt')           # writes the cache
    cached = EmbeddingClustering(**kw).fit(X, pretrained=tmp_path/'pre.pt')          # reads it
    ck = Checkpoint(tmp_path/'run.pt')
    est = EmbeddingClustering(**kw)
    orig = est._joint_epoch
    calls = {'n': 0}
    def crash(*a):
        calls['n'] += 1
        if calls['n'] == 2: raise KeyboardInterrupt
        return orig(*a)
    est._joint_epoch = crash
    with pytest.raises(KeyboardInterrupt): est.fit(X, checkpoint=ck)
    resumed = EmbeddingClustering(**kw).fit(X, checkpoint=ck)
    for other in (first, cached, resumed):
        assert np.array_equal(other.labels_, ref.labels_)
        assert all(torch.equal(a, b) for a, b in zip(ref.representation_.parameters(), other.representation_.parameters()))
    assert [h['epoch'] for h in resumed.history_] == [1, 2, 3, 4, 5, 6]


def test_protocols():
    assert es_config('full', 'mnist', 'cpu') == es_config('full', 'mnist', 'paper')
    assert es_config('full', 'fashion_mnist', 'paper')['joint_epochs'] == 200 and es_config('full', 'fashion_mnist', 'cpu')['joint_epochs'] == 50
    assert es_config('ae_kmeans', 'mnist', 'cpu')['joint_epochs'] == 0
