import pytest
import torch

from resunetpp.training.losses import LOSSES, dice_loss, get_loss


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 1, 8, 8, generator=g)
    target = (torch.rand(2, 1, 8, 8, generator=g) > 0.6).float()
    return logits, target


def test_dice_matches_authors_formula_over_the_batch():
    logits, y = _batch()
    p = torch.sigmoid(logits)
    expected = 1 - (2 * (y * p).sum() + 1) / (y.sum() + p.sum() + 1)  # Keras dice_coef_loss, smooth 1
    assert torch.allclose(dice_loss(logits, y), expected)
    # over the batch, not the mean of per-image losses
    per_image = torch.stack([dice_loss(logits[i:i + 1], y[i:i + 1]) for i in range(2)]).mean()
    assert not torch.allclose(dice_loss(logits, y), per_image)


def test_dice_perfect_and_empty():
    y = torch.zeros(1, 1, 4, 4)
    y[..., :2, :2] = 1
    perfect = (y * 2 - 1) * 1e4
    assert dice_loss(perfect, y).item() == pytest.approx(0.0, abs=1e-6)
    # empty target and confident empty prediction: smooth makes it 1 - 1/1 = 0
    assert dice_loss(torch.full((1, 1, 4, 4), -1e4), torch.zeros(1, 1, 4, 4)).item() == pytest.approx(0.0, abs=1e-6)


def test_bce_mse_and_combo():
    logits, y = _batch(1)
    assert torch.allclose(get_loss("bce")(logits, y), torch.nn.BCEWithLogitsLoss()(logits, y))
    assert torch.allclose(get_loss("mse")(logits, y), ((torch.sigmoid(logits) - y) ** 2).mean())
    assert torch.allclose(get_loss("bce+dice")(logits, y), get_loss("bce")(logits, y) + dice_loss(logits, y))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_float32_under_autocast_and_gradients(name):
    logits, y = _batch(2)
    logits = logits.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = get_loss(name)(logits, y.to(torch.uint8))
    assert loss.dtype == torch.float32 and loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad.float()).all()


def test_errors():
    with pytest.raises(ValueError, match=r"^unknown loss 'focal'; choose one of dice, bce, bce\+dice, mse, structure$"):
        get_loss("focal")
    with pytest.raises(ValueError, match="differ in shape"):
        dice_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
