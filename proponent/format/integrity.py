"""Integrity of an index: what the server checks before serving, and ``verify --deep``.

Every file of an index is covered by a checksum: the manifest by its own ``checksum`` field,
checkpoints, FAISS files and every ``zarr.json`` by sha256 values recorded in the manifest,
every chunk of every Zarr array by its crc32c codec, and every chunk's place by the crc32c
recorded for its position (the store's position map, hashed in the manifest: a chunk file moved,
swapped or copied in from another index keeps its own checksum but not its place's).
:func:`verify_index` checks all but the chunks' contents (it does check that every chunk exists);
``deep=True`` reads every chunk too and names each damaged or misplaced one. The server
additionally verifies every chunk it reads, position included (:func:`open_store`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from . import curvature, precond, whiten
from .fsio import IndexDir, index_dir
from .manifest import FileRecord, Manifest, ManifestError, PluginRecord, read_manifest
from .store import STORE_DIR, FeatureStore, StoreError, ckpt_group


def open_store(where: IndexDir, man: Manifest) -> FeatureStore:
    """The index's store, checking every chunk it reads against the position map the manifest records
    (indexes finished before position maps existed are checked by their chunks' own checksums only)."""
    pos = man.storage.positions
    return FeatureStore.open(where, positions=None if pos is None else (pos.path, pos.sha256))


def verify_index(
    location: str | IndexDir, *, deep: bool = False, check_hashes: bool = True, preconditioner: bool = False
) -> list[str]:
    """Problems that stop the index at ``location`` from being served (empty list: sound); with
    ``preconditioner``, also those of its stored preconditioner (which stop only preconditioned queries)."""
    where = index_dir(location)
    try:
        man = read_manifest(where)
    except ManifestError as e:
        return [str(e)]
    return verify_contents(where, man, deep=deep, check_hashes=check_hashes, preconditioner=preconditioner)


def code_problems(record: PluginRecord) -> list[str]:
    """Each file of the model's code (the plugin file, the modules it imports, ``--model-code-dir``) that is
    missing or whose sha256 differs from the one recorded when the index was built, named."""
    files = list(record.files)
    if not files and Path(record.code).is_file():  # indexes built before every file was recorded: the plugin file
        files = [FileRecord(path=record.code, sha256=record.sha256)]
    out = []
    for f in files:
        p = Path(f.path)
        if not p.is_file():
            out.append(f"model code {p}: file missing (the index was built with it)")
            continue
        sha = hashlib.sha256(p.read_bytes()).hexdigest()
        if sha != f.sha256:
            out.append(
                f"model code {p}: its sha256 {sha[:12]}… differs from the index's {f.sha256[:12]}… (the file "
                "changed since the index was built); restore it, or rebuild the index with the new code"
            )
    return out


def verify_contents(
    where: IndexDir, man: Manifest, *, deep: bool = False, check_hashes: bool = True, preconditioner: bool = False
) -> list[str]:
    problems: list[str] = []
    if man.model.plugin is not None:
        problems.extend(code_problems(man.model.plugin))
    if not man.complete:
        problems.append(f"{where}: index is incomplete (the index job did not finish; run it again to resume)")
    for c, ck in enumerate(man.checkpoints):
        if not where.is_file(ck.path):
            problems.append(f"checkpoint {c}: {where.describe(ck.path)} missing")
        elif check_hashes and where.sha256(ck.path) != ck.sha256:
            problems.append(f"checkpoint {c}: {where.describe(ck.path)} damaged (sha256 differs from the manifest)")
    for f in man.ann.files:
        if not where.is_file(f.path):
            problems.append(f"ANN index {where.describe(f.path)} missing")
        elif check_hashes and where.sha256(f.path) != f.sha256:
            problems.append(f"ANN index {where.describe(f.path)} damaged (sha256 differs from the manifest)")
    if man.complete and len(man.ann.files) != (0 if man.ann.kind == "none" else len(man.checkpoints)):
        problems.append(f"manifest lists {len(man.ann.files)} ANN files for index kind {man.ann.kind!r}")
    recorded = {f.path: f.sha256 for f in man.storage.metadata}
    for rel, sha in recorded.items():
        if not where.is_file(rel):
            problems.append(f"{where.describe(rel)} missing")
        elif check_hashes and where.sha256(rel) != sha:
            problems.append(f"{where.describe(rel)} damaged (sha256 differs from the manifest)")
    if problems and any("zarr.json" in p for p in problems):
        return problems  # the store's metadata cannot be trusted: do not open it
    try:
        store = open_store(where, man) if check_hashes else FeatureStore.open(where)
    except StoreError as e:
        return [*problems, str(e)]
    if man.complete and recorded and set(store.metadata_files()) != set(recorded):
        extra = sorted(set(store.metadata_files()) ^ set(recorded))
        problems.append(f"{where.describe(STORE_DIR)}: arrays differ from the manifest's ({', '.join(extra[:3])})")
    if (store.n, store.dim, store.n_checkpoints, store.dtype.name) != (
        man.n,
        man.dim,
        len(man.checkpoints),
        man.storage.dtype,
    ):
        problems.append(
            f"{where.describe(STORE_DIR)}: holds N={store.n}, D={store.dim}, C={store.n_checkpoints}, "
            f"{store.dtype.name}; the manifest says N={man.n}, D={man.dim}, C={len(man.checkpoints)}, "
            f"{man.storage.dtype}"
        )
        return problems
    for c in range(store.n_checkpoints):
        try:
            mask = store.done_mask(c)
        except StoreError as e:
            problems.append(str(e))
            continue
        if not mask.all():
            problems.append(f"{where.describe(STORE_DIR)}: checkpoint {c} has {int((~mask).sum())} unfinished units")
    present = set(where.walk_files(STORE_DIR))  # one listing, not one request per chunk
    for name in store.array_names():
        for idx in store.chunk_indices(name):
            key = store.chunk_key(name, idx)
            if key not in present:
                if not name.endswith("/done"):  # an absent done flag reads as "not done" (reported above)
                    problems.append(f"{where.describe(key)}: chunk missing")
            elif deep:
                problem = store.chunk_problem(name, idx)
                if problem:
                    problems.append(problem)
    if preconditioner and not problems:  # its fingerprint reads the features' chunks: only of a sound store
        problems.extend(precond.problems(where, man, store))
        problems.extend(curvature.problems(where, man, store))
    problems.extend(whiten.problems(where, man))
    return problems


def feature_arrays(n_checkpoints: int) -> list[str]:
    return [f"{ckpt_group(c)}/features" for c in range(n_checkpoints)]
