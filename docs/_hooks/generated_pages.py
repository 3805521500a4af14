"""MkDocs hook: pages generated at build time from the repository, so they cannot drift from it.

- ``reference/configuration.md``: every file under ``conf/`` (the Hydra configs of the CLIs), its opening
  comment, a table of its keys (default and the comment on the key's line) and the file itself;
- ``results.md``: ``benchmarks/RESULTS.md`` as it is.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
# the CLI each top-level config belongs to, in the order the page lists them
COMMANDS = {"eval": "python -m parapolicy.eval", "bench": "python -m parapolicy.bench",
            "serve": "python -m parapolicy.serve", "serve_bench": "python -m parapolicy.serve_bench",
            "train": "python -m parapolicy.train", "collect": "python -m parapolicy.collect"}
GROUPS = {"env": "Tasks (`env=<name>` in every command)",
          "sampler": "Samplers (`sampler=<name>`; `baseline=<name>` in the eval)",
          "preset": "Bench presets (`preset=<name>` in `python -m parapolicy.bench`)",
          "hydra/launcher": "Hydra launchers (`hydra/launcher=<name>` with `-m`)"}
KEY_LINE = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z_][\w.\-]*):(?P<rest>.*)$")


def _split_comment(text: str) -> tuple[str, str]:
    """``value  # comment`` -> (value, comment); a ``#`` inside quotes or ``${...}`` is not a comment."""
    quote, depth = None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "#" and depth == 0 and (i == 0 or text[i - 1].isspace()):
            return text[:i].strip(), text[i + 1:].strip()
    return text.strip(), ""


def _cell(text: str, html: bool = False) -> str:
    text = text.replace("|", "\\|")
    if not html:  # inside backticks
        return text
    # prose: "[a=b]" is not a link, "<dir>" not a tag
    return text.replace("[", "\\[").replace("]", "\\]").replace("<", "&lt;").replace(">", "&gt;")


def describe(path: Path) -> tuple[str, list[tuple[str, str, str]]]:
    """(the file's opening comment, [(dotted key, default, comment)]) of one YAML config, read line by
    line so the comments survive; comment-only lines after a key continue its comment."""
    lines = path.read_text().splitlines()
    intro = []
    while lines and lines[0].startswith("#"):
        intro.append(lines.pop(0).lstrip("#").strip())
    rows: list[list[str]] = []
    parents: list[tuple[int, str]] = []
    last_indent, header = 0, ""
    for line in lines:
        if not line.strip():
            continue
        if line.lstrip().startswith("#"):
            text = line.strip().lstrip("#").strip()
            if rows and len(line) - len(line.lstrip()) > last_indent:  # under the comment column: continues it
                rows[-1][2] = (rows[-1][2] + " " + text).strip()
            else:  # at the keys' indentation: a heading for the keys that follow
                header = (header + " " + text).strip()
            continue
        if line.lstrip().startswith("- "):  # a list item (Hydra's defaults list): shown in the file itself
            continue
        match = KEY_LINE.match(line)
        if not match:
            continue
        indent = len(match["indent"])
        while parents and parents[-1][0] >= indent:
            parents.pop()
        value, comment = _split_comment(match["rest"])
        last_indent = indent
        if header:
            comment, header = f"{header} {comment}".strip(), ""
        key = ".".join([p for _, p in parents] + [match["key"]])
        if key == "defaults" or key.startswith("hydra.") or key == "hydra":
            parents.append((indent, match["key"]))
            continue
        if value == "":  # a mapping: its children follow
            parents.append((indent, match["key"]))
            rows.append([key, "", comment])
            continue
        rows.append([key, value, comment])
    return " ".join(intro), [tuple(r) for r in rows]


def _section(path: Path, title: str, level: str) -> str:
    intro, rows = describe(path)
    rel = path.relative_to(ROOT).as_posix()
    out = [f"{level} {title}", "", f"`{rel}`" + (f": {_cell(intro, html=True)}" if intro else ""), ""]
    if rows:
        out += ["| key | default | meaning |", "|---|---|---|"]
        out += [f"| `{_cell(k)}` | {'`' + _cell(v) + '`' if v else ''} | {_cell(c, html=True)} |" for k, v, c in rows]
        out.append("")
    out += [f'??? note "{rel}"', "", "    ```yaml"]
    out += ["    " + line for line in path.read_text().splitlines()]
    out += ["    ```", ""]
    return "\n".join(out)


def configuration_page() -> str:
    out = ["# Configuration reference", "",
           "Generated from `conf/` when the site is built: every key with its default and the comment "
           "beside it in the file. Override any key on the command line (`key=value`, "
           "`group.key=value`), pick a group's file with `group=<name>`; Hydra's "
           "[override grammar](https://hydra.cc/docs/advanced/override_grammar/basic/) applies.", ""]
    listed = set()
    out += ["## Commands", ""]
    for name, command in COMMANDS.items():
        path = CONF / f"{name}.yaml"
        if path.exists():
            listed.add(path)
            out.append(_section(path, f"`{command}`", "###"))
    for path in sorted(CONF.glob("*.yaml")):  # a config added later, not in COMMANDS
        if path not in listed:
            out.append(_section(path, f"`{path.stem}`", "###"))
    for group, title in GROUPS.items():
        files = sorted((CONF / group).glob("*.yaml"))
        if files:
            out += [f"## {title}", ""]
            out += [_section(path, f"`{group.split('/')[-1]}={path.stem}`", "###") for path in files]
    extra = sorted({p.parent.relative_to(CONF).as_posix() for p in CONF.rglob("*.yaml")} - set(GROUPS) - {"."})
    for group in extra:  # a group added later
        out += [f"## `{group}`", ""]
        out += [_section(path, f"`{path.stem}`", "###") for path in sorted((CONF / group).glob("*.yaml"))]
    return "\n".join(out)


def on_files(files, config):
    from mkdocs.structure.files import File

    files.append(File.generated(config, "reference/configuration.md", content=configuration_page()))
    files.append(File.generated(config, "results.md", content=(ROOT / "benchmarks" / "RESULTS.md").read_text()))
    return files


def on_config(config):
    # rebuild when a config or the results change (`mkdocs serve`)
    config.watch.extend([str(CONF), str(ROOT / "benchmarks" / "RESULTS.md")])
    return config
