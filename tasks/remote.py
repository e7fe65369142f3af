"""The object-store copy of a coupling round (``storage.backend: s3``), shared by couple, reflow and distill."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from rectflow.config import Params
from rectflow.layout import Layout
from rectflow.pairs import MANIFEST

__all__ = ["RemoteRound", "remote_round"]


class RemoteRound:
    """The object-store copy of round K: ``couplings/round-K/`` (shards, then ``manifest.json``).

    Picklable (an :class:`~rectflow.storage.S3Store` pickles by its settings alone), so Dask tasks
    upload their own shards. Credentials come from the environment of whichever process uploads.
    """

    def __init__(self, store: Any, round_k: int) -> None:
        self.store, self.prefix = store, f"couplings/round-{round_k}"

    def url(self) -> str:
        return str(self.store.url(self.prefix))

    def put_file(self, path: Path) -> None:
        self.store.put_file(path, f"{self.prefix}/{path.name}")

    def sync(self, round_dir: Path, names: list[str]) -> None:
        """Make the store's copy equal to the finished local round ``round_dir`` (a round made while
        storage was local, or whose upload was cut short): nothing to do if the manifests agree."""
        from rectflow.storage import ObjectNotFoundError

        local = (round_dir / MANIFEST).read_bytes()
        try:
            if self.store.read_bytes(f"{self.prefix}/{MANIFEST}") == local:
                return
        except ObjectNotFoundError:
            pass
        print(f"[couple] {round_dir.name}: uploading to {self.url()}", file=sys.stderr, flush=True)
        import json

        marker = json.loads(local) | {"complete": False}  # readers refuse the copy until it is whole
        self.store.write_bytes(f"{self.prefix}/{MANIFEST}", (json.dumps(marker, indent=2) + "\n").encode())
        for name in names:
            self.put_file(round_dir / name)
        self.put_file(round_dir / MANIFEST)


def remote_round(p: Params, layout: Layout, round_k: int, check: bool = True) -> RemoteRound | None:
    """Round ``round_k``'s copy in the object store when ``storage`` is S3 (else None; the local
    round is the only copy). ``check``: verify access now (credentials, endpoint, bucket)."""
    from rectflow.storage import S3Store, make_store
    from rectflow.storage import check as check_store

    store = make_store(p.storage, layout.root)
    if not isinstance(store, S3Store):
        return None
    if check:
        check_store(store)
    return RemoteRound(store, round_k)
