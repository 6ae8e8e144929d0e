"""The API fixtures (app, callers) for the import endpoint tests."""

from tests.api.conftest import admin, app, bot, desk, http, make_caller  # noqa: F401
