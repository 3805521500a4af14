"""The docs' configuration reference (generated from ``conf/`` at build time) lists every key of every
config with its default, so a key added to a config cannot be missing from the site."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("generated_pages", ROOT / "docs" / "_hooks" / "generated_pages.py")
pages = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pages)


def flat_keys(cfg: DictConfig, prefix: str = "") -> dict[str, str]:
    """``{dotted key: default as written}`` (mappings: ""), without Hydra's ``defaults`` and ``hydra``."""
    out = {}
    for key in cfg.keys():
        if not prefix and key in ("defaults", "hydra"):
            continue
        node = cfg._get_node(key)
        name = f"{prefix}{key}"
        if isinstance(node, DictConfig) and len(node) and not node._is_interpolation():
            out[name] = ""
            out.update(flat_keys(node, name + "."))
        else:
            out[name] = OmegaConf.to_container(node) if isinstance(node, (DictConfig, ListConfig)) else node._value()
    return out


def test_every_config_key_is_in_the_reference_with_its_default():
    files = sorted((ROOT / "conf").rglob("*.yaml"))
    assert len(files) > 15
    for path in files:
        rows = {key: default for key, default, _ in pages.describe(path)[1]}
        expected = flat_keys(OmegaConf.load(path))
        # a mapping written in flow style ({a: 1}) is one row with its value: its keys are in that value
        inline = {key for key, default in rows.items() if default.startswith("{")}
        expected = {k: v for k, v in expected.items() if not any(k.startswith(p + ".") for p in inline)}
        for key in inline:
            expected[key] = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
            for part in key.split("."):
                expected[key] = expected[key][part]
        assert set(rows) == set(expected), path
        for key, value in expected.items():
            if value != "":  # a mapping's row has no default
                assert yaml.safe_load(rows[key]) == value, (path, key, rows[key], value)

def test_the_page_has_a_section_per_config_and_escapes_table_text():
    page = pages.configuration_page()
    for path in sorted((ROOT / "conf").rglob("*.yaml")):
        assert f"`{path.relative_to(ROOT).as_posix()}`" in page
    assert pages._cell("a | b <dir> [x=1]", html=True) == "a \\| b &lt;dir&gt; \\[x=1\\]"
    assert pages._split_comment("'a # b'  # the comment") == ("'a # b'", "the comment")
    assert pages._split_comment("${now:%Y-%m-%d#x}") == ("${now:%Y-%m-%d#x}", "")
