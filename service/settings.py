"""Configuration from the environment (12-factor), with an optional ``.env`` file.

Only the variables in DESIGN.md exist; AWS endpoints and credentials are
boto3's own business (``AWS_ENDPOINT_URL*``, the default credential chain).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from domain.durations import parse_duration

DEFAULTS: Mapping[str, str] = {
    "RESULTSVC_DATABASE_URL": "sqlite:///./var/resultsvc.db",
    "RESULTSVC_BACKUP_URL": "file://./var/backups",
    "RESULTSVC_MASTER_KEY": "file://./var/master.key",
    "RESULTSVC_BACKUP_RETENTION": "5y",
    "RESULTSVC_DISPLAY_RETENTION": "90d",
}


@dataclass(frozen=True)
class Settings:
    """The service's whole configuration, parsed and checked once at start-up."""

    database_url: str
    backup_url: str
    master_key: str
    backup_retention: timedelta
    display_retention: timedelta
    aws_principal_arn: str | None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the settings; a ``.env`` file in the working folder fills gaps only."""
        env = dict(read_dotenv(Path(".env")))
        env.update(os.environ if environ is None else environ)

        def get(name: str) -> str:
            return env.get(name) or DEFAULTS[name]

        return cls(
            database_url=get("RESULTSVC_DATABASE_URL"),
            backup_url=get("RESULTSVC_BACKUP_URL"),
            master_key=get("RESULTSVC_MASTER_KEY"),
            backup_retention=parse_duration(
                get("RESULTSVC_BACKUP_RETENTION"), "RESULTSVC_BACKUP_RETENTION"
            ),
            display_retention=parse_duration(
                get("RESULTSVC_DISPLAY_RETENTION"), "RESULTSVC_DISPLAY_RETENTION"
            ),
            aws_principal_arn=env.get("RESULTSVC_AWS_PRINCIPAL_ARN") or None,
        )


def read_dotenv(path: Path) -> dict[str, str]:
    """``NAME=value`` lines; ``#`` comments, blank lines and surrounding quotes allowed."""
    if not path.is_file():
        return {}
    values: dict[str, str] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, _, value = line.partition("=")
        name = name.strip().removeprefix("export ").strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[name] = value
    return values
