"""Object-storage staging through pyarrow filesystems, exercised with file:// URIs (the same code path
as s3:// and gs://, minus the network)."""

from __future__ import annotations

import json

import pytest

from r2f_ray.storage import MANIFEST, is_uri, local_copy, publish, remote_exists, staged_output


def _artifact(root, marker="one"):
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "part-0.parquet").write_bytes(b"\x00" * 1000 + marker.encode())
    (root / MANIFEST).write_text(json.dumps({"marker": marker}))
    return root


def test_publish_then_local_copy_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("R2F_CACHE", str(tmp_path / "cache"))
    src = _artifact(tmp_path / "src")
    uri = f"file://{tmp_path}/bucket/bank"
    assert not remote_exists(uri)
    assert publish(src, uri) == 2 and remote_exists(uri)
    copy = local_copy(uri)
    assert (copy / "sub" / "part-0.parquet").read_bytes() == (src / "sub" / "part-0.parquet").read_bytes()
    assert local_copy(uri) == copy  # cached while the manifest is unchanged
    (copy / "sub" / "part-0.parquet").write_bytes(b"stale")
    publish(_artifact(tmp_path / "src2", marker="two"), uri)  # a new manifest upstream: fetched again
    assert local_copy(uri) == copy and (copy / "sub" / "part-0.parquet").read_bytes().endswith(b"two")
    assert local_copy(tmp_path / "plain") == tmp_path / "plain" and not is_uri(tmp_path)


def test_unfinished_or_missing_remote_artifacts_are_refused(tmp_path):
    (tmp_path / "bucket" / "half").mkdir(parents=True)
    (tmp_path / "bucket" / "half" / "part-0.parquet").write_bytes(b"x")  # no manifest yet: still uploading
    with pytest.raises(FileNotFoundError, match="manifest"):
        local_copy(f"file://{tmp_path}/bucket/half", tmp_path / "copy")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        local_copy(f"file://{tmp_path}/bucket/none", tmp_path / "copy")


def test_staged_output_publishes_on_success_only(tmp_path, monkeypatch):
    monkeypatch.setenv("R2F_STAGING", str(tmp_path / "staging"))
    monkeypatch.setenv("R2F_CACHE", str(tmp_path / "cache"))
    uri = f"file://{tmp_path}/bucket/pairs"
    with pytest.raises(RuntimeError):
        with staged_output(uri, append=True) as local:
            _artifact(local)
            raise RuntimeError("the stage failed")
    assert not remote_exists(uri)  # nothing published by a failed stage
    with staged_output(uri, append=True) as local:  # the rerun finds its staging folder again
        assert (local / MANIFEST).is_file()
    assert remote_exists(uri)
    with pytest.raises(FileExistsError, match="overwrite"):
        with staged_output(uri, append=False):
            pass
    with staged_output(uri, append=False, overwrite=True) as local:
        assert not local.exists() or not any(local.iterdir())  # a fresh folder for a replaced artifact
        _artifact(local, marker="new")
    assert json.loads((local_copy(uri) / MANIFEST).read_text())["marker"] == "new"
