"""Command-line overrides are checked before anything runs (issue 27 item 5): an unknown key
names the closest one, a typo added with `+` is caught, a value of the wrong type names the
key and the type; what is valid passes (README and docs/ commands: tests/e2e/test_readme.py;
train.py itself: tests/e2e/test_overrides_e2e.py)."""

from __future__ import annotations

import pytest

from stages.overrides import check_overrides


@pytest.mark.parametrize(
    "argv, message",
    [
        (["data.batch_szie=32"], "unknown key 'data.batch_szie' (did you mean 'data.batch_size'?)"),
        (["+data.batch_szie=32"], "'+data.batch_szie' adds a key next to 'data.batch_size': a typo?"),
        (["+model.vision.widht=64"], "'+model.vision.widht' adds a key next to 'model.vision.width'"),
        (["optim.lr=abc"], "optim.lr=abc: expected a number"),
        (["sed=3"], "unknown key 'sed' (did you mean 'seed'?)"),
        (["trainer.max_stpes=10"], "did you mean 'trainer.max_steps'?"),
        (["stage=naflex", "stage.naflex.seq_len=[64]"], "did you mean 'stage.naflex.seq_lens'?"),
        (["model=b16", "model.vision.widht=64"], "did you mean 'model.vision.width'?"),  # checked against b16
        (["stage.losses.sigmoid.nominal_negatives=no"], "expected a boolean"),
        # Hydra's grammar rejects these: the override and its quoting are named, not only the token
        (
            ["data=webdataset", "data.train=/d/{000..009}.tar"],
            "could not parse the override 'data.train=/d/{000..009}.tar'",
        ),
        (["data.batch_size=[1,"], "\"data.batch_size='[1,'\""),
        (["model=tinyy"], "conf/model/ has no 'tinyy' (did you mean 'model=tiny'?)"),
        (["data=webdatset"], "did you mean 'data=webdataset'?"),
        # your own shards with the default (the demo's) tokenizer: said before Hydra's interpolation error
        (["data=webdataset", 'data.train="/d/{000..009}.tar"'], "this data config builds no demo: name yours"),
        (
            ["debug=fast", "data=webdataset", 'data.train="/d/{000..009}.tar"'],
            "tokenizer=sentencepiece tokenizer.path=",
        ),
    ],
)
def test_typos_and_bad_values_are_named(argv, message):
    problems = check_overrides("train", argv)
    assert len(problems) == 1 and message in problems[0], problems


@pytest.mark.parametrize(
    "argv",
    [
        ["optim.lr=1e-3"],
        ["optim.lr=1e-3,3e-4"],
        ["trainer.devices=auto"],
        ["trainer.devices=[0,3]"],
        ["+trainer.profiler=simple"],
        ["+stage.losses.probe.start_frac=0.5"],
        ["stage.losses.locca=null"],
        [
            "data=webdataset",
            'data.train="/data/{00000..00999}.tar"',
            "tokenizer=sentencepiece",
            "tokenizer.path=/t.model",
        ],
        ["seed=3"],
        ["init_from=/x.ckpt"],
        ["stage=naflex", "stage.naflex.seq_lens=[64]", "stage.clock.lr=rewarm"],
        ["~callbacks.lr_monitor"],
        ["data=webdataset", "data.train='/d/{000..009}.tar'", "tokenizer=hf", "tokenizer.path=/folder"],
        ["model=b16,tiny"],
    ],
)
def test_valid_overrides_pass(argv):
    assert check_overrides("train", argv) == []


def test_a_repeated_key_and_a_required_value_are_named():
    """The shell expands an unquoted `data.train=/x/{0..2}.tar` into three overrides of which
    Hydra keeps the last (one shard trained, silently); eval.py without ckpt_path."""
    problems = check_overrides(
        "train",
        [
            "data=webdataset",
            "data.train=/x/0.tar",
            "data.train=/x/1.tar",
            "tokenizer=sentencepiece",
            "tokenizer.path=/t.model",
        ],
    )
    assert len(problems) == 1 and "'data.train' is given 2 times" in problems[0] and "Quote it" in problems[0]
    # a key given again with another value is how the recipe driver lets a stage's own value win
    assert check_overrides("train", ["trainer.max_steps=9", "trainer.max_steps=1500"]) == []
    assert check_overrides("eval", []) == ["'ckpt_path' has no default and is required: add ckpt_path=..."]
    assert check_overrides("eval", ["ckpt_path=/x.ckpt"]) == []
    assert check_overrides("train", ["tokenizer=gemma"]) == [
        "'tokenizer.path' has no default and is required: add tokenizer.path=..."
    ]


@pytest.mark.parametrize(
    "values, key",
    [
        ({"window": [0.9, 0.5]}, "stage.clock.window"),
        ({"window": [0.1]}, "stage.clock.window"),
        ({"stretch": 0}, "stage.clock.stretch"),
        ({"examples": 0}, "stage.clock.examples"),
        ({"lr": "cosine"}, "stage.clock.lr"),
        ({"rewarm_warmup": 1.0}, "stage.clock.rewarm_warmup"),
        ({"rewarm_peak": -1}, "stage.clock.rewarm_peak"),
    ],
)
def test_a_bad_recipe_window_value_names_its_key(values, key):
    from siglip2.config import from_dict
    from siglip2.schedule import ClockWindow

    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        from_dict(ClockWindow, values, "stage.clock")
    assert from_dict(ClockWindow, {"window": [0.9, 1]}, "stage.clock").window == (0.9, 1.0)


@pytest.mark.parametrize(
    "argv, moved",
    [
        (["stage.recipe.lr=rewarm"], "'stage.recipe.lr' moved to 'stage.clock.lr'"),
        (["callbacks.zeroshot_eval=null"], "'callbacks.zeroshot_eval' moved to 'callbacks.eval_suite'"),
    ],
)
def test_renamed_keys_name_their_new_place(argv, moved):
    """`siglip2.config.MOVED`: a key from before a rename (`stage.recipe` is `stage.clock`, the
    evaluation callback `eval_suite`) is answered with where it lives now, on the command line
    and in the typed config alike."""
    from siglip2.config import from_dict
    from siglip2.schedule import ClockWindow

    assert check_overrides("train", argv) == [moved]
    from siglip2.config import moved_to

    assert moved_to("stage.recipe") == "stage.clock" and moved_to("stage.recipes.x") is None
    with pytest.raises(ValueError, match="'stage.clock.windw' \\(did you mean 'stage.clock.window'"):
        from_dict(ClockWindow, {"windw": [0, 1]}, "stage.clock")


@pytest.mark.parametrize(
    "argv, seq_len, naflex",
    [
        (["stage=naflex"], 64, True),  # the tiny model's naflex_eval_seq_len: NaFlex stages evaluate as they train
        (["stage=naflex", "eval.naflex_seq_len=null"], None, True),  # an explicit null stays square views
        (["stage=naflex", "eval.naflex_seq_len=96"], 96, True),
        (["stage=pretrain"], None, False),
    ],
)
def test_what_the_stage_asks_of_loader_and_eval_reaches_them(argv, seq_len, naflex):
    """The data and eval groups read no `stage.*`: `stages.runner` hands the data module the
    stage's LocCa targets, NaFlex plan and ACID share, and resolves `eval.naflex_seq_len=auto`."""
    from hydra import compose, initialize_config_dir

    from stages.overrides import CONF
    from stages.runner import resolve_eval_seq_len, stage_data_inputs

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=argv)
    resolve_eval_seq_len(cfg)
    assert cfg.eval.naflex_seq_len == seq_len
    inputs = stage_data_inputs(cfg)
    assert (inputs["naflex"] is not None) == naflex and inputs["filter_ratio"] == 0.0
    if naflex:
        assert inputs["naflex"]["seq_lens"] == [32, 64, 144, 196, 256]
    assert inputs["locca_targets"]["bins"] == 500 and inputs["locca_targets"]["max_len"] == 40
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        acid = compose("train", overrides=["stage=acid"])
    assert stage_data_inputs(acid)["filter_ratio"] == acid.stage.acid.filter_ratio > 0
