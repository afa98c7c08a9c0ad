"""Logging for the long-running commands: one format, and AWS libraries kept quiet.

botocore logs every request it signs at DEBUG, Authorization header
included, which names the access key. A customer's keys pass through
botocore while an account is linked, so its loggers (and those of the HTTP
libraries under it) never go below WARNING, whatever level is asked for.
"""

from __future__ import annotations

import logging

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
LEVELS = ("debug", "info", "warning", "error")
QUIET = ("botocore", "boto3", "s3transfer", "urllib3")


def configure_logging(level: str = "info") -> None:
    """Set the root level and format; AWS libraries stay at WARNING or above."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, force=True)
    quiet_aws_loggers()


def quiet_aws_loggers() -> None:
    """Raise the AWS libraries' loggers to WARNING if anything set them lower.

    Called by ``configure_logging`` and again by the code that holds a
    customer's keys, so a process that set up logging some other way (an
    embedding server, a test runner) still never logs signed requests.
    """
    for name in QUIET:
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)
