"""The README and docs/ stay true: the README's two set-up-and-go commands match what .ci/run does, the README
is a short front door, every link, anchor and file path on a page exists, every `qcompile` command a page
shows composes and validates against the recipe schema, every `python bench/...` command names a real script
and its real flags, and the tables that mirror the code (step x target, recipes, exit codes) match it."""

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from compiler.commands.cli import SUBCOMMANDS
from compiler.core.paths import RECIPES_DIR
from compiler.core.status import EXIT_CODES

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README] + sorted((REPO / "docs").rglob("*.md"))
MAX_README_LINES = 300


def _rel(page: Path) -> str:
    return str(page.relative_to(REPO))


def _top_commands():
    text = README.read_text()
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


def test_readme_is_a_short_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines (at most {MAX_README_LINES}): move detail to a page in docs/ "
        "(docs/README.md says which) and link it")


# --- links, anchors and paths ----------------------------------------------------------------------------

def _without_code(text: str) -> str:
    """The page without fenced code blocks (a `#` comment in a bash block is not a heading)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (word characters, spaces and hyphens
    kept), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set:
    seen: dict = {}
    anchors = set()
    for m in re.finditer(r"^#{1,6} +(.+?) *#*$", _without_code(page.read_text()), flags=re.M):
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        anchors.add(slug if n == 0 else f"{slug}-{n}")  # GitHub numbers repeated headings
        seen[slug] = n + 1
    return anchors


def _links(page: Path):
    for m in re.finditer(r"!?\[[^\]]*\]\(([^)\s]+)\)", _without_code(page.read_text())):
        yield m.group(1)


def test_slug_matches_github():
    assert _slug("Measured: `+sweep=formats` on MiniLM") == "measured-sweepformats-on-minilm"
    assert _slug("Layers by role, not by name") == "layers-by-role-not-by-name"
    assert _slug("TensorRT (`target=trt`) and GPU machines") == "tensorrt-targettrt-and-gpu-machines"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_relative_link_resolves(page):
    bad = []
    for link in _links(page):
        if re.match(r"[a-z]+:", link):  # https:, mailto: ...: not ours to check offline
            continue
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            bad.append(f"{link}: no file {target.relative_to(REPO) if target.is_relative_to(REPO) else target}")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            bad.append(f"{link}: no heading with anchor #{anchor} in {_rel(target)}")
    assert not bad, f"{_rel(page)} has broken links:\n" + "\n".join(bad)


def test_every_docs_page_is_linked_from_the_readme_or_the_docs_index():
    linked = set()
    for page in (README, REPO / "docs" / "README.md"):
        for link in _links(page):
            linked.add((page.parent / link.partition("#")[0]).resolve())
    orphans = [_rel(p) for p in PAGES[1:] if p.resolve() not in linked and p.name != "README.md"]
    assert not orphans, f"docs pages nobody links to: {orphans}"


PATH_IN_BACKTICKS = re.compile(r"`((?:compiler|targets|tests|bench|recipes|docs|\.ci)/[^`\s]*)`")


def _expand(path: str):
    """`bench/results/x.{md,png}` -> both files."""
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [p for alt in m.group(1).split(",") for p in _expand(path[:m.start()] + alt + path[m.end():])]


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_every_file_path_a_page_names_exists(page):
    """`compiler/stages/check.py`, `tests/...`, `bench/results/...`: a path named in backticks exists (a
    placeholder like `compiler/steps/<name>.py` or `steps/*.py` is not a path)."""
    missing = []
    for m in PATH_IN_BACKTICKS.finditer(page.read_text()):
        raw = m.group(1).rstrip(".,:;")
        if any(c in raw for c in "<>*") or "..." in raw:
            continue
        missing += [p for p in _expand(raw) if not (REPO / p.split("::")[0]).exists()]
    assert not missing, f"{_rel(page)} names files that do not exist: {sorted(set(missing))}"


# --- commands ------------------------------------------------------------------------------------------------

def _shell_lines(page: Path):
    """Each command line of the page's bash blocks: continuations joined, comments dropped."""
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                yield line


def _words(line: str):
    return shlex.split(line, comments=True)


def _qcompile_commands():
    for page in PAGES:
        for line in _shell_lines(page):
            for part in line.split("&&"):
                words = _words(part)
                if words and words[0] == "qcompile":
                    yield pytest.param(words[1:], id=f"{_rel(page)}: {shlex.join(words)[:90]}")


# launcher presets whose Hydra plugin is not a qcompile dependency (docs/sweeps.md: install the one you use)
PLUGIN_LAUNCHERS = {"slurm": "hydra_plugins.hydra_submitit_launcher", "ray_cluster": "hydra_plugins.hydra_ray_launcher"}


def _plugin_missing(overrides) -> str:
    for o in overrides:
        if o.startswith("hydra/launcher="):
            module = PLUGIN_LAUNCHERS.get(o.split("=", 1)[1])
            if module and importlib.util.find_spec(module.split(".")[0]) and importlib.util.find_spec(module):
                return ""
            if module:
                return module
    return ""


def _sweep_jobs(overrides):
    """Each value of each sweep (`key=a,b`, `choice(...)`) once, the other keys at their first value, as the
    CLI checks a multirun before its first job; `glob(...)` and `interval(...)` are left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices = []
    for o in OverridesParser.create().parse_overrides(overrides):
        if not o.is_sweep_override():
            choices.append([o.input_line])
            continue
        try:
            choices.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()])
        except Exception:  # glob(), interval(): expanded by Hydra or the sweeper
            choices.append([None])
    firsts = [c[0] for c in choices]
    jobs = [firsts] + [firsts[:i] + [v] + firsts[i + 1:] for i, c in enumerate(choices) for v in c[1:]]
    return [[o for o in job if o is not None] for job in jobs]


@pytest.mark.parametrize("args", list(_qcompile_commands()))
def test_every_qcompile_command_on_a_page_is_valid(args):
    """A subcommand exists; a build or sweep composes with Hydra as the CLI does (each sweep value once) and
    passes validation (schema, step x target capabilities, the model's shape) unless it names a placeholder
    (`<run>`, `/path/to/...`), which can only be composed."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from compiler.stages.validate import validate

    if args and not args[0].startswith("-") and "=" not in args[0]:
        assert args[0] in SUBCOMMANDS, f"qcompile has no subcommand {args[0]!r} (it has {', '.join(SUBCOMMANDS)})"
        return
    multirun = bool(args) and args[0] in ("-m", "--multirun")
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    assert all("=" in o for o in overrides), f"not key=value overrides: {overrides}"
    missing = _plugin_missing(overrides)
    if missing:
        pytest.skip(f"the launcher plugin {missing} is not installed (not a qcompile dependency)")
    placeholder = any("<" in o or "/path/" in o for o in overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(RECIPES_DIR), version_base="1.3", job_name="qcompile"):
            for job in (_sweep_jobs(overrides) if multirun else [overrides]):
                cfg = compose("config", overrides=job, return_hydra_config=True)
                if not placeholder:
                    validate(cfg)
    finally:
        GlobalHydra.instance().clear()


def _bench_commands():
    for page in PAGES:
        text = page.read_text()
        lines = list(_shell_lines(page)) + re.findall(r"`(python bench/[^`]+)`", text)
        for line in lines:
            for part in line.split("&&"):
                words = _words(part)
                if len(words) >= 2 and words[0] == "python" and words[1].startswith("bench/"):
                    yield pytest.param(words[1:], id=f"{_rel(page)}: {shlex.join(words)[:90]}")


@pytest.mark.parametrize("args", list(_bench_commands()))
def test_every_bench_command_on_a_page_names_a_real_script_and_flags(args):
    script = REPO / args[0]
    assert script.is_file(), f"no script {args[0]}"
    source = script.read_text()
    for flag in (a.split("=", 1)[0] for a in args[1:] if a.startswith("--")):
        assert f'"{flag}"' in source, f"{args[0]} has no option {flag}"


def test_bench_blocks_live_on_the_pages_their_scripts_rewrite():
    """bench/speed.py and bench/accuracy_table.py rewrite a marked block of one docs page (`--readme`)."""
    for script in ("bench/speed.py", "bench/accuracy_table.py"):
        source = (REPO / script).read_text()
        page = re.search(r'^PAGE = "([^"]+)"', source, flags=re.M).group(1)
        begin, end = re.search(r'^BEGIN, END = "([^"]+)", "([^"]+)"', source, flags=re.M).groups()
        text = (REPO / page).read_text()
        assert text.count(begin) == 1 and text.count(end) == 1, f"{page} needs one {begin} ... {end} block"
        assert text.index(begin) < text.index(end)


# --- tables that mirror the code ----------------------------------------------------------------------------

def test_readme_step_table_is_what_qcompile_capabilities_prints(capsys):
    from compiler.commands.subcommands import capabilities

    capabilities([])
    printed = capsys.readouterr().out.strip().splitlines()
    text = README.read_text().splitlines()
    start = text.index(printed[0])
    assert text[start:start + len(printed)] == printed, "README's step x target table: paste `qcompile capabilities`"


def test_readme_lists_every_shipped_recipe_model_and_target():
    text = README.read_text()
    for label, group in (("Recipes", "recipe"), ("Models", "model"), ("Targets", "target")):
        line = next(ln for ln in text.splitlines() if ln.startswith(f"{label}: "))
        listed = set(re.findall(r"`([a-z0-9_]+)`", line))  # `model.path=` is no name: the pattern skips it
        shipped = {p.stem for p in (RECIPES_DIR / group).glob("*.yaml")}
        assert listed == shipped, f"README {label}: lists {sorted(listed)}, recipes/{group}/ has {sorted(shipped)}"


def test_exit_codes_on_the_pages_are_the_codes_the_cli_uses():
    codes = set(EXIT_CODES.values())
    readme_line = next(ln for ln in README.read_text().splitlines() if ln.startswith("Exit codes:"))
    assert set(int(c) for c in re.findall(r"\b(\d+) [a-z]", readme_line)) == codes
    table = re.findall(r"^\| (\d+) \|", (REPO / "docs" / "bad-input.md").read_text(), flags=re.M)
    assert set(int(c) for c in table) == codes
