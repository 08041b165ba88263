"""What every stage shares: which parameters are decayed and the learning-rate schedule."""
import math

import torch

from stages.base import no_decay, warmup_cosine
from siglip2.model import build_model


def test_decay_groups_follow_the_recipe():
    model = build_model({"vision": dict(width=16, depth=1, mlp_dim=32, heads=2, patch_size=4, posemb_grid=2,
                                        image_size=8),
                         "text": dict(width=16, depth=1, mlp_dim=32, heads=2, vocab_size=10, max_len=4)})
    kept = {n for n, p in model.named_parameters() if no_decay(n, p)}
    decayed = {n for n, p in model.named_parameters() if not no_decay(n, p)}
    assert {"logit_scale", "logit_bias", "vision_model.head.probe",
            "vision_model.embeddings.position_embedding.weight",
            "text_model.embeddings.token_embedding.weight", "vision_model.post_layernorm.weight"} <= kept
    assert {"vision_model.embeddings.patch_embedding.weight", "text_model.head.weight",
            "vision_model.encoder.layers.0.mlp.fc1.weight"} <= decayed
    assert all(not n.endswith(".bias") for n in decayed)


def test_warmup_then_cosine_matches_closed_form():
    total, warm = 100, 10
    assert warmup_cosine(0, total, warm, 0.0) == 0.1
    assert warmup_cosine(9, total, warm, 0.0) == 1.0
    assert math.isclose(warmup_cosine(55, total, warm, 0.0), 0.5)      # halfway through the cosine
    assert math.isclose(warmup_cosine(100, total, warm, 0.1), 0.1)     # floor at min_lr_ratio
