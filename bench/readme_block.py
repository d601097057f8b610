"""What the bench scripts share: the recipe the CLI would build (Hydra compose of recipes/, no weights load) and
rewriting one marked block of a documentation page (docs/speed.md, docs/accuracy.md) with a script's result."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def compose(overrides: list[str]):
    """The config `qcompile <overrides>` would build, composed from recipes/ (for validation only)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "recipes"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    OmegaConf.set_struct(cfg, False)
    cfg.pop("hydra", None)
    return cfg


def write_block(page: str, text: str, begin: str, end: str, what: str) -> None:
    """Replace what lies between the `begin` and `end` markers of `page` (a path from the repository root,
    e.g. docs/speed.md) with text."""
    doc = REPO / page
    old = doc.read_text()
    if begin not in old or end not in old:
        raise SystemExit(f"{page} has no {begin} ... {end} block to rewrite")
    head, rest = old.split(begin, 1)
    doc.write_text(head + begin + "\n" + text + "\n" + end + rest.split(end, 1)[1])
    print(f"rewritten: {doc} ({what})")
