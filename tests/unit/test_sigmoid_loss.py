"""SigmoidLoss: values and gradients against open_clip's SigLipLoss and the paper's formula,
chunked vs plain, memory behaviour of the chunked path (the 2-process gloo run:
tests/e2e/test_sigmoid_loss_e2e.py)."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from siglip2.losses import SigmoidLoss


def _load_open_clip_loss():
    """open_clip/loss.py loaded on its own: it only needs torch, while `import open_clip`
    costs seconds (timm, model configs) in this process and again in each spawned rank."""
    origin = Path(importlib.util.find_spec("open_clip").origin).parent / "loss.py"
    spec = importlib.util.spec_from_file_location("_open_clip_loss", origin)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SigLipLoss = _load_open_clip_loss().SigLipLoss

D = 8


def _inputs(b, seed=0, scale=10.0, bias=-10.0, scale_shape=()):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(b, D, generator=g), dim=-1)
    y = F.normalize(torch.randn(b, D, generator=g), dim=-1)
    # make positives more similar than chance so both signs of z matter
    y = F.normalize(y + 0.5 * x, dim=-1)
    t = torch.full(scale_shape, scale)
    bb = torch.full(scale_shape, bias)
    return x, y, t, bb


def _leaves(*ts):
    return [t.clone().requires_grad_(True) for t in ts]


def _loss_and_grads(loss_fn, x, y, t, b):
    x, y, t, b = _leaves(x, y, t, b)
    out = loss_fn(x, y, t, b)
    loss = out[0] if isinstance(out, tuple) else out
    grads = torch.autograd.grad(loss, [x, y, t, b])
    return loss.detach(), grads


def _direct_formula(x, y, t, b):
    """The paper's formula, written out element by element."""
    n = x.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            logit = float(t) * float(x[i] @ y[j]) + float(b)
            total += -math.log(1.0 / (1.0 + math.exp(-z * logit)))
    return total / n


@pytest.mark.parametrize("b", [1, 7, 16, 33, 100])
@pytest.mark.parametrize("chunk", [16, 4096])
@pytest.mark.parametrize("scale_shape", [(), (1,)])
def test_matches_open_clip(b, chunk, scale_shape):
    x, y, t, bias = _inputs(b, seed=b, scale=7.3, bias=-4.2, scale_shape=scale_shape)
    ref_loss, ref_grads = _loss_and_grads(SigLipLoss(), x, y, t, bias)
    loss, grads = _loss_and_grads(SigmoidLoss(chunk_size=chunk), x, y, t, bias)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name, g, rg in zip(["image_emb", "text_emb", "logit_scale", "logit_bias"], grads, ref_grads):
        assert g.shape == rg.shape, name
        torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("b", [7, 33])
def test_matches_direct_formula(b):
    x, y, t, bias = _inputs(b, seed=1)
    expected = _direct_formula(x.double(), y.double(), t, bias)
    for chunk in (16, 4096):
        loss, _ = SigmoidLoss(chunk_size=chunk)(x, y, t, bias)
        assert abs(loss.item() - expected) < 1e-5 * max(1.0, abs(expected))


def test_chunked_equals_plain_in_float64_and_metrics():
    x, y, t, bias = _inputs(33, seed=2, scale=3.0, bias=-1.0)
    x, y, t, bias = x.double(), y.double(), t.double(), bias.double()
    plain_loss, plain_grads = _loss_and_grads(SigmoidLoss(chunk_size=4096), x, y, t, bias)
    chunk_loss, chunk_grads = _loss_and_grads(SigmoidLoss(chunk_size=5), x, y, t, bias)
    torch.testing.assert_close(chunk_loss, plain_loss, rtol=1e-12, atol=1e-12)
    for g, pg in zip(chunk_grads, plain_grads):
        torch.testing.assert_close(g, pg, rtol=1e-12, atol=1e-12)
    # metrics: mean positive / negative logit, by hand
    logits = t * x @ y.T + bias
    eye = torch.eye(33, dtype=torch.bool)
    for chunk in (5, 4096):
        _, m = SigmoidLoss(chunk_size=chunk)(x, y, t, bias)
        torch.testing.assert_close(m["pos_logit"], logits[eye].mean())
        torch.testing.assert_close(m["neg_logit"], logits[~eye].mean())
        assert m["logit_scale"].item() == 3.0 and m["logit_bias"].item() == -1.0
        assert not any(v.requires_grad for v in m.values())


def test_constant_scale_and_bias_need_no_grad():
    x, y, _, _ = _inputs(20, seed=3)
    x, y = _leaves(x, y)
    loss, _ = SigmoidLoss(chunk_size=6)(x, y, 10.0, -10.0)  # python floats
    gx, gy = torch.autograd.grad(loss, [x, y])
    ref = SigLipLoss()(x, y, torch.tensor(10.0), torch.tensor(-10.0))
    rgx, rgy = torch.autograd.grad(ref, [x, y])
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gx, rgx)
    torch.testing.assert_close(gy, rgy)


def _saved_numels(fn):
    numels = []

    def pack(t):
        numels.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return numels


def test_chunked_path_saves_no_batch_squared_tensor():
    b = 100
    x, y, t, bias = _leaves(*_inputs(b, seed=4))

    def run(chunk):
        return lambda: SigmoidLoss(chunk_size=chunk)(x, y, t, bias)[0]

    chunked = _saved_numels(run(16))
    plain = _saved_numels(run(4096))
    # the check is not vacuous: the plain autograd path keeps b x b tensors
    assert max(plain) >= b * b
    assert chunked and max(chunked) <= b * D
    # and the chunked backward still runs
    loss = SigmoidLoss(chunk_size=16)(x, y, t, bias)[0]
    loss.backward()
    assert x.grad is not None and t.grad is not None


def test_bfloat16_embeddings_accumulate_in_float32():
    x, y, t, bias = _inputs(40, seed=6)
    ref_loss, ref_grads = _loss_and_grads(SigmoidLoss(chunk_size=4096), x, y, t, bias)
    for chunk in (8, 4096):
        loss, grads = _loss_and_grads(SigmoidLoss(chunk_size=chunk), x.bfloat16(), y.bfloat16(), t, bias)
        assert loss.dtype == torch.float32
        assert grads[0].dtype == grads[1].dtype == torch.bfloat16 and grads[2].dtype == torch.float32
        torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(grads[2], ref_grads[2], rtol=5e-2, atol=5e-2)


# --------------------------------------------------------------------------------------
# Batches of another size than the nominal one (NaFlex's halved batches, token budgets):
# each negative weighted by (N - 1)/(n - 1) (issue 26)


def _no_information_loss(n, bias, nominal, chunk=4096):
    """The loss of a batch of n examples whose every logit is `bias` (t * x.y = 0: no
    information), and its gradient w.r.t. the bias."""
    x = torch.zeros(n, D)
    x[:, 0] = 1.0
    y = torch.zeros(n, D)
    y[:, 1] = 1.0  # x.y = 0 for every pair
    b = torch.tensor(float(bias), requires_grad=True)
    loss, _ = SigmoidLoss(chunk_size=chunk)(x, y, torch.tensor(10.0), b, nominal_batch_size=nominal)
    (gb,) = torch.autograd.grad(loss, [b])
    return float(loss), float(gb)


@pytest.mark.parametrize("chunk", [3, 4096])
def test_every_batch_size_has_the_nominal_no_information_optimum_and_gradient_scale(chunk):
    N = 32
    optimum = math.log(1 / (N - 1))  # sigmoid(b*) = 1/N

    # the analytic per-row loss of the nominal batch at logit b: -log s(b) - (N-1) log(1 - s(b))
    def nominal_row(b):
        return -F.logsigmoid(torch.tensor(b)).item() - (N - 1) * F.logsigmoid(torch.tensor(-b)).item()

    for n in (N, N // 2, 8, 2, 48):  # full, halved (the paper's NaFlex), a token budget's sizes
        for b in (-10.0, optimum, -1.0):
            loss, grad = _no_information_loss(n, b, N, chunk)
            assert loss == pytest.approx(nominal_row(b), rel=1e-5), (n, b)
            # d/db of the nominal row: (s - 1) + (N - 1) s, zero at s = 1/N
            s = 1 / (1 + math.exp(-b))
            assert grad == pytest.approx((s - 1) + (N - 1) * s, rel=1e-4, abs=1e-6), (n, b)
        assert abs(_no_information_loss(n, optimum, N, chunk)[1]) < 1e-5

    # Without the weighting (the plain loss, open_clip's and the paper's formula), a halved
    # batch's optimum is 1/(N/2): between the two optima, full and halved batches push the
    # shared bias in opposite directions (the failure of issue 26); weighted, both push alike.
    _, g_full = _no_information_loss(N, optimum, None, chunk)
    _, g_half = _no_information_loss(N // 2, optimum, None, chunk)
    assert abs(g_full) < 1e-5 and g_half < -0.4
    between = math.log(1 / (3 * N // 4 - 1))  # sigmoid = 1/24, between 1/32 and 1/16
    assert (
        _no_information_loss(N, between, None, chunk)[1]
        > 0.2
        > -0.2
        > _no_information_loss(N // 2, between, None, chunk)[1]
    )
    assert _no_information_loss(N // 2, between, N, chunk)[1] == pytest.approx(
        _no_information_loss(N, between, None, chunk)[1], rel=1e-4
    )


def test_nominal_batch_of_the_same_size_is_the_plain_loss_and_weights_only_negatives():
    x, y, t, bias = _inputs(12, seed=3)
    plain, grads = _loss_and_grads(lambda *a: SigmoidLoss()(*a), x, y, t, bias)
    same, grads_same = _loss_and_grads(lambda *a: SigmoidLoss()(*a, nominal_batch_size=12), x, y, t, bias)
    assert torch.equal(plain, same) and all(torch.equal(a, b) for a, b in zip(grads, grads_same))
    # against the formula with weights written out: positives 1, negatives (N-1)/(n-1)
    N, n = 40, 12
    w = (N - 1) / (n - 1)
    logits = t * x @ y.T + bias
    z = 2 * torch.eye(n) - 1
    expected = -(F.logsigmoid(z * logits) * torch.where(z > 0, 1.0, w)).sum() / n
    for chunk in (5, 4096):
        got, metrics = SigmoidLoss(chunk_size=chunk)(x, y, t, bias, nominal_batch_size=N)
        torch.testing.assert_close(got, expected)
        assert float(metrics["negative_weight"]) == pytest.approx(w)
    # chunked and plain paths give the same weighted gradients
    _, g_chunk = _loss_and_grads(lambda *a: SigmoidLoss(chunk_size=5)(*a, nominal_batch_size=N), x, y, t, bias)
    _, g_plain = _loss_and_grads(lambda *a: SigmoidLoss()(*a, nominal_batch_size=N), x, y, t, bias)
    for a, b in zip(g_chunk, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_negative_weight_values_and_errors():
    from siglip2.losses.sigmoid import negative_weight

    assert negative_weight(16, 32) == 31 / 15
    assert negative_weight(32, 32) == 1.0 and negative_weight(16, None) == 1.0 and negative_weight(1, 32) == 1.0
    with pytest.raises(ValueError, match="batch sizes must be >= 1"):
        negative_weight(0, 32)
