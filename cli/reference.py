"""Generate docs/cli.md from the Typer app, so the reference is never out of step with `--help`.

    python -m pld_pipeline_cli.reference > docs/cli.md
"""
from __future__ import annotations

import typer
from typer.core import TyperArgument, TyperOption

from .app import app


def _default(param: TyperOption) -> str:
    if param.required:
        return "required"
    if param.is_flag:
        return "off"
    if param.default is None or param.default == () or param.default == []:
        return "-"
    return f"`{param.default}`"


def render() -> str:
    group = typer.main.get_command(app)
    lines = ["# pld command reference", "",
             "Generated from the command line's own help (`python -m pld_pipeline_cli.reference > docs/cli.md`);",
             "a test fails when the two differ. Every command also answers `--help`.", ""]
    for name, cmd in group.commands.items():
        lines += [f"## `pld {name}`", "", (cmd.help or "").strip(), ""]
        args = [p for p in cmd.params if isinstance(p, TyperArgument)]
        if args:
            lines += ["| argument | help |", "|---|---|"]
            lines += [f"| `{p.name.upper()}` | {(getattr(p, 'help', None) or '').strip()} |" for p in args]
            lines.append("")
        opts = [p for p in cmd.params if isinstance(p, TyperOption) and p.name != "help"]
        if opts:
            lines += ["| option | default | help |", "|---|---|---|"]
            for p in opts:
                flags = ", ".join(f"`{o}`" for o in p.opts)
                lines.append(f"| {flags} | {_default(p)} | {(p.help or '').strip()} |")
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render())
