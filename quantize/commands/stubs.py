"""Subcommands whose issue has not landed: they say so and exit 2, never fake output."""

from __future__ import annotations

import click

from ..errors import NotImplementedStage

_PENDING: dict[str, str] = {}


def make_stub(name: str) -> click.Command:
    @click.command(
        name=name,
        context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
        help=f"{_PENDING[name]} (not implemented yet).",
        add_help_option=True,
    )
    @click.pass_context
    def stub(ctx):
        raise NotImplementedStage(f"`quantize {name}` is not implemented yet ({_PENDING[name]}); see the issue tracker")

    return stub


def pending() -> list[str]:
    return list(_PENDING)
