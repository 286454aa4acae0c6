"""The colour HOG teacher (the demo's default): every patch gets a definite target."""
import pytest
import torch
import torch.nn.functional as F

from model.vqkd.teachers import PIXEL_TEACHERS, ColourHOGTeacher, HOGTeacher, build_teacher
from tests.model.test_vqkd_train import square_image


def test_flat_patches_get_their_colour_and_edges_their_orientation():
    teacher = ColourHOGTeacher(patch_size=16)
    assert teacher.dim == 3 * 4 * (9 + 1)
    grey = torch.full((3, 32, 32), 0.8)
    red = torch.zeros(3, 32, 32)
    red[0] = 1.0
    edge = square_image((1.0, 0.0, 0.0))  # a red square on white: every patch holds a corner
    feats, weights = teacher(torch.stack([grey, red, edge]))
    assert feats.shape == (3, 4, teacher.dim) and weights is None  # every patch counts alike
    hog_dim = 3 * 4 * 9
    assert feats[:2, :, :hog_dim].abs().max() == 0  # flat: no edge part
    torch.testing.assert_close(feats[0, :, hog_dim:], torch.full((4, 12), 0.3))  # cell colours - 0.5
    assert F.cosine_similarity(feats[0], feats[1], dim=-1).max() < 0.5  # grey and red stay apart
    strength = feats[2, :, :hog_dim].norm(dim=-1)
    assert (strength > 0.03).all() and (strength < 0.1).all()  # a sharp edge: ~1/20 of its colour part
    sharper = ColourHOGTeacher(patch_size=16, edge_scale=0.1)(edge[None])[0][0, :, :hog_dim].norm(dim=-1)
    assert (sharper > 0.5).all()  # a small edge_scale: nearly a unit orientation pattern
    plain = HOGTeacher(patch_size=16)(edge[None])[0][0]
    # the edge part is the plain teacher's pattern, scaled by its strength
    torch.testing.assert_close(feats[2, :, :hog_dim] / strength[:, None], plain, atol=1e-4, rtol=1e-4)


def test_faint_noise_is_a_small_edge_part():
    """Pixel noise (the demo adds some) must not look like an edge: the flat patch's target
    stays its colour, so masked image modeling can predict it from its neighbours."""
    gen = torch.Generator().manual_seed(0)
    noisy = (torch.full((1, 3, 32, 32), 0.85) + torch.randn(1, 3, 32, 32, generator=gen) * 4 / 255).clamp(0, 1)
    feats, _ = ColourHOGTeacher(patch_size=16)(noisy)
    hog_dim = 3 * 4 * 9
    assert feats[0, :, :hog_dim].norm(dim=-1).max() < 0.3 * feats[0, :, hog_dim:].norm(dim=-1).min()


def test_build_teacher_names_the_pixel_teachers():
    assert type(build_teacher("hog_colour", 2, 16)) is ColourHOGTeacher
    assert type(build_teacher("hog", 2, 16)) is HOGTeacher
    assert set(PIXEL_TEACHERS) == {"hog", "hog_colour"}
    with pytest.raises(ValueError, match="teacher 'hog_colour' reads raw pixels"):
        build_teacher("hog_colour", 2, 16, norm="imagenet")
    with pytest.raises(ValueError, match="unknown teacher 'sift'"):
        build_teacher("sift", 2, 16)
