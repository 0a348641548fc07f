"""The store's remote tier against a real S3 endpoint (moto's server process on 127.0.0.1):
push order, pull verification, corruption, a killed push, racing builders, flat memory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from conftest import wait_for

from pipeline import ROOT
from pipeline.engine.objstore import Bucket, RemoteUnavailable, parse_url
from pipeline.engine.remote import RemoteCorrupt, RemoteTier, blob_key, manifest_key, record_key
from pipeline.engine.store import Store


def new_key() -> str:
    return uuid.uuid4().hex * 2


def entry(store: Store, key: str, files: dict[str, bytes], executable: tuple[str, ...] = ()) -> str:
    """Publish an entry of `files` under `key` in `store`, as a build would; return its digest."""
    scratch = store.new_scratch(key)
    for rel, data in files.items():
        path = scratch / "out" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if rel in executable:
            path.chmod(0o755)
    (scratch / "info" / "timings.json").write_text('{"s": 1}')
    (scratch / "log.txt").write_text("stage log\n")
    digest, _ = store.publish(scratch, key, {"stage": "demo", "host": "a"})
    return digest


def put(s3_server, url: str, key: str, data: bytes) -> None:
    """Write an object behind Kiln's back (as another client, or an attacker, could)."""
    bucket, prefix = parse_url(url)
    s3_server.client().put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=data)


def tier(s3_server, url: str) -> RemoteTier:
    return RemoteTier(Bucket(url, s3_server.endpoint))


def test_push_then_pull_into_an_empty_store_gives_the_same_entry(tmp_path, s3_server, bucket_url):
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    key = new_key()
    files = {"model.bin": os.urandom(3000), "sub/run.sh": b"#!/bin/sh\necho hi\n", "same.txt": b"x", "copy.txt": b"x"}
    digest = entry(a, key, files, executable=("sub/run.sh",))
    remote = tier(s3_server, bucket_url)
    assert remote.pull(b, key) is None  # a miss: nothing pushed yet

    pushed = remote.push(a, key)
    assert (pushed.files, pushed.present) == (5, 0)  # 3 distinct output blobs (two files share one) + log + info
    again = remote.push(a, key)
    assert (again.files, again.present) == (0, 5) and again.notes == ["another builder pushed this key first (same output)"]

    got, moved = remote.pull(b, key)
    assert got == digest and b.output_of(key) == digest
    assert b.manifest(digest)["files"] == a.manifest(digest)["files"]
    for rel, data in files.items():
        assert (b.out(digest) / rel).read_bytes() == data
    assert os.access(b.out(digest) / "sub/run.sh", os.X_OK) and not os.access(b.out(digest) / "model.bin", os.X_OK)
    assert (b.action(key) / "log.txt").read_text() == "stage log\n"
    assert json.loads((b.action(key) / "info" / "timings.json").read_text()) == {"s": 1}
    record = b.record(key)
    assert record["pulled_from"] == bucket_url and record["stage"] == "demo" and record["output"] == digest
    assert not list((b.root / "scratch").iterdir())


def test_the_record_is_written_last(tmp_path, s3_server, bucket_url):
    """Pushing in steps: blobs, then the manifest, then the record; a reader sees nothing until the record."""
    a = Store(tmp_path / "a")
    key = new_key()
    digest = entry(a, key, {"w.bin": os.urandom(100)})
    remote = tier(s3_server, bucket_url)
    remote.push(a, key)
    s3 = s3_server.client()
    bucket, prefix = parse_url(bucket_url)
    times = {o["Key"].removeprefix(prefix + "/"): o["LastModified"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    record_time = times.pop(record_key(key))
    assert manifest_key(digest) in times and all(t <= record_time for t in times.values())
    # without its record, the same blobs and manifest are a miss
    s3.delete_object(Bucket=bucket, Key=f"{prefix}/{record_key(key)}")
    assert remote.pull(Store(tmp_path / "b"), key) is None


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_corrupted_blob_is_found_on_download_and_nothing_is_published(tmp_path, s3_server, bucket_url, damage):
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    key = new_key()
    data = os.urandom(50_000)
    digest = entry(a, key, {"weights.bin": data})
    remote = tier(s3_server, bucket_url)
    remote.push(a, key)
    bucket, prefix = parse_url(bucket_url)
    name = f"{prefix}/{blob_key(a.manifest(digest)['files']['weights.bin']['blake3'])}"
    s3 = s3_server.client()
    if damage == "delete":
        s3.delete_object(Bucket=bucket, Key=name)
    else:
        bad = bytes([data[0] ^ 1]) + data[1:] if damage == "flip" else data[:-10]
        s3.put_object(Bucket=bucket, Key=name, Body=bad)
    with pytest.raises(RemoteCorrupt, match="weights.bin"):
        remote.pull(b, key)
    assert b.record(key) is None and not b.has_output(digest) and not list((b.root / "scratch").iterdir())


@pytest.mark.parametrize("bad", [
    {"files": {"../escape": {"size": 1, "blake3": "blake3:" + "0" * 64, "exec": False}}},
    {"files": {"/etc/x": {"size": 1, "blake3": "blake3:" + "0" * 64, "exec": False}}},
    {"files": {"a": {"size": -1, "blake3": "blake3:" + "0" * 64, "exec": False}}},
    {"files": {"a": {"size": 1, "blake3": "md5:00", "exec": False}}},
    {"files": []},
])
def test_a_hostile_manifest_is_refused_before_anything_is_written(tmp_path, s3_server, bucket_url, bad):
    """What the bucket returns is input: paths that leave the output dir, odd sizes or hashes, or a
    manifest that does not hash to its name never reach the disk."""
    b = Store(tmp_path / "b")
    key, digest = new_key(), "ab" * 32
    remote = tier(s3_server, bucket_url)
    put(s3_server, bucket_url, record_key(key), json.dumps({"key": key, "output": digest}).encode())
    put(s3_server, bucket_url, manifest_key(digest), json.dumps({"digest": digest, **bad}).encode())
    with pytest.raises(RemoteCorrupt, match="not a file of a Kiln output|not a map|does not hash"):
        remote.pull(b, key)
    assert not (tmp_path / "escape").exists() and not list((b.root / "scratch").iterdir())


def test_a_record_under_another_key_or_not_json_is_refused(tmp_path, s3_server, bucket_url):
    remote = tier(s3_server, bucket_url)
    key, other = new_key(), new_key()
    put(s3_server, bucket_url, record_key(key), json.dumps({"key": other, "output": "ab" * 32}).encode())
    with pytest.raises(RemoteCorrupt, match="not that key's record"):
        remote.pull(Store(tmp_path / "b"), key)
    put(s3_server, bucket_url, record_key(other), b"\x00not json")
    with pytest.raises(RemoteCorrupt, match="not JSON"):
        remote.pull(Store(tmp_path / "b"), other)


PUSHER = textwrap.dedent("""\
    import sys
    from pathlib import Path
    from pipeline.engine.objstore import Bucket
    from pipeline.engine.remote import RemoteTier
    from pipeline.engine.store import Store
    store, key, url, endpoint = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    moved = RemoteTier(Bucket(url, endpoint)).push(Store(store), key)
    print(moved.files, moved.present, "|".join(moved.notes))
    """)


def push_process(store: Path, key: str, url: str, endpoint: str, host: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PUSHER, str(store), key, url, endpoint], cwd=ROOT,
                            env={**os.environ, "KILN_HOST_ID": host, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_a_push_killed_halfway_leaves_no_entry_and_the_next_push_completes(tmp_path, s3_server, bucket_url):
    a = Store(tmp_path / "a")
    key = new_key()
    files = {f"part{i}.bin": os.urandom(24 << 20) for i in range(4)}
    entry(a, key, files)
    bucket, prefix = parse_url(bucket_url)
    s3 = s3_server.client()

    def blobs() -> int:
        return s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/blobs/").get("KeyCount", 0)

    proc = push_process(a.root, key, bucket_url, s3_server.endpoint, "a")
    wait_for(lambda: blobs() >= 1 or proc.poll() is not None, 120)
    proc.kill()
    proc.wait()
    assert 1 <= blobs() < 6, "the kill came too late to test anything"
    remote = tier(s3_server, bucket_url)
    assert remote.bucket.size(record_key(key)) is None
    assert remote.pull(Store(tmp_path / "b"), key) is None  # no record: a miss, not a broken entry

    done = remote.push(a, key)
    assert done.present >= 1 and done.files + done.present == 6
    assert remote.pull(Store(tmp_path / "c"), key)[0] == a.output_of(key)


def test_two_builders_racing_one_key_leave_one_record_and_both_entries_usable(tmp_path, s3_server, bucket_url):
    """Two hosts built the same key (both missed the remote) and push at once: the server's
    create-if-absent write lets exactly one record in; the other push is told, and a third
    store pulls a consistent entry."""
    key = new_key()
    stores = [Store(tmp_path / h) for h in ("a", "b")]
    digests = {entry(s, key, {"w.bin": b"same bytes" * 1000}) for s in stores}
    procs = [push_process(s.root, key, bucket_url, s3_server.endpoint, h) for s, h in zip(stores, ("a", "b"))]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    told = [o for o in outputs if "another builder pushed this key first" in o]
    assert len(told) == 1, outputs
    got, _ = tier(s3_server, bucket_url).pull(Store(tmp_path / "c"), key)
    assert {got} == digests


def test_an_unreachable_endpoint_is_a_short_clear_error_without_secrets(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "kiln-test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "kiln-test-secret-5f0c9e")
    with pytest.raises(RemoteUnavailable) as e:
        Bucket("s3://kiln-none/p", "http://127.0.0.1:9").size("x")
    assert str(e.value) == "remote store s3://kiln-none/p: connection refused"


@pytest.mark.parametrize("url", ["s3://A/b", "s3://ab", "http://bucket/x", "s3://bucket/../x", "s3://bucket/a//b",
                                 "s3://bucket/a b", "s3://bucket/$(id)"])
def test_a_malformed_bucket_url_is_refused(url):
    from pipeline.engine.errors import KilnError

    with pytest.raises(KilnError, match="is not s3://bucket"):
        parse_url(url)


def lose_uploads(monkeypatch, land: list[bool]) -> list[str]:
    """obstore.put as a flaky server makes it: each call to it pops `land` (does the upload reach the
    bucket?) and then fails as a multipart upload whose completion reply was lost does (obstore's
    abort meets NoSuchUpload: FileNotFoundError). Returns the keys it was called with."""
    import obstore

    real, calls = obstore.put, []

    def put(store, key, data, **kwargs):
        if kwargs.get("mode") == "create" or not land:  # records and manifests, or no fault left
            return real(store, key, data, **kwargs)
        calls.append(key)
        if land.pop(0):
            real(store, key, data, **kwargs)
        raise FileNotFoundError(f"Object at location {key} not found: NoSuchUpload")

    monkeypatch.setattr(obstore, "put", put)
    return calls


def test_an_upload_whose_reply_was_lost_is_found_in_the_bucket_or_sent_again(tmp_path, s3_server, bucket_url,
                                                                             monkeypatch):
    a = Store(tmp_path / "a")
    key = new_key()
    entry(a, key, {"model.bin": os.urandom(5000)})
    lost = lose_uploads(monkeypatch, [True, False])  # 1st blob landed despite the error; 2nd did not
    pushed = tier(s3_server, bucket_url).push(a, key)
    assert (pushed.files, len(lost)) == (3, 2)       # both counted as sent; the 2nd was sent again
    got, _ = tier(s3_server, bucket_url).pull(Store(tmp_path / "b"), key)
    assert (Store(tmp_path / "b").out(got) / "model.bin").read_bytes() == (a.out(got) / "model.bin").read_bytes()


def test_an_upload_lost_twice_fails_naming_the_bucket_and_pushes_no_record(tmp_path, s3_server, bucket_url,
                                                                          monkeypatch):
    a = Store(tmp_path / "a")
    key = new_key()
    entry(a, key, {"model.bin": os.urandom(5000)})
    lose_uploads(monkeypatch, [False, False])
    with pytest.raises(RemoteUnavailable, match=rf"^remote store {bucket_url}: the multipart upload of blobs/.* was lost"):
        tier(s3_server, bucket_url).push(a, key)
    assert tier(s3_server, bucket_url).pull(Store(tmp_path / "b"), key) is None


@pytest.mark.slow
def test_a_1gb_file_goes_up_and_down_in_parts_with_flat_memory(tmp_path, s3_server, bucket_url):
    """1 GiB through multipart upload and a streamed download, in a process whose peak RSS is
    sampled: memory stays near the parts in flight (16 MiB x 2), nowhere near the file."""
    a = Store(tmp_path / "a")
    key = new_key()
    scratch = a.new_scratch(key)
    with open(scratch / "out" / "big.bin", "wb") as f:
        for _ in range(64):
            f.write(os.urandom(16 << 20))
    digest, _ = a.publish(scratch, key, {"stage": "big"})
    script = textwrap.dedent(f"""\
        import resource, sys
        from pathlib import Path
        from pipeline.engine.objstore import Bucket
        from pipeline.engine.remote import RemoteTier
        from pipeline.engine.store import Store
        remote = RemoteTier(Bucket({bucket_url!r}, {s3_server.endpoint!r}))
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        up = remote.push(Store(Path({str(a.root)!r})), {key!r})
        got, down = remote.pull(Store(Path({str(tmp_path / 'b')!r})), {key!r})
        print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, up.bytes, down.bytes, got)
        """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    base_kb, peak_kb, up, down, got = proc.stdout.split()
    assert int(up) == int(down) == 1 << 30 and got == digest
    assert int(peak_kb) - int(base_kb) < 200 * 1024, f"peak {int(peak_kb) >> 10} MB over a base of {int(base_kb) >> 10} MB"


def bucket_keys(s3_server, url: str) -> set[str]:
    bucket, prefix = parse_url(url)
    listed = s3_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"].removeprefix(prefix + "/") for o in listed}


def test_verify_remote_rereads_every_blob_and_deletes_the_records_of_bad_entries(tmp_path, s3_server, bucket_url):
    a = Store(tmp_path / "a")
    good, bad = new_key(), new_key()
    entry(a, good, {"shared.bin": b"s" * 5000, "g.bin": b"g" * 100})
    digest = entry(a, bad, {"shared.bin": b"s" * 5000, "b.bin": b"b" * 100})
    remote = tier(s3_server, bucket_url)
    remote.push(a, good)
    remote.push(a, bad)
    said: list[str] = []
    assert remote.verify(said.append) == []
    assert said[-1].endswith("; 0 record(s) deleted")

    bucket, prefix = parse_url(bucket_url)
    victim = blob_key(a.manifest(digest)["files"]["b.bin"]["blake3"])
    s3_server.client().put_object(Bucket=bucket, Key=f"{prefix}/{victim}", Body=b"B" * 100)  # same size, other bytes
    said.clear()
    assert remote.verify(said.append) == [bad]
    assert any("does not hold its bytes" in line for line in said), said
    left = bucket_keys(s3_server, bucket_url)
    assert record_key(good) in left and record_key(bad) not in left and victim not in left
    assert remote.pull(Store(tmp_path / "b"), good) is not None and remote.pull(Store(tmp_path / "c"), bad) is None


def test_gc_remote_drops_old_unneeded_records_then_what_no_record_names(tmp_path, s3_server, bucket_url):
    a = Store(tmp_path / "a")
    needed, old = new_key(), new_key()
    entry(a, needed, {"shared.bin": b"s" * 5000, "n.bin": b"n"})
    old_digest = entry(a, old, {"shared.bin": b"s" * 5000, "o.bin": b"o"})
    remote = tier(s3_server, bucket_url)
    remote.push(a, needed)
    remote.push(a, old)
    before = bucket_keys(s3_server, bucket_url)
    said: list[str] = []

    assert remote.gc({needed}, max_age_s=0, grace_s=0, dry_run=True, say=said.append) == 3
    assert bucket_keys(s3_server, bucket_url) == before  # a dry run deletes nothing
    # within the grace period only the record goes: blobs and manifest may belong to a push in flight
    assert remote.gc({needed}, max_age_s=0, grace_s=3600, dry_run=False, say=said.append) == 1
    assert remote.gc({needed}, max_age_s=0, grace_s=0, dry_run=False, say=said.append) == 2
    # the old entry's own objects went; its log, info and shared.bin blobs are the needed entry's too
    o_blob = blob_key(a.manifest(old_digest)["files"]["o.bin"]["blake3"])
    assert before - bucket_keys(s3_server, bucket_url) == {record_key(old), manifest_key(old_digest), o_blob}
    assert remote.pull(Store(tmp_path / "b"), needed) is not None
    assert remote.gc(set(), max_age_s=3600, grace_s=0, dry_run=False, say=said.append) == 0  # young records stay
