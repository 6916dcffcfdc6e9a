import os
import sys

import pytest

# Spawned ranks unpickle test functions by module name: make `tests.*` and `helpers` importable in them too.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _no_process_group_or_environment_left_behind():
    """Lightning leaves a one-process group (its store listening on MASTER_PORT) and MASTER_PORT, WORLD_SIZE, ... in
    os.environ after an in-process fit. A later test that starts `lightning-par fit` in a subprocess inherited them:
    its ranks met at the old port, where this process's store answered, and hung until the test's timeout (seen for
    the zero1-3 recipes when in-process zero tests ran before them). Every test starts from the environment the
    session started with."""
    environ = dict(os.environ)
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if os.environ != environ:
        os.environ.clear()
        os.environ.update(environ)
