#!/usr/bin/env python3
"""Pack files into a one-layer container image, as a docker-archive tarball (what
`docker save` writes and `ctr images import` reads), without docker.

Usage: mkimage.py OUT.tar NAME:TAG ENTRYPOINT_JSON ENTRY...
  ENTRY  PATH=FILE    a regular file (mode 0755) at PATH inside the image, from FILE
         PATH->TARGET a symbolic link at PATH
         PATH/        a directory (mode 0755; tmp/ gets 1777)

The output is reproducible: fixed timestamps and owners, entries in the given order.
scripts/testbed builds the real node's sandbox (pause) image and the test image with it.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import sys
import tarfile
from pathlib import Path

ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64"}


def _info(name: str, kind: bytes, mode: int, size: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.size = size
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def layer(entries: list[str]) -> bytes:
    """The layer tar of the entries."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for entry in entries:
            if "->" in entry:
                path, target = entry.split("->", 1)
                info = _info(path.strip("/"), tarfile.SYMTYPE, 0o777)
                info.linkname = target
                tar.addfile(info)
            elif "=" in entry:
                path, source = entry.split("=", 1)
                data = Path(source).read_bytes()
                tar.addfile(
                    _info(path.strip("/"), tarfile.REGTYPE, 0o755, len(data)), io.BytesIO(data)
                )
            elif entry.endswith("/"):
                name = entry.strip("/")
                tar.addfile(_info(name + "/", tarfile.DIRTYPE, 0o1777 if name == "tmp" else 0o755))
            else:
                raise SystemExit(f"mkimage: cannot tell what entry {entry!r} is")
    return buf.getvalue()


def main(argv: list[str]) -> None:
    if len(argv) < 4:
        raise SystemExit(__doc__)
    out, name, entrypoint, *entries = argv
    data = layer(entries)
    diff_id = hashlib.sha256(data).hexdigest()
    config = json.dumps(
        {
            "architecture": ARCHITECTURES.get(platform.machine(), platform.machine()),
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": {
                "Entrypoint": json.loads(entrypoint),
                "Env": ["PATH=/bin"],
                "WorkingDir": "/",
            },
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
            "history": [
                {"created": "1970-01-01T00:00:00Z", "created_by": "testbed/node/mkimage.py"}
            ],
        },
        sort_keys=True,
    ).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps(
        [{"Config": config_name, "RepoTags": [name], "Layers": [f"{diff_id}/layer.tar"]}]
    ).encode()
    tmp = Path(out + ".tmp")
    with tarfile.open(tmp, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        tar.addfile(_info(f"{diff_id}/", tarfile.DIRTYPE, 0o755))
        for path, blob in (
            (f"{diff_id}/layer.tar", data),
            (config_name, config),
            ("manifest.json", manifest),
        ):
            tar.addfile(_info(path, tarfile.REGTYPE, 0o644, len(blob)), io.BytesIO(blob))
    tmp.replace(out)


if __name__ == "__main__":
    main(sys.argv[1:])
