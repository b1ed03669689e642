"""The report's prose: Markdown templates under ``templates/``, one file per section, filled by name.

A template file holds named blocks, each opened by a line ``<!-- name -->`` and running to the next such line;
text before the first block is a note for whoever edits the file and is never rendered. Placeholders are
:class:`string.Template`'s ``${name}``; a literal ``$`` is written ``$$``. Paragraphs stay on one line each,
so the report has the same lines whatever the file's layout. The files ship as package data.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from string import Template

__all__ = ["render", "template_blocks"]

_BLOCK = re.compile(r"^<!-- (\w+) -->$", re.MULTILINE)


@cache
def template_blocks(section: str) -> dict[str, str]:
    """The blocks of ``templates/<section>.md`` by name, blank lines around each stripped.

    Args:
        section: the file's name without ``.md``.

    Raises:
        ValueError: no such template, a file without blocks, or a block name used twice.
    """
    path = resources.files(__package__) / "templates" / f"{section}.md"
    if not path.is_file():
        raise ValueError(f"no report template '{section}.md' in {resources.files(__package__) / 'templates'}")
    text = path.read_text(encoding="utf-8")
    marks = list(_BLOCK.finditer(text))
    if not marks:
        raise ValueError(f"report template {section}.md has no block: open each with a line '<!-- name -->'")
    blocks: dict[str, str] = {}
    for mark, after in zip(marks, [*marks[1:], None]):
        name = mark.group(1)
        if name in blocks:
            raise ValueError(f"report template {section}.md has the block '{name}' twice")
        blocks[name] = text[mark.end() : after.start() if after else len(text)].strip("\n")
    return blocks


def render(section: str, block: str, **values: object) -> list[str]:
    """The lines of one block with its placeholders filled.

    Args:
        section: the template file's name without ``.md``.
        block: the block's name.
        **values: a value for each of the block's placeholders (formatted with ``str``), and no others.

    Returns:
        The block's lines, without the blank lines around it.

    Raises:
        ValueError: an unknown section or block, a placeholder without a value, or a value no placeholder takes.
    """
    blocks = template_blocks(section)
    if block not in blocks:
        raise ValueError(f"report template {section}.md has no block '{block}'; it has {', '.join(blocks)}")
    template = Template(blocks[block])
    wanted = {m.group("named") or m.group("braced") for m in template.pattern.finditer(template.template)} - {None}
    missing, unused = sorted(wanted - values.keys()), sorted(values.keys() - wanted)
    if missing or unused:
        raise ValueError(
            f"report template {section}.md, block '{block}': "
            + "; ".join(
                text
                for text in (
                    f"no value for {', '.join(missing)}" if missing else "",
                    f"no placeholder for {', '.join(unused)}" if unused else "",
                )
                if text
            )
        )
    try:
        return template.substitute(values).splitlines()
    except ValueError as err:  # a lone '$' that starts no placeholder
        raise ValueError(f"report template {section}.md, block '{block}': {err}") from err
