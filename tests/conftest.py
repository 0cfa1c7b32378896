"""Session set-up shared by every test that starts DeepSpeed."""
import os
import sys

import pytest

from tests.distributed import REPO


@pytest.fixture(scope="session", autouse=True)
def deepspeed_ops_built():
    """JIT-build DeepSpeed's CPU ops once, here, before any test starts ranks.

    Otherwise the first ranks of the session build them concurrently under a test's time-out,
    and a rank killed mid-build leaves torch's build lock behind, hanging every later run.
    The environment matches tests/distributed.rank_env (same cache, the venv's ninja first),
    since torch keys its cache by the build command.
    """
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        for name in ("ShareMemCommBuilder", "FusedAdamBuilder", "CPUAdamBuilder"):
            get_accelerator().create_op_builder(name).load(verbose=False)
