"""What the command groups share: options read from the environment, the address type, the
coordinator and certificate options, and the one place a user's mistake becomes one line.

Light on purpose: every ``tapestry`` command imports this module, so it imports neither torch
nor the services (``tapestry health`` runs every few seconds in container healthchecks).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import wraps
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import click
import grpc
from click.core import ParameterSource
from google.protobuf.message import Message

from tapestry.address import check_address
from tapestry.errors import UserError
from tapestry.wire.status import COORDINATOR, describe_rpc_error

P = ParamSpec("P")
R = TypeVar("R")
DEFAULT_COORDINATOR = "127.0.0.1:50051"


def friendly_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Turn the errors a user can fix into one clear line and a non-zero exit. A command
    with an ``address`` parameter (``--coordinator``) talks to the coordinator there."""

    @wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except UserError as error:
            raise click.ClickException(str(error)) from None
        except OSError as error:  # e.g. a data directory that cannot be created or written
            raise click.ClickException(f"{type(error).__name__}: {error}") from None
        except grpc.RpcError as error:
            address = str(kwargs.get("address") or "")
            raise click.ClickException(
                describe_rpc_error(error, address, COORDINATOR, "--coordinator")
                if address
                else describe_rpc_error(error)
            ) from None

    return run


class EnvOption(click.Option):
    """An option whose environment variable is shown in ``--help`` and named in the error
    when a value read from it is refused (``Invalid value for '--listen' (from
    TAPESTRY_LISTEN): ...``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("show_envvar", True)
        super().__init__(*args, **kwargs)

    def get_error_hint(self, ctx: click.Context | None) -> str:
        hint = click.Parameter.get_error_hint(self, ctx)  # the names, without click's env note
        if ctx is not None and ctx.get_parameter_source(self.name or "") is (
            ParameterSource.ENVIRONMENT
        ):
            hint += f" (from {self.envvar})"
        return hint


class Address(click.ParamType[str, Any]):
    """``HOST:PORT`` through :func:`tapestry.address.check_address`, the one address check."""

    name = "HOST:PORT"

    def __init__(self, *, free_port: bool = False) -> None:
        self.free_port = free_port

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return check_address(str(value), free_port=self.free_port)
        except ValueError as error:
            self.fail(str(error), param, ctx)


coordinator_option = click.option(
    "--coordinator",
    "address",
    cls=EnvOption,
    type=Address(),
    default=DEFAULT_COORDINATOR,
    envvar="TAPESTRY_COORDINATOR",
    show_default=True,
    help="The coordinator's HOST:PORT.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")
page_size_option = click.option(
    "--page-size",
    type=click.IntRange(0, 2**31 - 1),  # the wire's int32; the server caps what it returns
    default=0,
    show_default=True,
    help="Items per request (0: the server's default); every page is fetched.",
)


def checked_credentials(
    ca: Path | None, cert: Path | None, key: Path | None
) -> grpc.ChannelCredentials | None:
    """The ``grpc.ChannelCredentials`` of a member's certificate, or a
    :class:`click.ClickException` saying what is wrong with the files."""
    from tapestry.pki.serving import client_credentials  # cryptography: when needed

    try:
        return client_credentials(ca, cert, key)
    except UserError as error:
        raise click.ClickException(str(error)) from None


def client_tls_options(command: Callable[..., R]) -> Callable[..., R]:
    """``--ca``, ``--cert``, ``--key`` (a member's certificate from `tapestry certs`; an
    operator's to run rounds or roll back) or ``--insecure``, turned into the command's
    ``credentials`` argument. A command given a ``journal`` directory reads no server: it
    may go without them."""

    @wraps(command)
    def run(
        *args: Any, ca: Path | None, cert: Path | None, key: Path | None, insecure: bool, **kw: Any
    ) -> R:
        if insecure and (ca or cert or key):
            raise click.UsageError("--insecure goes without --ca, --cert and --key")
        if not insecure and not (ca or cert or key):
            if kw.get("journal") is not None:
                return command(*args, credentials=None, **kw)
            raise click.UsageError(
                "give the certificate to call with: --ca, --cert and --key (or "
                "TAPESTRY_CA, TAPESTRY_CERT, TAPESTRY_KEY), e.g. an operator's from `tapestry "
                "certs init`; or --insecure for a server that serves plaintext"
            )
        return command(*args, credentials=checked_credentials(ca, cert, key), **kw)

    path = click.Path(dir_okay=False, path_type=Path)
    for flag, what in (("key", "Its private key"), ("cert", "Your certificate"),
                       ("ca", "The consortium CA's certificate")):  # fmt: skip
        envvar = f"TAPESTRY_{flag.upper()}"
        run = click.option(f"--{flag}", cls=EnvOption, type=path, envvar=envvar, help=f"{what}.")(
            run
        )
    return click.option(
        "--insecure",
        cls=EnvOption,
        is_flag=True,
        envvar="TAPESTRY_INSECURE",
        help="Call a plaintext server (no TLS, no certificate).",
    )(run)


def echo_json(document: Message | Sequence[Message], *, indent: bool = True) -> None:
    """Print a message, or a list of them, as JSON: proto field names, counts and sizes as
    numbers (:func:`tapestry.wire.codec.message_to_dict`)."""
    from tapestry.wire.codec import message_to_dict

    value: object = (
        message_to_dict(document)
        if isinstance(document, Message)
        else [message_to_dict(item) for item in document]
    )
    click.echo(json.dumps(value, indent=2 if indent else None, sort_keys=True))
