"""Evaluation metrics on 2 gloo processes: after the gather every rank sees each sample once and
gets the single-process recall (the metrics themselves: tests/unit/test_eval_metrics.py)."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from siglip2.eval import gather_embeddings, keys_to_positions, retrieval_recall
from test_eval_metrics import _random_retrieval


# --------------------------------------------------------------------------------------
# 2 processes (gloo): every rank sees each sample once after the gather

WORLD = 2


def _rank_share(rank):
    """Uneven, overlapping, shuffled shares of the global eval set."""
    img, txt, t2i = _random_retrieval(n=11, m=25, seed=3)
    g = torch.Generator().manual_seed(rank)
    img_ids = torch.arange(0, 8) if rank == 0 else torch.arange(5, 11)  # 5,6,7 on both
    txt_ids = torch.arange(0, 20) if rank == 0 else torch.arange(18, 25)  # 18,19 on both
    img_ids = img_ids[torch.randperm(len(img_ids), generator=g)]
    txt_ids = txt_ids[torch.randperm(len(txt_ids), generator=g)]
    return img[img_ids], img_ids, txt[txt_ids], txt_ids, t2i[txt_ids]


def _recall_from_shares(img, img_ids, txt, txt_ids, txt_img_ids, str_keys):
    if str_keys:
        img, img_keys = gather_embeddings(img, [f"img{i:03d}" for i in img_ids.tolist()])
        txt, _, txt_img = gather_embeddings(txt, [f"txt{i:03d}" for i in txt_ids.tolist()], txt_img_ids)
        t2i = keys_to_positions(img_keys, [f"img{i:03d}" for i in txt_img.tolist()])
    else:
        img, img_keys = gather_embeddings(img, img_ids)
        txt, _, txt_img = gather_embeddings(txt, txt_ids, txt_img_ids)
        t2i = keys_to_positions(img_keys, txt_img)
    return retrieval_recall(img, txt, t2i, ks=(1, 2, 5), chunk_size=3), img.shape[0], txt.shape[0]


def _gather_worker(rank, init_method, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD)
    try:
        share = _rank_share(rank)
        out = {str_keys: _recall_from_shares(*share, str_keys=str_keys) for str_keys in (False, True)}
        # a rank with nothing to contribute (more ranks than eval shards)
        n = 3 if rank == 0 else 0
        out["empty_rank"] = gather_embeddings(torch.arange(2.0 * n).reshape(n, 2), torch.arange(n))
        out["empty_rank_str"] = gather_embeddings(torch.arange(2.0 * n).reshape(n, 2), [str(i) for i in range(n)])
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_gather_gives_single_process_recall(tmp_path):
    mp.spawn(_gather_worker, args=(f"file://{tmp_path / 'init'}", str(tmp_path)), nprocs=WORLD, join=True)
    img, txt, t2i = _random_retrieval(n=11, m=25, seed=3)
    expected = retrieval_recall(img, txt, t2i, ks=(1, 2, 5))
    for r in range(WORLD):
        got = torch.load(tmp_path / f"rank{r}.pt")
        for str_keys in (False, True):
            recall, n, m = got[str_keys]
            assert (n, m) == (11, 25)
            assert recall == expected
        emb, keys = got["empty_rank"]
        assert keys.tolist() == [0, 1, 2] and emb.tolist() == [[0, 1], [2, 3], [4, 5]]
        emb, keys = got["empty_rank_str"]
        assert keys == ["0", "1", "2"] and emb.tolist() == [[0, 1], [2, 3], [4, 5]]
