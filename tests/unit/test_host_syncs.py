"""No host sync in the training step (DESIGN.md, "Scaling out"), counted, and LocCa's fixed graph.

A host sync makes the CPU wait until the GPU has run everything queued so far (``.item()``,
``bool(t)``, ``nonzero``, boolean-mask indexing, ``bincount``, ``unique``, a Python list
copied to the device with ``torch.tensor(..., device=)``, ...), so the GPU idles while the CPU
queues the rest of the step. On this CPU there is no device to wait for, so the census counts
the *calls* that would sync on a GPU, with a ``TorchFunctionMode`` over one
``stage.training_step`` (forward) and its backward, and attributes each to the innermost
frame of this repository that made it.

Budget: 0 in the stage, losses, views and towers this census covers (``KNOWN_AFTER_SWITCH``
(file, call) -> count lists any accepted exception, with its reason; none today).

LocCa (issue 25, 1h): under FSDP every rank must run the same decoder passes every step
(each pass all-gathers the decoder's shards), so a task with no valid row in a rank's batch
still runs its pass and contributes an exact 0.
"""

from __future__ import annotations

import collections
import random
import traceback
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from siglip2.data.locca_targets import IGNORE, LoccaFormat, build_locca_targets
from siglip2.losses.locca import LoccaLoss, LoccaObjective, locca_host_bounds
from test_locca import CharTokenizer

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # no Trainer here

ROOT = Path(__file__).resolve().parents[2]

# Calls that wait for the device (by their torch function name).
SYNC_CALLS = {
    "item",
    "__bool__",
    "tolist",
    "nonzero",
    "argwhere",
    "__int__",
    "__float__",
    "__index__",
    "cpu",
    "numpy",
    "bincount",
    "unique",
    "unique_consecutive",
    "masked_select",
}

# Known remaining syncs, in files this test does not own: (file, call) -> count per step.
KNOWN_AFTER_SWITCH: dict[tuple[str, str], int] = {}


class SyncCensus(TorchFunctionMode):
    """Counts the torch calls that sync the host with the device, by (file, call)."""

    def __init__(self):
        super().__init__()
        self.sites: collections.Counter = collections.Counter()

    def _hit(self, call: str) -> None:
        where = "<outside the repo>"
        for frame in reversed(traceback.extract_stack()[:-2]):
            path = Path(frame.filename)
            if ROOT in path.parents and ".venv" not in path.parts and path.name != Path(__file__).name:
                where = f"{path.relative_to(ROOT)}:{frame.lineno}"
                break
        self.sites[(where, call)] += 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in SYNC_CALLS:
            self._hit(name)
        elif name == "tensor" and kwargs.get("device") is not None:  # a host list copied to the device
            self._hit("tensor(device=)")
        elif (
            name == "repeat_interleave"
            and kwargs.get("output_size") is None
            and torch.is_tensor(args[1] if len(args) > 1 else kwargs.get("repeats"))
        ):
            self._hit("repeat_interleave")  # tensor repeats: the output size is data
        elif name == "__getitem__":
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(torch.is_tensor(i) and i.dtype == torch.bool for i in index):
                self._hit("__getitem__[bool]")
        return func(*args, **kwargs)

    def by_file(self) -> collections.Counter:
        out: collections.Counter = collections.Counter()
        for (where, call), n in self.sites.items():
            out[(where.rsplit(":", 1)[0], call)] += n
        return out


TOK = CharTokenizer()
FMT = LoccaFormat(max_len=40)
REGION = [{"caption": "red circle", "box": [0.1, 0.1, 0.4, 0.5]}]


def _locca_batch(samples) -> dict[str, torch.Tensor]:
    outs = [build_locca_targets(TOK, c, r, random.Random(i), FMT) for i, (c, r) in enumerate(samples)]
    return {k: torch.stack([o[k] for o in outs]) for k in outs[0]}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test here runs on one intra-op thread (conftest.one_thread)."""


# ---------------------------------------------------------------- the census of one step
def _stage():
    from stages.pretrain import PretrainStage

    heads = {"hidden_dim": 16, "bottleneck_dim": 8, "start_frac": 0.8}
    model = {
        "name": "micro",
        "embed_dim": 16,
        "vision": dict(width=16, depth=1, mlp_dim=32, heads=2, patch_size=4, posemb_grid=2, image_size=16),
        "text": dict(width=16, depth=1, mlp_dim=32, heads=2, vocab_size=TOK.vocab_size, max_len=4),
    }
    torch.manual_seed(0)
    return PretrainStage(
        model=model,
        optim={"lr": 1e-3},
        views={"local_grid": 2},
        losses={
            "sigmoid": {},
            "locca": {"targets": {"max_len": FMT.max_len}},
            "local_to_global": {"out_dim": 32, **heads},
            "masked": {"out_dim": 16, **heads},
        },
    )


def _step_census(stage, batch) -> SyncCensus:
    stage.examples_seen = 0  # no Trainer: keep the recipe clock at the window's start
    census = SyncCensus()
    with census:
        loss = stage.training_step(batch, 0)
        loss.backward()
    stage.zero_grad()
    return census


def test_training_step_host_sync_census():
    """Before the switch (sigmoid + LocCa, with one task absent from the batch) and after it
    (+ local-to-global and masked prediction): no sync outside the KNOWN_AFTER_SWITCH budget."""
    stage = _stage().train()
    batch = _locca_batch([("a red circle", REGION), ("two blue squares", None), ("x", REGION), ("a cat", None)])
    batch["locca_gcap_valid"][:] = False  # a task with no valid row: still one decoder pass
    g = torch.Generator().manual_seed(0)
    batch["image"] = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    batch["text"] = torch.randint(3, TOK.vocab_size, (4, 4), generator=g)
    bounded = {**batch, **locca_host_bounds(batch)}

    report = {}
    for phase in ("before", "after"):
        if phase == "after":
            for name in ("local_to_global", "masked"):
                stage.enable_loss(name)
        for label, b in (("full length", batch), ("host bounds", bounded)):
            census = _step_census(stage, b)
            report[f"{phase} / {label}"] = dict(census.sites)
            allowed = KNOWN_AFTER_SWITCH if phase == "after" else {}
            over = {k: n for k, n in census.by_file().items() if n > allowed.get(k, 0)}
            assert not over, f"host syncs over budget {phase} the switch ({label}): {dict(census.sites)}"
    print("\nhost-sync census per training step (forward + backward):")
    for key, sites in report.items():
        print(f"  {key}: {sum(sites.values())} {sites}")


def test_naflex_forward_makes_no_host_sync():
    """The NaFlex position embedding (per-image grids) and the padded tower: no sync."""
    from siglip2.data.naflex import pad_patches
    from siglip2.model import build_model

    torch.manual_seed(0)
    model = build_model(
        {
            "name": "t",
            "embed_dim": 16,
            "vision": dict(width=16, depth=1, mlp_dim=32, heads=2, patch_size=4, posemb_grid=4, image_size=16),
            "text": dict(width=16, depth=1, mlp_dim=32, heads=2, vocab_size=20, max_len=4),
        }
    )
    batch = pad_patches([(torch.rand(h * w, 48), (h, w)) for h, w in ((3, 5), (6, 2), (1, 1), (4, 4))], seq_len=20)
    census = SyncCensus()
    with census:
        out = model.encode_image(
            patches=batch["patches"],
            patch_coord=batch["patch_coord"],
            patch_valid=batch["patch_valid"],
            spatial_shapes=batch["spatial_shapes"],
        )
        out.pooled.sum().backward()
    assert not census.sites, dict(census.sites)


# ---------------------------------------------------------------- LocCa: same passes, same loss
def _decoder(vocab=TOK.vocab_size):
    from torch import nn

    from siglip2.model.decoder import LoccaDecoder

    torch.manual_seed(0)
    dec = LoccaDecoder(width=32, depth=2, heads=4, mlp_dim=64, vocab_size=vocab, max_len=FMT.max_len, image_width=24)
    nn.init.normal_(dec.head.weight, std=1.0)
    nn.init.normal_(dec.head.bias, std=1.0)
    return dec


def _reference(dec, img, batch, tasks):
    """The loss as it was defined: mean over the *present* tasks of each task's mean over its
    valid sequences of the per-sequence mean token CE, computed here with plain logits and
    boolean indexing, only for the present tasks."""
    import torch.nn.functional as F

    per_task = []
    for t in tasks:
        valid = batch[f"locca_{t}_valid"].bool()
        if not valid.any():
            continue
        logits = dec.head(dec(batch[f"locca_{t}_input"], img))
        tgt = batch[f"locca_{t}_target"]
        seqs = [
            F.cross_entropy(logits[i][tgt[i] != IGNORE], tgt[i][tgt[i] != IGNORE])
            for i in range(len(tgt))
            if valid[i] and (tgt[i] != IGNORE).any()
        ]
        per_task.append(torch.stack(seqs).mean() if seqs else logits.sum() * 0)
    return torch.stack(per_task).mean()


@pytest.mark.parametrize("with_bounds", [False, True])
def test_absent_task_runs_its_decoder_pass_and_adds_nothing(with_bounds):
    """ARef and GCap have no valid row (no regions): the loss is the Cap loss alone, as
    before, gradients equal the reference's, and the decoder ran once per task (the same
    passes on every rank whatever its rows), the absent tasks' metrics being 0."""
    batch = _locca_batch([("a red circle", None), ("two blue squares", None), ("a cat", None)])
    assert batch["locca_cap_valid"].all() and not batch["locca_aref_valid"].any()
    assert not batch["locca_gcap_valid"].any()
    if with_bounds:
        batch.update(locca_host_bounds(batch))
    img = torch.randn(3, 5, 24)
    dec = _decoder()
    passes = []
    hook = dec.register_forward_hook(lambda m, args, out: passes.append(args[0].shape))
    obj = LoccaObjective().eval()
    total, metrics = obj(dec, img, None, batch)
    hook.remove()
    assert len(passes) == 3  # cap, aref, gcap: every task's pass ran
    grads = torch.autograd.grad(total, list(dec.parameters()), allow_unused=True)
    ref = _reference(dec, img, batch, ("cap",))
    ref_grads = torch.autograd.grad(ref, list(dec.parameters()), allow_unused=True)
    torch.testing.assert_close(total, ref)
    for (name, _), g, r in zip(dec.named_parameters(), grads, ref_grads):
        if r is None:  # the reference never touched it: the new graph gives exact zeros
            assert g is None or (g == 0).all(), name
        else:
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6, msg=name)
    assert float(metrics["locca/aref"]) == 0.0 and float(metrics["locca/gcap"]) == 0.0
    torch.testing.assert_close(metrics["locca/loss"], ref.detach())


def test_host_bounds_trim_the_work_and_change_nothing():
    """`locca_host_bounds` (counted on the CPU batch) cuts the causal tasks' columns after the
    last target and runs the vocabulary projection on the target tokens only: same loss,
    same gradients and metrics as the full padded length."""
    batch = _locca_batch(
        [("a red circle", REGION), ("two blue squares", None), ("a very long caption of many words", REGION)]
    )
    bounds = locca_host_bounds(batch)
    for t in ("cap", "aref", "gcap"):
        has = (batch[f"locca_{t}_target"] != IGNORE) & batch[f"locca_{t}_valid"][:, None]
        assert bounds[f"locca_{t}_max_targets"] == int(has.sum()) > 0
        assert bounds[f"locca_{t}_columns"] == int(has.any(0).nonzero().max()) + 1
    assert bounds["locca_aref_columns"] < FMT.max_len  # there is something to cut
    img = torch.randn(3, 5, 24)
    dec = _decoder()
    obj = LoccaObjective(chunk_size=7).eval()
    full, m_full = obj(dec, img, None, batch)
    g_full = torch.autograd.grad(full, list(dec.parameters()))
    widths = []
    hook = dec.register_forward_hook(lambda m, args, out: widths.append(args[0].shape[1]))
    cut, m_cut = obj(dec, img, None, {**batch, **bounds})
    hook.remove()
    assert widths == [bounds[f"locca_{t}_columns"] for t in ("cap", "aref", "gcap")]
    g_cut = torch.autograd.grad(cut, list(dec.parameters()))
    torch.testing.assert_close(cut, full)
    for a, b in zip(g_cut, g_full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for k in m_full:
        torch.testing.assert_close(m_cut[k], m_full[k])
    # a bound counted on a larger batch stays valid for a slice of it
    part = {k: v[:2] for k, v in batch.items()}
    torch.testing.assert_close(obj(dec, img[:2], None, {**part, **bounds})[0], obj(dec, img[:2], None, part)[0])


def test_loss_with_max_targets_equals_boolean_indexing():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 6, 8, generator=g, requires_grad=True)
    head = torch.nn.Linear(8, 13)
    targets = torch.randint(0, 13, (4, 6), generator=g)
    targets[0, :2] = IGNORE
    targets[2] = IGNORE
    valid = torch.tensor([True, True, True, False])
    n = int(((targets != IGNORE) & valid[:, None]).sum())
    (a, ma), (b, mb) = (LoccaLoss(chunk_size=5)(hidden, head, targets, valid, max_targets=k) for k in (None, n))
    ga, gb = (torch.autograd.grad(x, [hidden, head.weight, head.bias]) for x in (a, b))
    torch.testing.assert_close(a, b)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)
    assert int(ma["tokens"]) == int(mb["tokens"]) == n and torch.equal(ma["acc"], mb["acc"])
    assert (ga[0][3] == 0).all() and (ga[0][2] == 0).all()  # rows without targets get nothing


def test_masked_positions_list_what_nonzero_lists():
    from siglip2.data.views import ViewConfig, make_views

    views = make_views(
        torch.rand(5, 3, 32, 32) * 2 - 1,
        torch.Generator().manual_seed(0),
        ViewConfig(local_size=16, local_count=1),
        patch_size=8,
    )
    pos = views.masked_positions(0.5)
    assert pos.shape == (5, 8) and pos.dtype == torch.long
    image_index, position = views.mask.nonzero(as_tuple=True)
    assert torch.equal(torch.arange(5).repeat_interleave(8), image_index)
    assert torch.equal(pos.reshape(-1), position)
