import pytest


@pytest.fixture(scope="session")
def tiny_cpu_artifact(tmp_path_factory):
    """tiny compiled for the cpu target in fp32 (max context 32), signed with the run's key
    (DS4C_HOME, tests/conftest.py); shared by the signing and fuzz tests."""
    import ds4c

    path = tmp_path_factory.mktemp("tiny-cpu") / "tiny-cpu.ds4"
    ds4c.compile("tiny", target="cpu", precision="fp32", max_context=32, progress=False).save(path)
    return path
