"""IAM role ARNs: the only handle the service keeps on a customer's account."""

from __future__ import annotations

import re
from dataclasses import dataclass

from domain.errors import InvalidInput

# IAM limits: a path is "/" or "/segment/.../" (non-empty segments of
# printable ASCII) up to 512 characters; a role name is 1 to 64 characters of
# [A-Za-z0-9+=,.@_-].
_ROLE_ARN = re.compile(
    r"arn:aws:iam::(?P<account>[0-9]{12}):role"
    r"(?P<path>/(?:[\x21-\x2e\x30-\x7e]+/)*)"
    r"(?P<name>[A-Za-z0-9+=,.@_-]{1,64})"
)
MAX_PATH = 512


@dataclass(frozen=True)
class RoleArn:
    """A validated role ARN, with the AWS account id taken from it."""

    arn: str
    aws_account_id: str
    path: str
    name: str


def parse_role_arn(value: object, field: str = "role_arn") -> RoleArn:
    """Validate ``arn:aws:iam::<12 digits>:role/<path and name>``.

    The account id is read from the ARN rather than asked for separately, so
    the two can never disagree.
    """
    if not isinstance(value, str):
        raise InvalidInput(field, "must be a string")
    match = _ROLE_ARN.fullmatch(value)
    if match is None or len(match["path"]) > MAX_PATH:
        raise InvalidInput(
            field, "must be an IAM role ARN: arn:aws:iam::<12-digit account id>:role/<path/name>"
        )
    return RoleArn(
        arn=value,
        aws_account_id=match["account"],
        path=match["path"],
        name=match["name"],
    )
