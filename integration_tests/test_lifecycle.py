"""The register / deploy / undeploy / delete cycle on real TorchServe, through TorchServeClient.

The session's server already serves minilm.mar as "minilm"; the cycle registers the same archive
under a second name, so it never disturbs the model the other tests use, and every state is
checked through ``describe`` as an operator would. The second name is always unregistered.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from serving import MODEL_STORE, require

from ts_handlers.tools.client import TorchServeError

ARCHIVE = "minilm.mar"
NAME = "minilm_lifecycle"
# Synchronous register/scale calls return once workers are up; a bound keeps a stuck start
# from hanging the suite (loading MiniLM takes a few seconds per worker on two cores).
LIFECYCLE_TIMEOUT = 180
TEXTS = ["register, deploy, undeploy, delete", "a second sentence"]


def workers(client, name: str) -> list[dict]:
    return client.describe(name)["workers"]


def test_register_deploy_scale_undeploy_delete(torchserve):
    require(MODEL_STORE / ARCHIVE)
    client = torchserve.client(timeout=60)
    with pytest.raises(TorchServeError) as absent:
        client.describe(NAME)
    assert absent.value.status_code == 404

    try:
        # register + deploy one worker; returns once the worker has loaded the model
        answer = client.register(
            ARCHIVE, model_name=NAME, initial_workers=1, timeout=LIFECYCLE_TIMEOUT
        )
        assert NAME in answer["status"]
        assert NAME in [model["modelName"] for model in client.list_models()]
        described = client.describe(NAME)
        assert described["modelName"] == NAME
        assert described["batchSize"] == client.describe("minilm")["batchSize"]  # model-config
        assert [worker["status"] for worker in described["workers"]] == ["READY"]

        embeddings = np.array(client.embed(NAME, TEXTS))
        assert embeddings.shape == (2, 384)
        assert np.linalg.norm(embeddings, axis=1) == pytest.approx([1.0, 1.0], abs=1e-5)
        reference = np.array(client.embed("minilm", TEXTS))
        np.testing.assert_allclose(embeddings, reference, atol=1e-5)  # same archive, same answer

        # deploy a second worker
        client.scale(NAME, 2, timeout=LIFECYCLE_TIMEOUT)
        described = client.describe(NAME)
        assert (described["minWorkers"], described["maxWorkers"]) == (2, 2)
        assert [worker["status"] for worker in described["workers"]] == ["READY", "READY"]
        assert len({worker["pid"] for worker in described["workers"]}) == 2
        assert client.ready_workers(NAME) == 2
        assert len(client.embed(NAME, TEXTS[0])) == 1

        # undeploy: still registered, no workers, so inference is refused
        client.scale(NAME, 0, timeout=LIFECYCLE_TIMEOUT)
        assert workers(client, NAME) == []
        assert NAME in [model["modelName"] for model in client.list_models()]
        with pytest.raises(TorchServeError) as refused:
            client.embed(NAME, TEXTS)
        assert refused.value.status_code >= 500
        print(f"predict on an undeployed model: HTTP {refused.value.status_code}: {refused.value}")

        # delete
        answer = client.unregister(NAME)
        assert NAME in answer["status"]
        with pytest.raises(TorchServeError) as deleted:
            client.describe(NAME)
        assert deleted.value.status_code == 404
        assert deleted.value.error_type == "ModelNotFoundException"
        assert NAME not in [model["modelName"] for model in client.list_models()]
    finally:
        with contextlib.suppress(TorchServeError):  # already gone when the cycle completed
            client.unregister(NAME)

    # The session's own model never noticed.
    assert client.ready_workers("minilm") >= 1
    assert len(client.embed("minilm", TEXTS)) == 2
