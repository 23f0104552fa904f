"""The attack suite runs against the same local stack as the integration tests, in the
same pytest session (`make integration`), with the same fixtures."""

from tests.integration.conftest import *  # noqa: F403
