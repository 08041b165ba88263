"""The recipe chain (`experiment=recipe_*`, recipe/): overrides, hand-offs, resume
after a kill -9 anywhere, the results table, and SLURM submission with dependencies."""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from recipe.chain import flatten, hydra_value, parse_chain

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        False,
        3,
        -2.5e-4,
        1.0e-5,
        "ckpt",
        "/tmp/a b/last.ckpt",
        "hf:/models/so400m",
        "it's",
        "null",
        [32, 64, 144],
        ["a", "b c"],
        "a,b",
        "${x}",
        "1e-3",
    ],
)
def test_values_survive_hydras_override_parser(value):
    """What the chain writes on a stage's command line is read back by Hydra as the same value."""
    override = OverridesParser.create().parse_override(f"key={hydra_value(value)}")
    parsed = override.value()
    if isinstance(value, str):
        assert parsed == value and isinstance(parsed, str)
    else:
        assert parsed == value


def test_set_blocks_flatten_to_dotted_overrides():
    block = OmegaConf.create(
        {
            "model": {"vision": {"width": 192, "depth": 6}},
            "stage": {"losses": {"locca": None}},
            "trainer": {"max_steps": 3},
        }
    )
    assert flatten(block) == [
        ("model.vision.width", 192),
        ("model.vision.depth", 6),
        ("stage.losses.locca", None),
        ("trainer.max_steps", 3),
    ]


def _demo_recipe(**changes):
    cfg = OmegaConf.load(ROOT / "conf" / "experiment" / "recipe_demo.yaml").recipe
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def test_a_changed_stage_changes_its_folder_and_those_after_it_never_those_before(tmp_path):
    """Sweeps reuse finished earlier stages; a changed stage never passes for a finished one."""
    base = {s.name: s.dir for s in parse_chain(_demo_recipe(), tmp_path, [])}
    assert list(base) == ["teacher", "pretrain", "resadapt", "naflex", "acid"]
    acid = {
        s.name: s.dir
        for s in parse_chain(_demo_recipe(**{"stages.acid.set.stage.acid.filter_ratio": 0.75}), tmp_path, [])
    }
    assert [n for n in base if base[n] != acid[n]] == ["acid"]
    pre = {s.name: s.dir for s in parse_chain(_demo_recipe(**{"stages.pretrain.set.optim.lr": 1e-3}), tmp_path, [])}
    assert [n for n in base if base[n] != pre[n]] == ["pretrain", "resadapt", "naflex", "acid"]
    everywhere = {s.name: s.dir for s in parse_chain(_demo_recipe(), tmp_path, ["trainer=ddp_cpu"])}
    assert all(base[n] != everywhere[n] for n in base)
    needs = {s.name: s.needs for s in parse_chain(_demo_recipe(), tmp_path, [])}
    assert needs == {
        "teacher": [],
        "pretrain": [],
        "resadapt": ["pretrain"],
        "naflex": ["pretrain"],
        "acid": ["pretrain", "teacher"],
    }


def test_debug_makes_every_stage_a_smoke_run_unless_the_command_line_sets_its_steps(tmp_path):
    """`experiment=recipe_demo debug=fast` trained the teacher's 1,500 steps and ACID's 300
    (over 25 minutes) because a stage's own values win over the command line: under `debug=`
    the stage's own trainer.max_steps gives way to the debug config's, and a value the command
    line sets for the stage (`recipe.stages.<name>.set.trainer.max_steps`) still wins."""
    from recipe.chain import stage_overrides

    def steps(passthrough, explicit=frozenset()):
        chain = parse_chain(_demo_recipe(), tmp_path, passthrough, explicit)
        by_name = {s.name: s for s in chain}
        return {
            s.name: [a for a in stage_overrides(s, by_name, passthrough, "demo") if "max_steps" in a] for s in chain
        }

    assert steps([])["teacher"] == ["trainer.max_steps=1500"] and steps([])["acid"] == ["trainer.max_steps=300"]
    smoke = steps(["debug=fast"])
    assert all(v == [] for v in smoke.values()), smoke  # debug/fast.yaml's max_steps for every stage
    mine = steps(["debug=fast"], frozenset({"recipe.stages.teacher.set.trainer.max_steps"}))
    assert mine["teacher"] == ["trainer.max_steps=1500"] and mine["acid"] == []


def test_a_reference_to_a_later_or_unknown_stage_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="'naflex' is not an earlier stage"):
        parse_chain(_demo_recipe(**{"stages.resadapt.init_from": "ckpt:naflex/last"}), tmp_path, [])


def _chain_args(cache: Path, recipe_dir: Path, driver_dir: Path) -> list[str]:
    # debug size: every stage a few steps; each checkpoint at an epoch boundary (3 batches)
    return [
        sys.executable,
        "train.py",
        "experiment=recipe_demo",
        "debug=fast",
        f"paths.cache_dir={cache}",
        "trainer.max_steps=9",
        "eval=demo",
        "eval.max_batches=1",
        "eval.batch_size=50",
        "eval.sets=[${data.demo.root}/eval/zeroshot/zeroshot.yaml]",
        f"recipe.dir={recipe_dir}",
        f"hydra.run.dir={driver_dir}",
        "recipe.stages.teacher.set.trainer.max_steps=3",
        "recipe.stages.acid.set.trainer.max_steps=3",
        "recipe.stages.teacher.set.model.vision.depth=2",
        "recipe.stages.teacher.set.model.text.depth=2",
    ]


def _run_chain(args: list[str], **kw) -> subprocess.Popen:
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        args,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kw,
    )


def test_chain_killed_in_its_second_stage_resumes_to_the_uninterrupted_numbers(cache_dir, tmp_path):
    """`experiment=recipe_demo` at debug size: the five stages run and hand off; a kill -9 of
    the whole chain (driver and stage) at a random moment of the second stage, after its first
    checkpoint, and the same command again finish with the uninterrupted chain's numbers and
    weights, the finished first stage skipped."""
    full = _run_chain(_chain_args(cache_dir, tmp_path / "full", tmp_path / "d1"))
    log, _ = full.communicate(timeout=900)
    assert full.returncode == 0, log[-4000:]
    assert "| metric |" in log and "recipe.json written" in log
    expected = json.loads((tmp_path / "full" / "recipe.json").read_text())
    assert list(expected["stages"]) == ["teacher", "pretrain", "resadapt", "naflex", "acid"]
    for name, stage in expected["stages"].items():
        assert stage["metrics"]["zeroshot/demo_zeroshot/top1"] >= 0.0, name
        assert stage["examples_seen"] > 0 and stage["wall_s"] > 0, name
    # hand-offs: resadapt at 96 px from 95%, NaFlex from 90%, ACID from the final model + teacher
    assert expected["stages"]["resadapt"]["image_size"] == 96
    assert expected["stages"]["resadapt"]["init_from"] == "ckpt:pretrain/frac_0.95"
    assert expected["stages"]["naflex"]["init_from"] == "ckpt:pretrain/frac_0.90"
    assert expected["stages"]["pretrain"]["global_step"] == 9

    killed = _run_chain(_chain_args(cache_dir, tmp_path / "chain", tmp_path / "d2"))
    deadline = time.time() + 600
    pretrain_last = None
    while time.time() < deadline and killed.poll() is None:
        found = list((tmp_path / "chain").glob("1_pretrain-*/checkpoints/last.ckpt"))
        if found:
            pretrain_last = found[0]
            break
        time.sleep(0.1)
    assert pretrain_last is not None, killed.communicate()[0][-4000:]
    time.sleep(random.Random().uniform(0.0, 1.5))
    os.killpg(killed.pid, signal.SIGKILL)
    killed.communicate(timeout=60)
    assert not list((tmp_path / "chain").glob("2_resadapt-*/metrics.json"))  # it stopped in stage 2
    stopped = int(torch.load(pretrain_last, map_location="cpu", weights_only=True)["global_step"])
    assert stopped % 3 == 0 and 3 <= stopped <= 9

    again = _run_chain(_chain_args(cache_dir, tmp_path / "chain", tmp_path / "d3"))
    log, _ = again.communicate(timeout=900)
    assert again.returncode == 0, log[-4000:]
    assert "recipe stage teacher: finished earlier" in log
    got = json.loads((tmp_path / "chain" / "recipe.json").read_text())
    for name in expected["stages"]:
        assert got["stages"][name]["metrics"] == pytest.approx(expected["stages"][name]["metrics"], abs=1e-6), name
        assert got["stages"][name]["examples_seen"] == expected["stages"][name]["examples_seen"]
        a = torch.load(
            Path(expected["stages"][name]["dir"]) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
        )["state_dict"]
        b = torch.load(
            Path(got["stages"][name]["dir"]) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
        )["state_dict"]
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=f"{name}: {key}")
    attempts = (Path(got["stages"]["pretrain"]["dir"]) / "recipe_attempts.jsonl").read_text().splitlines()
    assert any("ckpt_path=" in line for line in attempts)  # the second attempt resumed, not restarted


FAKE_SBATCH = """#!/usr/bin/env bash
n=$(( $(cat "$FAKE_SLURM/count" 2>/dev/null || echo 100) + 1 )); echo $n > "$FAKE_SLURM/count"
cp "${@: -1}" "$FAKE_SLURM/job_$n.sh"; echo "Submitted batch job $n"
"""
FAKE_SQUEUE = """#!/usr/bin/env bash
echo PENDING
"""


def test_slurm_launcher_submits_each_stage_as_a_job_after_the_ones_it_needs(tmp_path):
    """`hydra/launcher=slurm`: one sbatch job per stage, `afterok` on its parents' jobs; a sweep
    value for the last stage submits only that stage, depending on the queued earlier jobs."""
    pytest.importorskip("submitit")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("squeue", FAKE_SQUEUE), ("srun", "#!/usr/bin/env bash\n")):
        (bindir / name).write_text(text)
        (bindir / name).chmod((bindir / name).stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", FAKE_SLURM=str(tmp_path), WANDB_MODE="disabled")
    base = [
        sys.executable,
        "train.py",
        "experiment=recipe_demo",
        "hydra/launcher=slurm",
        "trainer=gpu_ddp",
        f"recipe.dir={tmp_path / 'recipe'}",
        f"hydra.run.dir={tmp_path / 'driver'}",
    ]
    out = subprocess.run(base, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    scripts = {n: (tmp_path / f"job_{n}.sh").read_text() for n in range(101, 106)}
    assert not (tmp_path / "job_106.sh").exists()
    names = [
        next(line.split("=")[1] for line in s.splitlines() if line.startswith("#SBATCH --job-name"))
        for s in scripts.values()
    ]
    assert names == ["demo-teacher", "demo-pretrain", "demo-resadapt", "demo-naflex", "demo-acid"]
    deps = [
        next((line.split("=", 1)[1] for line in s.splitlines() if line.startswith("#SBATCH --dependency")), None)
        for s in scripts.values()
    ]
    assert deps == [None, None, "afterok:102", "afterok:102", "afterok:102:101"]
    assert all("#SBATCH --gpus-per-node=8" in s and "#SBATCH --ntasks-per-node=8" in s for s in scripts.values())
    # a sweep over ACID's filter ratio reuses the queued teacher and pretraining jobs
    out = subprocess.run(
        [*base, "+recipe.stages.acid.set.stage.acid.filter_ratio=0.75"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    new = (tmp_path / "job_106.sh").read_text()
    assert not (tmp_path / "job_107.sh").exists()
    assert "#SBATCH --job-name=demo-acid" in new and "#SBATCH --dependency=afterok:102:101" in new


@pytest.mark.parametrize(
    "experiment, stages",
    [
        ("recipe_b16", {"pretrain": 256, "resadapt": 384, "naflex": 256, "acid": 256}),
        ("recipe_so400m16", {"pretrain": 256, "resadapt": 384, "naflex": 256}),
    ],
)
def test_real_run_recipes_compose_every_stage_with_the_papers_settings(experiment, stages, tmp_path):
    """Each stage's command line of the real-run recipes composes into a valid config with the
    paper's batch (32k global on 8-GPU nodes), examples, lr and resolutions [P §2.1, §2.4, §2.5]."""
    from hydra import compose, initialize_config_dir

    from recipe.chain import stage_overrides

    user = [
        'data.train="/shards/{0000..0009}.tar"',
        "tokenizer.path=/models/tokenizer.model",
        "data.balance_table=/tables/keep.tsv",
    ]  # an M4 table (issue 30) reaches every stage
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        recipe = compose(
            "train",
            overrides=[
                f"experiment={experiment}",
                f"paths.root_dir={tmp_path}",
                "recipe.stages.acid.set.stage.acid.teacher=hf:/models/so400m",
            ]
            if "acid" in stages
            else [f"experiment={experiment}", f"paths.root_dir={tmp_path}"],
        ).recipe
        chain = parse_chain(recipe, tmp_path, user)
        by_name = {s.name: s for s in chain}
        assert list(by_name) == list(stages)
        for stage in chain:
            args = [a for a in stage_overrides(stage, by_name, user, experiment) if not a.startswith("hydra.")]
            cfg = compose("train", overrides=[*args, f"paths.output_dir={tmp_path}", f"paths.root_dir={tmp_path}"])
            assert cfg.stage.name == stage.name
            assert cfg.model.vision.image_size == stages[stage.name]
            nodes = {"recipe_b16": 32, "recipe_so400m16": 64}[experiment]
            assert cfg.data.batch_size * 8 * nodes == 32768
            assert cfg.tokenizer.path == "/models/tokenizer.model" and cfg.trainer.accelerator == "gpu"
            assert cfg.data.balance_table == "/tables/keep.tsv"
            if stage.name == "pretrain":
                assert cfg.trainer.max_steps * 32768 == pytest.approx(40e9, rel=1e-4)
                assert cfg.optim.lr == 1e-3 and cfg.optim.warmup_steps == 20000
            if stage.name == "acid":
                assert cfg.stage.optim_overrides.lr == 1e-5 and cfg.stage.acid.filter_ratio == 0.5
                assert cfg.stage.acid.teacher == "hf:/models/so400m"
                assert cfg.trainer.max_steps * 32768 == pytest.approx(4e9, rel=1e-4)
            if stage.name in ("resadapt", "naflex"):
                ref = {"resadapt": "frac_0.95", "naflex": "frac_0.90"}[stage.name]
                assert cfg.init_from.endswith(f"0_pretrain-{by_name['pretrain'].key}/checkpoints/{ref}.ckpt")


def test_a_run_resumed_from_its_final_checkpoint_still_writes_its_evaluation(cache_dir, tmp_path):
    """A stage killed during its final evaluation resumes from a last.ckpt at max_steps:
    Lightning skips training (and on_train_end), yet metrics.json must carry the numbers."""
    env = dict(os.environ, WANDB_MODE="disabled")
    common = [
        sys.executable,
        "train.py",
        "debug=fast",
        f"paths.cache_dir={cache_dir}",
        "trainer.max_steps=3",
        "eval=demo",
        "eval.max_batches=1",
        "eval.batch_size=50",
        "eval.sets=[${data.demo.root}/eval/zeroshot/zeroshot.yaml]",
    ]
    first = subprocess.run(
        [*common, f"hydra.run.dir={tmp_path / 'a'}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert first.returncode == 0, first.stderr[-3000:]
    again = subprocess.run(
        [*common, f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={tmp_path / 'b'}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert b["global_step"] == 3 and b["zeroshot/demo_zeroshot/top1"] == a["zeroshot/demo_zeroshot/top1"]
