"""Realistic findings for the demo, the benchmarks and the tests.

Deterministic for a given seed, so a benchmark run and its baseline work on
exactly the same data.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

_RULES = [
    ("s3-bucket-public-read", "S3 bucket allows public read access", "s3", "critical"),
    ("s3-bucket-no-encryption", "S3 bucket default encryption disabled", "s3", "high"),
    ("iam-user-no-mfa", "IAM user has console access without MFA", "iam", "high"),
    ("iam-root-access-key", "Root account has an active access key", "iam", "critical"),
    ("ec2-sg-open-22", "Security group allows 0.0.0.0/0 on port 22", "ec2", "high"),
    ("ec2-ebs-unencrypted", "EBS volume is not encrypted", "ec2", "medium"),
    ("rds-public-snapshot", "RDS snapshot is public", "rds", "critical"),
    ("cloudtrail-disabled", "CloudTrail is not enabled in all regions", "cloudtrail", "medium"),
    ("kms-rotation-off", "KMS key rotation is disabled", "kms", "low"),
    ("lambda-runtime-eol", "Lambda function uses an end-of-life runtime", "lambda", "low"),
    ("guardduty-off", "GuardDuty is not enabled", "guardduty", "informational"),
]
_REGIONS = ["eu-west-1", "eu-central-1", "us-east-1", "us-west-2", "ap-southeast-2"]
_STATUS_WEIGHTS = (("FAIL", 0.35), ("PASS", 0.55), ("ERROR", 0.03), ("SKIPPED", 0.07))


def findings(
    count: int,
    *,
    aws_account_id: str = "123456789012",
    seed: int = 7,
    start: datetime | None = None,
) -> Iterator[dict[str, Any]]:
    """``count`` findings as a scanner would report them (about 300 bytes of JSON each)."""
    rng = random.Random(seed)
    moment = start or datetime(2026, 11, 1, tzinfo=UTC)
    statuses = [s for s, _ in _STATUS_WEIGHTS]
    weights = [w for _, w in _STATUS_WEIGHTS]
    for i in range(count):
        rule_id, title, service, severity = rng.choice(_RULES)
        region = rng.choice(_REGIONS)
        status = rng.choices(statuses, weights)[0]
        resource = f"arn:aws:{service}:{region}:{aws_account_id}:{service}-resource/r-{i:08x}"
        finding: dict[str, Any] = {
            "rule_id": rule_id,
            "title": title,
            "severity": severity,
            "status": status,
            "resource_arn": resource,
            "region": region,
            "message": f"{title} ({status.lower()}) for r-{i:08x}",
            "observed_at": (moment + timedelta(seconds=i)).isoformat().replace("+00:00", "Z"),
        }
        if i % 10 == 0:
            finding["details"] = {"checked_by": "auditor/2.4", "evidence": {"attempt": i % 3}}
        yield finding


def batches(total: int, size: int, **kwargs: Any) -> Iterator[list[dict[str, Any]]]:
    """``findings(total)`` cut into lists of ``size``."""
    batch: list[dict[str, Any]] = []
    for finding in findings(total, **kwargs):
        batch.append(finding)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
