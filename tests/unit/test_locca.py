"""LocCa: targets, decoder (masks, parallel prediction, cached decoding), chunked loss, eval."""

import io
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from siglip2.data.boxes import box_to_text, dequantize_box, hflip_boxes, parse_box
from siglip2.data.locca_targets import IGNORE, TASKS, LoccaFormat, build_locca_targets, prompt_ids, prompt_text
from siglip2.eval.captioning import caption_correctness, caption_names_object, generate_captions
from siglip2.eval.refexp import box_iou, predict_boxes, refexp_accuracy
from siglip2.losses.locca import LoccaLoss, LoccaObjective
from siglip2.model.decoder import LoccaDecoder, self_attention_mask


class CharTokenizer:
    """Character-level stand-in for siglip2.data.tokenizer.Tokenizer (same interface)."""

    chars = " abcdefghijklmnopqrstuvwxyz0123456789:"
    pad_id, eos_id, unk_id = 0, 1, 2
    vocab_size = 3 + len(chars)

    def encode(self, text, add_eos=True):
        ids = [3 + self.chars.index(c) if c in self.chars else self.unk_id for c in text.lower()]
        return ids + [self.eos_id] if add_eos else ids

    def decode(self, ids):
        out = []
        for i in ids:
            if i == self.eos_id:
                break
            if 3 <= i < self.vocab_size:
                out.append(self.chars[i - 3])
        return "".join(out)


TOK = CharTokenizer()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These ops are tiny: on a shared 2-core machine, intra-op threads spin-wait for each
    other and a 0.1 s test takes 10 s. Restored afterwards for the rest of the session."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_decoder(vocab=TOK.vocab_size, max_len=24, seed=0, image_width=24, random_head=True):
    torch.manual_seed(seed)
    dec = LoccaDecoder(
        width=32, depth=2, heads=4, mlp_dim=64, vocab_size=vocab, max_len=max_len, image_width=image_width
    )
    if random_head:  # the zero-initialised head would make every argmax a tie
        nn.init.normal_(dec.head.weight, std=1.0)
        nn.init.normal_(dec.head.bias, std=1.0)
    return dec.eval()


# ---------------------------------------------------------------- targets
def test_targets_layout_and_alignment():
    fmt = LoccaFormat(max_len=48)
    regions = [{"caption": "Red circle", "box": [0.1, 0.2, 0.3, 0.4]}]
    out = build_locca_targets(TOK, "A red circle", regions, random.Random(0), fmt)
    assert set(out) == {f"locca_{t}_{k}" for t in TASKS for k in ("input", "target", "valid")}
    want = {
        "cap": ("caption:", "a red circle"),
        "aref": ("aref: red circle box:", "50 100 150 200"),
        "gcap": ("gcap: 50 100 150 200 caption:", "red circle"),
    }
    for t, (prompt, target) in want.items():
        inp, tgt = out[f"locca_{t}_input"], out[f"locca_{t}_target"]
        assert inp.shape == tgt.shape == (48,) and inp.dtype == tgt.dtype == torch.long
        assert out[f"locca_{t}_valid"].item() is True
        p = TOK.encode(prompt, add_eos=False)
        assert inp[: len(p)].tolist() == p  # the prompt is input ...
        assert (tgt[: len(p) - 1] == IGNORE).all()  # ... and never a target
        m = tgt != IGNORE
        assert TOK.decode(tgt[m].tolist()) == target and tgt[m][-1] == TOK.eos_id
        last = int(m.nonzero().max())
        assert m[len(p) - 1 : last + 1].all() and not m[last + 1 :].any()
        assert torch.equal(tgt[len(p) - 1 : last], inp[len(p) : last + 1])  # next-token targets
        assert (inp[last + 1 :] == TOK.pad_id).all()
    assert parse_box(
        TOK.decode(out["locca_aref_target"][out["locca_aref_target"] != IGNORE].tolist())
    ) == dequantize_box([50, 100, 150, 200])


def test_targets_without_regions_train_cap_only():
    for regions in (
        None,
        [],
        [
            {"caption": "x"},
            {"box": [0, 0, 1, 1]},
            {"caption": "", "box": [0, 0, 1, 1]},
            {"caption": "flat", "box": [0.5, 0.5, 0.5, 0.9]},
            {"caption": "bad", "box": [1, 2]},
        ],
    ):
        out = build_locca_targets(TOK, "a cat", regions, random.Random(0))
        assert out["locca_cap_valid"] and not out["locca_aref_valid"] and not out["locca_gcap_valid"]
        assert (out["locca_aref_target"] == IGNORE).all() and (out["locca_aref_input"] == TOK.pad_id).all()
    out = build_locca_targets(TOK, "", [{"caption": "dog", "box": [0.1, 0.1, 0.5, 0.5]}], random.Random(0))
    assert not out["locca_cap_valid"] and out["locca_aref_valid"] and out["locca_gcap_valid"]


def test_targets_region_choice_is_seeded_and_independent():
    regions = [{"caption": f"thing {c}", "box": [0.1 * i, 0.1, 0.1 * i + 0.05, 0.2]} for i, c in enumerate("abcdef")]
    fmt = LoccaFormat(max_len=40)

    def picks(seed):
        o = build_locca_targets(TOK, "x", regions, random.Random(seed), fmt)
        aref = TOK.decode(o["locca_aref_input"].tolist()).split("box:")[0]
        gcap = TOK.decode(o["locca_gcap_target"][o["locca_gcap_target"] != IGNORE].tolist())
        return aref, gcap

    assert picks(3) == picks(3)
    seen = [picks(s) for s in range(30)]
    assert len({a for a, _ in seen}) > 3 and len({g for _, g in seen}) > 3
    assert any(a.split()[-1] != g.split()[-1] for a, g in seen)  # ARef and GCap draw separately


def test_targets_use_transformed_boxes_and_truncate():
    regions = [{"caption": "dog", "box": [0.1, 0.2, 0.3, 0.4]}]
    flipped = hflip_boxes([r["box"] for r in regions])
    out = build_locca_targets(TOK, "a dog", regions, random.Random(0), boxes=flipped)
    tgt = out["locca_aref_target"]
    assert TOK.decode(tgt[tgt != IGNORE].tolist()) == box_to_text(flipped[0]) == "350 100 450 200"
    fmt = LoccaFormat(max_len=16)
    out = build_locca_targets(
        TOK,
        "a very long caption that cannot fit",
        [{"caption": "a long region caption", "box": [0.1, 0.2, 0.3, 0.4]}],
        random.Random(0),
        fmt,
    )
    cap = out["locca_cap_target"]
    assert out["locca_cap_valid"] and (cap != IGNORE).sum() == 16 - len("caption:") + 1  # cut, still learns
    assert not out["locca_aref_valid"]  # a box is never cut: the task is dropped instead
    assert out["locca_gcap_input"].shape == (16,)


# ---------------------------------------------------------------- decoder
def test_self_attention_mask_per_row():
    m = self_attention_mask(4, torch.tensor([False, True]), 2)
    assert m.shape == (2, 1, 4, 4)
    assert torch.equal(m[0, 0], torch.ones(4, 4, dtype=torch.bool).tril())
    assert m[1].all()


def test_parallel_rows_see_only_mask_tokens_and_attend_both_ways():
    dec, g = tiny_decoder(), torch.Generator().manual_seed(1)
    img = torch.randn(3, 5, 24, generator=g)
    tok = torch.randint(0, dec.vocab_size, (3, 10), generator=g)
    par = torch.tensor([True, False, True])
    h1 = dec(tok, img, parallel=par)
    tok2 = torch.randint(0, dec.vocab_size, (3, 10), generator=g)
    h2 = dec(tok2, img, parallel=par)
    torch.testing.assert_close(h1[par], h2[par], rtol=0, atol=0)  # targets never leak into parallel rows
    assert not torch.allclose(h1[1], h2[1])
    # one layer, versus a causal pass over all-mask inputs: the last position sees the same
    # keys either way, earlier positions see more keys when parallel (no causal mask)
    dec.layers = dec.layers[:1]
    h1, causal = dec(tok, img, parallel=par), dec(torch.full_like(tok, dec.mask_id), img)
    torch.testing.assert_close(h1[par, -1], causal[par, -1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(h1[par, 0], causal[par, 0], atol=1e-3)


def test_causal_rows_do_not_see_the_future():
    dec, g = tiny_decoder(), torch.Generator().manual_seed(2)
    img = torch.randn(2, 5, 24, generator=g)
    tok = torch.randint(0, dec.vocab_size, (2, 12), generator=g)
    h = dec(tok, img, parallel=torch.tensor([False, False]))
    torch.testing.assert_close(h, dec(tok, img), rtol=1e-5, atol=1e-5)  # mask path == is_causal path
    for i in (0, 5, 10):
        t2 = tok.clone()
        t2[:, i + 1 :] = torch.randint(0, dec.vocab_size, (2, 11 - i), generator=g)
        t2[:, i + 1 :] = torch.where(
            t2[:, i + 1 :] == tok[:, i + 1 :], (t2[:, i + 1 :] + 1) % dec.vocab_size, t2[:, i + 1 :]
        )
        h2 = dec(t2, img)
        torch.testing.assert_close(h2[:, : i + 1], h[:, : i + 1], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(h2[:, i + 1 :], h[:, i + 1 :], atol=1e-4)


def test_image_mask_hides_padding_tokens():
    dec, g = tiny_decoder(), torch.Generator().manual_seed(3)
    img = torch.randn(2, 6, 24, generator=g)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    tok = torch.randint(0, dec.vocab_size, (2, 8), generator=g)
    h = dec(tok, img, mask)
    img2 = img.clone()
    img2[:, 4:] = torch.randn(2, 2, 24, generator=g)
    h2 = dec(tok, img2, mask)
    torch.testing.assert_close(h2[0], h[0], rtol=0, atol=1e-6)
    assert not torch.allclose(h2[1], h[1], atol=1e-4)


def _greedy_uncached(dec, img, mask, prompts, max_new, eos):
    """Reference: one row at a time, full forward pass per step, argmax of the last position."""
    rows = []
    for i, p in enumerate(prompts):
        seq, new = list(p), []
        for _ in range(max_new):
            h = dec(torch.tensor([seq]), img[i : i + 1], None if mask is None else mask[i : i + 1])
            nxt = int(dec.head(h[0, -1]).argmax())
            new.append(nxt)
            seq.append(nxt)
            if nxt == eos:
                break
        rows.append(new + [eos] * (max_new - len(new)))
    return torch.tensor(rows)


def test_cached_generation_equals_uncached_argmax():
    dec, g = tiny_decoder(max_len=16, seed=4), torch.Generator().manual_seed(4)
    img = torch.randn(3, 5, 24, generator=g)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [True] * 4 + [False]])
    prompts = [[5, 6, 7], [8], [9, 10]]
    prefix = torch.zeros(3, 3, dtype=torch.long)
    for i, p in enumerate(prompts):
        prefix[i, : len(p)] = torch.tensor(p)
    plen = torch.tensor([3, 1, 2])
    free = _greedy_uncached(dec, img, mask, prompts, 8, eos=-1)  # no EOS: all 8 tokens
    with torch.no_grad():
        got = dec.generate(img, mask, prefix, 8, eos_id=-1, prefix_len=plen)
    assert torch.equal(got, free)
    eos = int(free[0, 2])  # make row 0 stop at its third token
    want = _greedy_uncached(dec, img, mask, prompts, 8, eos=eos)
    got = dec.generate(img, mask, prefix, 8, eos_id=eos, prefix_len=plen)
    assert torch.equal(got, want) and got[0, 2] == eos and (got[0, 3:] == eos).all()
    same = dec.generate(img, mask, prefix[:, :1], 6, eos_id=-1)  # equal-length prompts, one-pass prefill
    assert torch.equal(same, _greedy_uncached(dec, img, mask, [[5], [8], [9]], 6, eos=-1))
    with pytest.raises(ValueError):
        dec.generate(img, mask, prefix, 15, eos_id=-1)  # needs more positions than max_len


# ---------------------------------------------------------------- loss
def _reference_loss(hidden, head, targets, valid):
    """Plain F.cross_entropy on full logits, normalised per sequence by hand."""
    logits = head(hidden)
    per_seq = []
    for i in range(hidden.shape[0]):
        m = targets[i] != IGNORE
        if valid[i] and m.any():
            per_seq.append(F.cross_entropy(logits[i][m], targets[i][m]))
    return torch.stack(per_seq).mean()


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_chunked_loss_matches_reference_and_gradients(chunk):
    g = torch.Generator().manual_seed(5)
    B, L, W, V = 5, 7, 16, 11
    hidden = torch.randn(B, L, W, generator=g, requires_grad=True)
    head = nn.Linear(W, V)
    with torch.no_grad():
        head.weight.normal_(generator=g)
        head.bias.normal_(generator=g)
    targets = torch.randint(0, V, (B, L), generator=g)
    targets[0, :3] = IGNORE  # a prompt
    targets[1, 2:] = IGNORE  # padding: a short sequence weighs as much as a long one
    targets[3] = IGNORE  # no target tokens at all
    valid = torch.tensor([True, True, False, True, True])
    loss, metrics = LoccaLoss(chunk_size=chunk)(hidden, head, targets, valid)
    gh, gw, gb = torch.autograd.grad(loss, [hidden, head.weight, head.bias])
    ref = _reference_loss(hidden, head, targets, valid)
    rh, rw, rb = torch.autograd.grad(ref, [hidden, head.weight, head.bias])
    torch.testing.assert_close(loss, ref)
    for a, b in [(gh, rh), (gw, rw), (gb, rb)]:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert metrics["sequences"] == 3 and metrics["tokens"] == 4 + 2 + 7
    hits = sum(int((head(hidden[i]).argmax(-1) == targets[i])[targets[i] != IGNORE].sum()) for i in (0, 1, 4))
    assert metrics["acc"].item() == pytest.approx(hits / 13)


def test_loss_without_valid_rows_is_a_connected_zero():
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    head = nn.Linear(4, 5)
    loss, _ = LoccaLoss()(hidden, head, torch.full((2, 3), IGNORE), torch.tensor([True, False]))
    loss.backward()
    assert loss.item() == 0 and hidden.grad is not None and (hidden.grad == 0).all()


def test_chunked_loss_under_bf16_autocast():
    g = torch.Generator().manual_seed(6)
    hidden = torch.randn(3, 6, 16, generator=g, requires_grad=True)
    head = nn.Linear(16, 50)
    targets = torch.randint(0, 50, (3, 6), generator=g)
    ref = _reference_loss(hidden, head, targets, torch.ones(3, dtype=torch.bool))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = LoccaLoss(chunk_size=4)(hidden, head, targets)
    loss.backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 0.05
    assert head.weight.grad.dtype == torch.float32 and torch.isfinite(hidden.grad).all()


def _peak_and_largest_alloc(fn):
    """(peak live bytes above the start, largest single allocation) from the profiler's
    allocation events, replayed in time order."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    allocs, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.typed[0] == _EventType.Allocation:
            allocs.append((node.start_time_ns, node.typed[1].alloc_size))
    live = peak = largest = 0
    for _, size in sorted(allocs):
        live += size
        peak, largest = max(peak, live), max(largest, size)
    return peak, largest


def test_chunked_loss_memory_stays_far_below_full_logits():
    B, L, W, V, chunk = 16, 64, 64, 32000, 32
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(B, L, W, generator=g, requires_grad=True)
    head = nn.Linear(W, V)
    targets = torch.randint(0, V, (B, L), generator=g)
    full = B * L * V * 4

    def chunked():
        LoccaLoss(chunk_size=chunk)(hidden, head, targets)[0].backward()

    def reference():
        _reference_loss(hidden, head, targets, torch.ones(B, dtype=torch.bool)).backward()

    peak, largest = _peak_and_largest_alloc(chunked)
    ref_peak, ref_largest = _peak_and_largest_alloc(reference)
    print(
        f"\nB*L*V*4 = {full} bytes; chunked peak {peak} (largest alloc {largest}); "
        f"full-logits reference peak {ref_peak} (largest alloc {ref_largest})"
    )
    assert ref_largest >= full  # the measurement does see a full logits tensor when there is one
    assert largest <= max(chunk * V * 4, V * W * 4) * 1.01  # one chunk of logits, or the weight gradient
    assert peak < full / 4


# ---------------------------------------------------------------- objective
def _batch(samples, fmt):
    outs = [build_locca_targets(TOK, c, r, random.Random(i), fmt) for i, (c, r) in enumerate(samples)]
    return {k: torch.stack([o[k] for o in outs]) for k in outs[0]}


def test_objective_mean_over_present_tasks_and_metrics():
    fmt = LoccaFormat(max_len=40)
    batch = _batch(
        [("a red circle", [{"caption": "red circle", "box": [0.1, 0.1, 0.4, 0.5]}]), ("two blue squares", None)], fmt
    )
    dec = tiny_decoder(max_len=40)
    img = torch.randn(2, 5, 24)
    obj = LoccaObjective(weights={"cap": 2.0, "gcap": 0.0}).eval()
    total, m = obj(dec, img, None, batch)
    assert set(m) == {"locca/cap", "locca/cap_acc", "locca/aref", "locca/aref_acc", "locca/loss"}
    per = {
        t: LoccaLoss()(
            dec(batch[f"locca_{t}_input"], img), dec.head, batch[f"locca_{t}_target"], batch[f"locca_{t}_valid"]
        )[0]
        for t in ("cap", "aref")
    }
    torch.testing.assert_close(total, (2 * per["cap"] + per["aref"]) / 2)
    torch.testing.assert_close(m["locca/aref"], per["aref"].detach())
    # training mode, parallel_prob=1: Cap is predicted from all-mask inputs without a causal mask
    obj = LoccaObjective(weights={"aref": 0, "gcap": 0}, parallel_prob=1.0).train()
    total, _ = obj(dec, img, None, batch)
    par = dec(batch["locca_cap_input"], img, parallel=torch.ones(2, dtype=torch.bool))
    torch.testing.assert_close(total, LoccaLoss()(par, dec.head, batch["locca_cap_target"])[0])
    total.backward()
    assert dec.token_embedding.weight.grad[dec.mask_id].abs().sum() > 0


# ---------------------------------------------------------------- eval helpers
def test_box_iou_and_refexp_accuracy_by_hand():
    a = [[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.2, 0.2], [0.1, 0.1, 0.3, 0.3]]
    b = [[0.0, 0.0, 0.5, 0.5], [0.25, 0.0, 0.75, 0.5], [0.5, 0.5, 0.7, 0.7], [0.1, 0.1, 0.3, 0.3]]
    torch.testing.assert_close(box_iou(a, b), torch.tensor([1.0, 1 / 3, 0.0, 1.0]))
    # predictions: exact hit, IoU 1/3 (miss), None (miss), IoU 0.5 exactly (hit: >= thr)
    pred = [a[0], [0.25, 0.0, 0.75, 0.5], None, [0.0, 0.0, 0.5, 0.5]]
    gt = [[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5], [0.1, 0.1, 0.2, 0.2], [0.0, 0.0, 0.5, 0.25]]
    assert refexp_accuracy(pred, gt) == 0.5
    assert refexp_accuracy(pred, gt, thr=0.3) == 0.75
    with pytest.raises(ValueError):
        refexp_accuracy(pred[:2], gt)


def test_caption_word_match():
    assert caption_names_object("A small Red circle.", "circle", "red")
    assert caption_names_object("two red circles", "circle", "red")
    assert not caption_names_object("a reddish circle", "circle", "red")
    assert not caption_names_object("a red square", "circle", "red")
    objs = [
        [{"shape": "circle", "color": "red"}],
        [{"shape": "square", "color": "blue"}, {"shape": "circle", "color": "green"}],
    ]
    assert caption_correctness(["red circle", "a green square"], objs) == 0.5
    # with a category (the demo's fill pattern), the category is what must be named
    objs = [
        [{"category": "striped", "shape": "circle", "color": "red"}],
        [{"category": "dotted", "shape": "circle", "color": "red"}],
    ]
    assert caption_correctness(["a red striped square", "a red striped circle"], objs) == 0.5


def test_overfit_decoder_then_caption_and_locate():
    """Targets, decoder, loss, cached decoding and box parsing agree end to end: a tiny decoder
    that memorises two images' tasks must give their captions and boxes back."""
    torch.manual_seed(0)
    fmt = LoccaFormat(max_len=40)  # the longest ARef (22 prompt + 16 box tokens) must fit
    samples = [
        ("a red circle", [{"caption": "red circle", "box": [0.1, 0.2, 0.5, 0.6]}]),
        ("a blue square", [{"caption": "blue square", "box": [0.4, 0.3, 0.9, 0.8]}]),
    ]
    batch = _batch(samples, fmt)
    img = torch.randn(2, 4, 16)
    assert batch["locca_aref_valid"].all() and batch["locca_gcap_valid"].all()
    dec = LoccaDecoder(width=64, depth=1, heads=4, mlp_dim=128, vocab_size=TOK.vocab_size, max_len=40, image_width=16)
    obj = LoccaObjective(parallel_prob=0.0)
    opt = torch.optim.Adam(dec.parameters(), lr=3e-3)
    for _ in range(60):
        loss, m = obj(dec, img, None, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(m[f"locca/{t}_acc"] == 1.0 for t in TASKS)
    dec.eval()
    assert generate_captions(dec, img, None, TOK, max_len=20) == ["a red circle", "a blue square"]
    boxes = predict_boxes(dec, img, None, TOK, ["red circle", "blue square"], fmt)
    assert refexp_accuracy(boxes, [r[0]["box"] for _, r in samples]) == 1.0
    assert boxes[0] == dequantize_box([50, 100, 250, 300])


def test_box_text_through_a_real_sentencepiece_model():
    spm = pytest.importorskip("sentencepiece")
    rng = random.Random(0)
    texts = [
        f"aref: {c} {s} box: {box_to_text([rng.random() * 0.5, rng.random() * 0.5, 0.5 + rng.random() * 0.5, 0.9])}"
        for c in ("red", "blue", "green")
        for s in ("circle", "square")
        for _ in range(40)
    ]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=model,
        vocab_size=60,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())

    class SP:
        pad_id, eos_id, vocab_size = 0, 1, sp.get_piece_size()

        def encode(self, text, add_eos=True):
            return sp.encode(text.lower()) + ([1] if add_eos else [])

        def decode(self, ids):
            ids = list(ids)
            return sp.decode([i for i in ids[: ids.index(1)] if i != 0] if 1 in ids else [i for i in ids if i != 0])

    tok = SP()
    box = [0.123, 0.456, 0.789, 0.999]
    out = build_locca_targets(
        tok, "a red circle", [{"caption": "red circle", "box": box}], random.Random(0), LoccaFormat(max_len=40)
    )
    tgt = out["locca_aref_target"]
    assert parse_box(tok.decode(tgt[tgt != IGNORE].tolist())) == dequantize_box([61, 228, 394, 499])
    assert tok.decode(prompt_ids(tok, prompt_text("aref", caption="red circle"))) == "aref: red circle box:"


@torch.no_grad()
def test_decoder_initialisation_is_cappas():
    """big_vision `models/proj/cappa/cappa.py`: attention kernels lecun-normal (flax's default,
    sd 1/sqrt(fan_in), cut at 2 sd; no biases there, zero here), MLP kernels xavier-uniform
    with ~1e-6 biases, unit-sd target embeddings, positions sd 1/sqrt(width), zero logits."""
    torch.manual_seed(0)
    width, mlp, image_width = 256, 1024, 128
    dec = LoccaDecoder(width=width, depth=2, heads=4, mlp_dim=mlp, vocab_size=5000, max_len=16, image_width=image_width)
    assert abs(float(dec.token_embedding.weight.std()) - 1.0) < 0.01
    assert abs(float(dec.position_embedding.std()) * width**0.5 - 1.0) < 0.1
    assert not dec.head.weight.any() and not dec.head.bias.any()
    for layer in dec.layers:
        for attn in (layer.self_attn, layer.cross_attn):
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj):
                sd = lin.in_features**-0.5
                assert abs(float(lin.weight.std()) / sd - 1.0) < 0.05, (lin, float(lin.weight.std()), sd)
                assert float(lin.weight.abs().max()) <= 2 * sd / 0.87962566103423978 + 1e-6  # cut at 2 sd
                assert not lin.bias.any()
        assert layer.cross_attn.k_proj.in_features == image_width
        for lin in (layer.mlp.fc1, layer.mlp.fc2):
            bound = (6 / (lin.in_features + lin.out_features)) ** 0.5
            w = lin.weight
            assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.99 * bound
            assert abs(float(w.std()) - bound / 3**0.5) < 0.02 * bound  # uniform(-b, b): sd b / sqrt(3)
            assert 0 < float(lin.bias.abs().max()) < 1e-5
    # the first loss is exactly log(V): zero logits
    hidden = dec(torch.randint(0, 5000, (2, 16)), torch.randn(2, 9, image_width))
    assert torch.equal(dec.logits(hidden), torch.zeros(2, 16, 5000))
