"""``mmcl.dist.world`` on one process: identity values, and the launcher's environment only when asked."""

from __future__ import annotations

import pytest

from mmcl.dist import world


def test_world_without_a_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert world() == (0, 1)  # collectives: nobody to gather from
    assert world(launcher=True) == (3, 4)  # the data loader: the launcher's place for this process
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert world(launcher=True) == (0, 1)
