"""What every stage shares: which parameters are decayed and the learning-rate schedule."""

import math

import torch

from siglip2.optim import no_decay
from siglip2.schedule import warmup_cosine
from siglip2.model import build_model


def test_decay_groups_follow_the_recipe():
    model = build_model(
        {
            "vision": dict(width=16, depth=1, mlp_dim=32, heads=2, patch_size=4, posemb_grid=2, image_size=8),
            "text": dict(width=16, depth=1, mlp_dim=32, heads=2, vocab_size=10, max_len=4),
        }
    )
    kept = {n for n, p in model.named_parameters() if no_decay(n, p)}
    decayed = {n for n, p in model.named_parameters() if not no_decay(n, p)}
    assert {
        "logit_scale",
        "logit_bias",
        "vision_model.head.probe",
        "vision_model.embeddings.position_embedding.weight",
        "text_model.embeddings.token_embedding.weight",
        "vision_model.post_layernorm.weight",
    } <= kept
    assert {
        "vision_model.embeddings.patch_embedding.weight",
        "text_model.head.weight",
        "vision_model.encoder.layers.0.mlp.fc1.weight",
    } <= decayed
    assert all(not n.endswith(".bias") for n in decayed)


def test_warmup_then_cosine_matches_closed_form():
    total, warm = 100, 10
    assert warmup_cosine(0, total, warm, 0.0) == 0.1
    assert warmup_cosine(9, total, warm, 0.0) == 1.0
    assert math.isclose(warmup_cosine(55, total, warm, 0.0), 0.5)  # halfway through the cosine
    assert math.isclose(warmup_cosine(100, total, warm, 0.1), 0.1)  # floor at min_lr_ratio


# ---------------------------------------------------------------- model.compile
import pytest  # noqa: E402

from stages.pretrain import PretrainStage  # noqa: E402

MICRO = {
    "name": "micro",
    "embed_dim": 16,
    "vision": dict(width=16, depth=1, mlp_dim=32, heads=2, patch_size=4, posemb_grid=2, image_size=8),
    "text": dict(width=16, depth=1, mlp_dim=32, heads=2, vocab_size=10, max_len=4),
}
OPTIM = {"lr": 1e-3, "weight_decay": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8, "impl": "foreach", "grad_clip": 1.0}


def _stage(**model_kw) -> PretrainStage:
    torch.manual_seed(0)
    return PretrainStage(model={**MICRO, **model_kw}, optim=OPTIM, losses={"sigmoid": {"chunk_size": 64}})


def test_model_compile_key_reaches_the_stage_and_is_not_architecture():
    assert build_model({**MICRO, "compile": True}).config == build_model(MICRO).config
    assert _stage(compile=True).compile_towers and not _stage().compile_towers
    assert _stage(compile=False).hparams["model"]["compile"] is False
    # the old `stage.compile` flag (saved in earlier checkpoints' hparams) still works
    torch.manual_seed(0)
    old = PretrainStage(model=MICRO, optim=OPTIM, losses={"sigmoid": {}}, compile=True)
    assert old.compile_towers and old.hparams["model"]["compile"] is True


@pytest.mark.e2e  # compiling two towers forward and backward takes ~30 s on a 2-core CPU
def test_compiled_training_step_matches_eager():
    g = torch.Generator().manual_seed(1)
    batch = {"image": torch.randn(4, 3, 8, 8, generator=g), "text": torch.randint(0, 10, (4, 4), generator=g)}
    losses = {}
    for compiled in (False, True):
        stage = _stage(compile=compiled)
        stage.configure_model()
        assert (stage.model.vision_model._compiled_call_impl is not None) == compiled
        opt = torch.optim.AdamW(stage.parameters(), lr=1e-2)
        seen = []
        for _ in range(2):  # forward, backward, step; then the loss after the update
            opt.zero_grad()
            loss = stage.training_step(batch, 0)
            loss.backward()
            opt.step()
            seen.append(float(loss))
        losses[compiled] = seen
    assert losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-5)
    assert losses[True][1] != losses[True][0]  # the step changed the compiled towers' weights


# ---------------------------------------------------------------- AdamW implementation
def test_adamw_auto_is_fused_where_lightning_can_clip_it():
    from types import SimpleNamespace

    from siglip2.optim import adamw_impl

    assert adamw_impl("auto", SimpleNamespace(precision="32-true")) == "fused"
    assert adamw_impl("auto", SimpleNamespace(precision="bf16-mixed")) == "foreach"
    assert (
        adamw_impl("auto", SimpleNamespace(precision="32-true", strategy=type("DeepSpeedStrategy", (), {})()))
        == "foreach"
    )
    assert adamw_impl("loop", SimpleNamespace(precision="bf16-mixed")) == "loop"
    with pytest.raises(ValueError, match="optim.impl"):
        adamw_impl("apex")


def test_fused_adamw_trains_with_gradient_clipping_in_a_trainer(tmp_path):
    import lightning as L

    stage = PretrainStage(model=MICRO, optim={**OPTIM, "impl": "auto"}, losses={"sigmoid": {}})
    g = torch.Generator().manual_seed(0)
    batches = [
        {"image": torch.randn(4, 3, 8, 8, generator=g), "text": torch.randint(0, 10, (4, 4), generator=g)}
        for _ in range(2)
    ]
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=2,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    before = stage.model.logit_bias.detach().clone()
    trainer.fit(stage, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert trainer.optimizers[0].defaults["fused"] is True
    assert not torch.equal(before, stage.model.logit_bias.detach())


@pytest.mark.parametrize("progress_bar", [False, True])
def test_losses_reach_the_progress_bar_only_when_there_is_one(tmp_path, progress_bar):
    """Lightning converts progress-bar metrics to Python numbers after every batch (a device
    sync per step on GPU), so without a bar nothing is logged to it."""
    import lightning as L

    stage = _stage()
    g = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randn(4, 3, 8, 8, generator=g), "text": torch.randint(0, 10, (4, 4), generator=g)}]
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(stage, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    assert ("train/loss" in trainer.progress_bar_metrics) == progress_bar
    assert "train/loss" in trainer.callback_metrics and "train/loss_sigmoid" in trainer.callback_metrics


# ---------------------------------------------------------------- decay, gates, old checkpoints
from siglip2.optim import param_groups  # noqa: E402


def test_decay_follows_the_built_ndim_when_the_optimiser_sees_flat_shards():
    """FSDP1 hands the optimiser 1-D views: the ndim recorded at build decides, as unwrapped."""
    stage = _stage()
    flat = [(n, torch.nn.Parameter(p.detach().reshape(-1))) for n, p in stage.named_parameters()]
    as_built = param_groups(stage.named_parameters(), 0.1)
    from_flat = param_groups(flat, 0.1, ndims=stage._param_ndims)
    decayed = lambda groups: sum(len(g["params"]) for g in groups if g["weight_decay"] > 0)  # noqa: E731
    assert decayed(from_flat) == decayed(as_built) > 0
    assert decayed(param_groups(flat, 0.1)) == 0  # what ndim alone gave a sharded run


def test_dormant_loss_and_frozen_prototypes_step_with_lr_zero_in_their_own_groups():
    torch.manual_seed(0)
    stage = PretrainStage(
        model=MICRO,
        optim=OPTIM,
        losses={
            "sigmoid": {},
            "local_to_global": {"start_frac": 0.8, "out_dim": 16, "hidden_dim": 8, "bottleneck_dim": 4},
        },
    )
    gates = stage.lr_gates()
    assert gates == {
        "losses.sigmoid.": True,
        "losses.local_to_global.": False,
        "losses.local_to_global.head.prototypes": False,
    }
    groups = param_groups(stage.named_parameters(), 0.1, ndims=stage._param_ndims, gates=gates)
    opt = torch.optim.AdamW(groups, lr=1e-3)
    by_gate = {g.get("gate"): g for g in opt.param_groups}
    proto = stage.losses["local_to_global"].head.prototypes
    assert any(p is proto for p in by_gate["losses.local_to_global.head.prototypes"]["params"])
    before = {id(p): p.detach().clone() for g in opt.param_groups for p in g["params"]}
    for g in opt.param_groups:
        for p in g["params"]:
            p.grad = torch.ones_like(p)
    stage.on_before_optimizer_step(opt)
    opt.step()
    for g in opt.param_groups:
        moved = any(not torch.equal(before[id(p)], p) for p in g["params"])
        assert moved == (g.get("gate") in (None, "losses.sigmoid.")), g.get("gate")


def test_resume_refuses_an_optimiser_state_from_before_the_gated_groups_with_a_clear_error():
    stage = _stage()
    old = {
        "siglip2": {"format": 2, "stage": "pretrain"},
        "state_dict": stage.state_dict(),
        "optimizer_states": [{"state": {}, "param_groups": []}],
    }
    with pytest.raises(ValueError, match="format 2.*init_from"):
        stage.on_load_checkpoint(old)
