"""The README's two set-up-and-go commands stay true: .ci/run installs and tests the same way."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _top_commands():
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return blocks[0].strip(), blocks[1].strip()


def test_first_command_installs_and_runs_the_main_job():
    install, _ = _top_commands()
    assert install.startswith("python3 -m venv .venv && . .venv/bin/activate")
    assert "pip install -e '.[dev]'" in install
    assert install.endswith("&& qcompile")  # the defaults: model=minilm recipe=int8_static target=ort
    config = (REPO / "recipes" / "config.yaml").read_text()
    for default in ("model: minilm", "recipe: int8_static", "target: ort"):
        assert f"- {default}" in config


def test_ci_runs_the_readme_install_and_test_commands():
    install, test = _top_commands()
    ci = (REPO / ".ci" / "run").read_text()
    assert "python3 -m venv .venv" in ci and ". .venv/bin/activate" in ci
    assert "pip install -q -e '.[dev]'" in ci
    test_cmd = test.split("&&")[-1].strip()
    assert test_cmd == "python -m pytest -q"
    assert test_cmd in ci.splitlines()[-1]
