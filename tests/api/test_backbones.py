"""GET /v1/backbones: the names a job may give, the same list that checks a submit."""

from __future__ import annotations

import httpx

from tests.api.conftest import assert_error


def test_backbones_are_listed_and_filtered(client: httpx.Client) -> None:
    every = client.get("/v1/backbones").json()
    assert every["versions"]["timm"] == "1.0.31"
    names = every["data"]
    assert names[0] == "resnet101" and "tiny_cnn" in names  # ours first, sorted
    assert {"timm/convnext_atto", "timm/vit_tiny_patch16_224",
            "torchvision/efficientnet_b0"} <= set(names)
    assert len(names) > 1000

    convnext = client.get("/v1/backbones", params={"contains": "ConvNeXt_At"}).json()["data"]
    assert convnext == ["timm/convnext_atto", "timm/convnext_atto_ols", "timm/convnext_atto_rms"]
    own = client.get("/v1/backbones", params={"family": "own"}).json()["data"]
    assert own == sorted(own) and "tiny_cnn" in own and all("/" not in n for n in own)
    vision = client.get("/v1/backbones", params={"family": "torchvision"}).json()["data"]
    assert all(n.startswith("torchvision/") for n in vision) and "torchvision/vit_b_16" in vision

    assert_error(client.get("/v1/backbones", params={"family": "keras"}), 422,
                 "invalid_request", "family")
    assert client.get("/v1/backbones", headers={"Authorization": ""}).status_code == 401
