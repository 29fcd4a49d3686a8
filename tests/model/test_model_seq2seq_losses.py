"""The seq2seq loss against its definitions: label smoothing by hand, invariance to the content of padding."""

from __future__ import annotations

import torch
from test_model_seq2seq import V, batch, tiny


def test_label_smoothing_equals_its_definition():
    # Szegedy et al. 2016 / Vaswani et al. 2017: the target distribution is (1 - eps) one-hot + eps / V,
    # so loss = (1 - eps) * NLL(target) + eps * mean over the V classes of -log p(class)
    eps = 0.1
    model = tiny(label_smoothing=eps)
    src, src_mask, tgt = batch()
    targets = torch.randint(0, V, tgt.shape)
    targets[0, 5:] = -100
    logits, loss = model(src, tgt, targets, src_mask=src_mask)
    logp = torch.log_softmax(logits.float(), -1)[targets != -100]  # (N, V)
    t = targets[targets != -100]
    nll = -logp.gather(1, t[:, None])[:, 0]
    uniform = -logp.mean(dim=-1)
    torch.testing.assert_close(loss, ((1 - eps) * nll + eps * uniform).mean())


def test_loss_is_invariant_to_the_content_of_padding():
    model = tiny().eval()
    src, src_mask, tgt = batch()
    targets = tgt.roll(-1, dims=1)
    targets[1, 5:] = -100  # row 1: its last target positions are padding
    _, loss = model(src, tgt, targets, src_mask=src_mask)
    noisy_src, noisy_tgt = src.clone(), tgt.clone()
    noisy_src[~src_mask] = torch.randint(0, V, (int((~src_mask).sum()),))
    noisy_tgt[1, 5:] = torch.randint(0, V, (tgt.shape[1] - 5,))  # decoder inputs at padded positions
    _, noisy = model(noisy_src, noisy_tgt, targets, src_mask=src_mask)
    assert not torch.equal(noisy_src, src) and not torch.equal(noisy_tgt, tgt)
    torch.testing.assert_close(noisy, loss)
    # while a real source token does matter
    changed = src.clone()
    changed[0, 0] = (changed[0, 0] + 1) % V
    assert not torch.allclose(model(changed, tgt, targets, src_mask=src_mask)[1], loss)
