"""Putting messages on a queue for ``resultsvc send-results`` (and tests, and benchmarks)."""

from __future__ import annotations

import hashlib
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from service.queue_consumer import sqs_client
from service.queue_messages import AUTHORIZATION


class QueueUnavailable(Exception):
    """The queue refused or could not take a message; the message says which and why."""


class QueueSender:
    """Sends envelope bodies with the token attribute; FIFO queues get group and dedup ids."""

    def __init__(self, queue_url: str, token: str, *, group: str = "results", sqs: Any = None):
        self.queue_url = queue_url
        self.token = token
        self.group = group
        self.sqs = sqs if sqs is not None else sqs_client()
        self.fifo = queue_url.endswith(".fifo")

    def send(self, body: str) -> str:
        """Send one message; its SQS message id."""
        extra: dict[str, str] = {}
        if self.fifo:
            extra = {
                "MessageGroupId": self.group,
                "MessageDeduplicationId": hashlib.sha256(body.encode()).hexdigest()[:128],
            }
        try:
            answer = self.sqs.send_message(
                QueueUrl=self.queue_url,
                MessageBody=body,
                MessageAttributes={
                    AUTHORIZATION: {"DataType": "String", "StringValue": f"Bearer {self.token}"}
                },
                **extra,
            )
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "Unknown")
            raise QueueUnavailable(f"the queue refused the message ({code})") from None
        except BotoCoreError as error:
            raise QueueUnavailable(
                f"the queue could not be reached ({type(error).__name__})"
            ) from None
        return str(answer["MessageId"])
