"""The device mesh (ds4c/distributed/mesh.py): axes, groups, parsing, the mesh --gpus picks."""

from __future__ import annotations

import pytest

from ds4c.distributed.mesh import Mesh
from ds4c.errors import ConfigError
from ds4c.targets import get_target


def test_ranks_of_one_expert_group_are_neighbours_and_every_axis_partitions_the_ranks():
    mesh = Mesh(ep=2, tp=2)
    assert mesh.world == 4 and mesh.coords(3) == {"ep": 1, "tp": 1} and mesh.coords(1) == {"ep": 0, "tp": 1}
    assert mesh.groups("tp") == [[0, 1], [2, 3]]
    assert mesh.groups("ep") == [[0, 2], [1, 3]]
    assert mesh.groups("world") == [[0, 1, 2, 3]]
    for axis in ("ep", "tp", "world"):
        assert sorted(r for g in mesh.groups(axis) for r in g) == [0, 1, 2, 3]
    assert Mesh.from_dict(mesh.to_dict()) == mesh


def test_mesh_text_and_gpus():
    assert Mesh.parse("ep=4") == Mesh(ep=4) and Mesh.parse(" tp=2 , ep=2 ") == Mesh(ep=2, tp=2)
    dp = Mesh.parse("ep=4,attention=dp")
    assert dp == Mesh(ep=4, attention="dp") and Mesh.from_dict(dp.to_dict()) == dp and str(dp) == "ep=4,tp=1,attention=dp"
    with pytest.raises(ConfigError, match="replicated or dp"):
        Mesh.parse("ep=2,attention=tp")
    assert Mesh.for_gpus(4, experts=256) == Mesh(ep=4)
    assert Mesh.for_gpus(8, experts=384) == Mesh(ep=8)
    assert Mesh.for_gpus(6, experts=8) == Mesh(ep=2, tp=3)
    for text, message in (("ep=4,ep=2", "names ep twice"), ("ep", "axis=size"), ("", "empty"), ("tp=0", "1 or more")):
        with pytest.raises(ConfigError, match=message):
            Mesh.parse(text)
    with pytest.raises(ConfigError, match="outside"):
        Mesh(ep=2).coords(2)
    with pytest.raises(ConfigError, match="mesh.world"):
        Mesh.from_dict({"axes": {"ep": 2, "tp": 2}, "world": 2})


def test_gpu_targets_state_their_peer_links():
    assert get_target("h200").peer_link_bandwidth == get_target("h100").peer_link_bandwidth == 450e9
    assert get_target("b200").peer_link_bandwidth == 900e9
    assert get_target("cpu").peer_link_bandwidth is None
