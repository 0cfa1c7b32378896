"""pretrain/tasks/lm.py's loss: the chunked cross entropy equals the plain one and holds no full fp32 copy of the
logits for the backward pass (what a GPU's memory would pay at gpt-125m scale, 3.3 GB per copy)."""

import pytest
import torch
import torch.nn.functional as F

import pretrain.tasks.lm
from pretrain.tasks.lm import lm_loss

N, V = 300, 50  # rows (batch x positions) and vocabulary


def logits_and_targets(dtype):
    gen = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, N // 2, V, generator=gen)).to(dtype).requires_grad_()
    return logits, torch.randint(0, V, (2, N // 2), generator=gen)


def saved_fp32_sizes(loss_fn, logits, targets):
    """numel of every fp32 tensor autograd saves for the backward pass of ``loss_fn`` beyond the logits themselves
    (pieces of them are views: no memory of their own)."""
    sizes = []

    def pack(tensor):
        if tensor.dtype == torch.float32 and tensor.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr():
            sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn(logits, targets)
    return loss, sizes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_chunked_loss_equals_the_plain_one_and_saves_no_full_fp32_copy(dtype, monkeypatch):
    logits, targets = logits_and_targets(dtype)
    plain, plain_saved = saved_fp32_sizes(lambda x, t: F.cross_entropy(x.float().reshape(-1, V), t.reshape(-1)), logits, targets)
    (plain_grad,) = torch.autograd.grad(plain, logits)
    assert max(plain_saved) == N * V  # the plain loss keeps the whole fp32 log-softmax

    monkeypatch.setattr(pretrain.tasks.lm, "LOSS_CHUNK_ELEMENTS", 64 * V)  # pieces of 64 rows: 5 of them
    chunked, chunked_saved = saved_fp32_sizes(lm_loss, logits, targets)
    (chunked_grad,) = torch.autograd.grad(chunked, logits)
    assert max(chunked_saved, default=0) < 64 * V  # recomputed piece by piece in the backward pass instead
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=0)
    assert chunked_grad.dtype == dtype
    torch.testing.assert_close(chunked_grad, plain_grad, rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=1e-9)


def test_logits_in_one_piece_are_the_plain_loss_exactly():
    """The shipped tiny models' logits fit one piece: their loss, and so every CPU figure, is the unchunked one."""
    logits, targets = logits_and_targets(torch.float32)
    assert N * V <= pretrain.tasks.lm.LOSS_CHUNK_ELEMENTS
    assert torch.equal(lm_loss(logits, targets), F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1)))
