"""Rank arithmetic and validation: pure functions, no processes."""

import itertools

import pytest

from lightning_par.topology import Topology, rank_groups, tensor_axes


def test_worked_example():
    sizes = {"data": 2, "pipeline": 1, "tensor": 4}
    assert rank_groups(sizes, "tensor") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert rank_groups(sizes, "data") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    grid = {"data": 1, "pipeline": 1, "tensor_row": 2, "tensor_col": 2}
    assert rank_groups(grid, "tensor_col") == [[0, 1], [2, 3]]
    assert rank_groups(grid, "tensor_row") == [[0, 2], [1, 3]]


def _topologies(max_world: int = 64):
    for world in range(1, max_world + 1):
        for pipeline, tensor in itertools.product(range(1, world + 1), repeat=2):
            if world % (pipeline * tensor):
                continue
            data = world // (pipeline * tensor)
            for mode, depth in (("1d", 1), ("2d", 1), ("2.5d", 1), ("2.5d", 2), ("2.5d", 4), ("3d", 1)):
                try:
                    yield Topology(data, pipeline, tensor, mode, depth)
                except ValueError:
                    continue


def test_every_axis_partitions_the_world_up_to_64():
    count = 0
    for topo in _topologies():
        world = topo.world_size
        sizes = topo.axis_sizes()
        for axis in [*sizes, "tensor"]:
            groups = topo.groups(axis)
            expected = topo.tensor if axis == "tensor" else sizes[axis]
            assert all(len(g) == expected for g in groups)
            flat = sorted(r for g in groups for r in g)
            assert flat == list(range(world)), (topo, axis)
        # Tensor ranks are innermost: each tensor group is a contiguous block.
        for g in topo.groups("tensor"):
            assert g == list(range(g[0], g[0] + topo.tensor))
        # Coordinates agree with the groups: ranks of one data group differ only in their data coordinate.
        for g in topo.groups("data"):
            coords = [topo.coordinates(r) for r in g]
            assert [c["data"] for c in coords] == list(range(topo.data))
            assert all({k: v for k, v in c.items() if k != "data"} == {k: v for k, v in coords[0].items() if k != "data"} for c in coords)
        count += 1
    assert count > 500  # the sweep really covered many shapes


def test_2d_grid_rows_and_columns_intersect_once():
    topo = Topology(tensor=9, tensor_mode="2d")
    for row in topo.groups("tensor_row"):
        for col in topo.groups("tensor_col"):
            assert len(set(row) & set(col)) == 1


def test_3d_cube_axes():
    topo = Topology(data=2, tensor=8, tensor_mode="3d")
    assert topo.axis_sizes() == {"data": 2, "pipeline": 1, "tensor_x": 2, "tensor_y": 2, "tensor_z": 2}
    assert topo.groups("tensor_z")[0] == [0, 1]
    assert topo.groups("tensor_x")[0] == [0, 4]
    assert topo.groups("tensor")[1] == list(range(8, 16))


def test_wrong_world_size_says_what_fits():
    with pytest.raises(ValueError, match=r"data=2 x pipeline=1 x tensor=2 = 4 ranks, but the world size is 6.*data=3 would fit"):
        Topology(data=2, tensor=2).validate(6)
    with pytest.raises(ValueError, match=r"divisors are \[1, 2, 3, 6\]"):
        Topology(data=1, tensor=4).validate(6)
    Topology(data=3, tensor=2).validate(6)


@pytest.mark.parametrize(
    ("mode", "tensor", "depth", "message"),
    [
        ("2d", 2, 1, "square number"),
        ("2d", 8, 1, "square number"),
        ("3d", 4, 1, "cube number"),
        ("2.5d", 6, 2, "not a square"),
        ("2.5d", 8, 3, "does not divide"),
        ("4d", 4, 1, "Unknown tensor.mode"),
    ],
)
def test_bad_tensor_shapes(mode, tensor, depth, message):
    with pytest.raises(ValueError, match=message):
        Topology(tensor=tensor, tensor_mode=mode, depth=depth)


def test_bad_degrees():
    with pytest.raises(ValueError, match="positive integer"):
        Topology(data=0)
    with pytest.raises(ValueError, match="only applies"):
        Topology(tensor=4, tensor_mode="2d", depth=2)
    with pytest.raises(ValueError, match="does not divide the world size"):
        Topology.for_world(6, tensor=4)
    assert Topology.for_world(8, tensor=2) == Topology(data=4, tensor=2)


def test_tensor_axes_shapes():
    assert tensor_axes("2.5d", 8, 2) == (("tensor_depth", 2), ("tensor_row", 2), ("tensor_col", 2))
    assert tensor_axes("1d", 3) == (("tensor", 3),)
