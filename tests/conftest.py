"""Shared fixtures, each built once per test session.

* Tiny model directories of every family: each fixture returns the ``Path`` of a directory
  written by ``cdi_ray.models.testing``; ``cdi_ray.models.load_model(path)`` loads it. Tests must
  not modify these directories (copy one with ``shutil.copytree`` first).
* ``s3_server``: ONE moto S3 server on loopback for the session, behind the fault-injecting proxy
  (tests/_fault_proxy.py). From the moment it is requested the session's environment points
  boto3 at the proxy, so this process and every Ray worker started after see the same S3. Each
  test module uses buckets of its own; tests that inject faults clear the proxy's rules after.
* ``ray_head``: ONE real ``ray start --head`` cluster for the session's ``ray job submit`` tests
  (tests/_ray_head.py), started by the first test that asks for it.
* ``ray_session``: ONE local Ray for the session (16 logical CPUs on the 2-core CI box: a read →
  decode → actor → write stream deadlocks on 2), started inside that environment so workers
  inherit it — the S3 secret reaches no runtime_env, job or log record. A Ray start-up costs
  seconds; sharing one keeps the suite within its budget. Only tests that need a cluster of a
  different kind start their own, and say why (``ray start --head`` for ``ray job submit``; a
  CLI subprocess that must start a local Ray to show the local progress bar).

A "session" is one pytest-xdist worker's: scripts/test.sh runs two with ``--dist loadfile``, so each
test module runs whole on one worker (its module fixtures are built once; the longest modules go
first, ``pytest_collection_modifyitems`` below), and the whole suite starts two session Rays, two
S3 servers and one head (the ``ray job submit`` tests are one module, tests/test_job_submit.py). (``--dist loadgroup`` with ``xdist_group`` marks does not group under
pytest 9 with pytest-xdist 3.8: the group suffix xdist writes into ``item._nodeid`` is no longer
what ``item.nodeid`` returns, so every module was spread over both workers.)
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from cdi_ray import storage
from cdi_ray.models import testing
from _fault_proxy import FaultProxy
from _ray_head import ray_head_cluster
from _pipeline_helpers import S3_SECRET, env, moto_s3

@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    """The longest modules first, so that the two workers end together: xdist hands out whole
    modules in this order (scripts/test.sh: ``--dist loadfile --no-loadscope-reorder``), and a
    module that needs the ``ray job submit`` head, a ``slow`` test or the session's Ray costs
    seconds to minutes where the rest cost fractions of one. Modules stay whole (stable sort)."""
    def rank(item) -> int:
        if "ray_head" in item.fixturenames:
            return 0
        if item.get_closest_marker("slow") is not None:
            return 1
        return 2 if "ray_session" in item.fixturenames else 3

    module_rank: dict[str, int] = {}
    for item in items:
        module_rank[item.module.__name__] = min(module_rank.get(item.module.__name__, 3), rank(item))
    items.sort(key=lambda item: module_rank[item.module.__name__])


# The tiny test models run ~100x faster on one intra-op thread than on an oversubscribed pool
# (a 16x16 conv: 0.5 ms vs 50 ms on a busy 2-core CI box); nothing in the suite needs more.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pixel_dir(tmp_path_factory):
    """Unconditional pixel DDPM, 1 channel, 16×16 (latent_shape (1, 16, 16)), DDPM schedule T=1000."""
    return testing.make_tiny_pixel_ddpm(tmp_path_factory.mktemp("models") / "pixel", image_size=16, channels=1)


@pytest.fixture(scope="session")
def tiny_pixel_class_dir(tmp_path_factory):
    """Class-conditional pixel DDPM, 3 channels, 16×16, 5 classes (labels 0..4, no null class)."""
    return testing.make_tiny_pixel_ddpm(tmp_path_factory.mktemp("models") / "pixel_class", image_size=16,
                                        channels=3, num_classes=5)


@pytest.fixture(scope="session")
def tiny_latent_kl_dir(tmp_path_factory):
    """Unconditional KL latent UNet: RGB 16×16 images → latent (4, 8, 8)."""
    return testing.make_tiny_latent_kl(tmp_path_factory.mktemp("models") / "latent_kl", image_size=16, channels=3)


@pytest.fixture(scope="session")
def tiny_latent_vq_dir(tmp_path_factory):
    """Unconditional VQ latent UNet (LDMPipeline layout): RGB 16×16 images → latent (3, 8, 8)."""
    return testing.make_tiny_latent_vq(tmp_path_factory.mktemp("models") / "latent_vq", image_size=16, channels=3)


@pytest.fixture(scope="session")
def tiny_dit_dir(tmp_path_factory):
    """DiT, 10 classes (null class 10), learned sigma: RGB 16×16 images → latent (4, 8, 8)."""
    return testing.make_tiny_dit(tmp_path_factory.mktemp("models") / "dit", image_size=16, channels=3, num_classes=10)


@pytest.fixture(scope="session")
def tiny_t2i_dir(tmp_path_factory):
    """Stable-Diffusion layout (UNet2DConditionModel + VAE + CLIP text encoder/tokenizer, 8-token captions of
    width 32): RGB 16×16 images → latent (4, 8, 8)."""
    return testing.make_tiny_text2image(tmp_path_factory.mktemp("models") / "t2i", image_size=16)


@pytest.fixture(scope="session")
def tiny_uvit_class_dir(tmp_path_factory):
    """Class-conditional U-ViT, 11 label rows (classes 0..9, null class 10): RGB 16×16 → latent (4, 8, 8)."""
    return testing.make_tiny_uvit(tmp_path_factory.mktemp("models") / "uvit_class", "class", image_size=16)


@pytest.fixture(scope="session")
def tiny_uvit_text_dir(tmp_path_factory):
    """Text-conditional U-ViT (uvit_t2i, 8 CLIP tokens of width 32): RGB 16×16 → latent (4, 8, 8)."""
    return testing.make_tiny_uvit(tmp_path_factory.mktemp("models") / "uvit_text", "text", image_size=16)


@dataclass(frozen=True)
class S3Server:
    """The session's S3: ``env`` is what boto3 and Ray's workers see (through ``proxy``);
    ``direct`` is a client straight to moto, for setting up objects without touching the proxy."""

    env: dict
    proxy: FaultProxy
    direct: object


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    import boto3
    from botocore.config import Config

    cache = str(tmp_path_factory.mktemp("model-cache"))
    with moto_s3() as e, FaultProxy(e["AWS_ENDPOINT_URL"]) as proxy:
        values = {**e, "AWS_SECRET_ACCESS_KEY": S3_SECRET, "AWS_ENDPOINT_URL": proxy.url, "CDI_RAY_CACHE": cache}
        with env(values):
            storage.reset_client()
            # objects uploaded without a CRC (as by many tools): the ETag (MD5) is their only checksum
            direct = boto3.client("s3", endpoint_url=e["AWS_ENDPOINT_URL"],
                                  config=Config(request_checksum_calculation="when_required"))
            yield S3Server(env=values, proxy=proxy, direct=direct)
    storage.reset_client()


@dataclass(frozen=True)
class RaySession:
    address: str  #: the GCS address, for a driver subprocess that joins this cluster
    env: dict  #: the environment its workers inherited (the session's S3)


@pytest.fixture(scope="session")
def ray_session(s3_server):
    import ray

    if ray.is_initialized():  # started by code under test outside this fixture: restart it inside the S3 environment
        ray.shutdown()
    ray.init(address="local", num_cpus=16, include_dashboard=False)  # logical: room for the kept aggregator pool, warm workers and a stream's write tasks
    yield RaySession(address=ray.get_runtime_context().gcs_address, env=s3_server.env)
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_head():
    """``(dashboard address, environment)`` of a real local head for ``ray job submit``."""
    with ray_head_cluster() as head:
        yield head
