"""Ships ``superinfer_autoload.pth`` at the root of site-packages (pyproject.toml holds the
rest of the metadata). The .pth line runs ``superinfer._autoload`` at interpreter start, which
extends SGLang's CLI with ``--schedule-policy rotasched`` and the ``--rota-*`` flags."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "superinfer_autoload.pth"


class BuildWithPth(build_py):
    def run(self) -> None:
        super().run()
        self.copy_file(os.path.join("src", PTH), os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": BuildWithPth})
