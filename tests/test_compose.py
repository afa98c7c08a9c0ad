"""docker-compose.yml cannot run here (no Docker engine), so it is checked statically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from service.database import parse_database_url
from service.settings import DEFAULTS, Settings

ROOT = Path(__file__).resolve().parent.parent


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_every_service_named_exists() -> None:
    services = _compose()["services"]
    assert {"postgres", "minio", "minio-init", "resultsvc"} <= set(services)
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown service {dependency}"
    volumes = set(_compose().get("volumes", {}))
    for service in services.values():
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0]
            if not source.startswith(("/", ".")):
                assert source in volumes, f"named volume {source} is not declared"


def test_service_gets_every_variable_it_reads() -> None:
    service = _compose()["services"]["resultsvc"]
    env = _environment(service)
    missing = set(DEFAULTS) - set(env)
    assert not missing, f"resultsvc service lacks {sorted(missing)}"
    settings = Settings.from_env(env)  # parses: bad durations or URLs would raise
    config = parse_database_url(settings.database_url)
    assert config.kind == "postgresql"
    assert config.host in _compose()["services"], "database host is not a compose service"
    assert settings.backup_url.startswith("s3://")
    assert "serve" in service["command"]
    # boto3's own endpoint variable points at the MinIO service, no home-made one.
    assert env["AWS_ENDPOINT_URL_S3"].split("//", 1)[1].split(":", 1)[0] == "minio"
    assert not [name for name in env if name.startswith("RESULTSVC_") and "ENDPOINT" in name]


def test_backup_bucket_is_created_with_object_lock_and_no_default_retention() -> None:
    init = _compose()["services"]["minio-init"]
    script = " ".join(init["command"])
    bucket = _environment(_compose()["services"]["resultsvc"])["RESULTSVC_BACKUP_URL"]
    bucket_name = bucket.removeprefix("s3://").split("/", 1)[0]
    assert f"--with-lock local/{bucket_name}" in script
    # A bucket-wide default retention would lock the keyring and make
    # crypto-shredding impossible (DESIGN.md, Backups).
    assert "retention set" not in script
