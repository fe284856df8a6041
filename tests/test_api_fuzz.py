"""Property-based fuzzing of the API from its own OpenAPI spec (schemathesis), against real Redis.

Every operation gets generated requests, valid and invalid (bodies in both encodings, query and
path parameters, unsupported methods). Whatever comes in: no 5xx, and a refused request leaves
the queue as it was (nothing enqueued, no batch key created).
"""

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from service.deployment.api import create_app
from service.deployment.redis_queue import RedisQueue
from tests.service_harness import ADMIN_TOKEN, API_KEY, make_settings, needs_redis, publish_model, redis_namespace

pytestmark = needs_redis
MAX_EXAMPLES = 40  # per operation: about 300 requests in all, well under a minute on 2 cores
STATUSES: Counter = Counter()  # what the fuzzing got back, printed at the end (pytest -s) for docs/reliability.md


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    with redis_namespace() as namespace:
        settings = make_settings(namespace, tmp_path_factory.mktemp("fuzz"), max_batch_samples=16,
                                 max_body_bytes=64 * 1024, queue_max_length=50)
        queue = RedisQueue.from_settings(settings)
        publish_model(queue)
        yield create_app(settings), queue
    print(f"\nschemathesis: {sum(STATUSES.values())} requests, statuses {dict(sorted(STATUSES.items()))}")


@pytest.fixture(scope="module")
def api_schema(service):
    app, _ = service
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


def _queue_state(queue: RedisQueue) -> tuple[int, int]:
    return queue.client.xlen(queue.stream), sum(1 for _ in queue.client.scan_iter(match=queue.batch_key("*")))


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_5xx_or_enqueues_when_refused(case, service):
    _, queue = service
    before = _queue_state(queue)
    # a valid key, so that the bodies get past the door (tests/test_security.py covers the keys): the client
    # key or, every other request, the admin token (which also opens /v1/model)
    case.headers = {**(case.headers or {}), "X-API-Key": ADMIN_TOKEN if sum(STATUSES.values()) % 2 else API_KEY}
    response = case.call()
    STATUSES[response.status_code] += 1
    case.validate_response(response, checks=[not_a_server_error])
    if response.status_code >= 400:
        assert _queue_state(queue) == before, f"a refused request ({response.status_code}) changed the queue"
