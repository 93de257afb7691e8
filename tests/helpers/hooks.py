"""Forward hooks that tests put on modules for the length of a block."""

from contextlib import contextmanager


@contextmanager
def removed_after(handles):
    """Runs the block, then removes every hook handle in handles, also when the block raises."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()
