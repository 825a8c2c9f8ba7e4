"""Setuptools entry point, plus ``python setup.py build_protos``.

``build_protos`` regenerates the modules in ``chronicle_conn/_proto`` (messages,
gRPC stubs and their ``.pyi`` type stubs) from the ``.proto`` files under
``protos/``. It needs the ``test`` extra (``grpcio-tools`` and ``mypy-protobuf``
are pinned there, so the output is reproducible)::

    python setup.py build_protos              # rewrite chronicle_conn/_proto
    python setup.py build_protos --out DIR    # write DIR/chronicle_conn/_proto instead
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Command, setup

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE / "protos"


def generate_protos(out_root: Path) -> list[Path]:
    """Run protoc (grpc_tools) with the mypy-protobuf plugins over protos/."""
    sources = sorted(p.relative_to(PROTO_ROOT) for p in PROTO_ROOT.rglob("*.proto"))
    if not sources:
        raise SystemExit("no .proto files under protos/")
    out_root.mkdir(parents=True, exist_ok=True)
    bindir = Path(sys.executable).parent
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        f"--plugin=protoc-gen-mypy={shutil.which('protoc-gen-mypy') or bindir / 'protoc-gen-mypy'}",
        (
            f"--plugin=protoc-gen-mypy_grpc="
            f"{shutil.which('protoc-gen-mypy_grpc') or bindir / 'protoc-gen-mypy_grpc'}"
        ),
        *(str(s) for s in sources),
    ]
    subprocess.run(command, check=True, cwd=PROTO_ROOT)
    written: list[Path] = []
    for source in sources:
        stem = out_root / source.with_suffix("")
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi"):
            path = stem.parent / (stem.name + suffix)
            if path.exists():
                written.append(path)
    return written


class BuildProtos(Command):
    description = "regenerate chronicle_conn/_proto from protos/"
    user_options = [("out=", "o", "output root (default: the repository root)")]

    def initialize_options(self) -> None:
        self.out: str | None = None

    def finalize_options(self) -> None:
        pass

    def run(self) -> None:
        for path in generate_protos(Path(self.out) if self.out else HERE):
            print(f"wrote {path}")


setup(cmdclass={"build_protos": BuildProtos})
