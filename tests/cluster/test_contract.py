"""The single server's gRPC contract tests, run unchanged through Ray Serve's gRPC proxy.

The functions below are the runtime's own tests (imported, so pytest collects them here too),
given a `server` that is the cluster, on each engine: a plain `Client` with no routing metadata,
the same outputs, statuses and messages.
"""

from __future__ import annotations

import grpc
import pytest

from tests.fixtures.serving import reflected_services
from tests.runtime.test_errors import (  # noqa: F401
    test_bad_sampling_parameter_is_invalid_argument_naming_the_field,
    test_prompt_longer_than_the_context_is_invalid_argument,
    test_request_input_errors_are_invalid_argument,
    test_unknown_adapter_is_not_found_naming_the_loaded_ones,
)
from tests.runtime.test_generation import (  # noqa: F401
    exported_manifest,
    manifest,
    test_adapters_change_the_output,
    test_base_model_output_equals_manifest_base_parity,
    test_concurrent_requests_for_different_adapters_get_their_own_output,
    test_greedy_output_of_the_base_and_each_adapter_equals_onnxruntime_genai,
    test_greedy_output_per_adapter_equals_manifest_parity_tokens,
    test_max_new_tokens_is_honoured,
    test_same_seed_same_output_and_other_seed_differs,
    test_stop_string_ends_generation_and_is_not_returned,
    test_stream_pieces_add_up_to_the_unary_response,
    test_task_inputs_are_rendered_through_the_adapter_template,
    test_unary_error_status_is_not_found_for_unknown_adapter,
)
from tests.runtime.test_operations import test_health_answers_serving_for_the_server_and_each_service  # noqa: F401
from tests.runtime.test_scores import (  # noqa: F401
    reference,
    test_classify_logprobs_are_the_label_sequences_log_probabilities,
    test_classify_needs_labels_or_a_choice_contract,
    test_n_samples_are_the_requests_with_seeds_seed_plus_i,
)


@pytest.fixture(scope="module")
def server(cluster):
    return cluster


@pytest.fixture(scope="module")
def exported_server(cluster):
    return cluster


@pytest.fixture(scope="module")
def recipe_package(tiny_package):
    """The package the runtime tests' `server` serves: here the cluster's, the exported tiny package."""
    return tiny_package


def test_model_info_names_the_engine_and_the_clusters_adapters(cluster, manifest):  # noqa: F811
    from loraplex.adapters.package.reader import Package

    with cluster.client() as client:
        info = client.model_info()
    assert info.engine == cluster.config.server.engine and info.max_batch == 4
    assert list(info.adapters) == sorted(manifest.adapters)
    config = Package.open(cluster.config.server.package).config
    assert (info.context_length, info.vocab_size) == (config.context_length, config.vocab_size)


def test_reflection_lists_the_loraplex_services(cluster):
    names = reflected_services(cluster.target)
    assert {"loraplex.v1.Generation", "loraplex.v1.Adapters", "grpc.health.v1.Health"} <= names


def test_bad_loads_fail_with_the_single_servers_codes_and_change_nothing(cluster):
    from tests.runtime.test_errors import BAD_LOADS

    with cluster.client() as client:
        before = [(a.name, a.version) for a in client.list_adapters()]
        for name, path, code, words in BAD_LOADS.values():
            with pytest.raises(grpc.RpcError) as err:
                client.load_adapter(name, path)
            assert err.value.code() == code and words in err.value.details(), (name, path, err.value.details())
        assert [(a.name, a.version) for a in client.list_adapters()] == before
        assert client.generate("alpha", "hi", max_new_tokens=2).adapter == "alpha"


def test_with_one_application_its_name_in_the_metadata_is_optional(cluster):
    for application in (cluster.config.app_name, None):
        with cluster.client(application=application) as client:
            assert client.generate("beta", "hi", max_new_tokens=2).adapter == "beta"
