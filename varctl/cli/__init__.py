"""The command line: ``python -m varctl {fit,validate,test,predict} -c FILE [key=value ...]``.

``config.py`` composes and checks a run configuration, ``main.py`` parses the command, instantiates and runs.
"""

from varctl.cli.main import main, run

__all__ = ["main", "run"]
