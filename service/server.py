"""``resultsvc serve``: the HTTP API with the projector in one process (the embedded default).

With ``consume`` set, an SQS consumer runs in the process too.

With ``projector=False`` the process serves the API alone, for several API
replicas in front of one projector (``resultsvc projections run``).
"""

from __future__ import annotations

import logging
import signal
import threading

import uvicorn

from service.api import create_app
from service.queue_consumer import QueueConsumer
from service.runtime import Runtime
from service.scheduler import start_scheduler
from service.settings import Settings

log = logging.getLogger("resultsvc.server")
# The consumer's long poll inside ``serve``: also the longest SIGTERM waits for it.
SERVE_WAIT_SECONDS = 5


def serve(
    settings: Settings,
    host: str,
    port: int,
    *,
    projector: bool = True,
    scheduler: bool = True,
    log_level: str = "info",
    consume: str | None = None,
    dead_letter_queue: str | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT; the projector thread and the jobs stop with the server."""
    runtime = Runtime.open(settings)
    consumer = None
    if consume is not None:
        try:  # before any thread starts: a consumer without a dead-letter queue stops here
            consumer = QueueConsumer(
                runtime,
                consume,
                dead_letter_queue,
                wait_seconds=SERVE_WAIT_SECONDS,
                on_applied=runtime.projector.wake,
            )
        except BaseException:
            runtime.close()
            raise
    stop = threading.Event()
    jobs = start_scheduler(runtime) if scheduler else None
    thread = None
    if projector:
        thread = threading.Thread(
            target=runtime.projector.run, args=(stop,), name="projector", daemon=True
        )
        thread.start()
    consumer_thread = None
    if consumer is not None:
        consumer_thread = threading.Thread(
            target=consumer.run, args=(stop,), name="queue-consumer", daemon=True
        )
        consumer_thread.start()
    try:
        app = create_app(runtime, projector_thread=thread)
        config = uvicorn.Config(
            app, host=host, port=port, log_level=log_level, access_log=False, lifespan="off"
        )
        # uvicorn shuts down gracefully on SIGTERM/SIGINT, restores the handlers
        # it found and raises the signal again. With these in place, that
        # second raise is a no-op and the clean-up below runs (exit status 0).
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: None)
        uvicorn.Server(config).run()
    finally:
        if jobs is not None:
            jobs.shutdown(wait=True)
        stop.set()
        if consumer_thread is not None:
            consumer_thread.join()  # the message in hand finishes; the long poll ends
        if thread is not None:
            thread.join(timeout=30)
        runtime.close()
