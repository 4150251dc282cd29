"""The benchmark's upstream: real and generated distributions as a static simple index.

The tree that nginx serves (and every proxy mirrors) looks like PyPI's:

    simple/index.html                     the root list (PEP 503)
    simple/<name>/index.html(.gz)         PEP 503 HTML, with PEP 658/714 attributes
    simple/<name>/index.json(.gz)         PEP 691 JSON v1.1 with PEP 700 size/upload-time
    files/<name>/<filename>               the distribution (hard link to the cache)
    files/<name>/<filename>.metadata      PEP 658 core metadata, for wheels

Real distributions are downloaded once (bench/requirements.txt, exact pins) into
bench/.cache/dists; generated ones (the 50-file and 2,000-file projects, the
10,000 page-only projects, the upload wheel) are made here with zipfile.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import html
import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename

BENCH = Path(__file__).resolve().parent
CACHE = BENCH / ".cache"
WORK = BENCH / ".work"
REQUIREMENTS = BENCH / "requirements.txt"
# The sdists listed next to their wheels, so pages carry both kinds (never installed).
SDISTS = ("idna==3.20", "click==8.5.1", "markupsafe==3.0.4", "attrs==26.1.0", "mdurl==0.1.2")
UPLOAD_TIME = "2024-01-02T03:04:05.000000Z"
TREE_VERSION = "4"  # bump when the tree layout changes, to rebuild cached trees
FIFTY = "bench-fifty"
MANY = "bench-many"
PAGE_PREFIX = "bench-page-"


@dataclass(frozen=True)
class Spec:
    """What to build: the full benchmark's set or the smoke run's tiny one."""

    label: str
    many_files: int
    distinct_pages: int
    big_file_mb: int  # generated when no real wheel of about this size is in the set
    upload_mb: int
    real: bool  # download the real requirement set from PyPI


FULL = Spec("full", many_files=2000, distinct_pages=10_000, big_file_mb=50, upload_mb=1024,
            real=True)
SMOKE = Spec("smoke", many_files=200, distinct_pages=300, big_file_mb=8, upload_mb=16,
             real=False)


@dataclass
class Dataset:
    """The built tree and the names the figures need."""

    tree: Path
    install_reqs: Path  # requirements for `uv pip install` (exact pins)
    big_project: str
    big_filename: str
    big_size: int
    upload_file: Path
    many_files: int = 0
    page_names: list[str] = field(default_factory=list)
    n_dists: int = 0
    n_files: int = 0


@dataclass
class _Dist:
    project: str
    filename: str
    path: Path
    version: str
    metadata: bytes | None


# --- generated wheels -------------------------------------------------------------


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest},{len(data)}"


def _metadata(name: str, version: str, requires: tuple[str, ...] = ()) -> bytes:
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}",
             "Summary: generated for the indexguard benchmark", "Requires-Python: >=3.8"]
    lines += [f"Requires-Dist: {r}" for r in requires]
    return ("\n".join(lines) + "\n\n").encode()


def make_wheel(dest: Path, name: str, version: str, requires: tuple[str, ...] = (),
               payload_bytes: int = 0) -> Path:
    """A valid pure-python wheel; payload_bytes of incompressible data when asked."""
    dist = name.replace("-", "_")
    path = dest / f"{dist}-{version}-py3-none-any.whl"
    info = f"{dist}-{version}.dist-info"
    files: dict[str, bytes] = {
        f"{dist}/__init__.py": f"VERSION = {version!r}\n".encode(),
        f"{info}/METADATA": _metadata(name, version, requires),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: bench\nRoot-Is-Purelib: true\n"
                         b"Tag: py3-none-any\n",
    }
    record = [f"{n},{_record_hash(d)}" for n, d in files.items()]
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for n, d in files.items():
            zf.writestr(n, d)
        if payload_bytes:
            block = os.urandom(4 * 2**20)
            hasher = hashlib.sha256()
            left = payload_bytes
            with zf.open(f"{dist}/payload.bin", "w", force_zip64=True) as fh:
                while left:
                    piece = block[: min(left, len(block))]
                    fh.write(piece)
                    hasher.update(piece)
                    left -= len(piece)
            digest = base64.urlsafe_b64encode(hasher.digest()).rstrip(b"=").decode()
            record.append(f"{dist}/payload.bin,sha256={digest},{payload_bytes}")
        record.append(f"{info}/RECORD,,")
        zf.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    tmp.replace(path)
    return path


# --- real distributions -------------------------------------------------------------


def _pins(path: Path) -> list[str]:
    lines = (ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines())
    return [ln for ln in lines if ln]


def download_real(log: list[str]) -> tuple[Path, Path]:
    """pip download the pinned set (wheels) and a few sdists, once."""
    dists, sdists = CACHE / "dists", CACHE / "sdists"
    stamp = CACHE / "dists.stamp"
    want = REQUIREMENTS.read_text() + "\n".join(SDISTS)
    if stamp.exists() and stamp.read_text() == want:
        return dists, sdists
    shutil.rmtree(dists, ignore_errors=True)
    shutil.rmtree(sdists, ignore_errors=True)
    pip = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
           "--no-deps"]
    log.append("downloading the requirement set from PyPI (once)")
    subprocess.run([*pip, "--only-binary=:all:", "--dest", str(dists), "-r",
                    str(REQUIREMENTS)], check=True)
    subprocess.run([*pip, "--no-binary=:all:", "--dest", str(sdists), *SDISTS], check=True)
    stamp.write_text(want)
    return dists, sdists


def _wheel_metadata(path: Path) -> bytes | None:
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist()
                 if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
        return zf.read(names[0]) if names else None


def _scan(directory: Path) -> list[_Dist]:
    out: list[_Dist] = []
    for path in sorted(directory.iterdir()):
        if path.name.endswith(".whl"):
            name, version, _b, _t = parse_wheel_filename(path.name)
            out.append(_Dist(name, path.name, path, str(version), _wheel_metadata(path)))
        elif path.name.endswith((".tar.gz", ".zip")):
            name, version = parse_sdist_filename(path.name)
            out.append(_Dist(name, path.name, path, str(version), None))
    return out


# --- pages ----------------------------------------------------------------------------


def _requires_python(metadata: bytes | None) -> str | None:
    if not metadata:
        return None
    for line in metadata.decode("utf-8", "replace").splitlines():
        if not line.strip():
            break
        if line.lower().startswith("requires-python:"):
            return line.split(":", 1)[1].strip() or None
    return None


def _file_entry(project: str, filename: str, sha256: str, size: int,
                metadata: bytes | None) -> dict[str, object]:
    meta: dict[str, str] | bool = (
        {"sha256": hashlib.sha256(metadata).hexdigest()} if metadata else False
    )
    entry: dict[str, object] = {
        "filename": filename, "url": f"../../files/{project}/{filename}",
        "hashes": {"sha256": sha256}, "core-metadata": meta, "dist-info-metadata": meta,
        "size": size, "upload-time": UPLOAD_TIME, "yanked": False,
    }
    rp = _requires_python(metadata)
    if rp:
        entry["requires-python"] = rp
    return entry


def _html_page(project: str, files: list[dict[str, object]]) -> bytes:
    out = ["<!DOCTYPE html>\n<html>\n<head>\n",
           '<meta name="pypi:repository-version" content="1.1">\n',
           f"<title>Links for {project}</title>\n</head>\n<body>\n<h1>Links for {project}</h1>\n"]
    for f in files:
        hashes = f["hashes"]
        assert isinstance(hashes, dict)
        attrs = [f'href="{html.escape(str(f["url"]))}#sha256={hashes["sha256"]}"']
        if "requires-python" in f:
            attrs.append(f'data-requires-python="{html.escape(str(f["requires-python"]))}"')
        meta = f["core-metadata"]
        if isinstance(meta, dict):
            value = f"sha256={meta['sha256']}"
            attrs.append(f'data-dist-info-metadata="{value}" data-core-metadata="{value}"')
        out.append(f"<a {' '.join(attrs)}>{html.escape(str(f['filename']))}</a><br />\n")
    out.append("</body>\n</html>\n")
    return "".join(out).encode()


def _write_page(tree: Path, project: str, files: list[dict[str, object]],
                versions: list[str]) -> None:
    d = tree / "simple" / project
    d.mkdir(parents=True, exist_ok=True)
    body_json = json.dumps({"meta": {"api-version": "1.1"}, "name": project, "files": files,
                            "versions": versions}).encode()
    for fname, body in (("index.json", body_json), ("index.html", _html_page(project, files))):
        (d / fname).write_bytes(body)
        (d / (fname + ".gz")).write_bytes(gzip.compress(body, 6, mtime=0))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(2**20):
            h.update(chunk)
    return h.hexdigest()


def _place(tree: Path, d: _Dist) -> dict[str, object]:
    target = tree / "files" / d.project / d.filename
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(d.path, target)
    except OSError:
        shutil.copyfile(d.path, target)
    if d.metadata is not None:
        (target.parent / (d.filename + ".metadata")).write_bytes(d.metadata)
    return _file_entry(d.project, d.filename, _sha256_file(d.path), d.path.stat().st_size,
                       d.metadata)


def _write_pages(tree: Path, dists: list[_Dist]) -> None:
    by_project: dict[str, list[_Dist]] = {}
    for d in dists:
        by_project.setdefault(d.project, []).append(d)
    for project, items in by_project.items():
        files = [_place(tree, d) for d in items]
        versions = list(dict.fromkeys(d.version for d in items))
        _write_page(tree, project, files, versions)


def _page_only_projects(tree: Path, count: int) -> list[str]:
    """Projects whose pages exist but whose (fake) files do not: for the RSS figure."""
    names = []
    for i in range(count):
        name = f"{PAGE_PREFIX}{i:05d}"
        files = []
        for v in range(3):
            fn = f"{name.replace('-', '_')}-1.{v}-py3-none-any.whl"
            sha = hashlib.sha256(f"{name}/{v}".encode()).hexdigest()
            files.append(_file_entry(name, fn, sha, 1000 + v, None))
        _write_page(tree, name, files, [f"1.{v}" for v in range(3)])
        names.append(name)
    return names


def _root(tree: Path) -> None:
    names = sorted(p.name for p in (tree / "simple").iterdir() if p.is_dir())
    links = "".join(f'<a href="{n}/">{n}</a><br />\n' for n in names)
    (tree / "simple" / "index.html").write_text(
        f"<!DOCTYPE html>\n<html><body>\n{links}</body></html>\n")
    (tree / "simple" / "index.json").write_text(json.dumps(
        {"meta": {"api-version": "1.1"}, "projects": [{"name": n} for n in names]}))


def build(spec: Spec, log: list[str]) -> Dataset:
    """Build (or reuse) the static tree for a spec."""
    base = (CACHE if spec.real else WORK) / f"tree-{spec.label}"
    tree, gen = base / "www", base / "generated"
    stamp = base / "stamp.json"
    key = json.dumps({"v": TREE_VERSION, "spec": spec.__dict__,
                      "reqs": REQUIREMENTS.read_text() if spec.real else ""})
    upload = CACHE / f"upload-{spec.upload_mb}MiB" / "bench_upload-1.0-py3-none-any.whl"
    if not upload.exists():
        upload.parent.mkdir(parents=True, exist_ok=True)
        log.append(f"generating the {spec.upload_mb} MiB upload wheel")
        make_wheel(upload.parent, "bench-upload", "1.0", payload_bytes=spec.upload_mb * 2**20)
    if not (stamp.exists() and stamp.read_text() == key):
        log.append(f"building the {spec.label} upstream tree in {base}")
        shutil.rmtree(base, ignore_errors=True)
        _build_tree(spec, tree, gen, log)
        stamp.write_text(key)
    meta = json.loads((base / "dataset.json").read_text())
    return Dataset(tree=tree, install_reqs=Path(meta["install_reqs"]),
                   big_project=meta["big_project"], big_filename=meta["big_filename"],
                   big_size=meta["big_size"], upload_file=upload, many_files=spec.many_files,
                   page_names=meta["page_names"], n_dists=meta["n_dists"],
                   n_files=meta["n_files"])


def _build_tree(spec: Spec, tree: Path, gen: Path, log: list[str]) -> None:
    gen.mkdir(parents=True)
    (tree / "simple").mkdir(parents=True)
    dists: list[_Dist] = []
    reqs = gen / "install-requirements.txt"
    if spec.real:
        wheels, sdists = download_real(log)
        dists += _scan(wheels) + _scan(sdists)
        reqs.write_text("\n".join(_pins(REQUIREMENTS)) + "\n")
    else:
        small = gen / "small"
        small.mkdir()
        chain = [f"bench-dep-{i}" for i in range(6)]
        for i, name in enumerate(chain):
            make_wheel(small, name, "1.0", tuple(f"{n}==1.0" for n in chain[i + 1:i + 3]))
        reqs.write_text(f"{chain[0]}==1.0\n")
        dists += _scan(small)
    real_big = [d for d in dists if abs(d.path.stat().st_size - spec.big_file_mb * 2**20)
                < 0.15 * spec.big_file_mb * 2**20 and d.filename.endswith(".whl")]
    if real_big:
        big = real_big[0]
    else:
        bigdir = gen / "big"
        bigdir.mkdir()
        make_wheel(bigdir, "bench-big", "1.0", payload_bytes=spec.big_file_mb * 2**20)
        big = _scan(bigdir)[0]
        dists.append(big)
    for project, count in ((FIFTY, 50), (MANY, spec.many_files)):
        d = gen / project
        d.mkdir()
        for i in range(count):
            make_wheel(d, project, f"1.{i // 100}.{i % 100}")
        dists += _scan(d)
    _write_pages(tree, dists)
    pages = _page_only_projects(tree, spec.distinct_pages)
    _root(tree)
    (tree.parent / "dataset.json").write_text(json.dumps({
        "install_reqs": str(reqs), "big_project": canonicalize_name(big.project),
        "big_filename": big.filename, "big_size": big.path.stat().st_size,
        "page_names": pages, "n_dists": len({d.project for d in dists}),
        "n_files": len(dists),
    }))
