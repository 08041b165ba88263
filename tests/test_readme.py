"""The README's first two commands are what a new user runs and what CI runs (.ci/run)."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, re.S)]


def test_readme_opens_with_the_main_job_then_the_test_command():
    text = (ROOT / "README.md").read_text()
    first, second = bash_blocks(text)[:2]
    assert first.startswith("python3 -m venv .venv") and "pip install -e ." in first
    assert first.endswith("&& python train.py"), first  # the main job with its defaults, no overrides
    assert second.startswith("python3 -m venv .venv") and "pip install -e '.[dev]'" in second
    assert second.endswith("&& pytest"), second
    assert text.index("<!-- test-command -->") < text.index(second)


def test_ci_extracts_exactly_the_readme_test_command():
    """.ci/run's sed pipeline, run on the README, yields the second block verbatim."""
    script = (ROOT / ".ci" / "run").read_text()
    extract = re.search(r"cmd=\$\((.*)\)\n", script).group(1)
    out = subprocess.run(["bash", "-c", extract], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == bash_blocks((ROOT / "README.md").read_text())[1]
