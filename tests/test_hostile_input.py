"""Hostile and careless input (issue #16): nothing hangs, nothing leaks, nothing computed is lost.

* a collection with a FIFO, a link to a device, a socket, a dangling link, a link loop, a
  directory loop and a link to a system file: each is an unusable entry with a named reason
  (never opened, never quoted), and the run finishes every audit with the verdicts a clean copy
  of the collection gets;
* reads are bounded in size and in time (a stalled S3 read fails that image only);
* a manifest of nested YAML aliases fails fast; echoed values are redacted and cut short; a value
  the results files cannot store, or a URL carrying credentials anywhere, is refused at validation;
* the output is probed before anything is computed; results are written as one set;
* P and U naming the same images says so.

The Ctrl-C case is tests/test_interrupt.py (a driver process of its own).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time

import pytest
import yaml

from cdi_ray import storage
from cdi_ray.cli import EXIT_INVALID, main
from cdi_ray.spec import ManifestError, load_manifest, parse_manifest
from _pipeline_helpers import write_images

FAST = {"dl": {"n_draws": 2}}
TEST = {"procedure": "split", "min_samples": 2}
#: entry name → the named reason it must get (and be listed under).
HOSTILE = {
    "fifo.png": "not_a_regular_file: ",        # a named pipe: open() would block until a writer appears
    "zero.png": "not_a_regular_file: ",        # → /dev/zero: a read would never end
    "sock.png": "not_a_regular_file: ",        # a UNIX socket
    "gone.png": "dangling_symlink: ",          # → a file that does not exist
    "self.png": "symlink_loop: ",              # → itself
    "sub/up": "directory_loop: ",              # → its own parent folder
    "passwd.png": "not a recognised image format: ",  # → a system file: read, refused, never quoted
    "bad-\\xff.png": "undecodable_name: ",  # a name that is not UTF-8 (no Parquet or JSON file can hold it)
}


def make_hostile(folder, good_from) -> None:
    """``folder``: copies of the images of ``good_from`` beside every hostile entry of :data:`HOSTILE`."""
    shutil.copytree(good_from, folder)
    os.mkfifo(folder / "fifo.png")
    os.symlink("/dev/zero", folder / "zero.png")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "sock.png"))
    sock.close()
    os.symlink(folder / "missing.png", folder / "gone.png")
    os.symlink(folder / "self.png", folder / "self.png")
    (folder / "sub").mkdir()
    os.symlink(folder, folder / "sub" / "up")
    target = folder.parent / "passwd"
    target.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")  # what /etc/passwd starts with
    os.symlink(target, folder / "passwd.png")
    with open(os.fsencode(folder) + b"/bad-\xff.png", "wb") as f:
        f.write((good_from / "0000.png").read_bytes())


@pytest.fixture(scope="module")
def collections(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    write_images(root / "clean", 8, seed=61)
    write_images(root / "u", 8, seed=62)
    make_hostile(root / "hostile", root / "clean")
    return root


def reasons_of(entries) -> dict[str, str]:
    return {os.path.relpath(e.uri, e.uri.split("/hostile/")[0] + "/hostile"): e.error for e in entries if e.error}


def test_listing_names_every_bad_entry_and_never_opens_it(collections):
    t0 = time.time()
    entries = storage.list_images(str(collections / "hostile"))
    assert time.time() - t0 < 5
    reasons = reasons_of(entries)
    for name, why in HOSTILE.items():
        if name != "passwd.png":
            assert reasons[name].startswith(why), (name, reasons.get(name))
    assert "a named pipe (FIFO)" in reasons["fifo.png"] and "a character device" in reasons["zero.png"]
    assert "a socket" in reasons["sock.png"]
    # every good image once (the loop is not followed), the link to a regular file listed as a file
    good = sorted(os.path.basename(e.uri) for e in entries if not e.error)
    assert good == sorted(os.listdir(collections / "clean")) + ["passwd.png"]
    # reads: never blocked on, never read from a device; a stat of a listed FIFO is a named refusal
    for name in ("fifo.png", "zero.png", "sock.png"):
        with pytest.raises(storage.NotARegularFile, match="not_a_regular_file"):
            storage.read_bytes(str(collections / "hostile" / name))
        with pytest.raises(storage.BadEntry):
            storage.stat(str(collections / "hostile" / name))
    # a list naming them: each its own unusable entry, the rest listed
    from cdi_ray.sources import list_source

    named = [str(collections / "hostile" / n) for n in ("fifo.png", "gone.png", "0000.png")]
    named.append("s3://bucket/key.png?X-Amz-Signature=0123abcd&X-Amz-Credential=AKIAX")
    got = {os.path.basename(e.uri.split("?")[0]): e for e in list_source(named)}
    assert got["fifo.png"].error.startswith("not_a_regular_file") and got["gone.png"].error.startswith("dangling")
    assert got["0000.png"].error is None and got["0000.png"].size > 0
    signed = got["key.png"]
    assert signed.error.startswith("credentials_in_uri") and "0123abcd" not in signed.uri and "AKIAX" not in signed.uri


def test_a_fifo_among_shards_is_one_unusable_entry(tmp_path):
    from cdi_ray.sources import list_source
    from cdi_ray.sources.shards import index_shard_cached

    os.mkfifo(tmp_path / "shard-000.tar")
    for pattern in ("shard-*.tar", "shard-000.tar"):  # found by a glob, or named
        (ref,) = list_source(str(tmp_path / pattern))
        index = index_shard_cached(ref, str(tmp_path / "store"), str(tmp_path / "scratch"))
        (row,) = storage.read_parquet(index.uri).to_pylist()
        assert row["error"].startswith("not_a_regular_file: ") and "a named pipe (FIFO)" in row["error"]


def test_reads_are_bounded_in_size(tmp_path, monkeypatch):
    from cdi_ray.sources.reading import read_image

    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * 5000)
    monkeypatch.setenv("CDI_RAY_MAX_IMAGE_BYTES", "4096")
    with pytest.raises(storage.TooLarge, match=r"too_large: .* 5,000 bytes, above the image limit of 4,096"):
        read_image(str(big))
    monkeypatch.setenv("CDI_RAY_MAX_IMAGE_BYTES", "5000")
    assert len(read_image(str(big))) == 5000


def test_a_stalled_read_fails_that_image_only(s3_server, tmp_path, monkeypatch):
    """An S3 read that stalls past the deadline is a ``timeout:`` reason for its image; the other
    images of the same hashing task are hashed (the stall is a real silent connection, through
    the session's fault proxy)."""
    import pyarrow as pa

    from cdi_ray.pipeline.hashing import hash_chunk
    from cdi_ray.sources.reading import read_image

    s3 = s3_server.direct
    s3.create_bucket(Bucket="hostile")
    for i in range(3):
        s3.put_object(Bucket="hostile", Key=f"img/{i}.png", Body=f"image {i}".encode())
    monkeypatch.setenv("CDI_RAY_READ_TIMEOUT", "1")
    s3_server.proxy.stall_seconds = 3
    try:
        s3_server.proxy.fail("/hostile/img/1.png", ["stall"], method="GET")
        t0 = time.time()
        with pytest.raises(TimeoutError, match=r"timeout: reading s3://hostile/img/1.png took longer than 1 s"):
            read_image("s3://hostile/img/1.png")
        assert time.time() - t0 < 2.5
        s3_server.proxy.fail("/hostile/img/1.png", ["stall"], method="GET")
        todo = tmp_path / "todo.parquet"
        storage.write_parquet(str(todo), pa.table({"uri": [f"s3://hostile/img/{i}.png" for i in range(3)],
                                                   "size": [7, 7, 7], "version": ["", "", ""]}))
        hashed, unreadable = hash_chunk(str(todo), str(tmp_path / "store"), str(tmp_path / "results"))
        assert (hashed, unreadable) == (2, 1)
        errors = storage.read_parquet(str(tmp_path / "results" / "todo.parquet")).column("error").to_pylist()
        assert errors[0] is None and errors[2] is None and errors[1].startswith("timeout: ")
    finally:
        s3_server.proxy.clear()


# ---------------------------------------------------------------------------------------------- a whole run
def audit(aid, model, p, u):
    return {"id": aid, "model": model, "published": str(p), "unpublished": str(u), "overrides": FAST, "test": TEST}


@pytest.fixture(scope="module")
def hostile_run(ray_session, tiny_pixel_dir, collections, tmp_path_factory):
    """One batch: the hostile collection, a clean copy of it, and P = U."""
    from cdi_ray.pipeline.run import run_manifest

    out = tmp_path_factory.mktemp("hostile-out")
    c = collections
    man = parse_manifest({
        "models": {"m": {"uri": str(tiny_pixel_dir), "access": "gray-box", "batch_size": 8}},
        "audits": [audit("hostile", "m", c / "hostile", c / "u"), audit("clean", "m", c / "clean", c / "u"),
                   audit("same", "m", c / "u", c / "u")],
        "output": str(out), "fdr": {"method": "none"}})
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(batch=run_manifest(man)), daemon=True)
    job.start()
    job.join(timeout=240)
    assert not job.is_alive(), "the run hung on a hostile entry"
    return out, {a["audit_id"]: a for a in json.loads((out / "results.json").read_text())["audits"]}


def test_a_run_with_hostile_entries_finishes_every_audit(hostile_run):
    _, by_id = hostile_run
    hostile, clean = by_id["hostile"], by_id["clean"]
    assert hostile["status"] == clean["status"] == "done"
    # the hostile entries change nothing about the verdict: the same images, the same test
    for key in ("verdict", "p_value", "statistic", "n_published", "n_unpublished"):
        assert hostile[key] == clean[key], key
    reasons = {u["uri"].split("/hostile/")[1]: u["reason"] for u in hostile["unusable_images"]}
    assert set(reasons) == set(HOSTILE)
    for name, why in HOSTILE.items():
        assert why in reasons[name], (name, reasons[name])
    assert not any("root:" in r or "b'" in r for r in reasons.values())  # what a file is not, never what it holds


def test_same_images_in_both_sets_says_so(hostile_run):
    _, by_id = hostile_run
    same = by_id["same"]
    assert same["status"] == "failed" and same["verdict"] == "inconclusive"
    assert same["error"].startswith("every image was in both sets: the 8 usable image(s)"), same["error"]
    assert "samples" not in same["error"]


def test_results_are_written_as_one_set(hostile_run, monkeypatch):
    """A failure while writing the results (a full disk here: the 2nd fsync fails) or while building
    them (a value the Parquet column cannot hold) leaves the previous set exactly as it was."""
    from cdi_ray.pipeline import results as results_module

    out, _ = hostile_run
    names = ("results.json", "results.parquet", "images.parquet")
    before = {n: (out / n).read_bytes() for n in names}
    old = json.loads(before["results.json"])
    batch = results_module.BatchResult(output=str(out), audits=old["audits"][:1], summary={"audits": 1}, fdr=old["fdr"],
                                       run=old["run"])
    calls = {"n": 0}
    real_fsync = os.fsync

    def full_disk(fd):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        results_module.write_results(batch)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert {n: (out / n).read_bytes() for n in names} == before
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]
    bad = results_module.BatchResult(output=str(out), audits=[{**old["audits"][0], "seed": 2**63}],
                                     summary={"audits": 1}, fdr=old["fdr"], run=old["run"])
    with pytest.raises(Exception):
        results_module.write_results(bad)
    assert {n: (out / n).read_bytes() for n in names} == before
    results_module.write_results(batch)  # and a write that succeeds replaces the whole set
    assert json.loads((out / "results.json").read_text())["summary"] == {"audits": 1}
    assert storage.read_parquet(str(out / "results.parquet")).num_rows == 1


# ---------------------------------------------------------------------------------------------- the output
def test_unwritable_output_is_refused_before_anything_runs(ray_session, tiny_pixel_dir, collections, tmp_path, capsys):
    man = tmp_path / "m.yaml"
    man.write_text(yaml.safe_dump({"models": {"m": {"uri": str(tiny_pixel_dir), "access": "gray-box"}},
                                   "audits": [audit("a", "m", collections / "clean", collections / "u")],
                                   "output": str(tmp_path / "out")}))
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a folder")
    cases = [(str(a_file), "is a file, not a folder"), (str(a_file / "below"), "lies below"),
             ("/proc/cdi-ray-out", "cannot be written")]
    for out, why in cases:
        assert main(["audit", str(man), "--out", out]) == EXIT_INVALID, out
        err = capsys.readouterr().err
        assert f"output: {out}" in err and why in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists() and not os.path.exists(str(a_file) + "/features")


# ---------------------------------------------------------------------------------------------- the manifest
def small(**audit_extra) -> dict:
    return {"models": {"m": {"uri": "s3://models/m"}},
            "audits": [{"id": "a", "model": "m", "published": "s3://b/p/", "unpublished": "s3://b/u/", **audit_extra}],
            "output": "s3://o/x"}


def test_yaml_alias_bombs_are_refused_fast(tmp_path):
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 9):  # 9^9 ≈ 387 million strings once expanded, from < 1 kB
        prev, cur = chr(96 + i), chr(97 + i)
        lines.append(f"{cur}: &{cur} [{', '.join([f'*{prev}'] * 9)}]")
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert path.stat().st_size < 1000
    t0 = time.time()
    with pytest.raises(ManifestError, match=r"YAML aliases expand this manifest to [\d,]+ values \(more than "
                                            r"1,000,000 beyond the \d+ written\)"):
        load_manifest(str(path))
    assert time.time() - t0 < 2
    path.write_text("a: &a [1, *a]\n")
    with pytest.raises(ManifestError, match="refers to a value that contains it"):
        load_manifest(str(path))
    # shared values (yaml.safe_dump writes them as anchors and aliases) are fine
    shared = {"dl": {"n_draws": 2}}
    path.write_text(yaml.safe_dump(small(overrides=shared) | {"audits": [small(overrides=shared)["audits"][0],
                                                                          {**small(overrides=shared)["audits"][0], "id": "b"}]}))
    assert "&id001" in path.read_text()
    assert [a.overrides for a in load_manifest(str(path)).audits] == [shared, shared]
    path.write_text("audits: " + "[" * 10_000 + "]" * 10_000)
    with pytest.raises(ManifestError, match="nested deeper than"):
        load_manifest(str(path))


def test_messages_cut_and_redact_echoed_values():
    data = small()
    data["models"]["m"]["access"] = "x" * 1_000_000
    with pytest.raises(ManifestError) as exc:
        parse_manifest(data)
    (line,) = exc.value.problems
    assert line.startswith("models.m.access: 'xxx") and "(1,000,002 characters)" in line and len(line) < 400
    data = small(published="https://alice:hunter2@example.com/p/")
    with pytest.raises(ManifestError) as exc:
        parse_manifest(data)
    assert "hunter2" not in str(exc.value) and "alice" not in str(exc.value) and "***@" in str(exc.value)


def test_values_the_writers_cannot_store_are_refused():
    with pytest.raises(ManifestError) as exc:
        parse_manifest(small(seed=2**63))
    assert any(p.startswith("audits[0].seed:") and "9223372036854775807" in p for p in exc.value.problems)
    assert parse_manifest(small(seed=2**63 - 1)).audits[0].seed == 2**63 - 1
    for options, where in (({"max_permutations": 10**30}, "audits[0].test.options.max_permutations"),
                           ({"max_permutations": float("inf")}, "audits[0].test.options.max_permutations")):
        with pytest.raises(ManifestError) as exc:
            parse_manifest(small(test={"options": options}))
        assert any(p.startswith(where) for p in exc.value.problems), exc.value.problems
    with pytest.raises(ManifestError, match=r"audits\[0\].published: not valid Unicode text"):
        parse_manifest(small(published="s3://b/p-\udcff/"))
    data = small()
    data["models"]["m"]["num_cpus"] = float("inf")
    with pytest.raises(ManifestError, match=r"models.m.num_cpus: inf is not a finite number"):
        parse_manifest(data)


@pytest.mark.parametrize("where, value", [
    ("model option", "https://bob:s3cr3t@registry.example.com/m"),
    ("test option", "https://bucket.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4&X-Amz-Signature=s3cr3t"),
    ("override", "https://blob.example.net/c/x?sv=2024&sig=s3cr3t"),
    ("source", "s3://b/p/?X-Amz-Security-Token=s3cr3t"),
])
def test_urls_with_credentials_anywhere_are_refused_without_echo(where, value):
    data = small()
    if where == "model option":
        data["models"]["m"]["options"] = {"mirror": value}
    elif where == "test option":
        data["audits"][0]["test"] = {"options": {"note": [value]}}
    elif where == "override":
        data["audits"][0]["overrides"] = {"dl": {"source": value}}
    else:
        data["audits"][0]["published"] = value
    with pytest.raises(ManifestError) as exc:
        parse_manifest(data)
    assert "carries credentials" in str(exc.value) and "s3cr3t" not in str(exc.value)
