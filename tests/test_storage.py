"""cdi_ray.storage: URIs, listing (local and S3, paginated), list files, atomic writes."""
from __future__ import annotations

import os

import pytest

from cdi_ray import storage


# ---------------------------------------------------------------------------------------------- local
def test_join_parent_basename():
    assert storage.join("s3://b/prefix/", "a", "/b/") == "s3://b/prefix/a/b"
    assert storage.join("/x", "y") == "/x/y"
    assert storage.parent("s3://b/p/q.png") == "s3://b/p"
    assert storage.parent("s3://b/q.png") == "s3://b"
    assert storage.basename("s3://b/p/q.png") == "q.png"
    assert storage.local_path("file:///tmp/x") == "/tmp/x"
    with pytest.raises(ValueError, match="unsupported URI scheme"):
        storage.local_path("gs://b/x")
    with pytest.raises(ValueError, match="names no bucket"):
        storage.split_s3("s3:///key")


def test_list_images_local_recursive_sorted_filtered(tmp_path):
    for rel in ["b/2.PNG", "a/1.jpg", "c.webp", "notes.txt", ".hidden.png", ".cache/x.png", "a/z.jpeg"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * 3)
    got = [os.path.relpath(e.uri, tmp_path) for e in storage.list_images(str(tmp_path))]
    assert got == ["a/1.jpg", "a/z.jpeg", "b/2.PNG", "c.webp"]
    assert all(e.size == 3 and e.version for e in storage.list_images(str(tmp_path)))
    # a single file is its own listing; a missing folder is an error
    assert [e.uri for e in storage.list_images(str(tmp_path / "c.webp"))] == [str(tmp_path / "c.webp")]
    with pytest.raises(FileNotFoundError):
        storage.list_images(str(tmp_path / "nope"))


def test_read_list_file_local(tmp_path):
    (tmp_path / "imgs").mkdir()
    lst = tmp_path / "imgs" / "list.txt"
    lst.write_text("# my images\n\n a.png \n/abs/b.png\ns3://bucket/c.png\nsub/d.png\n")
    assert storage.read_list_file(str(lst)) == [
        str(tmp_path / "imgs" / "a.png"), "/abs/b.png", "s3://bucket/c.png", str(tmp_path / "imgs" / "sub" / "d.png"),
    ]


def test_atomic_write_local_replaces_whole_and_cleans_up(tmp_path, monkeypatch):
    target = tmp_path / "deep" / "f.bin"
    storage.atomic_write_bytes(str(target), b"first")
    storage.atomic_write_bytes(str(target), b"second")
    assert target.read_bytes() == b"second"

    def crash(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk gone"):
        storage.atomic_write_bytes(str(target), b"third, never visible")
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.bin"]  # no temp file left behind


def test_list_subdirs_local(tmp_path):
    for d in ["2026-11-27", "2026-11-28", "features"]:
        (tmp_path / d).mkdir()
    (tmp_path / "file.txt").write_text("x")
    assert storage.list_subdirs(str(tmp_path)) == ["2026-11-27", "2026-11-28", "features"]
    assert storage.list_subdirs(str(tmp_path / "missing")) == []


# ---------------------------------------------------------------------------------------------- S3
@pytest.fixture(scope="module")
def s3(s3_server):
    """The session's S3 with this module's bucket."""
    s3_server.direct.create_bucket(Bucket="owners")
    s3_server.proxy.clear()
    return s3_server.env


def test_s3_round_trip_listing_and_pagination(s3, monkeypatch):
    monkeypatch.setattr(storage, "S3_PAGE_SIZE", 2)  # 7 keys → 4 pages
    for i in range(5):
        storage.atomic_write_bytes(f"s3://owners/a/pub/{i}.png", bytes([i]) * (i + 1))
    storage.atomic_write_bytes("s3://owners/a/pub/readme.txt", b"x")
    storage.atomic_write_bytes("s3://owners/a/pub/.hidden/x.png", b"x")
    listed = storage.list_images("s3://owners/a/pub/")
    assert [e.uri for e in listed] == [f"s3://owners/a/pub/{i}.png" for i in range(5)]
    assert [e.size for e in listed] == [1, 2, 3, 4, 5]
    assert all(e.version for e in listed)  # ETags
    # the prefix without its slash lists the same; a single object lists itself
    assert [e.uri for e in storage.list_images("s3://owners/a/pub")] == [e.uri for e in listed]
    assert [e.uri for e in storage.list_images("s3://owners/a/pub/3.png")] == ["s3://owners/a/pub/3.png"]
    assert storage.read_bytes("s3://owners/a/pub/2.png") == b"\x02\x02\x02"
    assert storage.exists("s3://owners/a/pub/2.png") and not storage.exists("s3://owners/a/pub/9.png")
    assert storage.stat("s3://owners/a/pub/4.png").size == 5
    with pytest.raises(FileNotFoundError):
        storage.read_bytes("s3://owners/a/pub/9.png")
    with pytest.raises(FileNotFoundError):
        storage.list_images("s3://owners/nothing-here/")
    assert storage.list_subdirs("s3://owners/a") == ["pub"]
    storage.delete("s3://owners/a/pub/readme.txt")
    assert not storage.exists("s3://owners/a/pub/readme.txt")


def test_s3_list_file_relative_entries(s3):
    storage.atomic_write_bytes("s3://owners/lists/l.txt", b"x/1.png\n# c\ns3://owners/other/2.png\n")
    assert storage.read_list_file("s3://owners/lists/l.txt") == ["s3://owners/lists/x/1.png", "s3://owners/other/2.png"]
