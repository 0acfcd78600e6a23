"""Stand-in for ``torchvision`` (PyPI's build does not load beside the CPU build of torch).

Only the modules and names that sglang and transformers import at start-up; every function
raises NotImplementedError. The version marks it as a stand-in (transformers parses it).
See tests/sglang_standins/README.md.
"""

__version__ = "0.0.0+standin"


def _unavailable(name: str):
    def fn(*args, **kwargs):
        raise NotImplementedError(f"torchvision.{name} is a stand-in: torchvision is not installed")

    fn.__name__ = fn.__qualname__ = name.rsplit(".", 1)[-1]
    return fn
