"""The `medssr` console script: `medssr --stage=... --config=...` runs launch.main."""

from __future__ import annotations

import sys

from absl import flags

from launch import main as pipeline_main


def run() -> None:
    # absl's --help lists the flags and docstring of the __main__ module; under a console
    # script that is pip's wrapper, so lend it launch.main's.
    for flag in flags.FLAGS.get_flags_for_module(pipeline_main.__name__):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    wrapper = sys.modules.get("__main__")
    if wrapper is not None and not getattr(wrapper, "__doc__", None):
        wrapper.__doc__ = pipeline_main.__doc__
    pipeline_main.run()


if __name__ == "__main__":
    run()
