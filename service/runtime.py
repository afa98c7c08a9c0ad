"""The composition root: one object holding the application, the views and their projector.

Commands and the HTTP server build a ``Runtime`` from the settings and close
it when done; nothing else opens stores.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from domain.application import ResultsApp
from projections.projector import Projector
from projections.queries import DisplayQueries
from projections.sqlstore import ViewDatabase
from service.account_link import AwsAccountLinker
from service.accounts import AccountLinks
from service.database import open_application, view_database
from service.idempotency import IdempotencyStore
from service.settings import Settings
from service.tokens import TokenStore


@dataclass
class Runtime:
    settings: Settings
    app: ResultsApp
    views: ViewDatabase
    projector: Projector
    queries: DisplayQueries
    tokens: TokenStore
    idempotency: IdempotencyStore
    linker: AwsAccountLinker = field(init=False)

    def __post_init__(self) -> None:
        self.linker = AwsAccountLinker(self.settings.aws_principal_arn)

    @property
    def accounts(self) -> AccountLinks:
        """Account linking and the daily role check, on this runtime's stores."""
        return AccountLinks(self.app, self.queries, self.linker)

    @classmethod
    def open(cls, settings: Settings) -> Runtime:
        """Open the event store and the views (creating missing view tables)."""
        app = open_application(settings.database_url)
        try:
            views = view_database(settings.database_url)
            projector = Projector(app, views)
            projector.ensure_schema()
            tokens = TokenStore(views)
            tokens.ensure_schema()
            idempotency = IdempotencyStore(views)
            idempotency.ensure_schema()
        except BaseException:
            app.close()
            raise
        return cls(settings, app, views, projector, DisplayQueries(views), tokens, idempotency)

    def close(self) -> None:
        self.projector.close()
        self.views.close()
        self.app.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
