"""The `enclave` command."""

from __future__ import annotations

import click

from monitoring.exporter.cli import exporter
from serving import __version__
from serving.bench.exporter import bench_exporter
from serving.cli.admin import db, oauth, policies, usage
from serving.cli.audit_trail import audit
from serving.cli.bench import bench, bench_protection
from serving.cli.clients import clients
from serving.cli.evals import evals
from serving.cli.keys import keys
from serving.cli.models import models
from serving.cli.rollouts import rollout
from serving.cli.up import engines, gateway, up


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="enclave")
def cli() -> None:
    """Enclave: vLLM engines behind one authenticated gateway."""


cli.add_command(up)
cli.add_command(gateway)
cli.add_command(engines)
cli.add_command(clients)
cli.add_command(keys)
cli.add_command(policies)
cli.add_command(usage)
cli.add_command(audit)
cli.add_command(oauth)
cli.add_command(db)
cli.add_command(models)
cli.add_command(rollout)
cli.add_command(evals)
cli.add_command(bench)
cli.add_command(bench_protection)
cli.add_command(exporter)
cli.add_command(bench_exporter)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
