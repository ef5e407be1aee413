"""The PEP 517 build backend (pyproject.toml: build-backend = "build_backend", backend-path = ["protos"]).

setuptools' own backend, with the gRPC code generated from the .proto files under protos/ first, in
every build (wheel, sdist, editable), so no generated file is committed or edited. The generated
modules sit beside their .proto files, so the editable and the wheel install import them from the
same place: cartridge.v1.<name>_pb2.
"""
from __future__ import annotations

import warnings
from pathlib import Path

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (the hooks not wrapped here)
from setuptools.command.sdist import sdist as _sdist
from setuptools.warnings import InformationOnly

PROTOS = Path(__file__).resolve().parent


def generate_protos() -> None:
    """*_pb2.py, *_pb2_grpc.py and *_pb2.pyi beside each .proto file under protos/."""
    from grpc_tools import protoc

    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    args = ["protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={PROTOS}",
            f"--pyi_out={PROTOS}", f"--grpc_python_out={PROTOS}", *sources]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {sources}")


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    generate_protos()
    return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_sdist(sdist_directory, config_settings=None):
    generate_protos()
    return _setuptools.build_sdist(sdist_directory, config_settings)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    generate_protos()
    with warnings.catch_warnings():
        # setuptools notes on every editable install whose packages are not all under one folder
        # (cartridge is mapped to protos/cartridge) that same-named folders in the working directory
        # may shadow the packages; here those folders are the packages themselves.
        warnings.filterwarnings("ignore", "Editable installation", InformationOnly)
        return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)


class Sdist(_sdist):
    """setuptools' sdist, also carrying this file (pyproject.toml: [tool.setuptools.cmdclass]): the
    sdist names it as its backend, so without it no wheel could be built from the sdist."""

    def make_release_tree(self, base_dir, files) -> None:
        super().make_release_tree(base_dir, [*files, f"{PROTOS.name}/{Path(__file__).name}"])
