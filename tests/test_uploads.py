"""The uploads a deployment keeps: per-client count and bytes, the total, expiry, refusals
deleted (the bounds themselves; tests/test_attacks.py tries them over HTTP)."""

import pytest

from ecoflap.serve.server import Busy
from ecoflap.serve.uploads import MiB, Uploads


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def saved(tmp_path, name: str, size: int = 10) -> str:
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    path = folder / "image.png"
    path.write_bytes(b"x" * size)
    return str(path)


def upload(uploads, tmp_path, client, name, size=10):
    return uploads.keep(uploads.reserve(client, size), [saved(tmp_path, name, size)])


def test_each_client_has_a_count_and_bytes_and_everyone_a_total(tmp_path):
    uploads = Uploads(per_client=3, client_mb=1, total_mb=2, minutes=30, clock=Clock())
    for i in range(3):
        upload(uploads, tmp_path, "a", f"a{i}")
    with pytest.raises(Busy, match="uploaded 3 files in the last 30 minutes \\(at most 3\\)"):
        uploads.reserve("a", 10)
    big = uploads.reserve("b", int(0.9 * MiB))
    with pytest.raises(Busy, match="at most 1 MiB per person"):
        uploads.reserve("b", int(0.2 * MiB))  # the pending upload counts before it lands
    uploads.keep(big, [saved(tmp_path, "b0")])
    uploads.keep(uploads.reserve("c", int(0.9 * MiB)), [saved(tmp_path, "c0")])
    with pytest.raises(Busy, match="space for uploads is full right now \\(2 MiB for everyone\\)"):
        uploads.reserve("d", int(0.3 * MiB))
    assert uploads.held() == {"upload_files": 5, "upload_mib": round((30 + 2 * int(0.9 * MiB)) / MiB, 3),
                              "upload_clients": 3}


def test_uploads_expire_and_their_files_go(tmp_path):
    clock = Clock()
    uploads = Uploads(per_client=2, client_mb=1, total_mb=2, minutes=30, clock=clock)
    first = upload(uploads, tmp_path, "a", "one")
    clock.now += 20 * 60
    second = upload(uploads, tmp_path, "a", "two")
    clock.now += 11 * 60
    uploads.tidy()
    assert [p.endswith("one/image.png") for p in first.paths] == [True]
    from pathlib import Path

    assert not Path(first.paths[0]).exists() and not Path(first.paths[0]).parent.exists()
    assert Path(second.paths[0]).exists()
    upload(uploads, tmp_path, "a", "three")  # the expired one no longer counts
    with pytest.raises(Busy):
        uploads.reserve("a", 10)


def test_an_upload_past_the_count_is_deleted_at_once(tmp_path):
    from pathlib import Path

    uploads = Uploads(per_client=2, client_mb=1, total_mb=2, minutes=30, clock=Clock())
    upload(uploads, tmp_path, "a", "one")
    ticket = uploads.reserve("a", 30)
    paths = [saved(tmp_path, f"many{i}") for i in range(3)]
    with pytest.raises(Busy, match="at most 2 files per person"):
        uploads.keep(ticket, paths)
    assert not any(Path(p).exists() for p in paths)
    assert uploads.held()["upload_files"] == 1


def test_the_same_file_uploaded_again_belongs_to_the_newest_upload(tmp_path):
    from pathlib import Path

    clock = Clock()
    uploads = Uploads(per_client=5, client_mb=1, total_mb=2, minutes=30, clock=clock)
    upload(uploads, tmp_path, "a", "same")
    clock.now += 25 * 60
    again = upload(uploads, tmp_path, "b", "same")
    clock.now += 6 * 60
    uploads.tidy()
    assert Path(again.paths[0]).exists()
    clock.now += 25 * 60
    uploads.tidy()
    assert not Path(again.paths[0]).exists()
