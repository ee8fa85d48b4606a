"""perfml.nn.CrossEntropyLoss and LinearCrossEntropyLoss as drop-ins for the torch losses."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from perfml.nn import CrossEntropyLoss, LinearCrossEntropyLoss
from perfml.ops import cross_entropy

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_loss_matches_torch(reduction):
    kw = {"ignore_index": 3, "reduction": reduction, "label_smoothing": 0.1}
    ours, theirs = CrossEntropyLoss(**kw), nn.CrossEntropyLoss(**kw)
    logits = torch.randn(10, 40, device=DEVICE)
    target = torch.randint(0, 40, (10,), device=DEVICE)
    target[::3] = 3
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    la, lb = ours(a, target), theirs(b, target)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    la.sum().backward()
    lb.sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_cross_entropy_loss_extra_options_pass_through():
    logits = torch.randn(10, 30, device=DEVICE)
    target = torch.randint(0, 30, (10,), device=DEVICE)
    loss = CrossEntropyLoss(z_loss=1e-3, softcap=5.0)(logits, target)
    torch.testing.assert_close(loss, cross_entropy(logits, target, z_loss=1e-3, softcap=5.0))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("shape", [(2, 5, 5), (2, 7, 3), (2, 4, 3, 2)])
def test_cross_entropy_loss_takes_classes_on_dim_1_like_torch(shape, reduction):
    # [N, C, d1, ...] with target [N, d1, ...]; (2, 5, 5) is the shape where a last-dim
    # convention would also accept the target and compute another loss without an error
    logits = torch.randn(*shape, device=DEVICE)
    target = torch.randint(0, shape[1], (shape[0], *shape[2:]), device=DEVICE)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    la = CrossEntropyLoss(reduction=reduction)(a, target)
    lb = nn.CrossEntropyLoss(reduction=reduction)(b, target)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    la.sum().backward()
    lb.sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_cross_entropy_loss_single_sample_and_refusals():
    logits, target = torch.randn(6, device=DEVICE), torch.tensor(2, device=DEVICE)
    torch.testing.assert_close(CrossEntropyLoss()(logits, target), F.cross_entropy(logits, target))
    with pytest.raises(ValueError, match=r"classes on dim 1.*perfml.ops.cross_entropy"):
        CrossEntropyLoss()(torch.randn(2, 5, 30, device=DEVICE), torch.zeros(2, 5).long())
    with pytest.raises(TypeError, match="class probabilities"):
        CrossEntropyLoss()(torch.randn(4, 3, device=DEVICE), torch.rand(4, 3, device=DEVICE))


def test_cross_entropy_loss_inplace_backward():
    h = torch.randn(4, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(20, 8, device=DEVICE)
    target = torch.randint(0, 20, (4,), device=DEVICE)
    CrossEntropyLoss(inplace_backward=True)(h @ w.t(), target).backward()
    h2 = h.detach().clone().requires_grad_()
    F.cross_entropy(h2 @ w.t(), target).backward()
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-5, atol=1e-7)


def test_cross_entropy_loss_refuses_class_weights_and_bad_options():
    with pytest.raises(ValueError, match="class weights are not supported"):
        CrossEntropyLoss(torch.ones(10))
    with pytest.raises(ValueError, match="reduction must be one of"):
        CrossEntropyLoss(reduction="batchmean")
    with pytest.raises(ValueError, match="label_smoothing"):
        CrossEntropyLoss(label_smoothing=-0.1)


def test_extra_repr():
    assert "z_loss=0.001" in repr(CrossEntropyLoss(z_loss=1e-3))
    assert "chunk_size=64" in repr(LinearCrossEntropyLoss(chunk_size=64))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_loss_matches_linear_then_cross_entropy(reduction):
    head = nn.Linear(16, 50, bias=True).to(DEVICE)
    ref_head = nn.Linear(16, 50, bias=True).to(DEVICE)
    ref_head.load_state_dict(head.state_dict())
    hidden = torch.randn(3, 7, 16, device=DEVICE)
    target = torch.randint(0, 50, (3, 7), device=DEVICE)
    target[0, :2] = -100
    a, b = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    la = LinearCrossEntropyLoss(reduction=reduction, chunk_size=5)(
        a, head.weight, target, head.bias
    )
    logits = ref_head(b)
    lb = F.cross_entropy(logits.reshape(-1, 50), target.reshape(-1), reduction=reduction)
    torch.testing.assert_close(la, lb.reshape(la.shape), rtol=1e-5, atol=1e-6)
    la.sum().backward()
    lb.sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(head.weight.grad, ref_head.weight.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(head.bias.grad, ref_head.bias.grad, rtol=1e-5, atol=1e-7)


def test_linear_cross_entropy_loss_with_tied_embeddings():
    # the head's weight is the embedding's: both uses accumulate into one .grad
    emb = nn.Embedding(40, 12).to(DEVICE)
    ref = nn.Embedding(40, 12).to(DEVICE)
    ref.load_state_dict(emb.state_dict())
    ids = torch.randint(0, 40, (2, 6), device=DEVICE)
    target = torch.roll(ids, -1, dims=1)
    LinearCrossEntropyLoss()(torch.tanh(emb(ids)), emb.weight, target).backward()
    F.cross_entropy(
        (torch.tanh(ref(ids)) @ ref.weight.t()).reshape(-1, 40), target.reshape(-1)
    ).backward()
    torch.testing.assert_close(emb.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-7)


def test_linear_cross_entropy_loss_bad_options():
    with pytest.raises(ValueError, match="chunk_size must be None or >= 1"):
        LinearCrossEntropyLoss(chunk_size=0)
    with pytest.raises(ValueError, match="softcap"):
        LinearCrossEntropyLoss(softcap=-1.0)
