from functools import partial

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from deepclust_nb.augment import (adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, affine_matrices,
                                  color_jitter, compose, gaussian_noise, random_affine, random_binarize,
                                  random_brightness_shift, random_channel_shift, random_crop, random_grayscale,
                                  random_hflip, random_resized_crop, random_vflip, warp_affine)

torch.manual_seed(0)
GRAY = torch.rand(8, 1, 16, 16)
RGB = torch.rand(8, 3, 16, 16)


def test_identity_parameters_return_input():
    torch.testing.assert_close(random_affine(GRAY), GRAY, atol=1e-5, rtol=0)
    torch.testing.assert_close(random_resized_crop(RGB, scale=(1, 1)), RGB, atol=1e-5, rtol=0)
    assert torch.equal(color_jitter(RGB), RGB)
    assert torch.equal(random_hflip(RGB, p=0), RGB) and torch.equal(random_grayscale(RGB, p=0), RGB)


def test_rotation_and_shift_are_exact():
    n = len(GRAY); z = torch.zeros(n); o = torch.ones(n)
    rot = warp_affine(GRAY, affine_matrices(n, torch.full((n,), 90.), torch.zeros(n, 2), o, z))
    torch.testing.assert_close(rot, torch.rot90(GRAY, k=-1, dims=(2, 3)), atol=1e-5, rtol=0)
    sh = warp_affine(GRAY, affine_matrices(n, z, torch.tensor([[0, 2 / 16]]).repeat(n, 1), o, z))
    torch.testing.assert_close(sh[..., 2:, :], GRAY[..., :-2, :], atol=1e-5, rtol=0)
    assert sh[..., :2, :].abs().max() < 1e-6   # filled with 0


def test_fill_value():
    n = len(GRAY); z = torch.zeros(n); o = torch.ones(n)
    out = warp_affine(GRAY, affine_matrices(n, z, torch.tensor([[0.25, 0.]]).repeat(n, 1), o, z), fill=0.5)
    torch.testing.assert_close(out[..., :4], torch.full_like(out[..., :4], 0.5))


def test_each_sample_gets_its_own_draw():
    same = GRAY[:1].repeat(6, 1, 1, 1)
    for f in (partial(random_affine, degrees=30, translate=0.1), partial(random_resized_crop, scale=(0.5, 0.9)),
              partial(random_brightness_shift, delta=0.3), partial(gaussian_noise, std=0.1)):
        out = f(same)
        assert all((out[0] - out[i]).abs().max() > 1e-4 for i in range(1, 6)), f


def test_crop_is_whole_pixel_shift():
    x = torch.rand(1, 1, 10, 10).repeat(50, 1, 1, 1)
    out = random_crop(x, padding=2)
    assert set(out.unique().tolist()) <= set(x.unique().tolist()) | {0.0}, 'pixels are copied, never interpolated'
    for o in out:
        assert any(torch.equal(o[:, max(0, dy):10 + min(0, dy), max(0, dx):10 + min(0, dx)],
                               x[0, :, max(0, -dy):10 - max(0, dy), max(0, -dx):10 - max(0, dx)])
                   for dy in range(-2, 3) for dx in range(-2, 3))


def test_flips():
    assert torch.equal(random_hflip(RGB, p=1), RGB.flip(-1)) and torch.equal(random_vflip(RGB, p=1), RGB.flip(-2))
    torch.manual_seed(1)
    out = random_hflip(RGB.repeat(50, 1, 1, 1), p=0.5)
    flipped = sum(torch.equal(o, i.flip(-1)) for o, i in zip(out, RGB.repeat(50, 1, 1, 1)))
    assert 100 < flipped < 300


@pytest.mark.parametrize('mine,ref,lo,hi', [(adjust_brightness, TF.adjust_brightness, 0.2, 1.8),
                                            (adjust_contrast, TF.adjust_contrast, 0.2, 1.8),
                                            (adjust_saturation, TF.adjust_saturation, 0.2, 1.8),
                                            (adjust_hue, TF.adjust_hue, -0.5, 0.5)])
def test_colour_ops_match_torchvision(mine, ref, lo, hi):
    f = torch.linspace(lo, hi, len(RGB))
    expected = torch.stack([ref(img, float(v)) for img, v in zip(RGB, f)])
    torch.testing.assert_close(mine(RGB, f), expected, atol=1e-4, rtol=0)


def test_colour_jitter_ranges_and_errors():
    out = color_jitter(RGB, 0.4, 0.4, 0.4, 0.1)
    assert out.shape == RGB.shape and out.min() >= 0 and out.max() <= 1
    with pytest.raises(ValueError, match='hue'): color_jitter(RGB, hue=0.6)
    assert torch.equal(adjust_hue(GRAY, torch.ones(len(GRAY)) * 0.3), GRAY)


def test_grayscale_channel_shift_binarize_noise():
    g = random_grayscale(RGB, p=1)
    assert torch.equal(g[:, 0], g[:, 2])
    cs = random_channel_shift(RGB, 0.5)
    assert (cs.amin(dim=(2, 3)) >= RGB.amin(dim=(2, 3)) - 1e-6).all()
    torch.manual_seed(0)
    x = torch.rand(200, 1, 16, 16)
    b = random_binarize(x)
    assert set(b.unique().tolist()) <= {0.0, 1.0} and abs(float(b.mean() - x.mean())) < 0.01
    assert abs(float((gaussian_noise(x, 0.2, clip=False) - x).std()) - 0.2) < 0.01


@pytest.mark.parametrize('bad,msg', [(torch.rand(3, 16, 16), 'expected a batch'),
                                     (torch.randint(0, 255, (2, 1, 8, 8), dtype=torch.uint8), 'float images')])
def test_bad_input(bad, msg):
    for f in (random_affine, random_hflip, color_jitter, random_binarize, partial(gaussian_noise, std=0.1)):
        with pytest.raises(ValueError, match=msg): f(bad)
    with pytest.raises(ValueError, match='empty range'): random_affine(GRAY, scale=(1.2, 0.8))


def test_compose_and_repr():
    pol = compose(partial(random_hflip, p=1.0), partial(random_brightness_shift, delta=0.0))
    assert torch.equal(pol(RGB), RGB.flip(-1))
    assert repr(pol) == 'compose(random_hflip(p=1.0), random_brightness_shift(delta=0.0))'


def test_reproducible_with_seed():
    pol = compose(partial(random_affine, degrees=15, translate=0.1), partial(color_jitter, brightness=0.3, hue=0.1))
    torch.manual_seed(5); a = pol(RGB)
    torch.manual_seed(5); b = pol(RGB)
    assert torch.equal(a, b)
