import pytest

import ds4c


@pytest.fixture(scope="session")
def tiny_cpu(tmp_path_factory):
    """``tiny`` compiled for cpu (fp32), saved: the artifact every export test starts from."""
    art = ds4c.compile("tiny", target="cpu", max_context=64, progress=False)
    return art.save(tmp_path_factory.mktemp("export") / "tiny-cpu.ds4")
