import math

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError
import torch.nn.functional as F

from deepclust_nb.data import load_dataset
from deepclust_nb.experiment import build_config, get_experiment
from deepclust_nb.metrics import evaluate
from deepclust_nb.st_dac import (ST_DAC_DIGITS, ST_DAC_ESTIMATOR_KEYS, ST_DAC_VARIANTS, DeepAdaptiveClustering, SpatialTransformer,
                                 balanced_upper, build_st_dac_net, dac_pair_loss, dac_pair_targets, dac_thresholds, label_features,
                                 st_dac_augmentation, st_dac_config)


def test_pair_selection_on_hand_made_similarities():
    sim = torch.tensor([[1.0, 0.95, 0.10, 0.50],
                        [0.95, 1.0, 0.30, 0.89],
                        [0.10, 0.30, 1.0, 0.05],
                        [0.50, 0.89, 0.05, 1.0]])
    r, v = dac_pair_targets(sim, upper=0.9, lower=0.2)
    assert torch.equal(r, (sim >= 0.9).float())
    expected_v = torch.tensor([[1., 1, 1, 0], [1, 1, 0, 0], [1, 0, 1, 1], [0, 0, 1, 1]])
    assert torch.equal(v, expected_v)
    assert torch.equal(dac_pair_targets(sim, 0.5, 0.5)[1], torch.ones(4, 4))    # u <= l: every pair selected
    with pytest.raises(ValueError, match='square'): dac_pair_targets(torch.rand(2, 3), 0.9, 0.1)
    with pytest.raises(ValueError, match=r'\[0, 1\]'): dac_pair_targets(sim, 1.5, 0.1)


def test_pair_loss_hand_computed():
    # two label features: f1 = (1, 0), f2 = (0.6, 0.8) -> g12 = 0.6; with u = 0.5 the pair is "similar"
    f = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.float64)
    loss, info = dac_pair_loss(f, upper=0.5, lower=0.1, eps=1e-12)
    # pairs: (1,1) g=1 r=1, (2,2) g=1 r=1, (1,2) and (2,1) g=0.6 r=1 -> mean of -log g over 4 pairs
    assert loss.item() == pytest.approx(-2 * math.log(0.6) / 4, abs=1e-9)
    assert info['selected'] == 1.0 and info['positive'] == 1.0
    # with u = 0.7, l = 0.65 the off-diagonal pair is "dissimilar": -log(1 - 0.6)
    loss2, _ = dac_pair_loss(f, upper=0.7, lower=0.65, eps=1e-12)
    assert loss2.item() == pytest.approx(-2 * math.log(0.4) / 4, abs=1e-6)
    # with u = 0.9, l = 0.5 the off-diagonal pair is not selected: only the (zero-loss) diagonal remains
    loss3, info3 = dac_pair_loss(f, upper=0.9, lower=0.5, eps=1e-12)
    assert loss3.item() == pytest.approx(0, abs=1e-9) and info3['selected'] == 0.5


def test_label_features_and_loss_gradient():
    p = torch.randn(6, 4).softmax(1).requires_grad_()
    f = label_features(p)
    assert torch.allclose(f.norm(dim=1), torch.ones(6))
    dac_pair_loss(f, 0.5, 0.5)[0].backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    with pytest.raises(ValueError, match='N x k'): label_features(torch.rand(3))


def test_threshold_schedules():
    assert dac_thresholds(0, 10, 0.9, 0.99) == (0.99, 0.9)
    u, l = dac_thresholds(9, 10, 0.9, 0.99)
    assert u == pytest.approx(0.945) and l == pytest.approx(0.945)
    us = [dac_thresholds(e, 10, 0.8, 0.99)[0] for e in range(10)]
    assert all(a > b for a, b in zip(us, us[1:]))                            # u falls every epoch
    u, l = dac_thresholds(9, 10, schedule='dac')
    assert u == pytest.approx(0.5) and l == pytest.approx(0.5)
    assert dac_thresholds(3, 10, 0.9, 0.99, 'code') == pytest.approx((0.963, 0.963))
    with pytest.raises(ValueError, match='unknown schedule'): dac_thresholds(0, 10, schedule='cosine')
    with pytest.raises(ValueError, match='epoch'): dac_thresholds(10, 10)


def test_balanced_upper_threshold():
    ref = label_features(torch.eye(4)[[0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]] * 0.97 + 0.01)
    u = balanced_upper(ref, 4)                                  # s = (12/4 - 1)/11: exactly the same-cluster pairs
    r, _ = dac_pair_targets(ref @ ref.T, u, 0.9)
    assert torch.equal(r, torch.block_diag(*[torch.ones(3, 3)] * 4))
    torch.manual_seed(1)
    soft = label_features((3 * torch.randn(64, 10)).softmax(1))
    u = balanced_upper(soft, 10, floor=0.0)
    off = ~torch.eye(64, dtype=torch.bool)
    share = ((soft @ soft.T)[off] >= u).float().mean().item()
    assert share == pytest.approx((64 / 10 - 1) / 63, abs=2 / (64 * 63) + 1e-6)
    assert balanced_upper(soft, 10, floor=0.99) >= 0.99          # never below the floor
    sparse = label_features(torch.eye(10)[torch.arange(20) % 10] * 0.97 + 0.003)   # fewer same-cluster pairs than s
    assert balanced_upper(sparse, 4) == 0.5                      # the quantile falls among the ~0 similarities
    assert balanced_upper(soft[:5], 10) == 1.0                     # fewer images than clusters
    with pytest.raises(ValueError, match='n_clusters'): balanced_upper(soft, 1)
    with pytest.raises(ValueError, match='N x k'): balanced_upper(soft[0], 10)
    est = DeepAdaptiveClustering(10, 'st0', epochs=1, widths=(8, 8, 8), hidden=16, schedule='balanced').fit(
        load_dataset('digits', 'all')[0][:200])
    h = est.history_[0]
    assert 0.5 <= h['upper'] <= 1 and 0 < h['positive'] < 1               # u per batch, never below its floor


def test_identity_st_layer_returns_input_and_default_zooms():
    x = torch.rand(3, 1, 28, 28)
    assert torch.allclose(SpatialTransformer(1, 28, final_tanh=False)(x), x, atol=1e-5)
    h = torch.randn(2, 256, 7, 7)
    assert torch.allclose(SpatialTransformer(256, 7, final_tanh=False)(h), h, atol=1e-5)
    theta = torch.tensor([[math.tanh(1), 0, 0], [0, math.tanh(1), 0]]).expand(3, 2, 3)
    zoomed = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False)
    assert torch.allclose(SpatialTransformer(1, 28)(x), zoomed, atol=1e-5)


def test_final_tanh_option_reaches_every_st_layer():
    assert st_dac_config('st2', 'mnist', 'cpu')['final_tanh'] is True and 'final_tanh' in ST_DAC_ESTIMATOR_KEYS
    x = torch.rand(4, 1, 28, 28)
    for final_tanh in (True, False):
        net = build_st_dac_net('st3', final_tanh=final_tanh)
        heads = [st.loc.head[-1] for st in (net.st1, net.st2, net.st3)]
        assert all(isinstance(m, torch.nn.Tanh if final_tanh else torch.nn.Identity) for m in heads)
        assert torch.allclose(net.st1(x), x, atol=1e-5) != final_tanh        # identity start only without the tanh
    est = DeepAdaptiveClustering(10, 'st1', epochs=1, widths=(8, 8, 8), hidden=16, final_tanh=False).fit(
        load_dataset('digits', 'all')[0][:64])
    assert isinstance(est.net_.st1.loc.head[-1], torch.nn.Identity)


@pytest.mark.parametrize('variant', list(ST_DAC_VARIANTS))
def test_every_variant_shape_and_gradients(variant):
    net = build_st_dac_net(variant)
    x = torch.rand(5, 1, 28, 28)
    p = net(x)
    assert p.shape == (5, 10) and torch.allclose(p.sum(1), torch.ones(5))
    dac_pair_loss(label_features(p), 0.6, 0.6)[0].backward()
    missing = [n for n, q in net.named_parameters() if q.grad is None]
    assert not missing, missing
    n_st = ST_DAC_VARIANTS[variant] or 0
    locs = [m for m in net.modules() if isinstance(m, SpatialTransformer)]
    assert len(locs) == n_st
    for st in locs: assert st.loc.head[2].weight.grad.abs().sum() > 0     # gradient reaches every localisation net


def test_configs_protocols_and_augmentation():
    p, c = st_dac_config('st2', 'mnist', 'paper'), st_dac_config('st2', 'mnist', 'cpu')
    assert (p['lr'], p['batch_size'], p['lower'], p['upper'], p['subset']) == (1e-4, 32, 0.9, 0.99, None)
    assert st_dac_config('st3', 'fashion_mnist', 'paper')['lower'] == 0.8
    assert c['subset'] and c['epochs'] < p['epochs']
    exp = get_experiment('st_dac')
    assert exp.variants == ('dac_star', 'st0', 'st1', 'st2', 'st3') and {'mnist', 'fashion_mnist'} <= set(exp.datasets)
    with pytest.raises(ValueError, match='unknown variant'): build_config(exp, 'st4', 'mnist', 'cpu')
    with pytest.raises(ValueError, match='unknown dataset'): build_config(exp, 'st2', 'stl10', 'cpu')
    x = torch.rand(16, 1, 28, 28)
    for d in ('mnist', 'fashion_mnist'):
        out = st_dac_augmentation(d)(x)
        assert out.shape == x.shape and not torch.equal(out, x) and out.min() >= 0


def test_bad_input():
    x8 = torch.rand(50, 1, 8, 8)
    with pytest.raises(ValueError, match='n_clusters'): DeepAdaptiveClustering(1).fit(x8)
    with pytest.raises(ValueError, match='unknown variant'): DeepAdaptiveClustering(10, 'st7').fit(x8)
    with pytest.raises(ValueError, match='lower <= upper'): DeepAdaptiveClustering(10, lower=0.99, upper=0.9).fit(x8)
    est = DeepAdaptiveClustering(10, 'st0', epochs=1, widths=(4, 4, 4), hidden=8)
    with pytest.raises(ValueError, match='pass image_shape'): est.fit(torch.rand(50, 64))
    with pytest.raises(ValueError, match='NaN'): est.fit(torch.full((50, 1, 8, 8), float('nan')))
    with pytest.raises(ValueError, match='at least'): est.fit(torch.rand(5, 1, 8, 8))
    with pytest.raises(NotFittedError, match='fit'): est.predict(torch.rand(5, 1, 8, 8))
    with pytest.raises(ValueError, match='n_st'): build_st_dac_net('st0').__class__(n_st=4)
    with pytest.raises(ValueError, match='20x20'): build_st_dac_net('dac_star', image_size=8)


def test_short_run_on_digits_learns_a_partition():
    # DAC does NOT beat k-means on the digits (k-means on pixels: ACC 0.795, NMI 0.744; see the notebook's demo), so
    # this checks what it does reach: a 10-way partition well above chance, with the pair loss falling.
    x, y = load_dataset('digits', 'all')
    est = DeepAdaptiveClustering(10, 'st0', augment=st_dac_augmentation('digits'), random_state=0, **ST_DAC_DIGITS).fit(x)
    m = evaluate(y, est.labels_)
    assert m['acc'] > 0.5 and m['nmi'] > 0.5, m
    assert len(np.unique(est.labels_)) >= 8
    assert est.history_[-1]['loss'] < 0.5 * est.history_[0]['loss']
    assert est.transform(x[:5]).shape == (5, 10) and np.allclose(np.linalg.norm(est.transform(x[:5]), axis=1), 1)


# --- the authors_code preset: each part against a hand-computed case --------------------------------------------

from deepclust_nb.st_dac import STDACNet, self_label_loss, st_dac_authors_code   # noqa: E402
from deepclust_nb.augment import affine_matrices, warp_affine                      # noqa: E402


def test_self_label_loss_hand_computed_and_target_gets_no_gradient():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[0.9, 0.3, 0.1], [0.0, 0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    by_hand = -sum(tj * math.log(pj) + (1 - tj) * math.log(1 - pj)
                   for prow, trow in zip(p.tolist(), t.tolist()) for pj, tj in zip(prow, trow)) / 6
    loss = self_label_loss(p, t)
    assert loss.item() == pytest.approx(by_hand, abs=1e-9)
    loss.backward()
    assert p.grad is not None and t.grad is None
    with pytest.raises(ValueError, match='same shape'): self_label_loss(p, t[:, :2])


def test_code_schedule_is_one_threshold_on_all_pairs():
    # the code: th = 0.99 at epoch 1, minus (0.99 - 0.8) / 10 after each epoch; u = l, so every pair is selected
    for e in range(10):
        u, l = dac_thresholds(e, 10, lower=0.8, upper=0.99, schedule='code')
        assert u == l == pytest.approx(0.99 - e * 0.019)
    f = label_features(torch.rand(6, 4))
    _, info = dac_pair_loss(f, 0.9, 0.9)
    assert info['selected'] == 1.0


def test_authors_code_preset_values():
    m, fm = st_dac_authors_code('st2', 'mnist'), st_dac_authors_code('st3', 'fashion_mnist')
    assert (m['lower'], fm['lower'], m['upper']) == (0.8, 0.9, 0.99)
    assert m['dropout'] == 0.5 and m['third_pool'] is False and m['chunk'] == 1000 and m['self_label_weight'] == 10
    assert m['self_label_target'] == 'clean' and m['bn'] == 'batch' and m['predict_batch_size'] == 32 and m['center']
    cfg = build_config(get_experiment('st_dac'), 'st2', 'mnist', 'paper', m)      # every key is a config setting
    assert cfg['epochs'] == 10 and cfg['subset'] is None                          # the budget is the protocol's
    with pytest.raises(ValueError, match='dac_star'): st_dac_authors_code('dac_star', 'mnist')


def test_batch_statistics_bn_is_keras_mode_2():
    # Keras 1 mode=2: the batch's own statistics in predict too, so one image's output depends on its batch
    torch.manual_seed(0)
    net = STDACNet(n_st=1, widths=(8, 8, 8), hidden=16, bn='batch').eval()
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        alone, with_others = net(x[:4]), net(x)[:4]
        assert not torch.allclose(alone, with_others)
        bn = net.head[1]; h = torch.randn(5, 16)
        by_hand = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + bn.eps)
        assert torch.allclose(bn(h), by_hand, atol=1e-5)                     # gamma 1, beta 0 at the start
    assert not any(m.track_running_stats for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    with pytest.raises(ValueError, match='unknown bn'): STDACNet(bn='mode2')


def test_keras_init_dropout_and_no_third_pool():
    torch.manual_seed(0)
    net = STDACNet(n_st=2, third_pool=False, dropout=0.5, init='keras')
    dense = net.head[0]
    bound = math.sqrt(6 / (dense.in_features + dense.out_features))            # glorot_uniform's limit
    assert dense.weight.abs().max() <= bound and dense.weight.abs().max() > 0.9 * bound and not dense.bias.any()
    assert dense.in_features == 256 * 7 * 7 and net.head[3].p == 0.5
    last = net.st1.loc.head[2]                                                 # the ST layer still starts at the identity
    assert not last.weight.any() and torch.equal(last.bias, torch.tensor([1.0, 0, 0, 0, 1, 0]))
    with pytest.raises(ValueError, match='unknown init'): STDACNet(init='glorot')


def test_seya_sampler_reads_pixel_s_plus_one_times_w_over_two():
    # at theta = I, output pixel j reads input position j * W / (W - 1) (seya's (s + 1) * W / 2 on a linspace grid)
    st = SpatialTransformer(1, 28, final_tanh=False, sampler='seya')
    ramp = torch.arange(28.0).repeat(28, 1)[None, None]                        # value = column index
    out = st(ramp)[0, 0, 5]
    j = torch.arange(28.0); want = j * 28 / 27
    inside = want <= 27
    assert torch.allclose(out[inside], want[inside], atol=1e-4)
    assert out[~inside].abs().max() < 1                                      # beyond the last pixel centre: zero padding
    with pytest.raises(ValueError, match='unknown sampler'): SpatialTransformer(1, 28, sampler='keras')


def test_keras_augmentation_fills_with_the_edge_pixel():
    x = torch.rand(2, 1, 28, 28) + 1.0                                         # no pixel is 0
    A = affine_matrices(2, torch.zeros(2), torch.tensor([[3 / 28, 0.0]] * 2), torch.ones(2), torch.zeros(2))
    out = warp_affine(x, A, mode='nearest', padding='border')
    assert torch.allclose(out[..., :3], x[..., :1].expand(-1, -1, -1, 3))       # the uncovered columns repeat the edge
    assert torch.allclose(out[..., 3:], x[..., :-3])                            # a whole-pixel shift, read exactly
    aug = st_dac_augmentation('mnist', keras=True)
    assert aug(x).min() > 0.5                                                  # no zero fill anywhere


def test_chunk_targets_come_from_clean_images_without_gradient():
    x, _ = load_dataset('digits', 'all')
    est = DeepAdaptiveClustering(10, 'st1', widths=(8, 8, 8), hidden=16, chunk=64, batch_size=16, pair_labels='clean',
                                 self_label_weight=10, self_label_target='clean', bn='batch', predict_batch_size=16,
                                 center=True, augment=st_dac_augmentation('digits', keras=True), random_state=0)
    est._check_params(); est._build((1, 8, 8)); est.offset_ = 0.0
    torch.manual_seed(0)
    batches = est._batches(x[:128])
    xb, ref = next(batches)
    assert xb.shape == (16, 1, 8, 8) and not ref.requires_grad
    # the chunk's targets are the clean images' label features in inference mode, predicted in batches of 16
    torch.manual_seed(0); perm = torch.randperm(128)
    xc = x[:128][perm[:64]]
    est.net_.eval()
    with torch.no_grad(): clean = torch.cat([label_features(est.net_(xc[i:i + 16])) for i in range(0, 64, 16)])
    rows = [int(((xc - b).flatten(1).abs().sum(1) == 0).nonzero()[0]) for b in xb]   # where each batch image sits in the chunk
    assert torch.allclose(ref, clean[rows], atol=1e-6)
    assert sum(1 for _ in batches) == 2 * (64 // 16) - 1                        # 2 chunks of 64, 4 batches each
    with pytest.raises(ValueError, match='chunk'): DeepAdaptiveClustering(chunk=8, batch_size=16).fit(x)


def test_authors_code_runs_and_centres_the_images():
    x, y = load_dataset('digits', 'all')
    est = DeepAdaptiveClustering(10, 'st1', epochs=1, widths=(8, 8, 8), hidden=16, random_state=0,
                                 **{k: v for k, v in st_dac_authors_code('st1', 'digits').items()
                                    if k in ST_DAC_ESTIMATOR_KEYS and k not in ('widths', 'hidden')} | {'chunk': 512})
    est.fit(x)
    assert est.offset_ == pytest.approx(float(x.mean()))
    assert est.labels_.shape == (len(x),) and np.array_equal(est.labels_, est.predict(x))
    assert est.history_[0]['selected'] == 1.0
