"""`semisparse settings [NAME]`: the registered techniques, and each one's settings from its config."""

from __future__ import annotations

import click

from semisparse import registry
from semisparse.cli.common import threads_option, user_errors
from semisparse.errors import SemisparseError
from semisparse.settings import describe


def _facts(entry: registry.Technique) -> str:
    facts = []
    if entry.needs_calibration:
        facts.append("needs calibration data")
    if entry.updates_kept_weights:
        facts.append("updates kept weights")
    return f" ({', '.join(facts)})" if facts else ""


def _find(name: str, kind: str | None) -> registry.Technique:
    kinds = [kind] if kind else list(registry.KINDS)
    found = [registry.lookup(k, name) for k in kinds if name in registry.names(k)]
    if not found:
        known = ", ".join(n for k in kinds for n in registry.names(k))
        raise SemisparseError(f"no technique named '{name}': use one of {known}")
    if len(found) > 1:
        choices = ", ".join(entry.kind for entry in found)
        raise SemisparseError(f"'{name}' names a {choices}: say which with --kind")
    return found[0]


@click.command("settings")
@click.argument("name", required=False)
@click.option("--kind", type=click.Choice(registry.KINDS), default=None, help="Only this kind of technique.")
@threads_option
@user_errors
def settings_command(name: str | None, kind: str | None) -> None:
    """List the registered techniques, or NAME's settings with type, default and meaning.

    Example: semisparse settings maskllm (τ, κ, the prior strength α, ...); semisparse settings sparsegpt.
    """
    if name is None:
        for each in [kind] if kind else registry.KINDS:
            click.echo(f"{each}s:")
            for entry in (registry.lookup(each, n) for n in registry.names(each)):
                click.echo(f"  {entry.name:<12} {entry.summary}{_facts(entry)}")
        return
    entry = _find(name, kind)
    click.echo(f"{entry.kind} {entry.name}: {entry.summary}{_facts(entry)}")
    rows = describe(entry.config)
    if not rows:
        click.echo("  (no settings)")
    if any(row.name == "method" for row in rows) and entry.kind == "stage":
        click.echo("  plus the chosen method's own settings, flattened in: `semisparse settings METHOD`")
    width = max((len(row.name) for row in rows), default=0)
    kinds = max((len(row.type) for row in rows), default=0)
    for row in rows:
        click.echo(f"  {row.name:<{width}}  {row.type:<{kinds}}  default {row.default!r:<10}  {row.help}")
