"""/openapi.json tells the truth: schemathesis sends generated requests to every operation, with the API key and
with the admin key, and checks each answer against the document (its default checks plus status-code
conformance: every status answered is documented, every body matches its schema).

`positive_data_acceptance` (every schema-valid request succeeds) is left out: what depends on the served model
(its context length and vocabulary, --max-batch, which models exist) and "prompt or a continuation" cannot be
stated in a schema, so such requests are rightly refused with a documented 400."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

KEY, ADMIN = "key-openapi", "admin-openapi"
EXAMPLES = 12  # per operation and key: ~20 operations stay within a minute on a busy machine


@pytest.fixture(scope="module")
def api(serve, tiny_model_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("openapi-store")
    return serve(f"tiny={tiny_model_dir}", "--api-key", KEY, "--admin-key", ADMIN, "--store", store,
                 "--max-batch", "4").wait_ready()


def test_every_operation_answers_as_documented(api):
    from hypothesis import given
    from schemathesis.specs.openapi.checks import positive_data_acceptance, status_code_conformance

    schema = schemathesis.openapi.from_url(api.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            for key in (KEY, ADMIN):
                case.call_and_validate(headers={"Authorization": f"Bearer {key}"},
                                       additional_checks=[status_code_conformance],
                                       excluded_checks=[positive_data_acceptance], timeout=60)

        check()
