import math

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError
import torch.nn.functional as F

from deepclust_nb.adc import (ADC_DIGITS, ADC_WEIGHTS, ADCNet, AssociativeDeepClustering, CifarResNet, VCNN, adc_augmentation,
                              adc_config, adc_losses, adc_lr, association_loss, association_probs, norm_loss,
                              pairwise_logit_crossentropy, trafo_loss, visit_loss, walker_loss, walker_target)
from deepclust_nb.data import load_dataset
from deepclust_nb.metrics import evaluate
from deepclust_nb.train import Checkpoint, kmeans


def test_transition_rows_sum_to_one():
    a, b = torch.randn(7, 5, dtype=torch.float64), torch.randn(11, 5, dtype=torch.float64)
    p_ab, p_ba, p_aba = association_probs(a, b)
    for p, shape in ((p_ab, (7, 11)), (p_ba, (11, 7)), (p_aba, (7, 7))):
        assert p.shape == shape and torch.allclose(p.sum(1), torch.ones(len(p), dtype=torch.float64))
    assert torch.allclose(p_ab, torch.softmax(a @ b.T, 1)) and torch.allclose(p_ba, torch.softmax(b @ a.T, 1))
    with pytest.raises(ValueError, match='same embedding size'): association_probs(a, torch.randn(3, 4))


def test_walker_loss_hand_computed_3x3():
    a = torch.eye(3, dtype=torch.float64)          # M = I: P^ab = P^ba = e/(e+2) on the diagonal, 1/(e+2) off it
    d, o = math.e / (math.e + 2), 1 / (math.e + 2)
    p = torch.full((3, 3), o, dtype=torch.float64); p.fill_diagonal_(d)
    p_aba = association_probs(a, a)[2]
    assert torch.allclose(p_aba, p @ p)
    assert walker_loss(p_aba, torch.arange(3)).item() == pytest.approx(-math.log(d * d + 2 * o * o), abs=1e-7)


def test_walker_loss_zero_for_consistent_association():
    sharp = 60 * torch.eye(4, dtype=torch.float64)
    assert walker_loss(association_probs(sharp, sharp)[2], torch.arange(4)).item() == pytest.approx(0, abs=1e-6)
    # labels 0, 0, 1: a perfect round trip splits evenly inside class 0 -> the loss is H(T) = 2/3 log 2
    t = walker_target(torch.tensor([0, 0, 1]))
    assert walker_loss(t.double(), torch.tensor([0, 0, 1]), eps=1e-12).item() == pytest.approx(2 / 3 * math.log(2))


def test_visit_loss_minimal_for_uniform_visits():
    n = 6
    uniform = torch.full((3, n), 1 / n, dtype=torch.float64)
    assert visit_loss(uniform).item() == pytest.approx(math.log(n))
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        p = torch.softmax(torch.randn(3, n, generator=g, dtype=torch.float64) * 3, 1)
        assert visit_loss(p) >= visit_loss(uniform) - 1e-12


def test_trafo_loss_hand_example():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z_t = torch.tensor([[1.0, 0.0]])
    o = torch.tensor([[2.0, 0.0], [0.0, 0.0]]); o_t = torch.tensor([[2.0, 0.0]])
    ce = pairwise_logit_crossentropy(o, o_t)
    s = torch.softmax(o, 1); ls = torch.log_softmax(o_t, 1)
    assert ce[0, 0].item() == pytest.approx(-(s[0] * ls[0]).sum().item())
    by_hand = (abs(1 - 1 - ce[0, 0].item()) + abs(1 - 0 - ce[1, 0].item())) / 2
    assert trafo_loss(z, z_t, o, o_t).item() == pytest.approx(by_hand, rel=1e-6)
    assert norm_loss(z, 3 * z_t).item() == pytest.approx(4 / 3)


def test_models_shapes_and_gradients():
    for bb, x in [(VCNN(1, 28), torch.rand(3, 1, 28, 28)), (VCNN(1, 16, widths=(8, 8, 8)), torch.rand(3, 1, 16, 16)),
                  (CifarResNet(3, 1), torch.rand(3, 3, 32, 32))]:
        net = ADCNet(bb, 4, centroids_per_cluster=2)
        assert net(x).shape == (3, bb.emb_dim) and net.centroids.shape == (8, bb.emb_dim)
        assert net.logits(net(x)).shape == (3, 4)
        out = adc_losses(net, x, torch.cat([x, x.flip(-1)]), visit_weight=0.5)
        out['total'].backward()
        assert all(p.grad is not None for p in net.parameters())
        assert net.centroids.grad.abs().sum() > 0           # centroids are trained
    with pytest.raises(ValueError, match='too small'): VCNN(1, 4)
    with pytest.raises(ValueError, match='n_clusters'): ADCNet(VCNN(1, 8, widths=(8,)), 1)


def test_warmup_leaves_centroids_and_W_alone():
    net = ADCNet(VCNN(1, 8, widths=(8, 8), emb_dim=16), 3)
    x = torch.rand(5, 1, 8, 8)
    out = adc_losses(net, x, torch.cat([x, x]), warmup=True)
    out['total'].backward()
    assert net.centroids.grad is None and net.classifier.weight.grad is None
    assert set(out) == {'aug', 'norm', 'total'}


def test_lr_schedule():
    assert adc_lr(0, 1.0, warmup=10) == pytest.approx(0.1)
    assert adc_lr(9, 1.0, warmup=10) == pytest.approx(1.0)
    assert adc_lr(25, 1.0, warmup=10, decay_every=10) == pytest.approx(1 / 9)


def test_configs_and_augmentation():
    p, c = adc_config('vcnn', 'mnist', 'paper'), adc_config('vcnn', 'mnist', 'cpu')
    assert (p['alpha'], p['beta'], p['gamma'], p['delta']) == (1.0, 0.9, 1e-5, 2e-5)
    assert p['visit_weight'] == 0.8 and p['loss_warmup'] == 1000 and p['batch_size'] == 100 and p['n_aug'] == 4
    assert adc_config('resnet', 'cifar10_jpeg', 'paper')['resnet_blocks'] == 5
    assert adc_config('vcnn', 'usps', 'paper')['visit_weight'] == 0.3
    assert c['steps'] < p['steps']
    x = torch.rand(6, 3, 32, 32)
    y = adc_augmentation('cifar10_jpeg')(x)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1


def test_bad_input():
    x8 = torch.rand(200, 1, 8, 8)
    with pytest.raises(ValueError, match='n_clusters'): AssociativeDeepClustering(1).fit(x8)
    with pytest.raises(ValueError, match='arch'): AssociativeDeepClustering(3, arch='vgg').fit(x8)
    with pytest.raises(ValueError, match='loss_warmup'): AssociativeDeepClustering(3, steps=10, loss_warmup=10).fit(x8)
    est = AssociativeDeepClustering(3, steps=2, loss_warmup=1, batch_size=4, widths=(4, 4), emb_dim=8, chunk=1)
    with pytest.raises(ValueError, match='pass image_shape'): est.fit(torch.rand(20, 64))
    with pytest.raises(ValueError, match='divide by 255'): est.fit(255 * torch.rand(20, 1, 8, 8))
    bad = torch.rand(20, 1, 8, 8); bad[3, 0, 0, 0] = float('nan')
    with pytest.raises(ValueError, match='NaN'): est.fit(bad)
    with pytest.raises(NotFittedError, match='fit'): est.predict(torch.rand(2, 1, 8, 8))
    est.fit(torch.rand(20, 1, 8, 8))
    with pytest.raises(ValueError, match=r'shape \(3, 8, 8\), the model was fitted on \(1, 8, 8\)'): est.predict(torch.rand(2, 3, 8, 8))


def test_short_run_on_digits_beats_kmeans():
    x_tr, _ = load_dataset('digits', 'train'); x_te, y_te = load_dataset('digits', 'test')
    cfg = {k: v for k, v in ADC_DIGITS.items()}
    adc = AssociativeDeepClustering(10, augment=adc_augmentation('digits'), random_state=0, **cfg).fit(x_tr)
    acc = evaluate(y_te, adc.predict(x_te))['acc']
    km = evaluate(y_te, kmeans(x_te.flatten(1), 10, seed=0).labels)['acc']
    assert acc > km, (acc, km)
    h = adc.history_[-1]
    assert h['agreement'] > 0.8 and h['largest_cluster'] < 0.3      # label-free health of the final model
    p = adc.predict_proba(x_te)
    assert np.allclose(p.sum(1), 1, atol=1e-5)


def test_authors_kmeans_init_options(tmp_path):
    "reset_adam_at_init restarts Adam at the k-means init; aug_weight_after_init scales beta from then on."
    x, _ = load_dataset('digits', 'train')
    def fit(name, **kw):
        ck = Checkpoint(tmp_path / f'{name}.pt')
        est = AssociativeDeepClustering(3, steps=6, loss_warmup=3, batch_size=8, n_aug=1, widths=(4, 4), emb_dim=8,
                                        chunk=2, **kw).fit(x[:40], checkpoint=ck)
        state = torch.load(ck.path, weights_only=False)['objects']['opt']['state']
        return max(v['step'].item() for v in state.values()), est.history_[-1]   # the backbone's count
    assert fit('plain')[0] == 6
    assert fit('reset', reset_adam_at_init=True)[0] == 3
    h = fit('aug', aug_weight_after_init=0.2)[1]
    w = ADC_WEIGHTS
    parts = (w['alpha'] * h['c'] + 0.2 * w['beta'] * h['aug'] + w['gamma'] * h['norm'] + w['delta'] * h['trafo'] +
             w['cls_weight'] * h['cls'] + w['logit_l2'] * h['l2'])
    assert h['total'] == pytest.approx(parts, rel=1e-5)
    assert h['total'] != pytest.approx(parts + 0.8 * w['beta'] * h['aug'], rel=1e-5)
    with pytest.raises(ValueError, match='aug_weight_after_init'): AssociativeDeepClustering(3, aug_weight_after_init=-1).fit(torch.rand(200, 1, 8, 8))
    cfg = adc_config('vcnn', 'mnist', 'paper')
    assert cfg['reset_adam_at_init'] is False and cfg['aug_weight_after_init'] == 1.0


def test_agreement_counts_clusters_not_centroids():
    "With 2 centroids per cluster, an image next to a centroid of the cluster its logits pick agrees."
    class Identity2(torch.nn.Module):
        emb_dim = 2
        def forward(self, x): return x.flatten(1)
    net = ADCNet(Identity2(), 2, centroids_per_cluster=2)
    with torch.no_grad():
        net.centroids.copy_(torch.tensor([[1., 0.], [0.9, 0.1], [0., 1.], [0.1, 0.9]]))
        net.classifier.weight.copy_(torch.eye(2)); net.classifier.bias.zero_()
    x = torch.tensor([[1., 0.05], [0.05, 1.], [0.95, 0.], [0.2, 0.9]])
    assert adc_losses(net, x, x)['agreement'].item() == 1.0
    with torch.no_grad(): net.classifier.weight.copy_(torch.tensor([[0., 1.], [1., 0.]]))   # logits swap the clusters
    assert adc_losses(net, x, x)['agreement'].item() == 0.0


# --- the authors_code preset: each regulariser against a hand-computed case ---------------------------------------

from deepclust_nb.experiment import build_config, get_experiment  # noqa: E402
from deepclust_nb.adc import (ADC_ESTIMATOR_KEYS, adc_authors_code, adc_lr, emb_l1_loss, norm_loss,  # noqa: E402
                              weight_decay_loss)


def test_norm_regulariser_sum_is_the_codes():
    e = torch.tensor([[3.0, 4.0], [0.6, 0.8], [0.0, 0.0]])                    # norms 5, 1, 0
    assert norm_loss(e, reduction='sum').item() == pytest.approx(16 + 0 + 1)
    assert norm_loss(e).item() == pytest.approx(17 / 3)
    with pytest.raises(ValueError, match='reduction'): norm_loss(e, reduction='max')


def test_l1_and_weight_decay_hand_computed():
    assert emb_l1_loss(torch.tensor([[1.0, -2.0]]), torch.tensor([[-0.5, 0.0]])).item() == pytest.approx(3.5)
    conv, lin = torch.nn.Conv2d(1, 1, 2), torch.nn.Linear(3, 1)
    torch.nn.init.constant_(conv.weight, 1.0); torch.nn.init.constant_(lin.weight, -2.0)
    torch.nn.init.constant_(conv.bias, 7.0); torch.nn.init.constant_(lin.bias, 7.0)    # biases are not decayed
    assert weight_decay_loss(torch.nn.Sequential(conv, lin)).item() == pytest.approx((4 * 1 + 3 * 4) / 2)


def test_losses_add_the_codes_regularisers():
    torch.manual_seed(0)
    net = ADCNet(VCNN(1, 8, widths=(4, 4, 4), emb_dim=6), 3, centroids_per_cluster=2)
    x, xa = torch.rand(5, 1, 8, 8), torch.rand(15, 1, 8, 8)
    kw = dict(gamma=2e-4, norm_reduction='sum', l1_weight=3e-4, weight_decay=1e-3, alpha=1.0, beta=1.0, delta=0.0,
              cls_weight=0.5, logit_l2=1e-4)
    out = adc_losses(net, x, xa, visit_weight=1.0, **kw)
    z = net(torch.cat([x, xa]))
    want_l1 = z.abs().sum() + net.centroids.abs().sum()
    want_norm = ((torch.cat([z, net.centroids]).norm(dim=1) - 1) ** 2).sum()
    assert out['l1'].item() == pytest.approx(want_l1.item(), rel=1e-5)
    assert out['norm'].item() == pytest.approx(want_norm.item(), rel=1e-5)
    assert out['wd'].item() == pytest.approx(sum((m.weight ** 2).sum().item() for m in net.backbone.modules()
                                                  if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))) / 2, rel=1e-5)
    total = (out['c'] + out['aug'] + 2e-4 * out['norm'] + 0.5 * out['cls'] + 1e-4 * out['l2'] + 3e-4 * out['l1']
             + 1e-3 * out['wd'])
    assert out['total'].item() == pytest.approx(total.item(), rel=1e-5)
    warm = adc_losses(net, x, xa, visit_weight=1.0, warmup=True, **kw)      # warm-up: no centroid terms, regularisers on
    assert warm['total'].item() == pytest.approx((warm['aug'] + 2e-4 * warm['norm'] + 3e-4 * warm['l1'] + 1e-3 * warm['wd']).item(), rel=1e-5)


def test_code_learning_rate_schedule():
    lr = lambda s: adc_lr(s, 1e-3, 2000, 5000, schedule='code')
    assert lr(0) == pytest.approx(1e-6)
    assert lr(1000) == pytest.approx(1e-6 + 0.5e-3)                           # the logistic envelope's midpoint
    assert lr(3000) == pytest.approx(1e-6 + 1e-3 * (math.tanh(5 / 2000 * 2000) + 1) / 2)
    assert lr(5000) > 9.9e-4 and lr(5001) == pytest.approx(1e-6 + 0.33e-3, rel=1e-3)   # x0.33 after step 5000
    assert lr(10_001) == pytest.approx(1e-6 + 0.33 ** 2 * 1e-3, rel=1e-3)
    with pytest.raises(ValueError, match='schedule'): adc_lr(10, schedule='cosine')


def test_authors_code_preset_and_elu_embedding():
    p = adc_authors_code('vcnn', 'mnist')
    assert (p['gamma'], p['norm_reduction'], p['l1_weight'], p['weight_decay'], p['dropout']) == (2e-4, 'sum', 0.0, 1e-3, 0.2)
    assert (p['centroids_per_cluster'], p['n_aug'], p['steps'], p['cls_weight'], p['aug_weight_after_init']) == (4, 3, 10_000, 0.5, 0.2)
    cfg = build_config(get_experiment('adc'), 'vcnn', 'mnist', 'paper', p)    # every key is a config setting
    assert cfg['lr_schedule'] == 'code' and cfg['code_augment']
    with pytest.raises(ValueError, match='VCNN'): adc_authors_code('resnet', 'mnist')
    net = VCNN(1, 28, emb_activation='elu')
    assert net(torch.rand(4, 1, 28, 28)).min() >= -1.0                       # an ELU's floor
    with pytest.raises(ValueError, match='emb_activation'): VCNN(1, 28, emb_activation='relu')
    with pytest.raises(ValueError, match='norm_reduction'):
        AssociativeDeepClustering(norm_reduction='max').fit(load_dataset('digits', 'train')[0])


def test_code_augmentation_clips_once_and_fills_grey():
    torch.manual_seed(0)
    tau = adc_augmentation('mnist', code=True)
    x = torch.zeros(64, 1, 28, 28)
    out = tau(x)
    assert out.min() >= 0 and out.max() <= 1 and out.shape == x.shape
    assert (out.mean(dim=(1, 2, 3)) > 0.1).any()           # grey rotation corners and brightness offsets lift black images
    with pytest.raises(ValueError, match='digit set'): adc_augmentation('cifar10_jpeg', code=True)
