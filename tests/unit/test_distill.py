"""Self-distillation pieces against their formulas: EMA teacher, DINO head and losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from siglip2.losses.distill import (
    DINOHead,
    LocalToGlobalConfig,
    LocalToGlobalLoss,
    MaskedPredictionConfig,
    MaskedPredictionLoss,
    sinkhorn_knopp,
    teacher_temperature,
)
from siglip2.model.ema import EMATeacher


def test_ema_update_is_the_formula_and_leaves_the_student_alone():
    torch.manual_seed(0)
    student, head = nn.Linear(4, 3), nn.Linear(3, 2)
    teacher = EMATeacher(student, {"h": head})
    with torch.no_grad():  # the student moves on
        for p in [*student.parameters(), *head.parameters()]:
            p.add_(torch.randn_like(p))
    before_t = [p.clone() for p in teacher.parameters()]
    before_s = [p.clone() for p in [*student.parameters(), *head.parameters()]]
    teacher.update(student, {"h": head}, momentum=0.9)
    for t0, s, t in zip(before_t, before_s, teacher.parameters()):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s, rtol=0, atol=1e-7)
    for s0, s in zip(before_s, [*student.parameters(), *head.parameters()]):
        assert torch.equal(s0, s)
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.copy_from(student, {"h": head})
    for s, t in zip([*student.parameters(), *head.parameters()], teacher.parameters()):
        assert torch.equal(s, t)
    assert not teacher.train().training  # always eval


def test_dino_head_shape_and_unit_norm_prototypes():
    torch.manual_seed(0)
    head = DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8)
    x = torch.randn(5, 16)
    out = head(x)
    assert out.shape == (5, 32)
    assert out.abs().max() <= 1.0 + 1e-6  # cosine between unit bottleneck and unit prototypes
    with torch.no_grad():
        head.prototypes.mul_(7.0)  # weight norm fixed at 1: scaling V changes nothing
    torch.testing.assert_close(head(x), out)


def _np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def test_local_to_global_is_dino_cross_entropy_with_known_centre_and_temperatures():
    torch.manual_seed(0)
    cfg = LocalToGlobalConfig(out_dim=6, hidden_dim=8, bottleneck_dim=4, student_temp=0.1, center_momentum=0.9)
    loss_fn = LocalToGlobalLoss(cfg, width=5)
    center = torch.randn(1, 6)
    loss_fn.target.center.copy_(center)
    student = torch.randn(3, 2, 5)  # 3 local views, 2 images
    teacher_logits = torch.randn(2, 6)
    loss, metrics = loss_fn(student, teacher_logits, teacher_temp=0.04)
    s = loss_fn.head(student.reshape(6, 5)).reshape(3, 2, 6).detach().numpy()
    q = _np_softmax((teacher_logits.numpy() - center.numpy()) / 0.04)
    ref = np.mean([[-(q[b] * np.log(_np_softmax(s[v, b] / 0.1))).sum() for b in range(2)] for v in range(3)])
    assert float(loss) == pytest.approx(ref, rel=1e-5)
    # centre: EMA of the batch mean of the teacher logits
    torch.testing.assert_close(loss_fn.target.center, 0.9 * center + 0.1 * teacher_logits.mean(0, keepdim=True))
    assert 0.0 <= float(metrics["distill/l2g/agreement"]) <= 1.0


def test_masked_loss_is_mean_over_each_images_masked_patches_then_images():
    torch.manual_seed(0)
    cfg = MaskedPredictionConfig(out_dim=5, hidden_dim=8, bottleneck_dim=4, student_temp=0.1)
    loss_fn = MaskedPredictionLoss(cfg, width=6)
    tokens = torch.randn(4, 6)  # masked tokens: 3 of image 0, 1 of image 2 (image 1: none)
    image_index = torch.tensor([0, 0, 0, 2])
    teacher_logits = torch.randn(4, 5)
    loss, _ = loss_fn(tokens, teacher_logits, image_index, batch_size=3, teacher_temp=0.05)
    s = loss_fn.head(tokens).detach().numpy()
    q = _np_softmax(teacher_logits.numpy() / 0.05)  # centre starts at 0
    ce = [-(q[i] * np.log(_np_softmax(s[i] / 0.1))).sum() for i in range(4)]
    ref = (np.mean(ce[:3]) + ce[3]) / 3
    assert float(loss) == pytest.approx(ref, rel=1e-5)
    assert loss_fn.mask_token.shape == (6,) and torch.count_nonzero(loss_fn.mask_token) == 0


def test_teacher_temperature_warms_up_over_the_phase():
    cfg = MaskedPredictionConfig(start_frac=0.8)  # 0.04 -> 0.07 over 30% of [0.8, 1]
    assert teacher_temperature(cfg, 0.8) == pytest.approx(0.04)
    assert teacher_temperature(cfg, 0.83) == pytest.approx(0.055)
    assert teacher_temperature(cfg, 0.86) == pytest.approx(0.07)
    assert teacher_temperature(cfg, 1.0) == pytest.approx(0.07)
    assert teacher_temperature(LocalToGlobalConfig(), 0.9) == pytest.approx(0.04)


def test_sinkhorn_knopp_balances_prototypes():
    torch.manual_seed(0)
    q = sinkhorn_knopp(torch.randn(64, 8) * 3, temp=0.5, iterations=50)
    torch.testing.assert_close(q.sum(-1), torch.ones(64), rtol=0, atol=1e-5)  # rows are distributions
    torch.testing.assert_close(q.sum(0), torch.full((8,), 64 / 8), rtol=1e-3, atol=1e-3)  # equal use
    assert math.isfinite(float(q.sum()))


# ---------------------------------------------------------------- in the stage
MICRO = {
    "name": "micro",
    "embed_dim": 16,
    "vision": dict(width=16, depth=1, mlp_dim=32, heads=2, patch_size=4, posemb_grid=2, image_size=16),
    "text": dict(width=16, depth=1, mlp_dim=32, heads=2, vocab_size=10, max_len=4),
}
HEADS = {"hidden_dim": 16, "bottleneck_dim": 8, "start_frac": 0.0}


def _stage():
    from stages.pretrain import PretrainStage

    torch.manual_seed(0)
    return PretrainStage(
        model=MICRO,
        optim={"lr": 1e-3},
        views={"local_grid": 2},
        losses={"sigmoid": {}, "local_to_global": {"out_dim": 32, **HEADS}, "masked": {"out_dim": 16, **HEADS}},
    )


def test_teacher_gets_no_gradient_and_is_in_no_optimiser_group():
    from siglip2.optim import param_groups

    stage = _stage()
    batch = {"image": torch.rand(4, 3, 16, 16) * 2 - 1, "text": torch.randint(0, 10, (4, 4))}
    out = stage.compute_losses(batch)
    sum(stage.loss_configs[k].effective_weight * loss for k, (loss, _) in out.items()).backward()
    assert set(out) == {"sigmoid", "local_to_global", "masked"}
    assert all(p.grad is None and not p.requires_grad for p in stage.teacher.parameters())
    grouped = {id(p) for g in param_groups(stage.named_parameters(), 0.1) for p in g["params"]}
    assert not grouped & {id(p) for p in stage.teacher.parameters()}
    assert {id(p) for p in stage.losses.parameters()} <= grouped  # heads and mask token are trained
    assert stage.losses["masked"].mask_token.grad.abs().sum() > 0
    # size factor and weights: masked 0.25 x size factor
    assert stage.loss_configs["masked"].effective_weight == 0.25


def test_mask_token_replaces_exactly_the_masked_patch_embeddings():
    stage = _stage()
    vit = stage.model.vision_model
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [1, 5, 6]] = True
    mask[1, [0, 15]] = True
    token = torch.randn(16)
    seen = {}

    def grab(module, args, kwargs):
        seen["x"] = args[0].clone()

    hook = vit.encoder.register_forward_pre_hook(grab, with_kwargs=True)
    vit(image=image)
    plain = seen.pop("x")
    vit(image=image, masked_patches=mask, mask_token=token)
    masked = seen.pop("x")
    hook.remove()
    from siglip2.model.posemb import resize_posemb

    pos = resize_posemb(vit.embeddings.position_embedding.weight, (4, 4))
    torch.testing.assert_close(masked[mask], (token[None] + pos[mask.nonzero()[:, 1]]))
    torch.testing.assert_close(masked[~mask], plain[~mask])


# ---------------------------------------------------------------- the GPU configs, built on CPU
def _compose(overrides: list[str]):
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    root = Path(__file__).resolve().parents[2]
    with initialize_config_dir(config_dir=str(root / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides)


def test_b16_bf16_gpu_config_builds_the_distillation_stage():
    """`model=b16 trainer=gpu` (bf16-mixed) builds the stage the paper describes for B/16, on
    the meta device: 96 px local views (6x6 tokens of 16 px), weights 1.0 and 0.25 x the size
    factor 0.25, the paper-sized DINO heads, and a teacher outside the optimiser."""
    from stages.runner import build_stage

    cfg = _compose(["model=b16", "trainer=gpu"])
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.accelerator == "gpu"
    with torch.device("meta"):
        stage = build_stage(cfg, vocab_size=256000)
    assert stage.views.local_size == 96 and stage.views.local_size // stage.model.config.vision.patch_size == 6
    assert stage.views.local_count == 8 and stage.views.mask_ratio == 0.5
    l2g, masked = stage.loss_configs["local_to_global"], stage.loss_configs["masked"]
    assert (l2g.start_frac, masked.start_frac) == (0.8, 0.8)
    assert (l2g.effective_weight, masked.effective_weight) == (0.25, 0.0625)
    assert stage.losses["local_to_global"].head.prototypes.shape == (65536, 256)
    assert stage.losses["masked"].head.prototypes.shape == (8192, 256)
    teacher = {id(p) for p in stage.teacher.parameters()}
    assert teacher and not teacher & {id(p) for p in stage.parameters() if p.requires_grad}
    # the teacher copies the vision tower and both heads, nothing else
    vision = sum(p.numel() for p in stage.model.vision_model.parameters())
    heads = sum(p.numel() for n in ("local_to_global", "masked") for p in stage.losses[n].head.parameters())
    assert sum(p.numel() for p in stage.teacher.parameters()) == vision + heads


def test_tiny_distillation_step_runs_under_bf16_autocast():
    """The bf16-mixed path on CPU (autocast, as Lightning's bf16-mixed does on GPU): all four
    losses finite and float32 (the DINO cross-entropies are computed in float32), gradients
    reach the student, the heads and the mask token, and the EMA update keeps the teacher fp32."""
    from stages.runner import build_stage

    cfg = _compose(["debug=fast", "~stage.losses.locca"])  # LocCa's bf16 path: test_locca.py
    torch.manual_seed(0)
    stage = build_stage(cfg, vocab_size=300)
    for name in ("local_to_global", "masked"):
        stage.enable_loss(name)
    stage.train()
    size = cfg.model.vision.image_size
    g = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.rand(4, 3, size, size, generator=g) * 2 - 1,
        "text": torch.randint(1, 300, (4, cfg.model.text.max_len), generator=g),
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = stage.compute_losses(batch)
    assert set(out) == {"sigmoid", "local_to_global", "masked"}
    for name in ("local_to_global", "masked"):
        loss = out[name][0]
        assert loss.dtype == torch.float32 and torch.isfinite(loss), (name, loss)
    total = sum(stage.loss_configs[k].effective_weight * v[0] for k, v in out.items())
    total.backward()
    assert stage.losses["masked"].mask_token.grad.abs().sum() > 0
    assert stage.losses["local_to_global"].head.mlp[0].weight.grad.abs().sum() > 0
    assert stage.model.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    stage.teacher.update(stage.model.vision_model, stage.distill_heads(), 0.996)
    assert all(p.dtype == torch.float32 for p in stage.teacher.parameters())
