"""The HTTP API fixtures (app, http, make_caller), shared for the webhook endpoint tests."""

from tests.api.conftest import app, http, make_caller  # noqa: F401
