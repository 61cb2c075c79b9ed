"""Multi-agent reinforcement learning (pdl.marl): the PettingZoo interface, invalid settings, the rules of both
environments, resuming training after an interruption (in-process and by killing a real process), the
experiment tasks.

The small examples (scripted negotiation episodes, the symmetric observations, deadlocks, the curriculum's level
choice, bootstrap and mutual-information checks) are shown and checked in `notebooks/lib/8*_marl.*.ipynb`."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from pettingzoo.test import parallel_api_test

from pdl.core import PdlError
from pdl.marl.a2c import A2CConfig, evaluate, train
from pdl.marl.experiments import MarlTask, run_task
from pdl.marl.negotiation import EOT, NegotiationConfig, NegotiationEnv, NegotiationVec, play
from pdl.marl.rail import RailConfig, RailVec, run_fixed
from pdl.train import load_checkpoint

torch.set_num_threads(1)


@pytest.mark.parametrize("communication", ["none", "tokens", "noise"])
def test_parallel_api(communication):
    parallel_api_test(NegotiationEnv(communication=communication, max_dialogue=2), num_cycles=100)


@pytest.mark.parametrize("settings, message", [
    ({"n_agents": 0}, "exactly two cars"),
    ({"n_agents": 3}, "exactly two cars"),
    ({"road_width": 1, "passage_width": 2}, "cannot be wider than the road"),
    ({"road_width": 2, "passage_width": 0}, "between 1 and road_width"),
    ({"communication": "tokens", "max_dialogue": 0}, "at least one round"),
    ({"communication": "telepathy"}, "choose one of"),
    ({"length": 3}, "at least 5 columns"),
])
def test_invalid_negotiation_settings(settings, message):
    with pytest.raises(PdlError, match=message) as info:
        NegotiationConfig(**settings)
    assert "hint:" in str(info.value)


@pytest.mark.parametrize("settings, message", [
    ({"n_trains": 0}, "at least one train"),
    ({"n_tracks": 1}, "2 or 3 parallel tracks"),
    ({"length": 2}, "at least 4 cells"),
    ({"percepts": "sometimes"}, "choose one of"),
])
def test_invalid_rail_settings(settings, message):
    with pytest.raises(PdlError, match=message):
        RailConfig(**settings)


def test_invalid_trainer_settings():
    with pytest.raises(PdlError, match="must be >= 1"):
        A2CConfig(updates=0)
    with pytest.raises(PdlError, match="actions must have shape"):
        env = NegotiationVec()
        env.reset(2, np.random.default_rng(0))
        env.step(np.zeros((3, 2), int))


def test_wide_road_without_bottleneck_lets_cars_pass():
    """With the passage as wide as a two-lane road, both cars can drive straight on different lanes."""
    env = NegotiationVec(NegotiationConfig(road_width=2, passage_width=2))
    env.reset(1, np.random.default_rng(0))
    env.step(np.array([[3, 0]]))                 # car A moves up one lane, car B waits
    for _ in range(env.cfg.length - 1):
        env.step(np.array([[1, 1]]))
    env.step(np.array([[4, 0]]))                 # car A back down onto its goal
    assert env.success[0] and not env.collided[0]


def test_dialogue_limit_ends_the_talk():
    env = NegotiationVec(NegotiationConfig(communication="tokens", max_dialogue=2))
    env.reset(1, np.random.default_rng(0))
    env.step(np.array([[5, 6]]))
    _, mask, _, _, _ = env.step(np.array([[7, 8]]))
    assert not env.talking[0] and mask[0, 0, :5].all() and not mask[0, 0, 5:].any()
    result = play(env, ("detour", "straight"), tokens=[(EOT, 1)])
    assert result["success"] and result["dialogue_length"] == 2


def test_rail_every_step_and_switches_agree_on_forward_rule():
    """Moving forward everywhere is the same rule in both percept modes, so the outcomes are identical."""
    a = run_fixed(RailVec(RailConfig(percepts="every_step")), np.random.default_rng(3), 50)
    b = run_fixed(RailVec(RailConfig(percepts="switches")), np.random.default_rng(3), 50)
    np.testing.assert_array_equal(a["arrived"], b["arrived"])
    assert (a["decisions"] >= b["decisions"]).all()


def test_resume_after_interruption(tmp_path):
    env = NegotiationVec(NegotiationConfig(communication="tokens", max_dialogue=2))
    cfg = A2CConfig(updates=5, n_envs=8, checkpoint_every=2)
    full, hist_full = train(lambda h: env, cfg, tmp_path / "full")
    train(lambda h: env, cfg, tmp_path / "cut", stop_after=3)
    assert len(load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["extra"]["history"]) == 2
    resumed, hist = train(lambda h: env, cfg, tmp_path / "cut")
    assert hist == hist_full
    for x, y in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(x, y)
    # a finished run returns at once with the same result
    again, hist_again = train(lambda h: env, cfg, tmp_path / "cut")
    assert hist_again == hist_full


KILL_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    from pdl.marl.a2c import A2CConfig, train
    from pdl.marl.negotiation import NegotiationConfig, NegotiationVec
    env = NegotiationVec(NegotiationConfig(communication="tokens", max_dialogue=2))
    cfg = A2CConfig(updates=int(sys.argv[2]), n_envs=8, checkpoint_every=1)
    def slow(history):
        time.sleep(float(sys.argv[3]))
        return env
    policy, history = train(slow, cfg, sys.argv[1])
    print("updates", len(history))
""")


@pytest.mark.slow
def test_kill_and_rerun_resumes_from_last_checkpoint(tmp_path):
    """SIGKILL a training process midway; the rerun starts from the last checkpoint, not from scratch, and ends
    with the weights of an uninterrupted run."""
    script = tmp_path / "train.py"
    script.write_text(KILL_SCRIPT)
    work = tmp_path / "work"
    env = {**os.environ, "PDL_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, str(script), str(work), "40", "0.1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpt = work / "checkpoint.pt"
    deadline = time.time() + 120
    while time.time() < deadline:
        if ckpt.exists() and len(load_checkpoint(ckpt)["extra"]["history"]) >= 3:
            break
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(load_checkpoint(ckpt)["extra"]["history"])
    assert 3 <= done_before < 40
    rerun = subprocess.run([sys.executable, str(script), str(work), "40", "0"], env=env, capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming work from update {done_before}" in rerun.stderr
    assert "updates 40" in rerun.stdout
    env_ = NegotiationVec(NegotiationConfig(communication="tokens", max_dialogue=2))
    reference, _ = train(lambda h: env_, A2CConfig(updates=40, n_envs=8, checkpoint_every=1), tmp_path / "ref")
    resumed = load_checkpoint(ckpt)["state_dict"]
    for name, value in reference.state_dict().items():
        assert torch.equal(value, resumed[name])


def test_tasks_are_resumable_and_keyed(tmp_path):
    task = MarlTask("rail", "every_step", 0, a2c={"updates": 2, "n_envs": 4}, eval_episodes=5, root=str(tmp_path))
    first = run_task(task)
    assert (tmp_path / task.key / "checkpoint.pt").exists()
    assert run_task(task) == first                      # finished: read back, same evaluation
    assert len(first["eval"]["arrived"]) == 5 and len(first["eval_greedy"]["arrived"]) == 5


def test_evaluate_rejects_no_episodes():
    env = NegotiationVec()
    policy, _ = train(lambda h: env, A2CConfig(updates=1, n_envs=4))
    with pytest.raises(PdlError, match="at least one evaluation episode"):
        evaluate(env, policy, 0)
