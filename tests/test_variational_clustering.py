"Variational clustering (Prasad et al. 2020): the closed forms, the ELBO, the batched posterior, networks and the estimator."
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import distributions as D

from deepclust_nb.data import load_dataset
from deepclust_nb.experiment import build_config, run_experiment
from deepclust_nb.variational_clustering import (
    VARIATIONAL_CLUSTERING, Posterior, VariationalClustering, augmentation_loss, bernoulli_log_likelihood,
    TOY_SETTINGS, build_vc_net, elbo, elbo_terms, five_arcs, gaussian_kl, gaussian_log_likelihood, lambda_aug_at, mnist_trunk,
    run_toy, vc_augmentation, w2_diag_gaussians)


def _gaussians(n=5, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g), torch.rand(n, d, generator=g) + 0.1,
            torch.randn(n, d, generator=g), torch.rand(n, d, generator=g) + 0.1)


def test_gaussian_kl_matches_torch_distributions_and_is_zero_on_itself():
    m1, v1, m2, v2 = _gaussians()
    ref = D.kl_divergence(D.Independent(D.Normal(m1, v1.sqrt()), 1), D.Independent(D.Normal(m2, v2.sqrt()), 1))
    assert torch.allclose(gaussian_kl(m1, v1, m2, v2), ref, atol=1e-5)
    assert torch.allclose(gaussian_kl(m1, v1, m1, v1), torch.zeros(5), atol=1e-6)


def test_w2_is_zero_on_itself_symmetric_and_matches_a_1d_monte_carlo_estimate():
    m1, v1, m2, v2 = _gaussians()
    assert torch.allclose(w2_diag_gaussians(m1, v1, m1, v1), torch.zeros(5))
    assert torch.allclose(w2_diag_gaussians(m1, v1, m2, v2), w2_diag_gaussians(m2, v2, m1, v1))
    g = torch.Generator().manual_seed(1)   # in 1-D the optimal coupling pairs sorted samples
    a = (0.3 + 0.5 * torch.randn(200_000, generator=g)).sort().values
    b = (-1.0 + 2.0 * torch.randn(200_000, generator=g)).sort().values
    exact = w2_diag_gaussians(torch.tensor([0.3]), torch.tensor([0.25]), torch.tensor([-1.0]), torch.tensor([4.0]))
    assert abs(((a - b) ** 2).mean() - exact) < 0.05      # exact = 1.3^2 + 1.5^2 = 4.54


def test_log_likelihoods_match_torch_distributions():
    g = torch.Generator().manual_seed(2)
    x, mu, var = torch.randn(3, 2, generator=g), torch.randn(3, 4, 2, generator=g), torch.rand(3, 4, 2, generator=g) + .1
    assert torch.allclose(gaussian_log_likelihood(mu, var, x), D.Normal(mu, var.sqrt()).log_prob(x.unsqueeze(1)).sum(-1), atol=1e-5)
    xb, logits = (torch.rand(3, 1, 2, 2, generator=g) > .5).float(), torch.randn(3, 4, 1, 2, 2, generator=g)
    ref = D.Bernoulli(logits=logits).log_prob(xb.unsqueeze(1).expand_as(logits)).flatten(2).sum(-1)
    assert torch.allclose(bernoulli_log_likelihood(logits, xb), ref, atol=1e-5)


def test_elbo_on_a_hand_example():
    t = elbo(torch.tensor([[0.25, 0.75]]), torch.tensor([[-10.0, -2.0]]), torch.tensor([[1.0, 3.0]]), lambda_recons=0.5)
    assert torch.allclose(t['recon'], torch.tensor([-4.0])) and torch.allclose(t['kl'], torch.tensor([2.5]))
    assert torch.allclose(t['entropy'], torch.tensor([-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]))
    assert torch.allclose(t['elbo'], torch.tensor([0.5 * -4.0 + 0.5623351 - 2.5]), atol=1e-5)


def test_augmentation_loss_by_hand_and_zero_for_identical_posteriors():
    q, mu, var = torch.tensor([[0.5, 0.5]]), torch.zeros(1, 2, 3), torch.ones(1, 2, 3)
    assert torch.allclose(augmentation_loss(q, mu, var, q, mu, var), torch.zeros(1))
    got = augmentation_loss(q, mu, var, torch.tensor([[0.7, 0.3]]), torch.ones(1, 2, 3), torch.full((1, 2, 3), 4.0))
    assert torch.allclose(got, torch.tensor([0.08 + 0.5 * (3 + 3) * 2]))   # (0.2^2 * 2) + sum_k q_k (|1|^2 * 3 + |2 - 1|^2 * 3)


def test_posterior_sums_to_one_and_batched_pass_equals_a_loop_over_k():
    torch.manual_seed(0)
    post = Posterior(10, 32, mnist_trunk(), 1024, (256, 512))
    x = torch.rand(3, 1, 28, 28)
    q, mu, var = post(x)
    assert torch.allclose(q.sum(1), torch.ones(3)) and (var > 0).all()
    h = post.k_trunk(x)
    for k in range(10):
        mk, vk = post.z_head(post.z_body(torch.cat([h, F.one_hot(torch.full((3,), k), 10).float()], 1)))
        assert torch.allclose(mu[:, k], mk, atol=1e-5) and torch.allclose(var[:, k], vk, atol=1e-5)


@pytest.mark.parametrize('arch,shape', [('toy', (2,)), ('mnist', (1, 28, 28)), ('mlp', (1, 8, 8))])
def test_every_network_has_the_right_shapes_and_gradients(arch, shape):
    net = build_vc_net(arch, 4, shape, decoder_width=0.25, encoder_width=0.5)
    out = net(torch.rand(2, *shape))
    decs = out['dec'] if isinstance(out['dec'], tuple) else (out['dec'],)
    assert all(d.shape == (2, 4, *shape) for d in decs) and out['q'].shape == (2, 4)
    loss = -elbo_terms(out, torch.rand(2, *shape)).get('elbo').mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_lambda_schedule_augmentations_and_toy_data():
    assert [lambda_aug_at(e) for e in (0, 39, 40, 80)] == [0.01, 0.01, 0.5, 1.0]
    x = load_dataset('digits', 'train')[0][:6]
    assert set(vc_augmentation('fashion_mnist')(x).unique().tolist()) <= {0.0, 1.0}
    assert vc_augmentation('mnist')(x).shape == x.shape
    pts, lab = five_arcs(1000, seed=1)
    assert pts.shape == (1000, 2) and pts.dtype == torch.float32 and torch.bincount(lab).tolist() == [200] * 5
    assert torch.equal(five_arcs(100, seed=4)[0], five_arcs(100, seed=4)[0])


def test_bad_input_raises_clear_errors():
    x8 = torch.rand(200, 1, 8, 8)
    with pytest.raises(ValueError, match='n_clusters'): VariationalClustering(1, arch='mlp').fit(x8)
    with pytest.raises(ValueError, match='unknown arch'): VariationalClustering(arch='resnet').fit(x8)
    with pytest.raises(ValueError, match='28x28'): build_vc_net('mnist', 10, (1, 32, 32))
    with pytest.raises(ValueError, match='is 1-D'): VariationalClustering(5, arch='toy').fit(torch.rand(200))
    with pytest.raises(ValueError, match='NaN'): VariationalClustering(5, arch='toy').fit(torch.full((200, 2), float('nan')))
    with pytest.raises(ValueError, match='one more value'): lambda_aug_at(0, (40,), (0.1, 0.2, 0.3))
    with pytest.raises(ValueError, match='unknown dataset'): build_config(VARIATIONAL_CLUSTERING, 'full', 'cifar10_jpeg', 'cpu')


def test_a_short_digits_run_writes_a_test_split_record_and_generates(tmp_path):
    rec = run_experiment('variational_clustering', 'full', 'digits', 'cpu', 0, results=tmp_path, epochs=2)
    assert rec['split'] == 'test' and rec['n_test'] == 360 and len(rec['history']) == 2
    assert all(np.isfinite(h['loss']) for h in rec['history'])
    est = VariationalClustering(10, arch='mlp', epochs=1).fit(load_dataset('digits', 'train')[0])
    assert est.sample(3).shape == (10, 3, 1, 8, 8) and est.interpolate(0, 1, 5, 'e').shape == (5, 1, 8, 8)
    assert est.predict_proba(load_dataset('digits', 'test')[0]).sum(1) == pytest.approx(np.ones(360), abs=1e-5)


def test_a_short_toy_run_with_the_plain_elbo_and_a_warm_up_separates_the_arcs():
    "The `elbo_warmup` setting (lambda_recons = 1, 20 warm-up epochs) on 2,000 toy points, 60 epochs: ACC >= 0.9."
    x, y = five_arcs(2000, seed=0)
    s = TOY_SETTINGS['elbo_warmup']
    est = VariationalClustering(5, arch='toy', epochs=60, batch_size=100, random_state=0, **s).fit(x)
    from deepclust_nb.metrics import cluster_acc
    assert cluster_acc(y.numpy(), est.labels_) >= 0.9
    assert est.history_[-1]['entropy'] < 0.5 * math.log(5)      # q(k|x) is far from flat: no collapse
    assert est.history_[-1]['kl'] > 0.5


def test_run_toy_refuses_an_unknown_setting_and_records_its_tag(tmp_path):
    with pytest.raises(ValueError, match='unknown toy setting'): run_toy(0, 'nope', results=tmp_path)
    rec = run_toy(1, 'elbo', results=tmp_path, n=300, epochs=1)
    assert (rec['tag'], rec['seed'], rec['config']['lambda_recons'], rec['split']) == ('elbo', 1, 1.0, 'all')
    assert (tmp_path / 'variational_clustering' / 'full__five_arcs__paper__seed1__elbo.summary.npz').exists()   # what the figure needs
    # it goes through run_experiment: the record has the provenance and the confusion matrix, k-means beside it
    assert rec['commit'] and len(rec['confusion']) == 5 and 0 <= rec['kmeans_metrics']['acc'] <= 1
    assert run_toy(1, 'elbo', results=tmp_path, n=300, epochs=1)['finished_at'] == rec['finished_at']     # read back, not retrained


def test_five_arcs_is_a_generated_dataset_of_the_experiment():
    from deepclust_nb.experiment import build_config
    from deepclust_nb.variational_clustering import VARIATIONAL_CLUSTERING
    cfg = build_config(VARIATIONAL_CLUSTERING, 'full', 'five_arcs', 'cpu', {'lambda_recons': 1.0})
    assert (cfg['arch'], cfg['k'], cfg['n'], cfg['lambda_recons'], cfg['lambda_aug']) == ('toy', 5, 10_000, 1.0, (0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match='unknown dataset'): build_config(VARIATIONAL_CLUSTERING, 'full', 'four_arcs', 'cpu')


def test_table2_network_starts_as_tensorflow_does(real_data):
    "Glorot-uniform + zero bias (the Keras default) spreads q(k|x)'s logits across images far more than PyTorch's start."
    from deepclust_nb.variational_clustering import VC_INITS, build_vc_net
    x = real_data('mnist', 'test')[0][:500]
    spread, used = {}, {}
    for init in VC_INITS:
        torch.manual_seed(0)
        net = build_vc_net('mnist', 10, (1, 28, 28), init=init)
        with torch.no_grad(): logits = net.posterior.k_head(net.posterior.k_trunk(x))
        spread[init], used[init] = logits.std(0).mean().item(), logits.argmax(1).unique().numel()
    assert spread['glorot'] > 5 * spread['torch'] and used['glorot'] > used['torch']
    lin = net.posterior.k_head
    torch.manual_seed(0); g = build_vc_net('mnist', 10, (1, 28, 28), init='glorot')
    assert g.posterior.k_head.bias.abs().sum() == 0 and lin.bias.abs().sum() > 0
    with pytest.raises(ValueError, match='unknown init'): build_vc_net('mnist', 10, (1, 28, 28), init='he')
    from deepclust_nb import make
    assert make('variational_clustering', 'paper').init == 'glorot' and make('variational_clustering', 'demo').init == 'torch'
