"""S3 for real: a moto server on loopback behind a fault-injecting proxy (tests/_fault_proxy.py).

Retries are exercised against real HTTP faults (503 SlowDown, 500, connection resets), never by
mocking boto3; permanent errors (404, 403) are not retried and name the object. The same audit
run from local files and from S3 (hive-partitioned P, flat U, model fetched into the node cache,
features/results/reports written to S3, transient faults on the way) gives identical results.
The secret key of the test credentials is then searched for in every output and log.
"""
from __future__ import annotations

import glob
import os

import pytest

from cdi_ray import storage
from cdi_ray.pipeline.model_cache import materialize_model
from _pipeline_helpers import S3_SECRET, env, write_images

#: The test credentials' secret (the session's): must never appear in any output or log.
SECRET = S3_SECRET
BUCKET = "cdi-s3"


@pytest.fixture(scope="module")
def s3(s3_server):
    """The session's S3 (moto behind the fault proxy; boto3 here and in Ray's workers goes through
    the proxy) with this module's bucket; ``direct`` reaches moto without touching the proxy."""
    s3_server.direct.create_bucket(Bucket=BUCKET)
    return {"proxy": s3_server.proxy, "direct": s3_server.direct, "env": s3_server.env}


@pytest.fixture
def proxy(s3):
    s3["proxy"].clear()
    yield s3["proxy"]
    s3["proxy"].clear()


def put(direct, key: str, data: bytes) -> str:
    direct.put_object(Bucket=BUCKET, Key=key, Body=data)
    return f"s3://{BUCKET}/{key}"


# ---------------------------------------------------------------------------------------------- storage
def test_transient_errors_are_retried_with_backoff(s3, proxy):
    uri = put(s3["direct"], "retry/x.bin", b"payload" * 100)
    proxy.fail("/retry/x.bin", ["slowdown", "reset"], method="GET")
    assert storage.read_bytes(uri) == b"payload" * 100
    assert proxy.count("/retry/x.bin", "GET") == 3  # two faults, then the real answer
    # listing and writing retry too
    proxy.fail("/cdi-s3", ["500"], method="GET")
    assert [e.uri for e in storage.iter_files(f"s3://{BUCKET}/retry/")] == [uri]
    proxy.fail("/retry/y.bin", ["reset"], method="PUT")
    storage.atomic_write_bytes(f"s3://{BUCKET}/retry/y.bin", b"y")
    assert proxy.count("/retry/y.bin", "PUT") == 2 and storage.read_bytes(f"s3://{BUCKET}/retry/y.bin") == b"y"


def test_retries_exhausted_is_a_named_storage_error(s3, proxy):
    uri = put(s3["direct"], "retry/z.bin", b"z")
    proxy.fail("/retry/z.bin", ["503"] * 5, method="GET")
    with env({"AWS_MAX_ATTEMPTS": "2"}):
        storage.reset_client()
        try:
            with pytest.raises(storage.StorageError, match=r"s3://cdi-s3/retry/z\.bin: S3 error ServiceUnavailable after retries"):
                storage.read_bytes(uri)
        finally:
            storage.reset_client()
    assert proxy.count("/retry/z.bin", "GET") == 2


def test_permanent_errors_are_not_retried_and_name_the_object(s3, proxy):
    uri = put(s3["direct"], "perm/secret.png", b"x")
    proxy.deny("/perm/secret.png")
    with pytest.raises(PermissionError, match=r"s3://cdi-s3/perm/secret\.png: access denied \(AccessDenied\)"):
        storage.read_bytes(uri)
    with pytest.raises(PermissionError, match="access denied"):
        storage.stat(uri)  # HEAD: a bare 403
    with pytest.raises(FileNotFoundError, match=r"s3://cdi-s3/perm/gone\.png does not exist"):
        storage.read_bytes(f"s3://{BUCKET}/perm/gone.png")
    assert proxy.count("/perm/secret.png", "GET") == 1 and proxy.count("/perm/gone.png", "GET") == 1


def test_listing_paginates_thousands_flat_and_hive(s3, proxy):
    """2,150 objects under one prefix: three ListObjectsV2 pages at S3's 1,000 keys a page."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    # filled through the server's own backend (2,150 HTTP PUTs take ~20 s on a busy CI box); read over HTTP
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    keys = [f"big/year={2024 + i % 2}/month={i % 12 + 1:02d}/{i:05d}.png" for i in range(1100)]
    keys += [f"big/flat/{i:05d}.jpg" for i in range(1050)]
    for k in keys:
        backend.put_object(BUCKET, k, b"")
    listed = storage.list_images(f"s3://{BUCKET}/big/")
    assert [e.uri for e in listed] == sorted(f"s3://{BUCKET}/{k}" for k in keys)
    assert proxy.count(f"/{BUCKET}", "GET") == 3
    hive = storage.list_images(f"s3://{BUCKET}/big/year=2025/")
    assert len(hive) == 550 and all("/year=2025/month=" in e.uri for e in hive)


def test_model_fetch_verified_by_checksum(s3, proxy, tiny_pixel_dir):
    prefix = upload_dir(s3["direct"], tiny_pixel_dir, "models/verified")
    weights = "/models/verified/unet/diffusion_pytorch_model.safetensors"
    # a corrupted download is caught and fetched again; the cache holds the true bytes
    proxy.fail(weights, ["corrupt"], method="GET")
    local = materialize_model(prefix)
    assert proxy.count(weights, "GET") == 2
    for root, _, files in os.walk(tiny_pixel_dir):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), tiny_pixel_dir)
            assert open(os.path.join(local, rel), "rb").read() == open(os.path.join(root, f), "rb").read(), rel
    # an object that never arrives intact is refused — and nothing is cached
    s3["direct"].put_object(Bucket=BUCKET, Key="models/broken/model_index.json", Body=b"{}")
    proxy.fail("/models/broken/model_index.json", ["corrupt", "corrupt"], method="GET")
    cache = os.path.dirname(local)
    before = sorted(os.listdir(cache))
    with pytest.raises(OSError, match=r"model_index\.json .* after 2 downloads"):
        materialize_model(f"s3://{BUCKET}/models/broken")
    assert [d for d in sorted(os.listdir(cache)) if not d.endswith(".lock")] == [d for d in before if not d.endswith(".lock")]


def upload_dir(direct, folder, prefix: str) -> str:
    for root, _, files in os.walk(folder):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), folder)
            with open(os.path.join(root, f), "rb") as fh:
                direct.put_object(Bucket=BUCKET, Key=f"{prefix}/{rel}", Body=fh.read())
    return f"s3://{BUCKET}/{prefix}"


# ---------------------------------------------------------------------------------------------- the pipeline on S3
FAST = {"dl": {"n_draws": 2}}
TEST = {"procedure": "split", "min_samples": 2}


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """P in a hive-partitioned layout (year=/month=), U flat; the same relative paths locally and on S3."""
    root = tmp_path_factory.mktemp("owners")
    for month, seed in (("01", 4), ("02", 5)):
        write_images(root / "p" / "year=2025" / f"month={month}", 4, seed=seed)
    write_images(root / "u", 8, seed=6)
    return root


def audit_manifest(model: str, p: str, u: str, out: str, **audit) -> dict:
    return {"models": {"m": {"uri": model, "access": "gray-box", "batch_size": 4}},
            "audits": [{"id": "same", "model": "m", "published": p, "unpublished": u, "overrides": FAST, "test": TEST}, *audit.values()],
            "output": out, "fdr": {"method": "none"}}


def comparable(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k not in ("unusable_images",)}


def test_same_audit_from_local_files_and_from_s3(s3, proxy, ray_session, tiny_pixel_dir, collection, tmp_path):
    from cdi_ray.cli import EXIT_PARTIAL
    from cdi_ray.pipeline.run import run_manifest
    from cdi_ray.spec import parse_manifest

    local = run_manifest(parse_manifest(audit_manifest(str(tiny_pixel_dir), str(collection / "p"), str(collection / "u"),
                                                      str(tmp_path / "local-out"))))
    assert local.exit_code == 0

    direct = s3["direct"]
    model = upload_dir(direct, tiny_pixel_dir, "models/m")
    upload_dir(direct, collection, "owners")
    put(direct, "owners/locked/0000.png", open(collection / "u" / "0000.png", "rb").read())
    denied_img = put(direct, "owners/extra/denied.png", open(collection / "u" / "0001.png", "rb").read())
    proxy.deny("/owners/extra/denied.png")
    proxy.deny("owners/locked/")  # the objects and the listing (prefix=owners/locked/)
    # transient faults on the way: the first reads of two images fail, then succeed
    proxy.fail("/owners/p/year=2025/month=01/0000.png", ["slowdown", "reset"], method="GET")
    proxy.fail("/owners/u/0003.png", ["500"], method="GET")
    p_uris = sorted(e.uri for e in storage.list_images(f"s3://{BUCKET}/owners/p/"))
    out = f"s3://{BUCKET}/audits/2026-11-29"
    extra = {
        # one image denied, one missing: the audit runs on the others and names both
        "partial": {"id": "partial", "model": "m", "published": p_uris + [denied_img, f"s3://{BUCKET}/owners/extra/gone.png"],
                    "unpublished": f"s3://{BUCKET}/owners/u/", "overrides": FAST, "test": TEST},
        # a prefix that cannot be listed: this audit fails, with the reason
        "locked": {"id": "locked", "model": "m", "published": f"s3://{BUCKET}/owners/p/",
                   "unpublished": f"s3://{BUCKET}/owners/locked/", "overrides": FAST, "test": TEST},
    }
    remote = run_manifest(parse_manifest(audit_manifest(model, f"s3://{BUCKET}/owners/p/", f"s3://{BUCKET}/owners/u",
                                                       out, **extra)))
    by_id = {a["audit_id"]: a for a in remote.audits}
    assert remote.exit_code == EXIT_PARTIAL
    assert proxy.count("/owners/p/year=2025/month=01/0000.png", "GET") >= 3  # the faults were met and retried
    # identical results from local files and from S3
    assert comparable(by_id["same"]) == comparable(local.audits[0])
    assert by_id["same"]["n_published"] == 8 and by_id["same"]["status"] == "done"
    # permanent errors: the image, or the audit, with a clear reason; the others finish
    reasons = {u["uri"]: u["reason"] for u in by_id["partial"]["unusable_images"]}
    assert by_id["partial"]["status"] == "done" and by_id["partial"]["n_published"] == 8
    assert reasons[denied_img].startswith("access_denied:") and "s3:GetObject" in reasons[denied_img]
    assert reasons[f"s3://{BUCKET}/owners/extra/gone.png"].startswith("missing")
    assert by_id["locked"]["status"] == "failed" and "access denied" in by_id["locked"]["error"]
    # features, results and reports were written to S3
    written = {e.uri[len(out) + 1:] for e in storage.iter_files(out + "/")}
    for name in ("results.json", "results.parquet", "images.parquet", "index.html", "audits/same.json", "audits/same.html"):
        assert name in written, name
    assert any(w.startswith("features/model=") for w in written)
    check_outputs_hold_no_secret_and_no_images(collection, out, tmp_path / "local-out")


def check_outputs_hold_no_secret_and_no_images(collection, out: str, local_out):
    """Every output object (S3 and local), and every Ray log of the session, is free of the secret key;
    the feature store holds hashes, names and numbers only; no output carries an input image's bytes."""
    import ray
    import pyarrow as pa
    import pyarrow.parquet as pq

    # the secret really is in the workers' environment (else this check could not fail)
    assert ray.get(ray.remote(lambda: os.environ.get("AWS_SECRET_ACCESS_KEY")).remote()) == SECRET
    blobs = {e.uri: storage.read_bytes(e.uri) for e in storage.iter_files(out + "/")}
    for root, _, files in os.walk(local_out):
        for f in files:
            blobs[os.path.join(root, f)] = open(os.path.join(root, f), "rb").read()
    session = ray._private.worker._global_node.get_session_dir_path()
    logs = [p for p in glob.glob(os.path.join(session, "logs", "**", "*"), recursive=True) if os.path.isfile(p)]
    assert logs
    for p in logs:
        blobs[p] = open(p, "rb").read()
    leaks = [name for name, data in blobs.items() if SECRET.encode() in data]
    assert not leaks, leaks
    images = [open(os.path.join(r, f), "rb").read() for r, _, fs in os.walk(collection) for f in fs]
    outputs = {k: v for k, v in blobs.items() if k not in logs}
    assert not [k for k, v in outputs.items() if any(img in v for img in images)]
    assert not [k for k, v in outputs.items() if k.endswith(".html") and b"data:image" in v]
    for name, data in outputs.items():
        if "/features/" in name and name.endswith(".parquet"):
            schema = pq.read_schema(pa.BufferReader(data))
            assert all(pa.types.is_string(t) or pa.types.is_floating(t) or pa.types.is_integer(t) for t in schema.types), (name, schema)
