"""Generates the gRPC code from protos/ during every build, so no generated file is committed or edited."""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PROTOS = Path(__file__).parent / "protos"


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        from grpc_tools import protoc

        # Generated modules sit beside their .proto files, so the editable and the wheel
        # install import them from the same place: cartridge.v1.<name>_pb2.
        sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
        include = str(Path(protoc.__file__).parent / "_proto")
        args = ["protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={PROTOS}",
                f"--pyi_out={PROTOS}", f"--grpc_python_out={PROTOS}", *sources]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {sources}")
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
