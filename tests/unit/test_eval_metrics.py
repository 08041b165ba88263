"""Evaluation metrics: retrieval recall@k (hand-computed, ties, several captions per image,
chunking; the 2-process gather: tests/e2e/test_eval_metrics_e2e.py), zero-shot classifier and
accuracy (hand-computed)."""

import pytest
import torch
import torch.nn.functional as F

from siglip2.eval import (
    ZeroShotMetrics,
    build_classifier,
    gather_embeddings,
    keys_to_positions,
    retrieval_recall,
    zeroshot_logits,
)


def _from_scores(S):
    """Embeddings whose image @ text.T is exactly S (texts are one-hot)."""
    S = torch.tensor(S, dtype=torch.float32)
    return S, torch.eye(S.shape[1])


# images x texts. Captions 0,1 -> image 0; 2 -> image 1; 3,4 -> image 2.
S_HAND = [[0.9, 0.1, 0.5, 0.2, 0.2], [0.8, 0.6, 0.4, 0.1, 0.0], [0.3, 0.7, 0.1, 0.7, 0.2]]
T2I_HAND = [0, 0, 1, 2, 2]


@pytest.mark.parametrize("chunk", [1, 2, 1024])
def test_recall_hand_computed_with_ties(chunk):
    img, txt = _from_scores(S_HAND)
    t2i = torch.tensor(T2I_HAND)
    # image -> text, rank of the best caption among wrong texts:
    #   img0: best 0.9, no wrong text >= 0.9                     -> 0
    #   img1: caption 0.4 < 0.8, 0.6                             -> 2
    #   img2: best 0.7 (text 3), wrong text 1 ties at 0.7        -> pessimistic 1, optimistic 0
    # text -> image, column j over images:
    #   t0 .9 vs .8,.3 -> 0; t1 .1 vs .6,.7 -> 2; t2 .4 vs .5,.1 -> 1; t3 .7 vs .2,.1 -> 0;
    #   t4 .2 vs .2 (image 0, tie),.0 -> pessimistic 1, optimistic 0
    got = retrieval_recall(img, txt, t2i, ks=(1, 2, 3), chunk_size=chunk)
    assert got == pytest.approx(
        {
            "image_to_text_R@1": 1 / 3,
            "image_to_text_R@2": 2 / 3,
            "image_to_text_R@3": 1.0,
            "text_to_image_R@1": 2 / 5,
            "text_to_image_R@2": 4 / 5,
            "text_to_image_R@3": 1.0,
        }
    )
    got = retrieval_recall(img, txt, t2i, ks=(1, 2, 3), chunk_size=chunk, ties="optimistic")
    assert got == pytest.approx(
        {
            "image_to_text_R@1": 2 / 3,
            "image_to_text_R@2": 2 / 3,
            "image_to_text_R@3": 1.0,
            "text_to_image_R@1": 3 / 5,
            "text_to_image_R@2": 4 / 5,
            "text_to_image_R@3": 1.0,
        }
    )


def test_recall_uncaptioned_image_and_tied_correct_captions():
    # image 0 has captions 0,1,2; image 1 has none (left out of image -> text).
    img, txt = _from_scores([[0.5, 0.5, 0.2], [0.5, 0.1, 0.3]])
    t2i = torch.tensor([0, 0, 0])
    # img0: its two best captions tie with each other (0.5), no wrong text at all -> hit@1.
    # t0: .5 vs image 1 .5 (tie) -> pess 1 / opt 0; t1: .5 vs .1 -> 0; t2: .2 vs .3 -> 1.
    got = retrieval_recall(img, txt, t2i, ks=(1, 2))
    assert got == pytest.approx(
        {"image_to_text_R@1": 1.0, "image_to_text_R@2": 1.0, "text_to_image_R@1": 1 / 3, "text_to_image_R@2": 1.0}
    )
    got = retrieval_recall(img, txt, t2i, ks=(1,), ties="optimistic")
    assert got == pytest.approx({"image_to_text_R@1": 1.0, "text_to_image_R@1": 2 / 3})


def test_constant_embeddings_do_not_score_under_pessimistic_ties():
    img, txt = torch.ones(4, 3), torch.ones(8, 3)
    t2i = torch.arange(8) // 2
    got = retrieval_recall(img, txt, t2i, ks=(1, 5, 10))
    # 6 wrong texts tie with each image's captions, 3 wrong images with each caption
    assert got == pytest.approx(
        {
            "image_to_text_R@1": 0.0,
            "image_to_text_R@5": 0.0,
            "image_to_text_R@10": 1.0,
            "text_to_image_R@1": 0.0,
            "text_to_image_R@5": 1.0,
            "text_to_image_R@10": 1.0,
        }
    )
    assert retrieval_recall(img, txt, t2i, ks=(1,), ties="optimistic") == {
        "image_to_text_R@1": 1.0,
        "text_to_image_R@1": 1.0,
    }


def _random_retrieval(n=37, m=90, d=6, seed=0, quantise=None):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    t2i = torch.randint(0, n - 3, (m,), generator=g)  # images n-3.. have no caption
    txt = F.normalize(img[t2i] + 0.8 * torch.randn(m, d, generator=g), dim=-1)
    if quantise:  # coarse values -> many exact ties
        img, txt = (img * quantise).round(), (txt * quantise).round()
    return img, txt, t2i


@pytest.mark.parametrize("quantise", [None, 2])
def test_recall_chunked_equals_unchunked(quantise):
    img, txt, t2i = _random_retrieval(quantise=quantise)
    for ties in ("pessimistic", "optimistic"):
        full = retrieval_recall(img, txt, t2i, chunk_size=10_000, ties=ties)
        for chunk in (1, 4, 16):
            assert retrieval_recall(img, txt, t2i, chunk_size=chunk, ties=ties) == full


def test_recall_matches_topk_reference_without_ties():
    """Without ties, equal to the clip_benchmark formula: hit@k if a positive is in topk."""
    img, txt, t2i = _random_retrieval(seed=1)
    scores = img @ txt.T
    positive = t2i[None, :] == torch.arange(img.shape[0])[:, None]  # (N, M)
    has_caption = positive.any(1)
    got = retrieval_recall(img, txt, t2i, ks=(1, 5, 10), chunk_size=8)
    for k in (1, 5, 10):
        top = scores.topk(k, dim=1).indices
        i2t = positive.gather(1, top).any(1)[has_caption].float().mean().item()
        t2i_hit = (scores.T.topk(k, dim=1).indices == t2i[:, None]).any(1).float().mean().item()
        assert got[f"image_to_text_R@{k}"] == pytest.approx(i2t)
        assert got[f"text_to_image_R@{k}"] == pytest.approx(t2i_hit)


def test_gather_single_process_dedupes_and_sorts():
    emb = torch.arange(10.0).reshape(5, 2)
    idx = torch.tensor([4, 1, 4, 0, 1])
    extra = torch.tensor([40, 10, 41, 0, 11])
    e, k, x = gather_embeddings(emb, idx, extra)
    assert k.tolist() == [0, 1, 4]
    assert x.tolist() == [0, 10, 40]  # first occurrence kept
    assert e.tolist() == [[6.0, 7.0], [2.0, 3.0], [0.0, 1.0]]
    e, k = gather_embeddings(emb, ["b", "a", "b", "c", "a"])
    assert k == ["a", "b", "c"] and e.tolist() == [[2.0, 3.0], [0.0, 1.0], [6.0, 7.0]]
    assert keys_to_positions(torch.tensor([3, 7, 9]), torch.tensor([9, 3, 3])).tolist() == [2, 0, 0]
    assert keys_to_positions(["x", "y"], ["y", "x"]).tolist() == [1, 0]
    with pytest.raises(KeyError):
        keys_to_positions(["x"], ["z"])


# --------------------------------------------------------------------------------------
# zero-shot


class _ToyTokenizer:
    """Each distinct string -> its own id; records what it was asked to tokenize."""

    def __init__(self):
        self.ids, self.seen = {}, []

    def __call__(self, texts):
        self.seen.extend(texts)
        return torch.tensor([[self.ids.setdefault(t, len(self.ids))] for t in texts])


def test_build_classifier_is_normalised_mean_of_template_embeddings():
    table = torch.randn(100, 4, generator=torch.Generator().manual_seed(0)) * 3.0  # not unit norm
    encode_text = lambda tokens: table[tokens[:, 0]]
    classnames = [f"class{i}" for i in range(12)]  # > open_clip's 10 classes per batch
    templates = ["a photo of a {c}.", "a {} drawing", lambda c: f"itap of {c}"]
    tok = _ToyTokenizer()
    W = build_classifier(encode_text, tok, classnames, templates)
    assert W.shape == (4, 12)
    for i, c in enumerate(classnames):
        texts = [f"a photo of a {c}.", f"a {c} drawing", f"itap of {c}"]
        embs = [table[tok.ids[t]] for t in texts]  # KeyError if a template was misformatted
        mean = sum(e / e.norm() for e in embs) / 3
        torch.testing.assert_close(W[:, i], mean / mean.norm())
    assert set(tok.seen) == {t(c) if callable(t) else t.format(c, c=c) for c in classnames for t in templates}

    # an object with .encode_text works the same
    class Model:
        def encode_text(self, tokens):
            return encode_text(tokens)

    torch.testing.assert_close(build_classifier(Model(), tok, classnames, templates), W)

    x = torch.randn(5, 4)
    torch.testing.assert_close(zeroshot_logits(3.0 * x, W), F.normalize(x, dim=-1) @ W)


def test_zeroshot_metrics_hand_computed():
    logits = torch.tensor(
        [
            [5.0, 1, 0, 0, 0, 0],  # label 0: top-1 hit
            [3.0, 2, 1, 0, -1, -2],  # label 1: rank 1 -> top-5 hit only
            [6.0, 5, 4, 3, 2, 1],  # label 5: rank 5 -> miss even at 5
            [0.0, 0, 9, 0, 0, 0],
        ]
    )  # label 2: top-1 hit
    labels = torch.tensor([0, 1, 5, 2])
    m = ZeroShotMetrics(6)
    m.update(logits[:2], labels[:2])
    m.update(logits[2:], labels[2:])
    out = m.compute()
    assert out["top1"].item() == pytest.approx(0.5)
    assert out["top5"].item() == pytest.approx(0.75)
    # per class: 0 -> 1/1, 1 -> 0/1, 2 -> 1/1, 3 and 4 have no samples -> 0, 5 -> 0/1
    assert out["per_class"].tolist() == pytest.approx([1, 0, 1, 0, 0, 0])
    assert out["num_images"].item() == 4
    m.reset()
    assert m.compute()["num_images"].item() == 0
    m3 = ZeroShotMetrics(3)  # fewer than 5 classes: top-5 = top-3
    m3.update(torch.tensor([[0.0, 1, 2], [2.0, 1, 0]]), torch.tensor([0, 1]))
    out = m3.compute()
    assert out["top1"].item() == 0.0 and out["top5"].item() == 1.0


def test_eval_set_yaml_typo_names_the_key_and_the_closest_one(tmp_path):
    """A misspelt key in a set's yaml (`lable_key`) would fall back to the default key and
    score the wrong field: it is refused, naming the closest key."""
    import yaml

    from siglip2.eval.suite import load_eval_set

    spec = {
        "name": "mine",
        "task": "zeroshot",
        "urls": "x-{000..001}.tar",
        "classnames": ["a", "b"],
        "lable_key": "cls",
        "num_samples": 10,
    }
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ValueError, match=r"'lable_key' \(did you mean 'label_key'\?\)"):
        load_eval_set(path)
    spec["label_key"] = spec.pop("lable_key")
    path.write_text(yaml.safe_dump(spec))
    es = load_eval_set(path)
    assert es.label_key == "cls" and es.num_samples == 10 and es.urls == str(tmp_path / "x-{000..001}.tar")
    path.write_text("- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        load_eval_set(path)
