"""The Flatland wrapper (pdl.marl.flatland): invalid settings, the interface the trainer relies on, the two percept
modes on the same fixed rule, and a Flatland training task that resumes from its stored result.

The observation and the fixed rules are shown and checked on tiny worlds in `notebooks/lib/84_marl.flatland.ipynb`."""
import numpy as np
import pytest
import torch

from pdl.core import PdlError
from pdl.marl.experiments import MarlTask, run_task
from pdl.marl.flatland import OBS_DIM, FlatlandConfig, FlatlandVec, run_rule

torch.set_num_threads(1)
SMALL = {"n_trains": 2, "width": 20, "height": 20}


@pytest.mark.parametrize("settings, message", [
    ({"n_trains": 0}, "at least one train"),
    ({"width": 12, "height": 12}, "too small"),
    ({"width": 40, "height": 9}, "too small"),
    ({"n_cities": 1}, "need at least 2"),
    ({"rails_in_city": 4}, "1 to 3 platform pairs"),
    ({"percepts": "sometimes"}, "choose one of"),
])
def test_invalid_flatland_settings(settings, message):
    with pytest.raises(PdlError, match=message) as info:
        FlatlandConfig(**settings)
    assert "hint:" in str(info.value)


def test_invalid_pool_and_actions():
    with pytest.raises(PdlError, match="at least one map"):
        FlatlandVec(FlatlandConfig(**SMALL), maps=0)
    env = FlatlandVec(FlatlandConfig(**SMALL), maps=2)
    env.reset(2, np.random.default_rng(0))
    with pytest.raises(PdlError, match="actions must have shape"):
        env.step(np.zeros((3, 2), int))


def test_interface_and_episode_end():
    env = FlatlandVec(FlatlandConfig(**SMALL, percepts="every_step"), maps=2)
    obs, mask, acting = env.reset(3, np.random.default_rng(1))
    assert obs.shape == (3, 2, OBS_DIM) and mask.shape == (3, 2, 4) and acting.shape == (3, 2)
    assert mask[..., 0].all() and env.max_steps > 0
    for _ in range(env.max_steps + 1):
        obs, mask, acting, reward, done = env.step(np.full((3, 2), 2))
        assert reward.shape == (3, 2) and not acting[done].any()
        if done.all():
            break
    assert done.all()
    assert np.array_equal(env.stats()["arrived"], env.arrived.mean(1))


def test_percept_modes_agree_on_a_rule_that_never_asks_twice():
    """The shortest-path rule acts the same wherever it is asked, so both percept modes give the same outcome; the
    switch mode asks less often."""
    a = run_rule(FlatlandVec(FlatlandConfig(**SMALL, percepts="every_step"), maps=3), np.random.default_rng(2), 4)
    b = run_rule(FlatlandVec(FlatlandConfig(**SMALL, percepts="switches"), maps=3), np.random.default_rng(2), 4)
    np.testing.assert_array_equal(a["arrived"], b["arrived"])
    assert (a["decisions"] >= b["decisions"]).all() and a["decisions"].sum() > b["decisions"].sum()


def test_flatland_task_is_resumable(tmp_path):
    task = MarlTask("flatland", "switches", 0, a2c={"updates": 2, "n_envs": 2, "checkpoint_every": 1},
                    env={**SMALL, "maps": 2}, eval_episodes=2, root=str(tmp_path))
    first = run_task(task)
    assert (tmp_path / task.key / "checkpoint.pt").exists()
    assert run_task(task) == first
    assert len(first["history"]) == 2 and len(first["eval_greedy"]["arrived"]) == 2
